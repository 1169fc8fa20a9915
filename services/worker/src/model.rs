//! The model clients: OpenAI-compatible chat completions and embeddings over HTTP (one pooled
//! connection set per backend), or the in-process embedding model.

use crate::embed::Embedder;
use crate::streaming::{self, DeltaSink};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sluice_schemas::{ErrorCode, JobError, Message, Output, RequestEvent, Task, Usage};
use std::time::Duration;

#[derive(Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<SecretString>,
    /// Set for the in-process model's backend: embeddings are computed here, not fetched.
    local: Option<Embedder>,
}

/// How a failed call may be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Worth another attempt: unreachable, per-attempt timeout, 408, 429, 5xx.
    Retryable,
    /// About the request itself (other 4xx, a malformed answer): fail at once.
    Fatal,
    /// The job's deadline cut the call off: nothing more can be tried.
    DeadlineCut,
}

/// A failed call, with what the caller needs to decide what comes next.
#[derive(Debug, Clone)]
pub struct CallError {
    pub error: JobError,
    pub failure: Failure,
    /// The backend's `Retry-After` (or `retry-after-ms`), if it sent one.
    pub retry_after: Option<Duration>,
}

impl CallError {
    fn new(code: ErrorCode, failure: Failure, message: String) -> Self {
        Self {
            error: JobError { code, message },
            failure,
            retry_after: None,
        }
    }
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
}

/// The answer's message: all of it is kept, not only the text.
#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    function_call: Option<serde_json::Value>,
    #[serde(default)]
    refusal: Option<String>,
}

/// OpenAI's embeddings answer (vLLM, TEI, Ollama and llama.cpp answer the same shape).
#[derive(Deserialize)]
struct EmbeddingList {
    data: Vec<EmbeddingItem>,
    #[serde(default)]
    usage: Option<EmbeddingUsage>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    embedding: Vec<f32>,
    #[serde(default)]
    index: Option<usize>,
}

#[derive(Deserialize)]
struct EmbeddingUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
}

fn embedding_output(model: &str, vectors: Vec<Vec<f32>>, prompt_tokens: u64) -> Output {
    Output {
        model: Some(model.to_owned()),
        dimensions: vectors.first().map(Vec::len),
        embeddings: Some(vectors),
        usage: Some(Usage {
            prompt_tokens,
            completion_tokens: 0,
            total_tokens: prompt_tokens,
        }),
        ..Output::default()
    }
}

