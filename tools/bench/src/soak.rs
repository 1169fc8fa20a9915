//! The chaos soak's load (`scripts/soak` kills and restarts the stack's parts meanwhile): a
//! steady mix of chat jobs (some streamed), embedding jobs, jobs with a webhook to a receiver in
//! this process, and cancellations, every submission with an `Idempotency-Key` and retried as a
//! client does while ingest, the broker or Redis is away, until it is accepted. Writes the
//! accepted job ids, one per line, for the script to check in Postgres, and what the clients saw.

use axum::routing::post;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Base URL of ingest.
    #[arg(long)]
    pub ingest: String,
    /// Base URL of the results service (cancellations).
    #[arg(long)]
    pub results: String,
    /// Submissions per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    #[arg(long)]
    pub duration_secs: f64,
    /// Longest a client keeps retrying one submission.
    #[arg(long, default_value_t = 180.0)]
    pub give_up_secs: f64,
    /// Where the accepted job ids go, one per line.
    #[arg(long)]
    pub ids_out: PathBuf,
    /// What the clients saw, as JSON.
    #[arg(long)]
    pub out: PathBuf,
}

/// What the clients saw.
#[derive(Debug, Default, Serialize)]
pub struct Load {
    pub submitted: u64,
    pub accepted: u64,
    /// Keys never accepted within `give_up_secs`.
    pub abandoned: u64,
    /// Every key answered with one job id, however often it was retried.
    pub keys_with_two_jobs: u64,
    pub by_kind: BTreeMap<String, u64>,
    /// Answers other than 202 while retrying, by status; and no answer at all.
    pub retried_answers: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub cancels_sent: u64,
    pub cancels_accepted: u64,
    pub webhook_jobs: u64,
    pub webhooks_received: u64,
    pub webhook_events_distinct: u64,
}

#[derive(Default)]
struct Shared {
    load: Load,
    jobs: HashMap<u64, String>,
    webhook_ids: HashSet<String>,
}

/// The job of submission `index`: its kind and body.
fn job(index: u64, webhook_url: &str) -> (&'static str, serde_json::Value) {
    let user = format!("soak-{}", index % 50);
    let text = format!("soak job {index}");
    match index % 10 {
        0..=4 => (
            "chat",
            serde_json::json!({"user_id": user, "model": "sim",
                "messages": [{"role": "user", "content": text}]}),
        ),
        5 | 6 => (
            "streamed chat",
            serde_json::json!({"user_id": user, "model": "sim", "stream": true,
                "messages": [{"role": "user", "content": text}]}),
        ),
        7 | 8 => (
            "embedding",
            serde_json::json!({"user_id": user, "model": "sim", "input": [text]}),
        ),
        _ => (
            "chat with a webhook",
            serde_json::json!({"user_id": user, "model": "sim",
                "messages": [{"role": "user", "content": text}],
                "webhook": {"url": webhook_url}}),
        ),
    }
}

pub async fn run(args: &SoakArgs) -> anyhow::Result<Load> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let webhook_url = format!("http://{}/hooks", listener.local_addr()?);
    let receiver = axum::Router::new().route(
        "/hooks",
        post({
            let shared = shared.clone();
            move |headers: axum::http::HeaderMap| {
                let shared = shared.clone();
                async move {
                    let id = headers
                        .get("webhook-id")
                        .and_then(|id| id.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let mut shared = shared.lock().expect("soak state");
                    shared.load.webhooks_received += 1;
                    shared.webhook_ids.insert(id);
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, receiver).await });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let run_id = run_tag();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    let mut clients = Vec::new();
    let mut index = 0;
    while started.elapsed().as_secs_f64() < args.duration_secs {
        tick.tick().await;
        let client = Client {
            http: http.clone(),
            ingest: args.ingest.clone(),
            results: args.results.clone(),
            key: format!("soak-{run_id}-{index}"),
            give_up: Duration::from_secs_f64(args.give_up_secs),
            shared: shared.clone(),
        };
        let (kind, body) = job(index, &webhook_url);
        clients.push(tokio::spawn(client.submit(index, kind, body)));
        index += 1;
    }
    for client in clients {
        client.await?;
    }
    // Deliveries trail the statuses; the script waits for the jobs, this for the last webhooks.
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.abort();
    let mut shared = std::mem::take(&mut *shared.lock().expect("soak state"));
    let ids: Vec<&String> = shared.jobs.values().collect();
    let mut text = String::new();
    for id in &ids {
        text.push_str(id);
        text.push('\n');
    }
    std::fs::write(&args.ids_out, text)?;
    shared.load.webhook_events_distinct = shared.webhook_ids.len() as u64;
    Ok(shared.load)
}

/// A run's tag for its keys, so a second run's keys are new.
fn run_tag() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    )
}

struct Client {
    http: reqwest::Client,
    ingest: String,
    results: String,
    key: String,
    give_up: Duration,
    shared: Arc<Mutex<Shared>>,
}

impl Client {
    /// Submits until a 202, as a client that got no answer or a 5xx/429 does, honouring
    /// `Retry-After` (at most 2 s); every tenth accepted job is then cancelled.
    async fn submit(self, index: u64, kind: &'static str, body: serde_json::Value) {
        {
            let mut shared = self.shared.lock().expect("soak state");
            shared.load.submitted += 1;
            *shared.load.by_kind.entry(kind.to_owned()).or_default() += 1;
            if kind == "chat with a webhook" {
                shared.load.webhook_jobs += 1;
            }
        }
        let started = Instant::now();
        let job_id = loop {
            let sent = self
                .http
                .post(format!("{}/v1/jobs", self.ingest))
                .header("Idempotency-Key", &self.key)
                .json(&body)
                .send()
                .await;
            let mut wait = Duration::from_millis(250);
            match sent {
                Ok(response) if response.status() == 202 => {
                    let accepted: serde_json::Value = response.json().await.unwrap_or_default();
                    if let Some(id) = accepted["job_id"].as_str() {
                        break Some(id.to_owned());
                    }
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    if let Some(secs) = response
                        .headers()
                        .get("retry-after")
                        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
                    {
                        wait = Duration::from_secs(secs.clamp(1, 2));
                    }
                    let mut shared = self.shared.lock().expect("soak state");
                    *shared.load.retried_answers.entry(status).or_default() += 1;
                }
                Err(_) => {
                    self.shared
                        .lock()
                        .expect("soak state")
                        .load
                        .transport_errors += 1
                }
            }
            if started.elapsed() > self.give_up {
                break None;
            }
            tokio::time::sleep(wait).await;
        };
        let Some(job_id) = job_id else {
            self.shared.lock().expect("soak state").load.abandoned += 1;
            return;
        };
        {
            let mut shared = self.shared.lock().expect("soak state");
            shared.load.accepted += 1;
            if let Some(earlier) = shared.jobs.insert(index, job_id.clone())
                && earlier != job_id
            {
                shared.load.keys_with_two_jobs += 1;
            }
        }
        if index % 10 == 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let cancelled = self
                .http
                .delete(format!("{}/v1/jobs/{job_id}", self.results))
                .send()
                .await;
            let mut shared = self.shared.lock().expect("soak state");
            shared.load.cancels_sent += 1;
            if cancelled.is_ok_and(|response| response.status() == 202) {
                shared.load.cancels_accepted += 1;
            }
        }
    }
}
