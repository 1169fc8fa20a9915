//! Priority lanes inside a worker. Each lane is its own request topic (so batch work never sits
//! ahead of interactive work in a Kafka partition) with its own fair queue and read-ahead, and
//! the lanes share the in-flight window by stride scheduling: when both have work, the batch
//! lane starts `batch_share` of the jobs. Aging: each `aging` its oldest buffered job has
//! waited adds `batch_share` again, up to half, so batch work is never starved and a long
//! backlog drains faster the older it is. Interactive work alone gets every slot, batch work alone
//! all but a reserve: batch jobs never fill the last `interactive_reserve` of the window, so an
//! interactive job arriving behind a backlog starts at once instead of waiting for a batch job to
//! end.

use crate::fair::{FairQueue, Queued};
use crate::job::{Ran, Record};
use sluice_schemas::{Priority, TokenEstimate};
use std::time::{Duration, Instant};

/// How the lanes share the window.
#[derive(Debug, Clone, Copy)]
pub struct LaneSettings {
    /// The batch lane's share of the jobs started while both lanes have work.
    pub batch_share: f64,
    /// Each time this passes for the oldest waiting batch job, the share grows by itself again.
    pub aging: Duration,
    /// The share of the in-flight window batch jobs may not fill (0 to 0.5), kept for
    /// interactive ones.
    pub interactive_reserve: f64,
}

/// The most the batch lane's share grows to by aging.
const MAX_AGED_SHARE: f64 = 0.5;

/// The most of the window kept for interactive jobs.
const MAX_INTERACTIVE_RESERVE: f64 = 0.5;

struct Lane {
    queue: FairQueue,
    /// Stride scheduling's pass: grows by 1/weight per job started; the lowest goes next.
    pass: f64,
    /// Its jobs started and not finished.
    running: usize,
}

pub(crate) struct Lanes {
    interactive: Lane,
    batch: Lane,
    batch_topic: String,
    settings: LaneSettings,
    /// The most batch jobs running at once: the window less the interactive reserve.
    batch_slots: usize,
}

impl Lanes {
    /// Lanes for a window of `window` jobs running at once.
    pub(crate) fn new(
        window: usize,
        per_user: usize,
        quantum_tokens: u64,
        batch_topic: String,
        settings: LaneSettings,
    ) -> Self {
        let lane = || Lane {
            queue: FairQueue::new(per_user, quantum_tokens),
            pass: 0.0,
            running: 0,
        };
        let reserve = settings
            .interactive_reserve
            .clamp(0.0, MAX_INTERACTIVE_RESERVE);
        let reserved = (window as f64 * reserve).ceil() as usize;
        Self {
            interactive: lane(),
            batch: lane(),
            batch_topic,
            settings,
            batch_slots: window.saturating_sub(reserved).max(1),
        }
    }

    /// The lane a topic's records are in: the batch topic's, or interactive.
    fn priority_of_topic(&self, topic: &str) -> Priority {
        if topic == self.batch_topic {
            Priority::Batch
        } else {
            Priority::Interactive
        }
    }

    fn priority_of(&self, record: &Record) -> Priority {
        self.priority_of_topic(&record.topic)
    }

    fn lane_ref(&self, priority: Priority) -> &Lane {
        match priority {
            Priority::Interactive => &self.interactive,
            Priority::Batch => &self.batch,
        }
    }

    fn lane(&mut self, priority: Priority) -> &mut Lane {
        match priority {
            Priority::Interactive => &mut self.interactive,
            Priority::Batch => &mut self.batch,
        }
    }

    pub(crate) fn push(&mut self, queued: Queued) {
        let priority = self.priority_of(&queued.record);
        let other = self.lane_ref(match priority {
            Priority::Interactive => Priority::Batch,
            Priority::Batch => Priority::Interactive,
        });
        let other_pass = (other.queue.buffered() > 0).then_some(other.pass);
        let lane = self.lane(priority);
        // A lane that was idle starts level with the busy one: idleness banks no turns.
        if lane.queue.buffered() == 0
            && let Some(other_pass) = other_pass
        {
            lane.pass = lane.pass.max(other_pass);
        }
        lane.queue.push(queued);
    }

    /// The batch lane's share now, its aging included.
    fn batch_share(&self, now: Instant) -> f64 {
        let base = self.settings.batch_share.clamp(0.0, MAX_AGED_SHARE);
        let waited = self.batch.queue.oldest_wait(now).unwrap_or_default();
        let ages = waited.as_secs_f64() / self.settings.aging.as_secs_f64().max(0.001);
        (base * (1.0 + ages.floor())).min(MAX_AGED_SHARE).max(base)
    }

    /// The next job to start: from the lane with the lower pass that can start one (the batch
    /// lane only while it runs fewer than its slots).
    pub(crate) fn pop(&mut self) -> Option<Queued> {
        let share = self.batch_share(Instant::now());
        let order = if self.interactive.pass <= self.batch.pass {
            [Priority::Interactive, Priority::Batch]
        } else {
            [Priority::Batch, Priority::Interactive]
        };
        let batch_may_start = self.batch.running < self.batch_slots;
        for priority in order {
            let weight = match priority {
                Priority::Interactive => 1.0 - share,
                Priority::Batch if batch_may_start => share,
                Priority::Batch => continue,
            };
            let lane = self.lane(priority);
            if let Some(queued) = lane.queue.pop() {
                lane.pass += 1.0 / weight.max(0.001);
                lane.running += 1;
                return Some(queued);
            }
        }
        None
    }

    pub(crate) fn finished(
        &mut self,
        record: &Record,
        estimate: TokenEstimate,
        charged: f64,
        ran: &Ran,
    ) {
        let priority = self.priority_of(record);
        let user = record.key.as_deref().unwrap_or_default();
        let lane = self.lane(priority);
        lane.running = lane.running.saturating_sub(1);
        lane.queue.finished(user, estimate, charged, ran);
    }

