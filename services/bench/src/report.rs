//! The bench report: counts by outcome and latency percentiles, as text and as JSON.

use crate::{Histograms, Tally};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
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

#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    /// POST /v1/jobs until its answer.
    pub submit: Percentiles,
    /// Queued until a worker started the job (from the job's timings).
    pub queue_wait: Percentiles,
    /// Started until finished, all attempts (from the job's timings).
    pub model: Percentiles,
    /// POST /v1/jobs until the terminal SSE event arrived.
    pub end_to_end: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub duration_secs: f64,
    pub submitted: u64,
    pub accepted: u64,
    /// By `<HTTP status> <error code>`.
    pub rejected: BTreeMap<String, u64>,
    /// By terminal status.
    pub completed: BTreeMap<String, u64>,
    /// Accepted, but no terminal status within the timeout.
    pub lost: u64,
    /// Completed jobs per second over the whole run.
    pub throughput_per_sec: f64,
    pub latency: Latencies,
}

impl Report {
    pub(crate) fn from_tally(tally: &Tally, elapsed: Duration) -> Self {
        let histograms: &Histograms = &tally.histograms.lock().expect("histograms");
        let completed = tally.completed.lock().expect("completed").clone();
        let total: u64 = completed.values().sum();
        Self {
            duration_secs: elapsed.as_secs_f64(),
            submitted: tally.submitted.load(Ordering::Relaxed),
            accepted: tally.accepted.load(Ordering::Relaxed),
            rejected: tally.rejected.lock().expect("rejected").clone(),
            completed,
            lost: tally.lost.load(Ordering::Relaxed),
            throughput_per_sec: total as f64 / elapsed.as_secs_f64().max(1e-3),
            latency: Latencies {
                submit: Percentiles::of(&histograms.submit),
                queue_wait: Percentiles::of(&histograms.queue_wait),
                model: Percentiles::of(&histograms.model),
                end_to_end: Percentiles::of(&histograms.end_to_end),
            },
        }
    }

    pub fn render(&self) -> String {
        let mut text = format!(
            "{:.1} s: submitted {}, accepted {}, LOST {}, {:.1} completed/s\n",
            self.duration_secs, self.submitted, self.accepted, self.lost, self.throughput_per_sec
        );
        text.push_str(&format!(
            "completed: {:?}\nrejected: {:?}\n",
            self.completed, self.rejected
        ));
        text.push_str("latency (ms)      count      p50      p90      p99      max\n");
        for (name, p) in [
            ("submit", &self.latency.submit),
            ("queue wait", &self.latency.queue_wait),
            ("model", &self.latency.model),
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
