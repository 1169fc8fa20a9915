//! The OpenAI-compatible chat completions client: one pooled connection set per backend.

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sluice_schemas::{ErrorCode, JobError, Output, RequestEvent, Usage};
use std::time::Duration;

#[derive(Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    completions_url: String,
    api_key: Option<SecretString>,
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
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
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
        let completions_url = format!("{}/v1/chat/completions", base_url.trim_end_matches('/'));
        Ok(Self {
            http,
            completions_url,
            api_key,
        })
    }

    /// One call to the backend for `model`, given at most `timeout`. `timeout_is_deadline` says
    /// whether the job's deadline (not the per-attempt limit) is what bounds it.
    pub async fn chat(
        &self,
        request: &RequestEvent,
        model: &str,
        timeout: Duration,
        timeout_is_deadline: bool,
    ) -> Result<Output, CallError> {
        let mut body = request.params.clone();
        body.insert("model".into(), model.into());
        body.insert(
            "messages".into(),
            serde_json::to_value(&request.messages).expect("messages serialize"),
        );
        body.insert("stream".into(), false.into());

        let mut call = self
            .http
            .post(&self.completions_url)
            .timeout(timeout)
            .json(&body);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.expose_secret());
        }
        let timed_out = || {
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
        };
        let unreachable = |error: reqwest::Error| {
            if error.is_timeout() {
                timed_out()
            } else {
                CallError::new(
                    ErrorCode::BackendUnreachable,
                    Failure::Retryable,
                    format!("model backend unreachable: {}", error_chain(&error)),
                )
            }
        };
        let response = call.send().await.map_err(unreachable)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
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
            return Err(error);
        }
        let invalid = |message: String| {
            CallError::new(ErrorCode::InvalidBackendResponse, Failure::Fatal, message)
        };
        let completion: Completion = serde_json::from_slice(&bytes)
            .map_err(|error| invalid(format!("model answer is not a chat completion: {error}")))?;
        let choice = completion
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| invalid("model answer has no choices".to_owned()))?;
        Ok(Output {
            content: choice.message.content.unwrap_or_default(),
            model: Some(model.to_owned()),
            degraded: false,
            cached: false,
            finish_reason: choice.finish_reason,
            usage: completion.usage,
        })
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
