//! The OpenAI-compatible chat completions client: one pooled connection set per worker.

use reqwest::StatusCode;
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

    /// One call to the backend, given at most `timeout`. `timeout_is_deadline` says whether the
    /// job's deadline (not the per-call limit) is what bounds it, which decides the error code.
    pub async fn chat(
        &self,
        request: &RequestEvent,
        timeout: Duration,
        timeout_is_deadline: bool,
    ) -> Result<Output, JobError> {
        let mut body = request.params.clone();
        body.insert("model".into(), request.model.as_str().into());
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
            if timeout_is_deadline {
                job_error(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "the job's deadline passed after {} ms in the model call",
                        timeout.as_millis()
                    ),
                )
            } else {
                job_error(
                    ErrorCode::BackendTimeout,
                    format!(
                        "model backend did not answer within {} ms",
                        timeout.as_millis()
                    ),
                )
            }
        };
        let response = call.send().await.map_err(|error| {
            if error.is_timeout() {
                timed_out()
            } else {
                job_error(
                    ErrorCode::BackendUnreachable,
                    format!("model backend unreachable: {}", error_chain(&error)),
                )
            }
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|error| {
            if error.is_timeout() {
                timed_out()
            } else {
                job_error(
                    ErrorCode::BackendUnreachable,
                    format!("reading the model's answer failed: {error}"),
                )
            }
        })?;
        if !status.is_success() {
            return Err(job_error(
                ErrorCode::BackendError,
                backend_error_message(status, &bytes),
            ));
        }
        let completion: Completion = serde_json::from_slice(&bytes).map_err(|error| {
            job_error(
                ErrorCode::InvalidBackendResponse,
                format!("model answer is not a chat completion: {error}"),
            )
        })?;
        let choice = completion.choices.into_iter().next().ok_or_else(|| {
            job_error(
                ErrorCode::InvalidBackendResponse,
                "model answer has no choices".to_owned(),
            )
        })?;
        Ok(Output {
            content: choice.message.content.unwrap_or_default(),
            finish_reason: choice.finish_reason,
            usage: completion.usage,
        })
    }
}

fn job_error(code: ErrorCode, message: String) -> JobError {
    JobError { code, message }
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
