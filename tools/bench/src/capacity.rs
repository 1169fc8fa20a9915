//! Capacity planning against a running Sluice: sweep offered load to the highest rate that is
//! sustained (nothing lost, p99 end to end under a second), measure the pipeline's overhead at
//! half of it beside the broker's own hop, the goodput against a model of known capacity, and
//! ten times the sustainable rate against a global limit. Each phase writes JSON; `report`
//! turns them into `BENCHMARKS.md` and a plot.

use crate::procfs::{Sampler, Usage, Watched};
use crate::{Config, HopProbe, HopReport, Report};
use serde::{Deserialize, Serialize};
use sluice_common::kafka::KafkaArgs;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What makes a step sustained.
pub const MAX_P99_END_TO_END_MS: f64 = 1000.0;
/// Completions must keep up with submissions to this fraction, or a backlog is growing.
const MIN_KEEP_UP: f64 = 0.95;
/// Seconds at the start of a step left out of its steady throughput.
const WARM_UP_SECS: usize = 2;

#[derive(Debug, clap::Args)]
pub struct Target {
    /// Base URL of ingest.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub ingest: String,
    /// Users the jobs are spread over.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Processes to watch for CPU and memory, `name=pid`, repeated.
    #[arg(long = "watch")]
    pub watched: Vec<Watched>,
}

#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Model of unlimited capacity (a simulated model with a fixed service time, 50 ms in
    /// `scripts/bench`): the sweep measures the pipeline, not the model.
    #[arg(long, default_value = "unlimited")]
    pub unlimited_model: String,
    /// Model of known capacity, for goodput.
    #[arg(long, default_value = "limited")]
    pub limited_model: String,
    /// Requests the limited model serves at once.
    #[arg(long, default_value_t = 32)]
    pub limited_concurrency: usize,
    /// Milliseconds the limited model takes per request.
    #[arg(long, default_value_t = 100.0)]
    pub limited_service_ms: f64,
    /// Seconds each sweep step submits for.
    #[arg(long, default_value_t = 15.0)]
    pub step_secs: f64,
    #[arg(long, default_value_t = 50.0)]
    pub start_rate: f64,
    /// Each step offers this much more than the last, until one is not sustained.
    #[arg(long, default_value_t = 1.4)]
    pub growth: f64,
    #[arg(long, default_value_t = 5000.0)]
    pub max_rate: f64,
    /// Steps of bisection between the last sustained rate and the first that was not.
    #[arg(long, default_value_t = 2)]
    pub refine: usize,
    #[arg(long, default_value = "sluice.bench.hop")]
    pub hop_topic: String,
    /// Where the phase's JSON goes.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct OverloadArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value = "unlimited")]
    pub model: String,
    /// Offered submissions per second.
    #[arg(long)]
    pub rate: f64,
    /// The global limit ingest was started with, for the report.
    #[arg(long)]
    pub global_limit: f64,
    #[arg(long, default_value_t = 30.0)]
    pub duration_secs: f64,
    /// Each job's `timeout_ms`, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_secs: f64,
    /// How ingest was configured, for the report (e.g. `capacity admission off`).
    #[arg(long, default_value = "")]
    pub setting: String,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub rate: f64,
    pub sustained: bool,
    /// Why it was not, when it was not.
    pub verdict: String,
    pub steady_throughput_per_sec: f64,
    pub report: Report,
    pub usage: BTreeMap<String, Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    pub steps: Vec<Step>,
    pub sustainable_rate: f64,
    pub half_rate: Step,
    pub hop: HopReport,
    pub limited: Step,
    pub limited_capacity_per_sec: f64,
    pub limited_clients: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overload {
    pub rate: f64,
    pub duration_secs: f64,
    pub global_limit: f64,
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    #[serde(default)]
    pub setting: String,
    pub step: Step,
}

fn default_timeout_secs() -> f64 {
    60.0
}

pub(crate) fn bench_config(target: &Target, model: &str, secs: f64) -> Config {
    Config {
        ingest: target.ingest.clone(),
        rate: None,
        clients: None,
        users: target.users,
        duration_secs: secs,
        timeout_secs: 60.0,
        model: model.into(),
        api_key: None,
        webhook_url: None,
        priority: None,
        json: None,
        progress: false,
    }
}