    /// Drops buffered records that `keep` rejects (those of revoked partitions).
    pub(crate) fn retain(&mut self, keep: impl Fn(&Record) -> bool) {
        self.interactive.queue.retain(&keep);
        self.batch.queue.retain(&keep);
    }

    pub(crate) fn buffered(&self) -> usize {
        self.interactive.queue.buffered() + self.batch.queue.buffered()
    }

    /// Whether a lane's read-ahead is full, by its topic: its partitions are then paused while
    /// the other lane reads on.
    pub(crate) fn is_full(&self, topic: &str, records: usize, bytes: usize) -> bool {
        let lane = self.lane_ref(self.priority_of_topic(topic));
        lane.queue.buffered() >= records || lane.queue.buffered_bytes() >= bytes
    }

    pub(crate) fn record_metrics(&self) {
        for (name, lane) in [("interactive", &self.interactive), ("batch", &self.batch)] {
            metrics::gauge!("sluice_worker_lane_buffered", "lane" => name)
                .set(lane.queue.buffered() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_common::tiers::Tiers;

    fn queued(topic: &str, user: &str, offset: i64) -> Queued {
        let event = event_json(user);
        let record = Record {
            trace: Default::default(),
            topic: topic.into(),
            partition: 0,
            offset,
            key: Some(user.as_bytes().to_vec()),
            payload: Some(event.into_bytes()),
            timestamp_ms: None,
        };
        let tiers = Tiers::parse(r#"{"default": {"rate_per_sec": 1, "burst": 1}}"#).unwrap();
        Queued::new(record, &tiers, 16)
    }

    fn event_json(user: &str) -> String {
        serde_json::json!({
            "schema_version": 1,
            "job_id": sluice_schemas::JobId::default(),
            "user_id": user,
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "submitted_at": "2026-01-01T00:00:00Z",
            "deadline": "2026-01-01T00:01:00Z",
        })
        .to_string()
    }

    /// Lanes with a window too large to be the limit.
    fn lanes(batch_share: f64, aging: Duration) -> Lanes {
        lanes_in_window(1_000_000, batch_share, aging)
    }

    /// Lanes for a window of `window` jobs, a tenth of it kept for interactive ones.
    fn lanes_in_window(window: usize, batch_share: f64, aging: Duration) -> Lanes {
        Lanes::new(
            window,
            1000,
            1024,
            "batch".into(),
            LaneSettings {
                batch_share,
                aging,
                interactive_reserve: 0.1,
            },
        )
    }

    fn started(lanes: &mut Lanes, count: usize) -> (usize, usize) {
        let mut batch = 0;
        for _ in 0..count {
            let job = lanes.pop().expect("a job to start");
            if job.record.topic == "batch" {
                batch += 1;
            }
        }
        (count - batch, batch)
    }

    #[test]
    fn with_both_lanes_busy_batch_gets_its_share_and_alone_it_gets_everything() {
        let mut lanes = lanes(0.1, Duration::from_secs(3600));
        for offset in 0..2000 {
            lanes.push(queued("batch", &format!("b{}", offset % 50), offset));
        }
        assert_eq!(
            started(&mut lanes, 100),
            (0, 100),
            "batch alone takes every slot"
        );
        for offset in 0..1000 {
            lanes.push(queued("interactive", &format!("i{}", offset % 50), offset));
        }
        let (interactive, batch) = started(&mut lanes, 1000);
        assert!(
            (95..=105).contains(&batch),
            "{interactive} interactive, {batch} batch"
        );
    }

    #[test]
    fn an_interactive_job_arriving_behind_a_batch_backlog_starts_next() {
        let mut lanes = lanes(0.1, Duration::from_secs(3600));
        for offset in 0..5000 {
            lanes.push(queued("batch", "bulk", offset));
        }
        started(&mut lanes, 500);
        lanes.push(queued("interactive", "chat", 0));
        assert_eq!(lanes.pop().unwrap().record.topic, "interactive");
    }

    #[test]
    fn batch_jobs_leave_the_reserve_of_the_window_to_interactive_ones() {
        let mut lanes = lanes_in_window(10, 0.1, Duration::from_secs(3600));
        for offset in 0..100 {
            lanes.push(queued("batch", &format!("b{offset}"), offset));
        }
        let batch: Vec<Queued> = std::iter::from_fn(|| lanes.pop()).collect();
        assert_eq!(
            batch.len(),
            9,
            "batch alone fills the window but its reserve"
        );
        lanes.push(queued("interactive", "chat", 0));
        assert_eq!(lanes.pop().unwrap().record.topic, "interactive");
        assert!(lanes.pop().is_none(), "no slot for batch until one ends");
        let done = &batch[0];
        lanes.finished(
            &done.record,
            done.estimate,
            done.charged,
            &Ran {
                outcome: crate::job::Outcome::Finished(sluice_schemas::JobStatus::Succeeded),
                output: None,
            },
        );
        assert_eq!(lanes.pop().unwrap().record.topic, "batch");
        assert!(lanes.pop().is_none());
    }

    #[test]
    fn aging_raises_the_batch_share_up_to_half() {
        let mut lanes = lanes(0.1, Duration::from_millis(1));
        for offset in 0..2000 {
            lanes.push(queued("batch", &format!("b{}", offset % 50), offset));
            lanes.push(queued("interactive", &format!("i{}", offset % 50), offset));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(lanes.batch_share(Instant::now()), 0.5);
        let (interactive, batch) = started(&mut lanes, 1000);
        assert!(
            (480..=520).contains(&batch),
            "{interactive} interactive, {batch} batch"
        );
    }
}