impl ModelClient {
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            local: None,
        })
    }

    /// The client of the in-process embedding model.
    pub fn local(embedder: Embedder) -> Self {
        Self {
            http: reqwest::Client::new(),
            base_url: String::new(),
            api_key: None,
            local: Some(embedder),
        }
    }

    /// One call to the backend for `model`, given at most `timeout`: a chat completion or
    /// embeddings, as the job asks. `timeout_is_deadline` says whether the job's deadline (not
    /// the per-attempt limit) is what bounds it.
    pub(crate) async fn call(
        &self,
        request: &RequestEvent,
        model: &str,
        timeout: Duration,
        timeout_is_deadline: bool,
        sink: Option<&mut DeltaSink>,
    ) -> Result<Output, CallError> {
        match (&request.task, &self.local) {
            (Task::Chat(messages), None) => {
                let limit = Limit {
                    timeout,
                    timeout_is_deadline,
                };
                self.chat(request, messages, model, limit, sink).await
            }
            (Task::Embedding(texts), None) => {
                let mut body = request.params.clone();
                body.insert("model".into(), model.into());
                let expected = texts.len();
                body.insert("input".into(), texts.clone().into());
                let bytes = self
                    .post("/v1/embeddings", &body, timeout, timeout_is_deadline)
                    .await?;
                let list: EmbeddingList = serde_json::from_slice(&bytes).map_err(|error| {
                    invalid(format!("model answer is not an embedding list: {error}"))
                })?;
                let mut items = list.data;
                items.sort_by_key(|item| item.index.unwrap_or(0));
                let vectors: Vec<Vec<f32>> = items.into_iter().map(|item| item.embedding).collect();
                if vectors.len() != expected {
                    return Err(invalid(format!(
                        "model answered {} vectors for {expected} texts",
                        vectors.len()
                    )));
                }
                let tokens = list
                    .usage
                    .map_or(0, |usage| usage.prompt_tokens.max(usage.total_tokens));
                Ok(embedding_output(model, vectors, tokens))
            }
            (Task::Embedding(texts), Some(embedder)) => {
                match tokio::time::timeout(timeout, embedder.embed(texts.clone())).await {
                    Ok(Ok(embedded)) => Ok(embedding_output(
                        model,
                        embedded.vectors,
                        embedded.tokens as u64,
                    )),
                    Ok(Err(error)) => Err(CallError::new(
                        ErrorCode::BackendError,
                        Failure::Fatal,
                        format!("the in-process embedding model failed: {error:#}"),
                    )),
                    Err(_) => Err(timed_out(timeout, timeout_is_deadline)),
                }
            }
            (Task::Chat(_), Some(_)) => Err(CallError::new(
                ErrorCode::BackendError,
                Failure::Fatal,
                format!("{model} is the in-process embedding model: send `input`, not `messages`"),
            )),
        }
    }

    async fn chat(
        &self,
        request: &RequestEvent,
        messages: &[Message],
        model: &str,
        limit: Limit,
        sink: Option<&mut DeltaSink>,
    ) -> Result<Output, CallError> {
        let mut body = request.params.clone();
        body.insert("model".into(), model.into());
        body.insert(
            "messages".into(),
            serde_json::to_value(messages).expect("messages serialize"),
        );
        body.insert("stream".into(), sink.is_some().into());
        if let Some(sink) = sink {
            body.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
            let response = self.send("/v1/chat/completions", &body, limit).await?;
            return streaming::read_chat_stream(response, model, sink, |error| {
                limit.broken(&error)
            })
            .await;
        }
        let bytes = self
            .post(
                "/v1/chat/completions",
                &body,
                limit.timeout,
                limit.timeout_is_deadline,
            )
            .await?;
        let completion: Completion = serde_json::from_slice(&bytes)
            .map_err(|error| invalid(format!("model answer is not a chat completion: {error}")))?;
        let choice = completion
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| invalid("model answer has no choices".to_owned()))?;
        let message = choice.message;
        Ok(Output {
            content: message.content.unwrap_or_default(),
            model: Some(model.to_owned()),
            finish_reason: choice.finish_reason,
            tool_calls: message.tool_calls.filter(|calls| !calls.is_empty()),
            function_call: message.function_call.filter(|call| !call.is_null()),
            refusal: message.refusal,
            logprobs: choice.logprobs.filter(|logprobs| !logprobs.is_null()),
            usage: completion.usage,
            ..Output::default()
        })
    }

    /// POSTs `body` to `path`; a non-2xx answer or a transport failure becomes a `CallError`
    /// that says whether another attempt may help.
    async fn post(
        &self,
        path: &str,
        body: &serde_json::Map<String, serde_json::Value>,
        timeout: Duration,
        timeout_is_deadline: bool,
    ) -> Result<bytes::Bytes, CallError> {
        let limit = Limit {
            timeout,
            timeout_is_deadline,
        };
        let response = self.send(path, body, limit).await?;
        response.bytes().await.map_err(|error| limit.broken(&error))
    }

    /// POSTs `body` to `path` and returns the answer once its status says success; the body
    /// is the caller's to read (whole, or as a stream). `limit` bounds the whole exchange.
    async fn send(
        &self,
        path: &str,
        body: &serde_json::Map<String, serde_json::Value>,
        limit: Limit,
    ) -> Result<reqwest::Response, CallError> {
        let mut call = self
            .http
            .post(format!("{}{path}", self.base_url))
            .timeout(limit.timeout)
            .json(body);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.expose_secret());
        }
        let response = call.send().await.map_err(|error| limit.broken(&error))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|error| limit.broken(&error))?;
        let retryable = status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error();
        let failure = if retryable {
            Failure::Retryable
        } else {
            Failure::Fatal
        };
        let mut error = CallError::new(
            ErrorCode::BackendError,
            failure,
            backend_error_message(status, &bytes),
        );
        error.retry_after = retry_after;
        Err(error)
    }
}

/// How long a call may take, and whether the job's deadline (not the per-attempt limit) is
/// what bounds it.
#[derive(Debug, Clone, Copy)]
struct Limit {
    timeout: Duration,
    timeout_is_deadline: bool,
}

impl Limit {
    /// A transport failure: a timeout against this limit, or an unreachable backend.
    fn broken(&self, error: &reqwest::Error) -> CallError {
        if error.is_timeout() {
            timed_out(self.timeout, self.timeout_is_deadline)
        } else {
            CallError::new(
                ErrorCode::BackendUnreachable,
                Failure::Retryable,
                format!("model backend unreachable: {}", error_chain(error)),
            )
        }
    }
}

fn invalid(message: String) -> CallError {
    CallError::new(ErrorCode::InvalidBackendResponse, Failure::Fatal, message)
}

fn timed_out(timeout: Duration, timeout_is_deadline: bool) -> CallError {
    let millis = timeout.as_millis();
    if timeout_is_deadline {
        CallError::new(
            ErrorCode::Timeout,
            Failure::DeadlineCut,
            format!("the job's deadline passed {millis} ms into the model call"),
        )
    } else {
        CallError::new(
            ErrorCode::BackendTimeout,
            Failure::Retryable,
            format!("model backend did not answer within {millis} ms"),
        )
    }
}

/// `retry-after-ms` (OpenAI's) or `Retry-After` in seconds; HTTP dates are not honoured.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|value| value.is_finite() && *value >= 0.0)
    };
    number("retry-after-ms")
        .map(|millis| Duration::from_secs_f64(millis / 1000.0))
        .or_else(|| number("retry-after").map(Duration::from_secs_f64))
}

/// Follows `source()` so "error sending request" also says "connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `model backend answered 503 Service Unavailable: <the backend's own message>`.
fn backend_error_message(status: StatusCode, body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|json| {
            json.pointer("/error/message")
                .or_else(|| json.pointer("/message"))
                .or_else(|| json.get("error"))
                .and_then(|value| value.as_str().map(str::to_owned))
        });
    let detail = from_json
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned());
    format!("model backend answered {status}: {detail}")
}
