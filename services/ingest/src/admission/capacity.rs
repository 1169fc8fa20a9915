//! Admission that knows the pipeline's capacity: ingest estimates the time a new job would spend
//! in the pipeline and refuses at once a job whose deadline that time would pass, instead of
//! accepting it to expire in the queue.
//!
//! The estimate is the jobs in the pipeline (the workers' consumer group lag on the request
//! topic: waiting, or taken and unfinished) over the rate at which the workers finish jobs when
//! they have more than they can do. That rate is measured only over busy intervals (between two
//! readings, with a backlog at both ends of at least two seconds of the window's average
//! throughput): when the pipeline is idle, what it finishes is what it was given, not what it
//! can do, and a burst after a quiet minute must not be judged by the quiet minute. What the
//! workers finished over any window of the last minute is a floor under the rate: they did it,
//! so they can, and a partial stall (some partitions waiting for a rebalance) does not make the
//! estimate refuse what they will catch up on; an interval without a single commit measures
//! nothing (a full stall, or a gap between commits). Between two
//! readings the jobs this replica publishes are added and the ones the rate would have finished
//! taken away, so a burst is seen before the next reading.

use super::super::error::ApiError;
use sluice_common::kafka::{GroupLag, LagReading};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct CapacityArgs {
    /// Refuse a job whose deadline the pipeline's estimated wait would pass (`503
    /// deadline_unreachable`).
    #[arg(long = "capacity-admission", env = "SLUICE_CAPACITY_ADMISSION", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,

    /// The workers' consumer group, whose lag and throughput give the estimate (the worker's
    /// `SLUICE_WORKER_GROUP`).
    #[arg(
        long = "worker-group",
        env = "SLUICE_WORKER_GROUP",
        default_value = "sluice-workers"
    )]
    pub worker_group: String,

    /// How often the group's lag is read.
    #[arg(long = "capacity-check-ms", env = "SLUICE_CAPACITY_CHECK_MS", default_value = "1000", value_parser = sluice_common::settings::millis)]
    pub check_every: Duration,

    /// The seconds over which the group's throughput is measured.
    #[arg(long = "capacity-window-secs", env = "SLUICE_CAPACITY_WINDOW_SECS", default_value = "10", value_parser = sluice_common::settings::secs)]
    pub window: Duration,

    /// The share of a job's time to its deadline that the estimated wait may take: the rest is
    /// left for the model call and the estimate's error.
    #[arg(
        long = "capacity-headroom",
        env = "SLUICE_CAPACITY_HEADROOM",
        default_value_t = 0.8
    )]
    pub headroom: f64,

    /// Estimated waits below this are never refused: the estimate cannot tell them apart from
    /// the workers' commit interval (one second).
    #[arg(long = "capacity-min-wait-ms", env = "SLUICE_CAPACITY_MIN_WAIT_MS", default_value = "2000", value_parser = sluice_common::settings::millis)]
    pub min_wait: Duration,
}

impl CapacityArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.headroom > 0.0 && self.headroom <= 1.0,
            "SLUICE_CAPACITY_HEADROOM must be above 0 and at most 1"
        );
        anyhow::ensure!(
            self.window >= 2 * self.check_every,
            "SLUICE_CAPACITY_WINDOW_SECS must hold at least two readings (SLUICE_CAPACITY_CHECK_MS)"
        );
        Ok(())
    }
}

/// What the estimate says about the pipeline now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Jobs in the pipeline ahead of a new one.
    pub backlog: f64,
    /// Jobs the workers finish per second.
    pub rate_per_sec: f64,
    /// The time a new job would spend before it is finished.
    pub wait: Duration,
}

/// The last readings and what this replica published since.
#[derive(Debug, Default)]
struct Readings {
    /// The intervals between the window's readings, oldest first.
    intervals: VecDeque<Interval>,
    last: Option<(Instant, LagReading)>,
    published_since: u64,
    /// The window's average throughput at each reading of the last `FLOOR_MEMORY`.
    averages: VecDeque<(Instant, f64)>,
}

/// How long a throughput the workers showed keeps counting as one they can do.
const FLOOR_MEMORY: Duration = Duration::from_secs(60);

/// The time between two readings.
#[derive(Debug, Clone, Copy)]
struct Interval {
    ended: Instant,
    secs: f64,
    finished: u64,
    /// The smaller backlog of its two ends.
    least_backlog: u64,
}

