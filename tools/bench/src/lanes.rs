//! The priority lanes phase: interactive jobs at a steady rate on an idle pipeline, then the same
//! behind a backlog of batch jobs submitted just before; their queue waits side by side, and the
//! rate at which the batch backlog drained meanwhile.

use crate::capacity::{Target, bench_config, step};
use crate::{Config, Report};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct LanesArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value = "unlimited")]
    pub model: String,
    /// Interactive submissions per second, idle and behind the backlog.
    #[arg(long, default_value_t = 50.0)]
    pub interactive_rate: f64,
    /// Seconds the interactive jobs are submitted for, each time.
    #[arg(long, default_value_t = 20.0)]
    pub duration_secs: f64,
    /// Batch jobs in the backlog.
    #[arg(long, default_value_t = 10_000)]
    pub backlog: u64,
    /// How fast the backlog is submitted, per second.
    #[arg(long, default_value_t = 2_000.0)]
    pub backlog_rate: f64,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Lanes {
    pub interactive_rate: f64,
    /// Seconds the interactive jobs were submitted for, each time.
    pub duration_secs: f64,
    pub backlog: u64,
    pub idle: Report,
    pub behind_backlog: Report,
    pub batch: Report,
    /// Seconds into the batch run when the interactive jobs started.
    pub interactive_started_secs: f64,
    /// Batch jobs finished per second while the interactive jobs were submitted.
    pub batch_drain_per_sec: f64,
}

fn config(args: &LanesArgs, rate: f64, secs: f64, priority: &str) -> Config {
    Config {
        rate: Some(rate),
        priority: Some(priority.to_owned()),
        // A backlog takes its time: batch jobs are not lost for waiting.
        timeout_secs: 600.0,
        ..bench_config(&args.target, &args.model, secs)
    }
}

pub async fn run(args: LanesArgs) -> anyhow::Result<Lanes> {
    let interactive = || {
        config(
            &args,
            args.interactive_rate,
            args.duration_secs,
            "interactive",
        )
    };
    let idle = step(&args.target, interactive()).await?;
    let backlog_secs = args.backlog as f64 / args.backlog_rate;
    let batch = tokio::spawn(crate::run(config(
        &args,
        args.backlog_rate,
        backlog_secs,
        "batch",
    )));
    // The backlog is in before the interactive jobs start.
    tokio::time::sleep(Duration::from_secs_f64(backlog_secs)).await;
    let behind_backlog = step(&args.target, interactive()).await?;
    let batch = batch.await??;
    let from = backlog_secs.ceil() as usize;
    let to = (backlog_secs + args.duration_secs).floor() as usize;
    let drained: u64 = batch
        .completions_per_sec
        .iter()
        .skip(from)
        .take(to.saturating_sub(from))
        .sum();
    Ok(Lanes {
        interactive_rate: args.interactive_rate,
        duration_secs: args.duration_secs,
        backlog: args.backlog,
        idle: idle.report,
        behind_backlog: behind_backlog.report,
        batch_drain_per_sec: drained as f64 / (to.saturating_sub(from)).max(1) as f64,
        interactive_started_secs: backlog_secs,
        batch,
    })
}

/// The BENCHMARKS.md section.
pub fn markdown(lanes: &Lanes, sustainable: f64) -> String {
    let waits = |report: &Report| {
        let wait = &report.latency.queue_wait;
        format!(
            "{:.1} ms | {:.1} ms | {:.1} ms",
            wait.p50_ms, wait.p99_ms, wait.max_ms
        )
    };
    format!(
        "## Priority lanes: interactive work behind a batch backlog\n\n\
         {backlog} batch jobs (`\"priority\": \"batch\"`) submitted at {backlog_rate:.0}/s, then \
         interactive jobs at {rate:.0}/s for {secs:.0} s; the same interactive load first on the \
         idle pipeline. Queue wait is from the job's timings (queued until a worker started it).\n\n\
         | interactive jobs | queue wait p50 | p99 | max | lost |\n|---|---|---|---|---|\n\
         | idle pipeline | {idle} | {idle_lost} |\n\
         | behind {backlog} batch jobs | {busy} | {busy_lost} |\n\n\
         The batch backlog drained at **{drain:.0} jobs/s** while the interactive jobs ran \
         (the sustainable rate is {sustainable:.0}/s); all {batch_done} batch jobs ended, {batch_lost} lost, \
         the last {last:.0} s after the first was submitted.\n\n",
        backlog = lanes.backlog,
        backlog_rate = lanes.batch.offered_per_sec,
        rate = lanes.interactive_rate,
        secs = lanes.duration_secs,
        idle = waits(&lanes.idle),
        idle_lost = lanes.idle.lost,
        busy = waits(&lanes.behind_backlog),
        busy_lost = lanes.behind_backlog.lost,
        drain = lanes.batch_drain_per_sec,
        batch_done = lanes.batch.completed.values().sum::<u64>(),
        batch_lost = lanes.batch.lost,
        last = lanes.batch.duration_secs,
    )
}
