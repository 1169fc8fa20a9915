//! An adaptive concurrency limit toward one backend (TCP Vegas' idea, as in Netflix's
//! concurrency-limits): the worker learns the backend's capacity instead of trusting a number.
//!
//! With `min_rtt` the fastest answer seen lately and `rtt` a short average, the calls waiting
//! inside the backend are about `limit * (1 - min_rtt / rtt)` (for a streamed answer, the time
//! to its first token: a backend's queue delays that, and the rest is the answer's length).
//! Below `ALPHA` the limit grows by
//! `1 / limit` per answer (about one per round trip), above `BETA` it shrinks as fast, and an
//! overload answer (429, 503, timeouts, refused connections) cuts it by a fifth at once.
//!
//! It starts in slow start, as TCP does: until the first sign of queueing (above `BETA`, or an
//! overload answer) it grows by one per answer, doubling each round trip, and on leaving it
//! drops the calls it saw queued; a whole round trip of answers that found the limit reached and
//! no queue starts it again. Why: growing by one per round trip is slow when a round trip
//! is a whole streamed answer. From 8, a backend answering in 470 ms (21 tokens of 20 ms) needed
//! about 30 s to reach the 75 calls that 160 jobs a second keep open, and jobs waited for slots
//! until their deadlines passed (measured: first token p50 6.5 s at 160 streamed jobs/s).
//!
//! The lanes go on inside the limit: a job started by the lanes may still wait here for a slot,
//! and while interactive jobs wait, a batch job takes only every `BATCH_EVERY`th slot freed (so
//! batch work waits behind interactive work at the backend too, but never starves).

use sluice_schemas::Priority;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

/// Calls allowed to wait inside the backend before the limit stops growing, and shrinks: at
/// least these many, and at least these shares of the limit. Why the shares: at 8 calls three
/// waiting is a backend 60% slower than its best, at 100 calls it is 3% slower, which the jitter
/// of a busy machine gives without any queue. Past 30 calls the limit grows while answers are
/// within 11% of the fastest and shrinks once they are 50% slower (the tolerance of Netflix's
/// Gradient2 limit). Measured on the bench stack, 317 streamed jobs/s (a backend of unlimited
/// capacity, first tokens 50 ms, the machine's two cores saturated): with the absolute
/// thresholds alone the limit fell to 41 and first tokens waited 16.9 s (p50); shrinking at 25%
/// slower, 129 and 1.3 s; at 50% slower, 174 and 296 ms. The price: a backend at capacity may
/// hold up to a third of the limit queued inside it.
const ALPHA: f64 = 1.0;
const BETA: f64 = 3.0;
const ALPHA_SHARE: f64 = 0.1;
const BETA_SHARE: f64 = 1.0 / 3.0;
/// While interactive calls wait, one slot in this many goes to a waiting batch call.
const BATCH_EVERY: u32 = 10;
/// Answers after which `min_rtt` is forgotten and learned again, so a backend that got slower
/// for good is not held to an old best.
const MIN_RTT_WINDOW: u32 = 2_000;

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    /// Latencies of whole answers, and of streamed answers' first tokens: two scales (a
    /// streamed answer's length says nothing about the backend's queue, its first token does).
    whole: Latency,
    first_token: Latency,
    /// No queueing seen yet: the limit doubles each round trip.
    slow_start: bool,
    /// Answers in a row that found the limit reached and no queue at the backend: a whole
    /// round trip of them (as many as the limit) starts slow start again.
    clear: u32,
    /// Calls waiting for a slot, interactive and batch.
    interactive_waiting: usize,
    batch_waiting: usize,
    /// Slots given to interactive calls since the last one given to a batch call.
    since_batch: u32,
}

/// One kind of latency toward the backend: the fastest seen lately and a short average.
#[derive(Debug, Default)]
struct Latency {
    min: Option<Duration>,
    smoothed: Option<Duration>,
    samples: u32,
}

