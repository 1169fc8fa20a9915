//! A load generator for a running Sluice, through its public HTTP API: open loop at a target
//! rate or closed loop with N clients, over U users. Every accepted job is followed over SSE to
//! its terminal status; one that gets none within the timeout is counted LOST.

pub mod capacity;
mod hop;
pub mod lanes;
pub mod markdown;
mod plot;
mod procfs;
pub use procfs::status_kib;
mod report;
pub mod soak;
pub mod streaming;
pub mod webhooks;

pub use hop::{HopProbe, HopReport};
pub use markdown::ReportArgs;
pub use procfs::Watched;
pub use report::{Latencies, Percentiles, Report};

use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-bench",
    about = "Load a running Sluice and follow every job to its end"
)]
pub struct Config {
    /// Base URL of ingest.
    #[arg(
        long,
        env = "SLUICE_BENCH_INGEST",
        default_value = "http://127.0.0.1:8080"
    )]
    pub ingest: String,
    /// Open loop: submissions per second, whatever the answers take.
    #[arg(long, conflicts_with = "clients")]
    pub rate: Option<f64>,
    /// Closed loop: this many clients, each submitting its next job when the last one ended.
    #[arg(long)]
    pub clients: Option<usize>,
    /// Users the jobs are spread over (`bench-user-0` ...).
    #[arg(long, default_value_t = 10)]
    pub users: usize,
    /// How long to submit, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// The jobs' deadline (`timeout_ms`); an accepted job with no terminal status a minute after
    /// it counts as lost.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_secs: f64,
    /// Model name sent with every job.
    #[arg(long, default_value = "sim")]
    pub model: String,
    /// API key (`Authorization: Bearer`), when ingest has keys on; the key decides the user.
    #[arg(long, env = "SLUICE_BENCH_API_KEY")]
    pub api_key: Option<String>,
    /// The jobs' lane, `interactive` or `batch`; unset sends none (interactive).
    #[arg(long)]
    pub priority: Option<String>,
    /// Every job asks for its terminal status as a webhook to this URL.
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Write the report as JSON here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Live progress on stderr.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub progress: bool,
}

/// What every job task reports into.
struct Tally {
    started: Instant,
    submitted: AtomicU64,
    accepted: AtomicU64,
    finished: AtomicU64,
    lost: AtomicU64,
    /// Accepted jobs whose stream brought no terminal event within the grace, but whose record
    /// was terminal when read then.
    late: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
    completed: Mutex<BTreeMap<String, u64>>,
    histograms: Mutex<Histograms>,
    /// Jobs reaching a terminal status, by second since the start.
    completions_per_sec: Mutex<Vec<u64>>,
}

impl Tally {
    fn new(started: Instant) -> Self {
        Self {
            started,
            submitted: AtomicU64::default(),
            accepted: AtomicU64::default(),
            finished: AtomicU64::default(),
            lost: AtomicU64::default(),
            late: AtomicU64::default(),
            rejected: Mutex::default(),
            completed: Mutex::default(),
            histograms: Mutex::default(),
            completions_per_sec: Mutex::default(),
        }
    }

    fn count_completion(&self) {
        let second = self.started.elapsed().as_secs() as usize;
        let mut per_sec = self.completions_per_sec.lock().expect("completions");
        if per_sec.len() <= second {
            per_sec.resize(second + 1, 0);
        }
        per_sec[second] += 1;
    }
}

struct Histograms {
    submit: Histogram<u64>,
    rejection: Histogram<u64>,
    queue_wait: Histogram<u64>,
    model: Histogram<u64>,
    delivery: Histogram<u64>,
    overhead: Histogram<u64>,
    end_to_end: Histogram<u64>,
}

impl Default for Histograms {
    fn default() -> Self {
        let histogram = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Self {
            submit: histogram(),
            rejection: histogram(),
            queue_wait: histogram(),
            model: histogram(),
            delivery: histogram(),
            overhead: histogram(),
            end_to_end: histogram(),
        }
    }
}

fn micros(duration: Duration) -> u64 {
    (duration.as_micros() as u64).max(1)
}