/// Runs one load and judges it.
pub(crate) async fn step(target: &Target, config: Config) -> anyhow::Result<Step> {
    let rate = config.rate.unwrap_or_default();
    let submit_secs = config.duration_secs;
    let mut sampler = Sampler::start(&target.watched);
    let report = sampler.during(crate::run(config)).await?;
    let usage = sampler.finish();
    let steady = report.steady_throughput_per_sec(submit_secs, WARM_UP_SECS);
    let rejected: u64 = report.rejected.values().sum();
    let p99 = report.latency.end_to_end.p99_ms;
    let verdict = if report.lost > 0 {
        format!("{} lost", report.lost)
    } else if rejected > 0 {
        format!("{rejected} rejected")
    } else if p99 >= MAX_P99_END_TO_END_MS {
        format!("p99 end to end {p99:.0} ms")
    } else if rate > 0.0 && report.offered_per_sec < MIN_KEEP_UP * rate {
        format!("the bench offered only {:.0}/s", report.offered_per_sec)
    } else if rate > 0.0 && steady < MIN_KEEP_UP * report.offered_per_sec {
        format!("completions {steady:.0}/s fall behind")
    } else {
        String::new()
    };
    let label = match rate > 0.0 {
        true => format!("rate {rate:>7.1}/s"),
        false => "closed loop".to_owned(),
    };
    eprintln!(
        "{label}: offered {:.1}/s, steady {steady:.1}/s, p50 {:.1} ms, p99 {p99:.1} ms, lost {} {}",
        report.offered_per_sec,
        report.latency.end_to_end.p50_ms,
        report.lost,
        if verdict.is_empty() {
            "-> sustained"
        } else {
            &verdict
        },
    );
    Ok(Step {
        rate,
        sustained: verdict.is_empty(),
        verdict,
        steady_throughput_per_sec: steady,
        report,
        usage,
    })
}

async fn open_loop(args: &SweepArgs, model: &str, rate: f64) -> anyhow::Result<Step> {
    let config = Config {
        rate: Some(rate),
        ..bench_config(&args.target, model, args.step_secs)
    };
    step(&args.target, config).await
}

/// A sweep's steps: from `start`, `growth` times more each step up to `max`, until one is not
/// sustained, then `refine` bisections between the highest rate sustained and the lowest not.
/// Returns every step and the highest rate sustained (0 when none was).
pub async fn climb<S, Fut>(
    start: f64,
    growth: f64,
    max: f64,
    refine: usize,
    mut step: impl FnMut(f64) -> Fut,
    sustained: impl Fn(&S) -> bool,
) -> anyhow::Result<(Vec<S>, f64)>
where
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    let mut steps = Vec::new();
    let mut best = 0.0_f64;
    let mut first_failed = None;
    let mut rate = start;
    while rate <= max {
        let result = step(rate).await?;
        let held = sustained(&result);
        steps.push(result);
        if !held {
            first_failed = Some(rate);
            break;
        }
        best = best.max(rate);
        rate = (rate * growth).round();
    }
    if let Some(mut high) = first_failed {
        for _ in 0..refine {
            let middle = ((best + high) / 2.0).round();
            let result = step(middle).await?;
            match sustained(&result) {
                true => best = best.max(middle),
                false => high = middle,
            }
            steps.push(result);
        }
    }
    Ok((steps, best))
}

pub async fn sweep(args: SweepArgs) -> anyhow::Result<Sweep> {
    // Connections, consumer fetch sessions and Postgres caches warm up first, unmeasured.
    let warm_up = Config {
        rate: Some(args.start_rate),
        ..bench_config(&args.target, &args.unlimited_model, 5.0)
    };
    crate::run(warm_up).await?;
    let (steps, sustainable_rate) = climb(
        args.start_rate,
        args.growth,
        args.max_rate,
        args.refine,
        |rate| open_loop(&args, &args.unlimited_model, rate),
        |step: &Step| step.sustained,
    )
    .await?;
    anyhow::ensure!(
        sustainable_rate > 0.0,
        "not even {}/s was sustained",
        args.start_rate
    );

    // Half the sustainable rate, with the broker's own hop measured at the same time.
    let probe = HopProbe {
        kafka: args.kafka.clone(),
        topic: args.hop_topic.clone(),
        rate_per_sec: 50.0,
        duration: Duration::from_secs_f64(args.step_secs),
    };
    let (half_rate, hop) = tokio::join!(
        open_loop(
            &args,
            &args.unlimited_model,
            (sustainable_rate / 2.0).round()
        ),
        probe.run()
    );

    // Goodput: closed loop with three clients per request the model can hold at once, so the
    // model always has work and the pipeline's part shows as lost capacity.
    let clients = args.limited_concurrency * 3;
    let limited_config = Config {
        clients: Some(clients),
        ..bench_config(&args.target, &args.limited_model, args.step_secs * 2.0)
    };
    let limited = step(&args.target, limited_config).await?;
    Ok(Sweep {
        steps,
        sustainable_rate,
        half_rate: half_rate?,
        hop: hop?,
        limited,
        limited_capacity_per_sec: args.limited_concurrency as f64 * 1000.0
            / args.limited_service_ms,
        limited_clients: clients,
    })
}

pub async fn overload(args: OverloadArgs) -> anyhow::Result<Overload> {
    let config = Config {
        rate: Some(args.rate),
        timeout_secs: args.timeout_secs,
        ..bench_config(&args.target, &args.model, args.duration_secs)
    };
    let step = step(&args.target, config).await?;
    Ok(Overload {
        rate: args.rate,
        duration_secs: args.duration_secs,
        global_limit: args.global_limit,
        timeout_secs: args.timeout_secs,
        setting: args.setting,
        step,
    })
}

pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read(path)
        .map_err(|error| anyhow::anyhow!("reading {}: {error}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}