impl Latency {
    /// Takes `rtt` in; the calls `limit` implies are waiting inside the backend.
    fn queued(&mut self, rtt: Duration, limit: f64) -> f64 {
        let smoothed = self
            .smoothed
            .map_or(rtt, |average| average.mul_f64(0.8) + rtt.mul_f64(0.2));
        self.smoothed = Some(smoothed);
        self.samples += 1;
        if self.samples >= MIN_RTT_WINDOW {
            self.samples = 0;
            self.min = None;
        }
        let min = self.min.map_or(rtt, |min| min.min(rtt));
        self.min = Some(min);
        limit * (1.0 - min.as_secs_f64() / smoothed.as_secs_f64().max(1e-9))
    }
}

#[derive(Debug)]
pub struct AdaptiveLimit {
    state: Mutex<State>,
    freed: Notify,
    min: f64,
    max: f64,
    adaptive: bool,
}

/// A slot toward the backend; report how the call went with `release`.
#[derive(Debug)]
pub struct Permit<'a> {
    limit: &'a AdaptiveLimit,
    /// Calls in flight, this one included, and the limit, when it started.
    in_flight_at_start: usize,
    limit_at_start: f64,
    released: bool,
    /// The call's first token was counted as it came (`first_token`): its release teaches the
    /// limit no latency again.
    learned: bool,
}

/// How a call went, for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Answered (well or with a client error) after this long.
    Answered(Duration),
    /// A streamed answer's first token came after this long (its length is the answer's, not
    /// the backend's).
    FirstToken(Duration),
    /// The backend is overloaded or unreachable.
    Overloaded,
    /// Says nothing about the backend (the job's deadline cut the call, it was cancelled).
    Ignored,
}

impl AdaptiveLimit {
    /// `adaptive == false` keeps the limit at `max`.
    pub fn new(initial: usize, min: usize, max: usize, adaptive: bool) -> Self {
        let (min, max) = (min.max(1) as f64, max.max(min.max(1)) as f64);
        let limit = if adaptive {
            (initial as f64).clamp(min, max)
        } else {
            max
        };
        Self {
            state: Mutex::new(State {
                limit,
                in_flight: 0,
                whole: Latency::default(),
                first_token: Latency::default(),
                slow_start: true,
                clear: 0,
                interactive_waiting: 0,
                batch_waiting: 0,
                since_batch: 0,
            }),
            freed: Notify::new(),
            min,
            max,
            adaptive,
        }
    }

    /// Sets `sluice_model_concurrency_limit` for `backend`.
    pub fn report(&self, backend: &str) {
        metrics::gauge!("sluice_model_concurrency_limit", "backend" => backend.to_owned())
            .set(self.limit());
    }

    pub fn limit(&self) -> f64 {
        self.state.lock().expect("limit lock").limit
    }

    pub fn in_flight(&self) -> usize {
        self.state.lock().expect("limit lock").in_flight
    }