pub async fn run(config: Config) -> anyhow::Result<Report> {
    anyhow::ensure!(
        config.rate.is_some() || config.clients.is_some(),
        "give --rate (open loop) or --clients (closed loop)"
    );
    anyhow::ensure!(config.users > 0, "--users must be above 0");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let started = Instant::now();
    let tally = Arc::new(Tally::new(started));
    let config = Arc::new(config);
    let until = started + Duration::from_secs_f64(config.duration_secs);
    let progress = config
        .progress
        .then(|| spawn_progress(tally.clone(), started));

    let mut jobs = JoinSet::new();
    match (config.rate, config.clients) {
        (Some(rate), _) => {
            anyhow::ensure!(rate > 0.0, "--rate must be above 0");
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut index = 0usize;
            while Instant::now() < until {
                tick.tick().await;
                let (http, config, tally) = (http.clone(), config.clone(), tally.clone());
                jobs.spawn(async move { one_job(&http, &config, &tally, index).await });
                index += 1;
            }
        }
        (None, Some(clients)) => {
            for client in 0..clients {
                let (http, config, tally) = (http.clone(), config.clone(), tally.clone());
                jobs.spawn(async move {
                    let mut index = client;
                    while Instant::now() < until {
                        one_job(&http, &config, &tally, index).await;
                        index += clients;
                    }
                });
            }
        }
        (None, None) => unreachable!("checked above"),
    }
    while jobs.join_next().await.is_some() {}
    if let Some(bar) = progress {
        bar.abort();
    }
    Ok(Report::from_tally(&tally, &config, started.elapsed()))
}

/// Submits one job and follows it to its end.
async fn one_job(http: &reqwest::Client, config: &Config, tally: &Tally, index: usize) {
    let mut body = serde_json::json!({
        "model": config.model,
        "messages": [{"role": "user", "content": format!("bench job {index} at {:?}", Instant::now())}],
        "timeout_ms": (config.timeout_secs * 1000.0) as u64,
    });
    if let Some(url) = &config.webhook_url {
        body["webhook"] = serde_json::json!({"url": url});
    }
    if let Some(priority) = &config.priority {
        body["priority"] = priority.as_str().into();
    }
    // With an API key the key decides the user; without, the jobs are spread over `users`.
    if config.api_key.is_none() {
        body["user_id"] = format!("bench-user-{}", index % config.users).into();
    }
    // A submission is answered in milliseconds or it has failed: bounded, so that one the
    // client side lost track of (its connection gone under an overload) ends the run.
    let request = with_key(
        http.post(format!("{}/v1/jobs", config.ingest.trim_end_matches('/'))),
        config.api_key.as_deref(),
    )
    .timeout(SUBMIT_TIMEOUT)
    .json(&body);
    let submitted = Instant::now();
    tally.submitted.fetch_add(1, Ordering::Relaxed);
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return reject(tally, format!("transport: {}", root_cause(&error))),
    };
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    let submit_time = micros(submitted.elapsed());
    {
        let mut histograms = tally.histograms.lock().expect("histograms");
        match status.is_success() {
            true => histograms.submit.saturating_record(submit_time),
            false => histograms.rejection.saturating_record(submit_time),
        }
    }
    if !status.is_success() {
        let code = answer
            .pointer("/error/code")
            .and_then(|code| code.as_str())
            .unwrap_or("unknown");
        return reject(tally, format!("{} {code}", status.as_u16()));
    }
    tally.accepted.fetch_add(1, Ordering::Relaxed);
    let Some(events_url) = answer["events_url"].as_str() else {
        return reject(tally, "no events_url".into());
    };
    // The job's deadline is `timeout_secs`; a job still queued then ends `expired` when a worker
    // reaches it, which under a backlog is later. Lost is no terminal status even a minute after.
    let deadline = Duration::from_secs_f64(config.timeout_secs) + LATE_GRACE;
    match tokio::time::timeout(
        deadline,
        follow(http, events_url, config.api_key.as_deref()),
    )
    .await
    {
        Ok(Some((status, job))) => {
            let end_to_end = micros(submitted.elapsed());
            let arrived = chrono::Utc::now();
            tally.count_completion();
            *tally
                .completed
                .lock()
                .expect("completed")
                .entry(status)
                .or_default() += 1;
            let mut histograms = tally.histograms.lock().expect("histograms");
            histograms.end_to_end.saturating_record(end_to_end);
            let timing = |name: &str| {
                job.pointer(&format!("/timings/{name}"))
                    .and_then(serde_json::Value::as_u64)
            };
            if let Some(wait) = timing("queue_wait_ms") {
                histograms
                    .queue_wait
                    .saturating_record((wait * 1000).max(1));
            }
            if let Some(run) = timing("run_ms") {
                histograms.model.saturating_record((run * 1000).max(1));
                // What Sluice adds to the model's own time: the pipeline's overhead.
                histograms
                    .overhead
                    .saturating_record(end_to_end.saturating_sub(run * 1000).max(1));
            }
            // From the worker finishing to the browser hearing of it: the status event's hop
            // through the broker, the results write and the SSE push (one machine, one clock).
            if let Some(finished) = job
                .pointer("/timings/finished_at")
                .and_then(serde_json::Value::as_str)
                .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
            {
                let delivery = arrived.signed_duration_since(finished);
                histograms
                    .delivery
                    .saturating_record((delivery.num_microseconds().unwrap_or(0).max(1)) as u64);
            }
        }
        // No terminal event over SSE within the grace: lost, unless the job's own record says
        // it ended (then its stream, not the job, was late: under an overload the load
        // generator runs out of descriptors and its streams reconnect for seconds on end).
        _ => match stored_status(http, &answer, config.api_key.as_deref()).await {
            Some(status) if TERMINAL.contains(&status.as_str()) => {
                tally.late.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                tally.lost.fetch_add(1, Ordering::Relaxed);
            }
        },
    }
    tally.finished.fetch_add(1, Ordering::Relaxed);
}

