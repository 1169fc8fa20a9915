//! Fair scheduling inside a worker, by tokens. Partitioning by user keeps each user's order but
//! puts many users behind one heavy user's burst on a shared partition, and one request can be
//! 20 tokens or 20,000. The worker therefore reads ahead into this buffer and starts jobs by
//! deficit round robin (DRR) over users with buffered work: a user's turn adds `quantum ×
//! weight` tokens (its tier's weight) to its deficit, and it starts jobs while the deficit
//! covers the next job's tokens. A job's tokens are its estimate (`sluice_schemas::cost`: the
//! prompt and the answer's cap) scaled by what the user's recent jobs really used of theirs, and
//! when a job ends its user's deficit is settled against the model's reported usage, so shares
//! track real tokens. Why the scale: an answer's cap is often ten times the answer, and a
//! charge that is mostly given back later lets credit bank up and a user hold the turn. Each
//! user is also capped at `per_user` running jobs; offsets still advance only contiguously.

use crate::job::{Ran, Record};
use sluice_common::tiers::Tiers;
use sluice_schemas::{DecodeError, RequestEvent, TokenEstimate};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

/// A record waiting for its turn, decoded once to know its cost.
pub(crate) struct Queued {
    pub record: Record,
    pub request: Result<RequestEvent, DecodeError>,
    pub estimate: TokenEstimate,
    /// The user's tier's weight, as this job says it.
    pub weight: f64,
    /// What the fair queue charged the user when it started the job.
    pub charged: f64,
    /// Its number in the order of arrival in its queue.
    arrival: u64,
}

impl Queued {
    pub(crate) fn new(record: Record, tiers: &Tiers, default_max_tokens: u64) -> Self {
        let request = RequestEvent::decode(record.payload());
        let (estimate, weight) = match &request {
            Ok(request) => (
                request.estimate_tokens(default_max_tokens),
                tiers
                    .get(request.tier.as_ref().map(|tier| tier.as_str()))
                    .1
                    .weight,
            ),
            // Dead-lettered at once: it costs one token.
            Err(_) => (TokenEstimate::default(), 1.0),
        };
        Self {
            record,
            request,
            estimate,
            weight,
            charged: 0.0,
            arrival: 0,
        }
    }
}

/// How fast a user's ratio of used to estimated tokens follows its latest jobs.
const RATIO_WEIGHT: f64 = 0.2;

fn user_of(record: &Record) -> &[u8] {
    record.key.as_deref().unwrap_or_default()
}

fn size_of(record: &Record) -> usize {
    record.payload.as_ref().map_or(0, Vec::len) + record.key.as_ref().map_or(0, Vec::len)
}

struct User {
    jobs: VecDeque<Queued>,
    /// Tokens the user may still start in this turn; negative after a job used more than
    /// it was charged.
    deficit: f64,
    weight: f64,
    running: usize,
    /// Whether its current turn has had its quantum.
    in_turn: bool,
    /// The tokens its recent jobs used per token of their estimates (moving average).
    used_per_estimated: f64,
}

impl Default for User {
    fn default() -> Self {
        Self {
            jobs: VecDeque::new(),
            deficit: 0.0,
            weight: 1.0,
            running: 0,
            in_turn: false,
            used_per_estimated: 1.0,
        }
    }
}

impl User {
    /// What starting its next job costs: the estimate, scaled by what its jobs really use.
    fn next_cost(&self) -> f64 {
        let estimate = self.jobs.front().expect("a user in turn has jobs").estimate;
        (estimate.total() as f64 * self.used_per_estimated).max(1.0)
    }
}

pub(crate) struct FairQueue {
    users: HashMap<Vec<u8>, User>,
    /// Users with buffered jobs, in turn order; the front one is having its turn.
    turns: VecDeque<Vec<u8>>,
    per_user: usize,
    quantum: f64,
    buffered: usize,
    buffered_bytes: usize,
    /// When each buffered job arrived, by arrival number: the oldest one's wait ages a lane.
    arrivals: BTreeMap<u64, Instant>,
    next_arrival: u64,
}