    /// Waits for a slot below the current limit, as an interactive call.
    pub async fn acquire(&self) -> Permit<'_> {
        self.acquire_as(Priority::Interactive).await
    }

    /// Waits for a slot below the current limit, in `priority`'s turn.
    pub async fn acquire_as(&self, priority: Priority) -> Permit<'_> {
        let interactive = priority.is_interactive();
        // Counted among the waiting calls until it has a slot (or is dropped).
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            // Registered before the check, so a release between the two is not missed.
            let freed = self.freed.notified();
            {
                let mut state = self.state.lock().expect("limit lock");
                let room = (state.in_flight as f64) < state.limit.floor().max(1.0);
                let batch_due = state.since_batch + 1 >= BATCH_EVERY;
                let turn = if interactive {
                    state.batch_waiting == 0 || !batch_due
                } else {
                    state.interactive_waiting == 0 || batch_due
                };
                if room && turn {
                    state.in_flight += 1;
                    if interactive {
                        state.since_batch = state.since_batch.saturating_add(1);
                    } else {
                        state.since_batch = 0;
                    }
                    if let Some(mut counted) = waiting.take() {
                        *state.waiting(priority) -= 1;
                        counted.counted = false;
                    }
                    return Permit {
                        limit: self,
                        in_flight_at_start: state.in_flight,
                        limit_at_start: state.limit,
                        released: false,
                        learned: false,
                    };
                }
                if waiting.is_none() {
                    *state.waiting(priority) += 1;
                    waiting = Some(Waiting {
                        limit: self,
                        priority,
                        counted: true,
                    });
                }
            }
            freed.await;
        }
    }

    fn update(&self, state: &mut State, sample: Sample, started: (usize, f64)) {
        if !self.adaptive {
            return;
        }
        let limit = state.limit;
        match sample {
            Sample::Ignored => {}
            Sample::Overloaded => {
                state.slow_start = false;
                state.limit = (limit * 0.8).max(self.min);
            }
            Sample::Answered(rtt) | Sample::FirstToken(rtt) => {
                let latency = match sample {
                    Sample::FirstToken(_) => &mut state.first_token,
                    _ => &mut state.whole,
                };
                let queued = latency.queued(rtt, limit);
                // Grow only when the limit was what held calls back when this call started, not
                // when traffic was light.
                let (in_flight_at_start, limit_at_start) = started;
                let limit_was_reached = in_flight_at_start as f64 >= limit_at_start.floor() - 1.0;
                let (alpha, beta) = (ALPHA.max(limit * ALPHA_SHARE), BETA.max(limit * BETA_SHARE));
                // Load rose past a limit the backend shows no sign of minding: slow start again
                // (without it, a jump from 25 to 317 streamed jobs a second waited 4.7 s, p50,
                // for first tokens over the next 15 s; with it, 1.05 s).
                state.clear = match queued < alpha && limit_was_reached {
                    true => state.clear.saturating_add(1),
                    false => 0,
                };
                if !state.slow_start && f64::from(state.clear) >= limit {
                    state.slow_start = true;
                    state.clear = 0;
                }
                if state.slow_start {
                    if queued > beta {
                        state.slow_start = false;
                        state.limit = (limit - queued).max(self.min);
                    } else if limit_was_reached {
                        state.limit = (limit + 1.0).min(self.max);
                    }
                } else if queued < alpha && limit_was_reached {
                    state.limit = (limit + 1.0 / limit).min(self.max);
                } else if queued > beta {
                    state.limit = (limit - 1.0 / limit).max(self.min);
                }
            }
        }
    }
}

impl State {
    fn waiting(&mut self, priority: Priority) -> &mut usize {
        match priority {
            Priority::Interactive => &mut self.interactive_waiting,
            Priority::Batch => &mut self.batch_waiting,
        }
    }
}

/// A call counted as waiting; dropped with the call (its deadline passed), it stops counting, so
/// the other lane is not held back for it.
struct Waiting<'a> {
    limit: &'a AdaptiveLimit,
    priority: Priority,
    counted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.counted {
            *self
                .limit
                .state
                .lock()
                .expect("limit lock")
                .waiting(self.priority) -= 1;
            self.limit.freed.notify_waiters();
        }
    }
}

impl Permit<'_> {
    /// A streamed call's first token, counted as it comes rather than when the answer ends: slow
    /// start then follows a step in load at the pace of first tokens (50 ms against 450 for a
    /// whole answer in the benchmark), and a limit grown here may let a waiting call start.
    pub fn first_token(&mut self, rtt: Duration) {
        if self.learned {
            return;
        }
        self.learned = true;
        let mut state = self.limit.state.lock().expect("limit lock");
        self.limit.update(
            &mut state,
            Sample::FirstToken(rtt),
            (self.in_flight_at_start, self.limit_at_start),
        );
        drop(state);
        self.limit.freed.notify_waiters();
    }

    pub fn release(mut self, sample: Sample) {
        self.released = true;
        let sample = match sample {
            Sample::Answered(_) | Sample::FirstToken(_) if self.learned => Sample::Ignored,
            other => other,
        };
        let mut state = self.limit.state.lock().expect("limit lock");
        state.in_flight -= 1;
        self.limit.update(
            &mut state,
            sample,
            (self.in_flight_at_start, self.limit_at_start),
        );
        drop(state);
        self.limit.freed.notify_waiters();
    }
}

