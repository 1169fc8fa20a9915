//! Webhooks under load: every job at half the sustainable rate asks for its terminal status as a
//! webhook to a receiver in this process, which records when each arrived. Reports the delay
//! from the status to its receipt, and what the webhooks cost the pipeline beside the same load
//! without them (the sweep's half-rate step, in the same run).

use crate::capacity::{Step, Target, bench_config, step};
use crate::{Config, Percentiles};
use axum::body::Bytes;
use axum::routing::post;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Debug, clap::Args)]
pub struct WebhooksArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value = "unlimited")]
    pub model: String,
    #[arg(long)]
    pub rate: f64,
    #[arg(long, default_value_t = 15.0)]
    pub duration_secs: f64,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhooksRun {
    pub rate: f64,
    pub step: Step,
    /// The job reaching its terminal status (the event's `timestamp`) until the receiver had it.
    pub delay: Percentiles,
    pub received: u64,
    /// Events received more than once (at least once allows it).
    pub duplicates: u64,
}

#[derive(Default)]
struct Receipts {
    delays: Option<Histogram<u64>>,
    ids: HashSet<String>,
    received: u64,
}

pub async fn run(args: &WebhooksArgs) -> anyhow::Result<WebhooksRun> {
    let receipts = Arc::new(Mutex::new(Receipts {
        delays: Some(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
        ..Receipts::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks", listener.local_addr()?);
    let app = axum::Router::new().route(
        "/hooks",
        post({
            let receipts = receipts.clone();
            move |headers: axum::http::HeaderMap, body: Bytes| {
                let receipts = receipts.clone();
                async move {
                    let arrived = chrono::Utc::now();
                    let event: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    let status_at = event["timestamp"]
                        .as_str()
                        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok());
                    let mut receipts = receipts.lock().expect("receipts");
                    receipts.received += 1;
                    let id = headers
                        .get("webhook-id")
                        .and_then(|id| id.to_str().ok())
                        .unwrap_or("");
                    receipts.ids.insert(id.to_owned());
                    if let (Some(at), Some(delays)) = (status_at, receipts.delays.as_mut()) {
                        let micros = (arrived - at.with_timezone(&chrono::Utc))
                            .num_microseconds()
                            .unwrap_or(0);
                        let _ = delays.record(micros.max(1) as u64);
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let config = Config {
        rate: Some(args.rate),
        webhook_url: Some(url),
        ..bench_config(&args.target, &args.model, args.duration_secs)
    };
    let step = step(&args.target, config).await?;
    // Deliveries trail the terminal statuses the bench saw; give the last ones a moment.
    let expected: u64 = step.report.completed.values().sum();
    for _ in 0..100 {
        if receipts.lock().expect("receipts").ids.len() as u64 >= expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.abort();
    let receipts = receipts.lock().expect("receipts");
    let run = WebhooksRun {
        rate: args.rate,
        delay: Percentiles::of(receipts.delays.as_ref().expect("histogram")),
        received: receipts.received,
        duplicates: receipts.received - receipts.ids.len() as u64,
        step,
    };
    eprintln!(
        "webhooks at {}/s: {} received ({} twice), delay p50 {:.1} ms, p99 {:.1} ms",
        run.rate, run.received, run.duplicates, run.delay.p50_ms, run.delay.p99_ms
    );
    Ok(run)
}

/// The report's section: the delay, and the cost beside `without` (the same rate, no webhooks).
pub fn markdown(run: &WebhooksRun, without: &Step) -> String {
    use std::fmt::Write as _;
    let mut text = String::from("## Webhooks\n\n");
    let completed: u64 = run.step.report.completed.values().sum();
    let _ = writeln!(
        text,
        "Every job at {:.0}/s asks for its terminal status as a webhook to a receiver in the load generator (the webhooks service on the same machine). {} events received for {completed} completed jobs ({} twice). The job reaching its status until the receiver had it: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms.\n",
        run.rate,
        run.received,
        run.duplicates,
        run.delay.p50_ms,
        run.delay.p90_ms,
        run.delay.p99_ms,
        run.delay.max_ms
    );
    text.push_str("| the same rate | overhead p50 / p99 ms | end to end p50 / p99 ms | lost | CPU ms per job, all processes watched |\n|---|---|---|---:|---:|\n");
    for (name, step) in [
        ("without webhooks (the sweep's half-rate step)", without),
        ("with a webhook on every job", &run.step),
    ] {
        let latency = &step.report.latency;
        let completed: u64 = step.report.completed.values().sum();
        let cpu: f64 = step
            .usage
            .values()
            .map(|usage| usage.cpu_cores)
            .sum::<f64>()
            * step.report.duration_secs
            * 1000.0
            / completed.max(1) as f64;
        let _ = writeln!(
            text,
            "| {name} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {cpu:.2} |",
            latency.overhead.p50_ms,
            latency.overhead.p99_ms,
            latency.end_to_end.p50_ms,
            latency.end_to_end.p99_ms,
            step.report.lost
        );
    }
    text.push('\n');
    text
}