/// The status `GET /v1/jobs/{id}` gives for an accepted job (`status_url` in its 202), retried
/// for up to 10 s while the answer is not a job.
async fn stored_status(
    http: &reqwest::Client,
    answer: &serde_json::Value,
    api_key: Option<&str>,
) -> Option<String> {
    let url = answer["status_url"].as_str()?;
    for _ in 0..50 {
        let request = with_key(http.get(url), api_key).timeout(SUBMIT_TIMEOUT);
        if let Ok(response) = request.send().await
            && response.status().is_success()
            && let Ok(job) = response.json::<serde_json::Value>().await
            && let Some(status) = job["status"].as_str()
        {
            return Some(status.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The request with the API key as its bearer token, if the run has one.
fn with_key(request: reqwest::RequestBuilder, api_key: Option<&str>) -> reqwest::RequestBuilder {
    match api_key {
        Some(key) => request.bearer_auth(key),
        None => request,
    }
}

/// The innermost error under a failed request (e.g. the connect error under reqwest's "error
/// sending request"), which says what went wrong.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

fn reject(tally: &Tally, reason: String) {
    *tally
        .rejected
        .lock()
        .expect("rejected")
        .entry(reason)
        .or_default() += 1;
    tally.finished.fetch_add(1, Ordering::Relaxed);
}

/// Longest a submission may take before it counts as a transport failure.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long after its deadline an accepted job may still report its terminal status.
const LATE_GRACE: Duration = Duration::from_secs(60);

const TERMINAL: [&str; 4] = ["succeeded", "failed", "expired", "cancelled"];

/// Reads the job's SSE stream until a terminal event: its status and job JSON.
async fn follow(
    http: &reqwest::Client,
    events_url: &str,
    api_key: Option<&str>,
) -> Option<(String, serde_json::Value)> {
    loop {
        let Ok(response) = with_key(http.get(events_url), api_key).send().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|line| line.strip_prefix(name))
                        .map(str::to_owned)
                };
                if let (Some(event), Some(data)) = (field("event: "), field("data: "))
                    && TERMINAL.contains(&event.as_str())
                {
                    return Some((event, serde_json::from_str(&data).unwrap_or_default()));
                }
            }
        }
        // The stream ended without a terminal event (a results replica restarting): reconnect.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spawn_progress(tally: Arc<Tally>, started: Instant) -> tokio::task::JoinHandle<()> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .expect("a valid template"),
    );
    tokio::spawn(async move {
        loop {
            let submitted = tally.submitted.load(Ordering::Relaxed);
            let accepted = tally.accepted.load(Ordering::Relaxed);
            let finished = tally.finished.load(Ordering::Relaxed);
            let completed: u64 = tally.completed.lock().expect("completed").values().sum();
            let rejected: u64 = tally.rejected.lock().expect("rejected").values().sum();
            let rate = submitted as f64 / started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!(
                "submitted {submitted}  accepted {accepted}  completed {completed}  rejected {rejected}  in flight {}  {rate:.0}/s",
                submitted.saturating_sub(finished)
            ));
            bar.tick();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}