impl Drop for Permit<'_> {
    /// A permit dropped without `release` (the job was aborted) frees its slot, learning nothing.
    fn drop(&mut self) {
        if !self.released {
            self.limit.state.lock().expect("limit lock").in_flight -= 1;
            self.limit.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls of `priorities` arrive in order at a limit of one slot that is held, each waiting
    /// before the next arrives; the slot is then freed. The order in which they got it.
    async fn grant_order(priorities: Vec<Priority>) -> Vec<Priority> {
        let limit: &'static AdaptiveLimit = Box::leak(Box::new(AdaptiveLimit::new(1, 1, 1, false)));
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let held = limit.acquire().await;
        let mut calls = Vec::new();
        for priority in priorities {
            let order = order.clone();
            calls.push(tokio::spawn(async move {
                let permit = limit.acquire_as(priority).await;
                order.lock().unwrap().push(priority);
                tokio::task::yield_now().await;
                permit.release(Sample::Ignored);
            }));
            tokio::task::yield_now().await;
        }
        held.release(Sample::Ignored);
        for call in calls {
            call.await.unwrap();
        }
        order.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_a_waiting_interactive_call_before_earlier_batch_calls() {
        let order = grant_order(vec![
            Priority::Batch,
            Priority::Batch,
            Priority::Interactive,
        ])
        .await;
        assert_eq!(order[0], Priority::Interactive, "{order:?}");
    }

    #[tokio::test]
    async fn batch_calls_get_one_slot_in_ten_while_interactive_calls_keep_waiting() {
        let priorities = (0..60)
            .map(|index| match index % 2 {
                0 => Priority::Batch,
                _ => Priority::Interactive,
            })
            .collect();
        let order = grant_order(priorities).await;
        // The first 30 slots, while interactive calls wait: three go to batch calls.
        let batch = order[..30]
            .iter()
            .filter(|priority| **priority == Priority::Batch)
            .count();
        assert_eq!(batch, 3, "{order:?}");
    }

    #[tokio::test]
    async fn grows_while_answers_stay_fast_and_shrinks_when_they_queue() {
        let limit = AdaptiveLimit::new(4, 1, 100, true);
        for _ in 0..200 {
            let permits: Vec<_> =
                futures::future::join_all((0..limit.limit() as usize).map(|_| limit.acquire()))
                    .await;
            for permit in permits {
                permit.release(Sample::Answered(Duration::from_millis(100)));
            }
        }
        let grown = limit.limit();
        assert!(grown > 15.0, "grew to {grown}");
        for _ in 0..200 {
            let permit = limit.acquire().await;
            permit.release(Sample::Answered(Duration::from_millis(300)));
        }
        assert!(limit.limit() < grown - 5.0, "shrank to {}", limit.limit());
        let before = limit.limit();
        limit.acquire().await.release(Sample::Overloaded);
        assert!((limit.limit() - before * 0.8).abs() < 1e-9);
    }

    /// Calls kept at the limit, as under a backlog: each answer (the `n`th reporting
    /// `sample(n)`) frees a slot that the next call takes at once, and calls are added whenever
    /// the limit grows. The limit after `answers` answers.
    async fn answered(
        limit: &AdaptiveLimit,
        answers: usize,
        sample: impl Fn(usize) -> Sample,
    ) -> f64 {
        let mut open = std::collections::VecDeque::new();
        for n in 0..answers {
            while open.len() < limit.limit() as usize {
                open.push_back(limit.acquire().await);
            }
            open.pop_front().unwrap().release(sample(n));
        }
        limit.limit()
    }

    async fn under_backlog(limit: &AdaptiveLimit, answers: usize, rtt: Duration) -> f64 {
        answered(limit, answers, |_| Sample::Answered(rtt)).await
    }

    #[tokio::test]
    async fn streamed_first_tokens_and_whole_answers_are_two_scales() {
        // A backend answering whole in 2 s and streaming first tokens in 50 ms, both at once:
        // neither looks like queueing beside the other.
        let limit = AdaptiveLimit::new(8, 1, 256, true);
        let grown = answered(&limit, 200, |n| match n % 2 {
            0 => Sample::FirstToken(Duration::from_millis(50)),
            _ => Sample::Answered(Duration::from_secs(2)),
        })
        .await;
        assert!(grown > 100.0, "grew to {grown}");
    }

    #[tokio::test]
    async fn slow_start_doubles_each_round_trip_until_answers_queue() {
        let limit = AdaptiveLimit::new(8, 1, 256, true);
        let streamed = Duration::from_millis(470);
        // From 8, one more per answer: 64 after 56 answers (three round trips). Growing by one
        // per round trip would take about 2,000.
        let grown = under_backlog(&limit, 56, streamed).await;
        assert!(grown >= 56.0, "{grown} after 56 answers");
        // Answers twice as slow: calls queue at the backend; slow start ends (once the average
        // is half as slow again as the fastest), and the calls seen queued are dropped.
        let queued = under_backlog(&limit, 5, streamed * 2).await;
        assert!(queued < grown, "left slow start: {grown} -> {queued}");
        // Then at most one more per round trip ...
        let after = under_backlog(&limit, queued as usize, streamed).await;
        assert!(after <= queued + 1.0, "{queued} -> {after} in a round trip");
        // ... until a whole round trip of answers found the limit reached and no queue: slow
        // start again, and it grows past where it was.
        let again = under_backlog(&limit, 3 * after as usize, streamed).await;
        assert!(again > grown, "{after} -> {again} in three round trips");
    }

    #[tokio::test]
    async fn a_first_token_grows_the_limit_while_its_call_runs_and_lets_a_waiting_call_start() {
        let limit = AdaptiveLimit::new(4, 1, 256, true);
        // Four calls hold every slot; a fifth waits.
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(limit.acquire().await);
        }
        let fifth = tokio::time::timeout(Duration::from_millis(50), limit.acquire()).await;
        assert!(fifth.is_err(), "a fifth call waits for a slot");
        // Their first tokens come, their answers not yet: slow start grows the limit by one per
        // first token of a call that started with the limit (nearly) reached, the third and
        // fourth, and the waiting call starts.
        let waiting = limit.acquire();
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
        for permit in &mut open {
            permit.first_token(Duration::from_millis(50));
        }
        assert_eq!(limit.limit(), 6.0);
        let fifth = tokio::time::timeout(Duration::from_millis(50), waiting).await;
        assert!(fifth.is_ok(), "the grown limit lets it start");
        // The answers' ends teach nothing twice.
        for permit in open {
            permit.release(Sample::FirstToken(Duration::from_millis(50)));
        }
        assert_eq!(limit.limit(), 6.0);
    }

    #[tokio::test]
    async fn never_more_in_flight_than_the_limit_and_dropped_permits_free_their_slot() {
        let limit = AdaptiveLimit::new(2, 1, 10, true);
        let first = limit.acquire().await;
        let _second = limit.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(50), limit.acquire()).await;
        assert!(third.is_err(), "a third call waits");
        drop(first);
        let third = tokio::time::timeout(Duration::from_millis(50), limit.acquire()).await;
        assert!(third.is_ok(), "a dropped permit frees its slot");
    }

    #[test]
    fn a_fixed_limit_stays_at_its_maximum() {
        let limit = AdaptiveLimit::new(4, 1, 32, false);
        assert_eq!(limit.limit(), 32.0);
    }
}