impl FairQueue {
    pub(crate) fn new(per_user: usize, quantum_tokens: u64) -> Self {
        Self {
            users: HashMap::new(),
            turns: VecDeque::new(),
            per_user: per_user.max(1),
            quantum: quantum_tokens.max(1) as f64,
            buffered: 0,
            buffered_bytes: 0,
            arrivals: BTreeMap::new(),
            next_arrival: 0,
        }
    }

    pub(crate) fn push(&mut self, mut queued: Queued) {
        queued.arrival = self.next_arrival;
        self.next_arrival += 1;
        self.arrivals.insert(queued.arrival, Instant::now());
        self.buffered += 1;
        self.buffered_bytes += size_of(&queued.record);
        let key = user_of(&queued.record).to_vec();
        let user = self.users.entry(key.clone()).or_default();
        user.weight = queued.weight;
        if user.jobs.is_empty() {
            self.turns.push_back(key);
        }
        user.jobs.push_back(queued);
    }

    /// The next job to start, or `None` if every buffered user is at its cap.
    pub(crate) fn pop(&mut self) -> Option<Queued> {
        loop {
            let mut eligible = false;
            for _ in 0..self.turns.len() {
                let key = self.turns.front()?;
                let user = self.users.get_mut(key).expect("a user in turn has jobs");
                if user.running >= self.per_user {
                    user.in_turn = false;
                    self.turns.rotate_left(1);
                    continue;
                }
                eligible = true;
                if !user.in_turn {
                    user.deficit += self.quantum * user.weight;
                    user.in_turn = true;
                }
                if user.deficit >= user.next_cost() {
                    return Some(self.start_front());
                }
                user.in_turn = false;
                self.turns.rotate_left(1);
            }
            if !eligible {
                return None;
            }
            self.skip_empty_rounds();
        }
    }

    /// A whole round passed in which no user could afford its next job: adds at once what
    /// the rounds until the first one can would have added (so a quantum far below the jobs'
    /// sizes costs no time).
    fn skip_empty_rounds(&mut self) {
        let per_user = self.per_user;
        let quantum = self.quantum;
        let eligible = || {
            self.turns
                .iter()
                .map(|key| &self.users[key])
                .filter(|user| user.running < per_user)
        };
        let rounds = eligible()
            .map(|user| {
                let short = user.next_cost() - user.deficit;
                (short / (quantum * user.weight)).ceil() - 1.0
            })
            .fold(f64::INFINITY, f64::min)
            .max(0.0);
        for key in &self.turns {
            let user = self.users.get_mut(key).expect("a user in turn has jobs");
            if user.running < per_user {
                user.deficit += rounds * quantum * user.weight;
            }
        }
    }

    /// Starts the front user's next job; the user keeps its turn while its deficit lasts.
    fn start_front(&mut self) -> Queued {
        let key = self.turns.front().expect("a user has the turn").clone();
        let user = self.users.get_mut(&key).expect("a user in turn has jobs");
        let cost = user.next_cost();
        let mut queued = user.jobs.pop_front().expect("a user in turn has jobs");
        queued.charged = cost;
        user.deficit -= cost;
        user.running += 1;
        if user.jobs.is_empty() {
            // Out of the rotation: unused credit goes (as DRR has it), a debt stays while its
            // jobs run.
            user.deficit = user.deficit.min(0.0);
            user.in_turn = false;
            self.turns.pop_front();
        }
        self.buffered -= 1;
        self.buffered_bytes -= size_of(&queued.record);
        self.arrivals.remove(&queued.arrival);
        queued
    }

    /// A started job of `user` ended: its slot is free, its deficit is settled by the
    /// difference between the tokens it used and those it was charged (credit never past one
    /// turn's quantum: DRR's bound), and the user's ratio of used to estimated tokens learns
    /// from it.
    pub(crate) fn finished(
        &mut self,
        user: &[u8],
        estimate: TokenEstimate,
        charged: f64,
        ran: &Ran,
    ) {
        let Some(state) = self.users.get_mut(user) else {
            return;
        };
        state.running = state.running.saturating_sub(1);
        let used = estimate.settle(ran.output.as_ref()) as f64;
        state.deficit = (state.deficit + charged - used).min(self.quantum * state.weight);
        if ran.output.is_some() && estimate.total() > 0 {
            let ratio = used / estimate.total() as f64;
            state.used_per_estimated =
                (1.0 - RATIO_WEIGHT) * state.used_per_estimated + RATIO_WEIGHT * ratio;
        }
        if state.jobs.is_empty() && state.running == 0 {
            self.users.remove(user);
        }
    }

