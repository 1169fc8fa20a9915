//! A simulated OpenAI-compatible chat model: a fixed service time with jitter, a concurrency
//! capacity beyond which calls queue (as vLLM's scheduler does), and a failure rate.
//!
//! It answers `echo: <last user message>`, so a test can check that the right output was stored,
//! and reports what it saw at `GET /stats` (calls, open calls, peak open calls). With
//! `"stream": true` it streams the answer as OpenAI does (`stream.rs`); given `tools`, it calls
//! the first one (`tool_call`), and answers a tool's result with `echo: <result>`.

mod stream;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How the simulated model behaves.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-model-sim",
    about = "A simulated OpenAI-compatible chat model"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "SIM_ADDR", default_value = "127.0.0.1:8090")]
    pub addr: String,
    /// Time one call spends being served, in milliseconds.
    #[arg(long, env = "SIM_SERVICE_TIME_MS", default_value_t = 50)]
    pub service_time_ms: u64,
    /// Uniform random extra time added to each call, 0 to this many milliseconds.
    #[arg(long, env = "SIM_JITTER_MS", default_value_t = 0)]
    pub jitter_ms: u64,
    /// Calls served at once; more wait in a queue, as at a real inference server.
    #[arg(long, env = "SIM_CAPACITY", default_value_t = 64)]
    pub capacity: usize,
    /// Fraction of calls, 0.0 to 1.0, that fail with `failure_status`.
    #[arg(long, env = "SIM_FAILURE_RATE", default_value_t = 0.0)]
    pub failure_rate: f64,
    /// HTTP status of a simulated failure.
    #[arg(long, env = "SIM_FAILURE_STATUS", default_value_t = 503)]
    pub failure_status: u16,

    /// The first this many calls fail with `failure_status`, whatever the failure rate; for
    /// showing retries.
    #[arg(long, env = "SIM_FAIL_FIRST", default_value_t = 0)]
    pub fail_first: u64,

    /// Seconds sent in `Retry-After` with each simulated failure; none if unset.
    #[arg(long, env = "SIM_RETRY_AFTER_SECS")]
    pub retry_after_secs: Option<u64>,

    /// Streaming (`"stream": true`): the time between two content tokens, in milliseconds. The
    /// service time is then the time to the first token.
    #[arg(long, env = "SIM_TOKEN_TIME_MS", default_value_t = 0)]
    pub token_time_ms: u64,
}

impl Config {
    /// The defaults, as the binary would read them with nothing set.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["sluice-model-sim"])
    }
}

/// What the simulated model has seen, for tests and load reports.
#[derive(Debug, Default)]
pub struct Stats {
    calls: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    failures: AtomicU64,
    disconnected: AtomicU64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub calls: u64,
    pub open: u64,
    pub peak_open: u64,
    pub failures: u64,
    /// Calls whose client went away before the answer was ready.
    pub disconnected: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            calls: self.calls.load(Ordering::SeqCst),
            open: self.open.load(Ordering::SeqCst),
            peak_open: self.peak_open.load(Ordering::SeqCst),
            failures: self.failures.load(Ordering::SeqCst),
            disconnected: self.disconnected.load(Ordering::SeqCst),
        }
    }
}

/// Counts a call as open from arrival until it is answered or the caller goes away (axum then
/// drops the handler's future, and with it this guard, before `answered` is set).
struct OpenCall {
    stats: Arc<Stats>,
    answered: bool,
}

