//! The bench report: counts by outcome and latency percentiles, as text and as JSON.

use crate::{Config, Histograms, Tally};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub(crate) fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Latencies {
    /// POST /v1/jobs until its 202, for accepted jobs.
    pub submit: Percentiles,
    /// POST /v1/jobs until its 4xx/5xx, for rejected ones.
    pub rejection: Percentiles,
    /// Queued until a worker started the job (from the job's timings).
    pub queue_wait: Percentiles,
    /// Started until finished, all attempts (from the job's timings).
    pub model: Percentiles,
    /// The worker finishing until the terminal SSE event arrived: the status hop through the
    /// broker, the results write and the push.
    pub delivery: Percentiles,
    /// End to end minus the model's time: what the pipeline adds.
    pub overhead: Percentiles,
    /// POST /v1/jobs until the terminal SSE event arrived.
    pub end_to_end: Percentiles,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub duration_secs: f64,
    /// Submissions per second actually made while submitting.
    pub offered_per_sec: f64,
    pub submitted: u64,
    pub accepted: u64,
    /// By `<HTTP status> <error code>`.
    pub rejected: BTreeMap<String, u64>,
    /// By terminal status.
    pub completed: BTreeMap<String, u64>,
    /// Accepted, but no terminal status within the timeout, over SSE or in the job's record.
    pub lost: u64,
    /// Accepted and terminal in the job's record, but its SSE stream brought no terminal event
    /// within the timeout (the load generator's own connections failing under an overload).
    #[serde(default)]
    pub late: u64,
    /// Completed jobs per second over the whole run.
    pub throughput_per_sec: f64,
    /// Jobs reaching a terminal status in each second of the run.
    pub completions_per_sec: Vec<u64>,
    pub latency: Latencies,
}

impl Report {
    pub(crate) fn from_tally(tally: &Tally, config: &Config, elapsed: Duration) -> Self {
        let histograms: &Histograms = &tally.histograms.lock().expect("histograms");
        let completed = tally.completed.lock().expect("completed").clone();
        let total: u64 = completed.values().sum();
        let submitted = tally.submitted.load(Ordering::Relaxed);
        Self {
            duration_secs: elapsed.as_secs_f64(),
            offered_per_sec: submitted as f64 / config.duration_secs,
            submitted,
            accepted: tally.accepted.load(Ordering::Relaxed),
            rejected: tally.rejected.lock().expect("rejected").clone(),
            completed,
            lost: tally.lost.load(Ordering::Relaxed),
            late: tally.late.load(Ordering::Relaxed),
            throughput_per_sec: total as f64 / elapsed.as_secs_f64().max(1e-3),
            completions_per_sec: tally
                .completions_per_sec
                .lock()
                .expect("completions")
                .clone(),
            latency: Latencies {
                submit: Percentiles::of(&histograms.submit),
                rejection: Percentiles::of(&histograms.rejection),
                queue_wait: Percentiles::of(&histograms.queue_wait),
                model: Percentiles::of(&histograms.model),
                delivery: Percentiles::of(&histograms.delivery),
                overhead: Percentiles::of(&histograms.overhead),
                end_to_end: Percentiles::of(&histograms.end_to_end),
            },
        }
    }

    /// Completions per second in the steady part of the run: after the first `warm_up_secs`
    /// and before submitting stopped (the drain afterwards would drag the mean down).
    pub fn steady_throughput_per_sec(&self, submit_secs: f64, warm_up_secs: usize) -> f64 {
        let end = (submit_secs.floor() as usize).min(self.completions_per_sec.len());
        let window = self
            .completions_per_sec
            .get(warm_up_secs..end)
            .unwrap_or_default();
        match window.len() {
            0 => self.throughput_per_sec,
            seconds => window.iter().sum::<u64>() as f64 / seconds as f64,
        }
    }

    pub fn render(&self) -> String {
        let mut text = format!(
            "{:.1} s: submitted {} ({:.1}/s), accepted {}, LOST {}, late over SSE {}, {:.1} completed/s\n",
            self.duration_secs,
            self.submitted,
            self.offered_per_sec,
            self.accepted,
            self.lost,
            self.late,
            self.throughput_per_sec
        );
        text.push_str(&format!(
            "completed: {:?}\nrejected: {:?}\n",
            self.completed, self.rejected
        ));
        text.push_str("latency (ms)      count      p50      p90      p99      max\n");
        for (name, p) in [
            ("submit", &self.latency.submit),
            ("rejection", &self.latency.rejection),
            ("queue wait", &self.latency.queue_wait),
            ("model", &self.latency.model),
            ("delivery", &self.latency.delivery),
            ("overhead", &self.latency.overhead),
            ("end to end", &self.latency.end_to_end),
        ] {
            text.push_str(&format!(
                "{name:<14} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>8.1}\n",
                p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
            ));
        }
        text
    }
}