/// Seconds of throughput the backlog must hold at both ends of an interval for the workers to
/// count as busy in it. Why two: commits land once a second, so an idle pipeline shows up to a
/// second of finished but uncommitted work.
const BUSY_BACKLOG_SECS: f64 = 2.0;
/// Seconds of busy intervals needed to measure the throughput. Why two: an interval can hold no
/// commit and the next two, so one alone says more about commit timing than about throughput.
const MEASURED_SECS: f64 = 2.0;

pub struct Capacity {
    args: CapacityArgs,
    readings: Mutex<Readings>,
}

/// The seconds and the jobs finished in `intervals`.
fn totals<'a>(intervals: impl Iterator<Item = &'a Interval>) -> (f64, u64) {
    intervals.fold((0.0, 0), |(secs, finished), interval| {
        (secs + interval.secs, finished + interval.finished)
    })
}

/// Throughput below this is no throughput: the group is idle or stalled.
const NO_PROGRESS_PER_SEC: f64 = 0.1;

impl Capacity {
    pub fn new(args: CapacityArgs) -> Self {
        Self {
            args,
            readings: Mutex::new(Readings::default()),
        }
    }

    /// Counts a job this replica published, until the next reading includes it.
    pub fn published(&self) {
        self.readings
            .lock()
            .expect("capacity readings")
            .published_since += 1;
    }