    /// Drops buffered records that `keep` rejects (those of revoked partitions).
    pub(crate) fn retain(&mut self, keep: impl Fn(&Record) -> bool) {
        for user in self.users.values_mut() {
            user.jobs.retain(|queued| {
                let kept = keep(&queued.record);
                if !kept {
                    self.buffered -= 1;
                    self.buffered_bytes -= size_of(&queued.record);
                    self.arrivals.remove(&queued.arrival);
                }
                kept
            });
        }
        let users = &self.users;
        self.turns.retain(|key| !users[key].jobs.is_empty());
        self.users
            .retain(|_, user| !user.jobs.is_empty() || user.running > 0);
    }

    /// How long the job that arrived first of those buffered has waited.
    pub(crate) fn oldest_wait(&self, now: Instant) -> Option<std::time::Duration> {
        let (_, arrived) = self.arrivals.first_key_value()?;
        Some(now.saturating_duration_since(*arrived))
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buffered
    }

    pub(crate) fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Outcome;
    use sluice_schemas::{JobStatus, Output, Usage};

    fn tiers() -> Tiers {
        Tiers::parse(
            r#"{"default": {"rate_per_sec": 1, "burst": 1},
                "pro": {"rate_per_sec": 1, "burst": 1, "weight": 2}}"#,
        )
        .unwrap()
    }

    /// A chat job of `user` whose prompt is `words` words and whose answer is capped at
    /// `max_tokens`.
    fn job(user: &str, offset: i64, words: usize, max_tokens: u64, tier: Option<&str>) -> Queued {
        let mut event = serde_json::json!({
            "schema_version": 1,
            "job_id": sluice_schemas::JobId::default(),
            "user_id": user,
            "model": "m",
            "messages": [{"role": "user", "content": "word ".repeat(words)}],
            "params": {"max_tokens": max_tokens},
            "submitted_at": "2026-01-01T00:00:00Z",
            "deadline": "2026-01-01T00:01:00Z",
        });
        if let Some(tier) = tier {
            event["tier"] = tier.into();
        }
        let record = Record {
            trace: Default::default(),
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(user.as_bytes().to_vec()),
            payload: Some(event.to_string().into_bytes()),
            timestamp_ms: None,
        };
        Queued::new(record, &tiers(), 512)
    }

    fn user(queued: &Queued) -> String {
        String::from_utf8(queued.record.key.clone().unwrap()).unwrap()
    }

    fn answered(tokens: u64) -> Ran {
        Ran {
            outcome: Outcome::Finished(JobStatus::Succeeded),
            output: Some(Output {
                usage: Some(Usage {
                    prompt_tokens: tokens,
                    completion_tokens: 0,
                    total_tokens: tokens,
                }),
                ..Output::default()
            }),
        }
    }

    /// Starts and at once finishes `count` jobs (each using what it was estimated at, or
    /// `used` of it), returning the tokens each user was given.
    fn tokens_served(
        queue: &mut FairQueue,
        count: usize,
        used: impl Fn(&Queued) -> u64,
    ) -> HashMap<String, u64> {
        let mut served = HashMap::new();
        for _ in 0..count {
            let queued = queue.pop().expect("a job to start");
            let tokens = used(&queued);
            *served.entry(user(&queued)).or_default() += tokens;
            queue.finished(
                queued.record.key.as_deref().unwrap(),
                queued.estimate,
                queued.charged,
                &answered(tokens),
            );
        }
        served
    }

    #[test]
    fn users_share_by_tokens_not_by_jobs() {
        let mut queue = FairQueue::new(8, 256);
        for offset in 0..2000 {
            // ~1,010 tokens a job against ~110.
            queue.push(job("long", offset, 1000, 10, None));
            queue.push(job("short", offset, 100, 10, None));
        }
        let served = tokens_served(&mut queue, 1000, |queued| queued.estimate.total());
        let ratio = served["long"] as f64 / served["short"] as f64;
        assert!((0.9..1.1).contains(&ratio), "{served:?}");
    }

    #[test]
    fn a_tier_of_weight_two_gets_twice_the_tokens() {
        let mut queue = FairQueue::new(8, 256);
        for offset in 0..2000 {
            queue.push(job("pro", offset, 100, 10, Some("pro")));
            queue.push(job("free", offset, 100, 10, None));
        }
        let served = tokens_served(&mut queue, 900, |queued| queued.estimate.total());
        let ratio = served["pro"] as f64 / served["free"] as f64;
        assert!((1.9..2.1).contains(&ratio), "{served:?}");
    }

    #[test]
    fn a_job_that_used_more_than_estimated_is_charged_after_it_ends() {
        let mut queue = FairQueue::new(8, 256);
        for offset in 0..2000 {
            // Both estimated alike (a 100-token cap); "verbose" answers 10 times as long.
            queue.push(job("verbose", offset, 10, 100, None));
            queue.push(job("terse", offset, 10, 100, None));
        }
        let served = tokens_served(&mut queue, 1000, |queued| match user(queued).as_str() {
            "verbose" => 1000,
            _ => 100,
        });
        let ratio = served["verbose"] as f64 / served["terse"] as f64;
        assert!((0.85..1.15).contains(&ratio), "{served:?}");
    }

    #[test]
    fn shares_hold_when_answers_are_far_below_their_cap_and_end_after_others_start() {
        // A window of 4: each start waits for the oldest running job to end. Every job is
        // estimated at its 512-token cap and uses 41 tokens.
        let mut queue = FairQueue::new(4, 1024);
        for offset in 0..3000 {
            queue.push(job("pro", offset, 20, 512, Some("pro")));
            queue.push(job("free", offset, 20, 512, None));
        }
        let mut running = VecDeque::new();
        let mut served: HashMap<String, u64> = HashMap::new();
        for _ in 0..3000 {
            if running.len() == 4 {
                let done: Queued = running.pop_front().unwrap();
                *served.entry(user(&done)).or_default() += 41;
                let key = done.record.key.clone().unwrap();
                queue.finished(&key, done.estimate, done.charged, &answered(41));
            }
            running.push_back(queue.pop().expect("a job to start"));
        }
        let ratio = served["pro"] as f64 / served["free"] as f64;
        assert!((1.8..2.2).contains(&ratio), "{served:?}");
    }

    #[test]
    fn a_light_user_is_not_stuck_behind_a_burst_and_caps_hold() {
        let mut queue = FairQueue::new(2, 256);
        for offset in 0..100 {
            queue.push(job("heavy", offset, 10, 10, None));
        }
        queue.push(job("light", 100, 10, 10, None));
        let started: Vec<(String, i64)> = (0..3)
            .map_while(|_| queue.pop())
            .map(|queued| (user(&queued), queued.record.offset))
            .collect();
        assert_eq!(
            started,
            [
                ("heavy".into(), 0),
                ("heavy".into(), 1),
                ("light".into(), 100)
            ]
        );
        assert!(queue.pop().is_none(), "heavy is at its cap of 2");
        assert_eq!(queue.buffered(), 98);
    }

    #[test]
    fn order_within_a_user_is_kept_and_revoked_records_are_dropped() {
        let mut queue = FairQueue::new(1, 256);
        for offset in 0..3 {
            queue.push(job("a", offset, 10, 10, None));
        }
        let mut other = job("b", 9, 10, 10, None);
        other.record.partition = 5;
        queue.push(other);
        queue.retain(|record| record.partition != 5);
        let first = queue.pop().unwrap();
        assert!(queue.pop().is_none());
        queue.finished(b"a", first.estimate, first.charged, &answered(10));
        assert_eq!(queue.pop().unwrap().record.offset, 1);
        assert_eq!(queue.buffered(), 1);
    }
}