impl OpenCall {
    fn start(stats: Arc<Stats>) -> Self {
        stats.calls.fetch_add(1, Ordering::SeqCst);
        let open = stats.open.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak_open.fetch_max(open, Ordering::SeqCst);
        Self {
            stats,
            answered: false,
        }
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::SeqCst);
        if !self.answered {
            self.stats.disconnected.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[derive(Clone)]
struct AppState {
    config: Arc<Config>,
    capacity: Arc<Semaphore>,
    stats: Arc<Stats>,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    /// Null for an assistant message that only calls tools.
    #[serde(default)]
    content: Option<String>,
}

/// What the model says to a request.
enum Answer {
    Text(String),
    /// A call of this function with these arguments (JSON text).
    ToolCall {
        name: String,
        arguments: String,
    },
}

impl ChatRequest {
    fn answer(&self) -> Answer {
        let last = self.messages.last();
        // A tool's result comes back: answer with it. Tools offered otherwise: call the first.
        if let Some(message) = last.filter(|message| message.role == "tool") {
            return Answer::Text(format!(
                "echo: {}",
                message.content.as_deref().unwrap_or("")
            ));
        }
        let prompt = self
            .messages
            .iter()
            .rev()
            .find(|message| message.role == "user")
            .and_then(|message| message.content.as_deref())
            .unwrap_or("");
        let function = self
            .tools
            .first()
            .and_then(|tool| tool.pointer("/function/name"))
            .and_then(serde_json::Value::as_str);
        match function {
            Some(name) => Answer::ToolCall {
                name: name.to_owned(),
                arguments: serde_json::json!({"text": prompt}).to_string(),
            },
            None => Answer::Text(format!("echo: {prompt}")),
        }
    }

    fn prompt_tokens(&self) -> usize {
        self.messages
            .iter()
            .filter_map(|message| message.content.as_deref())
            .map(|content| content.split_whitespace().count())
            .sum()
    }
}

/// A running simulated model.
pub struct SimModel {
    pub stats: Arc<Stats>,
    router: Router,
}

impl SimModel {
    pub fn new(config: Config) -> Self {
        let stats = Arc::new(Stats::default());
        let state = AppState {
            capacity: Arc::new(Semaphore::new(config.capacity.max(1))),
            config: Arc::new(config),
            stats: stats.clone(),
        };
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .route("/stats", get(stats_handler))
            .route("/healthz", get(sluice_runtime::http::healthz))
            .with_state(state);
        Self { stats, router }
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        axum::serve(sluice_runtime::http::no_delay(listener), self.router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
        Ok(())
    }
}

/// A call's turn at the model: counted, waiting for one of `capacity` slots, then the service
/// time (plus jitter). Dropping the result before it returns counts a disconnect.
async fn serve_turn(state: &AppState) -> OpenCall {
    let mut open = OpenCall::start(state.stats.clone());
    let _slot = state
        .capacity
        .acquire()
        .await
        .expect("the capacity semaphore is never closed");
    let jitter = if state.config.jitter_ms == 0 {
        0
    } else {
        fastrand::u64(0..=state.config.jitter_ms)
    };
    tokio::time::sleep(Duration::from_millis(state.config.service_time_ms + jitter)).await;
    open.answered = true;
    open
}

async fn chat_completions(
    State(state): State<AppState>,
    Json(request): Json<ChatRequest>,
) -> Response {
    let call_number = state.stats.calls.load(Ordering::SeqCst) + 1;
    let open = serve_turn(&state).await;

    let fails = call_number <= state.config.fail_first
        || (state.config.failure_rate > 0.0 && fastrand::f64() < state.config.failure_rate);
    if fails {
        state.stats.failures.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(state.config.failure_status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let body =
            serde_json::json!({"error": {"message": "simulated failure", "type": "server_error"}});
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = state.config.retry_after_secs {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        return response;
    }

    if request.stream {
        return stream::chat(&state, &request, open).into_response();
    }
    drop(open);
    let answer = request.answer();
    let prompt_tokens = request.prompt_tokens();
    let (message, finish_reason, completion_tokens) = match &answer {
        Answer::Text(content) => (
            serde_json::json!({"role": "assistant", "content": content}),
            "stop",
            content.split_whitespace().count(),
        ),
        Answer::ToolCall { name, arguments } => (
            serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_sim_0", "type": "function",
                "function": {"name": name, "arguments": arguments},
            }]}),
            "tool_calls",
            1,
        ),
    };
    Json(serde_json::json!({
        "id": format!("chatcmpl-sim-{}", fastrand::u64(..)),
        "object": "chat.completion",
        "model": request.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    }))
    .into_response()
}

async fn models() -> Json<serde_json::Value> {
    Json(
        serde_json::json!({"object": "list", "data": [{"id": "sim", "object": "model", "owned_by": "sluice"}]}),
    )
}

async fn stats_handler(State(state): State<AppState>) -> Json<StatsSnapshot> {
    Json(state.stats.snapshot())
}

#[derive(serde::Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: serde_json::Value,
}

/// `POST /v1/embeddings`, OpenAI's shape: one 8-dimensional unit vector per text, derived from
/// the text's bytes, so the same text always gets the same vector. A stand-in for a real
/// embedding server (TEI, vLLM, Ollama); it counts as a call like a chat completion does.
async fn embeddings(
    State(state): State<AppState>,
    Json(request): Json<EmbeddingRequest>,
) -> Response {
    let _open = serve_turn(&state).await;
    let texts: Vec<String> = match request.input {
        serde_json::Value::String(text) => vec![text],
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let data: Vec<serde_json::Value> = texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let mut vector = [0f32; 8];
            for (position, byte) in text.bytes().enumerate() {
                vector[position % 8] += f32::from(byte);
            }
            let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
            let unit: Vec<f32> = vector.iter().map(|x| x / norm).collect();
            serde_json::json!({"object": "embedding", "index": index, "embedding": unit})
        })
        .collect();
    let tokens: usize = texts
        .iter()
        .map(|text| text.split_whitespace().count())
        .sum();
    Json(serde_json::json!({
        "object": "list",
        "model": request.model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}