    /// Takes a reading of the group at `now`.
    pub fn observe(&self, now: Instant, reading: LagReading) {
        let mut readings = self.readings.lock().expect("capacity readings");
        if let Some((previous_at, previous)) = readings.last {
            let secs = now.saturating_duration_since(previous_at).as_secs_f64();
            if secs > 0.0 {
                readings.intervals.push_back(Interval {
                    ended: now,
                    secs,
                    finished: reading.committed.saturating_sub(previous.committed),
                    least_backlog: previous.backlog.min(reading.backlog),
                });
            }
        }
        while readings.intervals.front().is_some_and(|interval| {
            now.saturating_duration_since(interval.ended) > self.args.window
        }) {
            readings.intervals.pop_front();
        }
        readings.last = Some((now, reading));
        readings.published_since = 0;
        let (secs, finished) = totals(readings.intervals.iter());
        if secs >= MEASURED_SECS {
            readings.averages.push_back((now, finished as f64 / secs));
        }
        while readings
            .averages
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > FLOOR_MEMORY)
        {
            readings.averages.pop_front();
        }
    }

    /// The estimate at `now`; `None` when it cannot be made: no recent reading (the broker is
    /// unreachable: the publish then fails on its own), too few busy intervals in the window (the
    /// pipeline has not had more than it could do: nothing to refuse), or no progress in them
    /// (workers not started, or scaled to zero). Without an estimate, jobs are admitted.
    pub fn estimate(&self, now: Instant) -> Option<Estimate> {
        let readings = self.readings.lock().expect("capacity readings");
        let (read_at, reading) = readings.last?;
        let since = now.saturating_duration_since(read_at);
        if since > 5 * self.args.check_every {
            return None;
        }
        let (window_secs, window_finished) = totals(readings.intervals.iter());
        let average = window_finished as f64 / window_secs.max(f64::EPSILON);
        // Why only intervals with progress: one with no commit at all is a stall (a worker
        // replaced, a rebalance) or a gap between commits, and says nothing of how fast the
        // workers go once they go.
        let (busy_secs, busy_finished) = totals(readings.intervals.iter().filter(|interval| {
            interval.finished > 0 && interval.least_backlog as f64 >= BUSY_BACKLOG_SECS * average
        }));
        if busy_secs < MEASURED_SECS {
            return None;
        }
        let floor = readings
            .averages
            .iter()
            .map(|(_, average)| *average)
            .fold(0.0, f64::max);
        let rate = (busy_finished as f64 / busy_secs).max(floor);
        if rate < NO_PROGRESS_PER_SEC {
            return None;
        }
        let backlog = (reading.backlog as f64 + readings.published_since as f64
            - rate * since.as_secs_f64())
        .max(0.0);
        Some(Estimate {
            backlog,
            rate_per_sec: rate,
            wait: Duration::from_secs_f64(backlog / rate),
        })
    }

    /// Admits a job with `time_left` until its deadline, or refuses it with the wait it faces.
    pub fn check(&self, time_left: Duration) -> Result<(), ApiError> {
        if !self.args.enabled {
            return Ok(());
        }
        let Some(estimate) = self.estimate(Instant::now()) else {
            return Ok(());
        };
        let allowed = time_left.mul_f64(self.args.headroom);
        if estimate.wait <= self.args.min_wait || estimate.wait <= allowed {
            return Ok(());
        }
        // The backlog drains about a second a second when nothing is added: retry when the
        // wait has fallen to what this deadline allows.
        let retry_after_secs = (estimate.wait - allowed)
            .as_secs_f64()
            .ceil()
            .clamp(1.0, 600.0);
        Err(ApiError::DeadlineUnreachable {
            wait: estimate.wait,
            backlog: estimate.backlog.round() as u64,
            rate_per_sec: estimate.rate_per_sec,
            time_left,
            retry_after_secs: retry_after_secs as u64,
        })
    }

    /// Reads the group's lag every `check_every` until `stop`.
    pub async fn run(
        self: std::sync::Arc<Self>,
        lag: GroupLag,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let lag = std::sync::Arc::new(lag);
        let timeout = self.args.check_every.max(Duration::from_millis(500));
        let mut tick = tokio::time::interval(self.args.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let reader = lag.clone();
            // Why a blocking task: librdkafka's offset queries wait on the broker.
            let reading = tokio::task::spawn_blocking(move || reader.read(timeout)).await?;
            match reading {
                Ok(reading) => {
                    self.observe(Instant::now(), reading);
                    failures = 0;
                    if let Some(estimate) = self.estimate(Instant::now()) {
                        metrics::gauge!("sluice_admission_estimated_wait_seconds")
                            .set(estimate.wait.as_secs_f64());
                        metrics::gauge!("sluice_admission_throughput_per_second")
                            .set(estimate.rate_per_sec);
                    }
                    metrics::gauge!("sluice_admission_backlog").set(reading.backlog as f64);
                }
                Err(error) => {
                    failures += 1;
                    // Logged on the first failure and then every minute or so, not every tick.
                    if failures == 1 || failures.is_multiple_of(60) {
                        tracing::warn!(error = %error, failures, "could not read the workers' lag; jobs are admitted without a capacity estimate");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        capacity: CapacityArgs,
    }

    fn capacity() -> Capacity {
        Capacity::new(Args::parse_from(["test"]).capacity)
    }

    fn reading(backlog: u64, committed: u64) -> LagReading {
        LagReading { backlog, committed }
    }

    #[test]
    fn no_estimate_until_a_throughput_is_measured() {
        let capacity = capacity();
        let start = Instant::now();
        assert_eq!(capacity.estimate(start), None);
        capacity.observe(start, reading(5_000, 0));
        assert_eq!(capacity.estimate(start), None);
        assert!(capacity.check(Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn the_wait_is_the_backlog_over_the_throughput() {
        let capacity = capacity();
        let start = Instant::now();
        capacity.observe(start, reading(2_000, 0));
        capacity.observe(start + Duration::from_secs(2), reading(2_000, 400));
        let estimate = capacity
            .estimate(start + Duration::from_secs(2))
            .expect("an estimate");
        assert_eq!(estimate.rate_per_sec, 200.0);
        assert_eq!(estimate.wait, Duration::from_secs(10));
        // 10 s of wait: a 15 s deadline allows 12 s, a 10 s one only 8 s.
        assert!(capacity.check(Duration::from_secs(15)).is_ok());
        let refused = capacity.check(Duration::from_secs(10)).unwrap_err();
        let ApiError::DeadlineUnreachable {
            retry_after_secs, ..
        } = refused
        else {
            panic!("refused for capacity: {refused:?}");
        };
        assert_eq!(retry_after_secs, 2);
    }

    #[test]
    fn jobs_published_since_the_last_reading_count_and_finished_ones_do_not() {
        let capacity = capacity();
        let start = Instant::now();
        capacity.observe(start, reading(1_000, 0));
        capacity.observe(start + Duration::from_secs(1), reading(1_000, 100));
        let read_at = start + Duration::from_secs(2);
        capacity.observe(read_at, reading(1_000, 200));
        for _ in 0..500 {
            capacity.published();
        }
        // Half a second later: 1,000 + 500 published - 50 finished, at 100/s.
        let estimate = capacity
            .estimate(read_at + Duration::from_millis(500))
            .expect("an estimate");
        assert_eq!(estimate.backlog, 1_450.0);
    }

    #[test]
    fn what_an_idle_pipeline_finishes_is_not_its_throughput() {
        let capacity = capacity();
        let start = Instant::now();
        let at = |second: u64| start + Duration::from_secs(second);
        // Five jobs a second with a few in flight: idle, however long it lasts.
        for second in 0..=10 {
            capacity.observe(at(second), reading(3, second * 5));
        }
        assert_eq!(capacity.estimate(at(10)), None);
        // A burst lands: the second it arrives in does not count either.
        capacity.observe(at(11), reading(3_000, 55));
        assert_eq!(capacity.estimate(at(11)), None);
        // The next two seconds the workers are busy and finish 600 a second.
        capacity.observe(at(12), reading(2_400, 655));
        assert_eq!(
            capacity.estimate(at(12)),
            None,
            "one busy second is not enough"
        );
        capacity.observe(at(13), reading(1_800, 1_255));
        let estimate = capacity.estimate(at(13)).expect("an estimate");
        assert_eq!(estimate.rate_per_sec, 600.0);
        assert_eq!(estimate.wait, Duration::from_secs(3));
    }

    #[test]
    fn a_second_without_a_commit_does_not_stop_the_pipeline() {
        let capacity = capacity();
        let start = Instant::now();
        let at = |second: u64| start + Duration::from_secs(second);
        // 300 jobs a second with 300 in the pipeline, commits landing 0, 600, 0, 600, ...:
        // never two seconds of backlog, so never busy, so nothing refused.
        let mut committed = 0;
        for second in 0..=10 {
            committed += if second % 2 == 0 { 0 } else { 600 };
            capacity.observe(at(second), reading(300, committed));
        }
        assert_eq!(capacity.estimate(at(10)), None);
    }

    #[test]
    fn a_stall_is_judged_by_what_the_workers_did_before_it() {
        let capacity = capacity();
        let start = Instant::now();
        let at = |second: u64| start + Duration::from_secs(second);
        // Sixty jobs a second, never busy.
        for second in 0..=10 {
            capacity.observe(at(second), reading(30, second * 60));
        }
        // A worker dies: nothing is committed while sixty a second arrive. That measures
        // nothing, so nothing is refused.
        for second in 11..=13 {
            capacity.observe(at(second), reading(30 + (second - 10) * 60, 600));
        }
        assert_eq!(capacity.estimate(at(13)), None);
        // Half the partitions move again at thirty a second: judged at the sixty seen before.
        for second in 14..=17 {
            capacity.observe(
                at(second),
                reading(210 + (second - 13) * 30, 600 + (second - 13) * 30),
            );
        }
        let estimate = capacity.estimate(at(17)).expect("an estimate");
        assert_eq!(estimate.rate_per_sec, 60.0);
        assert_eq!(estimate.wait, Duration::from_millis(5_500));
    }

    #[test]
    fn workers_that_finish_nothing_give_no_estimate() {
        let capacity = capacity();
        let start = Instant::now();
        for second in 0..=5 {
            capacity.observe(start + Duration::from_secs(second), reading(500, 0));
        }
        assert_eq!(capacity.estimate(start + Duration::from_secs(5)), None);
    }

    #[test]
    fn short_waits_are_never_refused_and_stale_readings_give_no_estimate() {
        let capacity =
            Capacity::new(Args::parse_from(["test", "--capacity-min-wait-ms", "5000"]).capacity);
        let start = Instant::now();
        capacity.observe(start, reading(600, 0));
        capacity.observe(start + Duration::from_secs(1), reading(600, 200));
        capacity.observe(start + Duration::from_secs(2), reading(600, 400));
        assert!(capacity.estimate(start + Duration::from_secs(2)).is_some());
        // 3 s of wait against a 1 s deadline: below the 5 s floor, so admitted.
        assert!(capacity.check(Duration::from_secs(1)).is_ok());
        assert_eq!(capacity.estimate(start + Duration::from_secs(30)), None);
    }
}
