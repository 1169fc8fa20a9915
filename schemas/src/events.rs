//! The two events on Sluice's topics: a request to run a job, and a change in a job's status.

use crate::domain::{FieldError, JobId, ModelName, UserId};
use crate::request::RequestEvent;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The `schema_version` this build writes; it reads this version only.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a record could not be turned into an event; becomes the dead-letter reason.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not valid JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Field(#[from] FieldError),
    #[error("unsupported schema_version {found}; this build reads {SCHEMA_VERSION}")]
    UnsupportedVersion { found: u32 },
}

impl DecodeError {
    /// A short, stable label for metrics and the dead-letter `dlq-reason` prefix.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "invalid_json",
            DecodeError::Field(_) => "invalid_field",
            DecodeError::UnsupportedVersion { .. } => "unsupported_schema_version",
        }
    }
}

/// Parses JSON into `T`, telling a syntax error (`Json`) from a well-formed document with a
/// wrong or missing field (`Field`, naming the field's path, e.g. `messages[1].role`).
pub fn decode_json<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(payload);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if !inner.is_data() {
            return DecodeError::Json(inner.to_string());
        }
        let message = inner.to_string();
        // A missing field is reported at its parent; name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_owned());
        let field = match (path.as_str(), missing) {
            (".", Some(name)) => name,
            (".", None) => "body".to_owned(),
            (parent, Some(name)) => format!("{parent}.{name}"),
            (parent, None) => parent.to_owned(),
        };
        DecodeError::Field(FieldError::new(field, message))
    })
}

pub(crate) fn check_version(found: u32) -> Result<(), DecodeError> {
    if found != SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedVersion { found });
    }
    Ok(())
}

/// Where a job is in its life. The order of the variants is the order of progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Expired,
        JobStatus::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        self.rank() == 2
    }

    /// 0 queued, 1 running, 2 terminal: a job only ever moves to a higher rank.
    pub fn rank(self) -> i16 {
        match self {
            JobStatus::Queued => 0,
            JobStatus::Running => 1,
            JobStatus::Succeeded
            | JobStatus::Failed
            | JobStatus::Expired
            | JobStatus::Cancelled => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Expired => "expired",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

/// A stable, machine-readable reason for a job that did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The model backend could not be reached (connection refused, DNS, TLS).
    BackendUnreachable,
    /// The model backend did not answer within the per-request timeout.
    BackendTimeout,
    /// The model backend answered with a non-2xx status.
    BackendError,
    /// The model backend answered 2xx with a body that is not a chat completion.
    InvalidBackendResponse,
    /// The job's deadline passed before a worker could start it (status `expired`).
    DeadlineExceeded,
    /// The job's deadline passed during the model call, which was cut off.
    Timeout,
    /// Every backend that could answer has its circuit open after repeated failures.
    CircuitOpen,
    /// The job was cancelled.
    Cancelled,
    /// Sluice itself failed.
    Internal,
}

/// Why a job did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
}

/// Token counts, as the backend reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// What the model answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// A chat job's answer; empty for an embedding job.
    #[serde(default)]
    pub content: String,
    /// The model that answered: the requested one or a fallback from the chain.
    #[serde(default)]
    pub model: Option<String>,
    /// True when the content is the configured static fallback, not a model's answer.
    #[serde(default)]
    pub degraded: bool,
    /// True when the answer came from the response cache or an identical call in flight,
    /// not from a model call made for this job.
    #[serde(default)]
    pub cached: bool,
    /// True when the job asked for its answer streamed: `delta` events carried it as it was
    /// generated (or, for a cache hit or a shared answer, carry it whole before the terminal
    /// status).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streamed: bool,
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The tool calls the model made (`finish_reason` `tool_calls`), as it made them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// The legacy function call, for backends that still answer with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<serde_json::Value>,
    /// The model's refusal message, when it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// The token log probabilities, when the request asked for them (`logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub usage: Option<Usage>,
    /// An embedding job's vectors, one per input text, in input order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<Vec<Vec<f32>>>,
    /// The length of each vector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<usize>,
}

/// When the job reached each stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub queued_at: DateTime<Utc>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}

/// Published to the status topic, keyed by `user_id`: "this job is now in this status".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub schema_version: u32,
    pub job_id: JobId,
    pub user_id: UserId,
    pub model: ModelName,
    pub status: JobStatus,
    #[serde(default)]
    pub output: Option<Output>,
    #[serde(default)]
    pub error: Option<JobError>,
    /// 1 for the first call to the model; 0 for a job that never reached a model.
    pub attempt: u32,
    pub timings: Timings,
    #[serde(default)]
    pub worker_id: Option<String>,
    pub emitted_at: DateTime<Utc>,
    /// The job's webhook, copied from its request, so the webhooks service needs only this topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<crate::Webhook>,
}

impl StatusEvent {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let event: StatusEvent = decode_json(payload)?;
        check_version(event.schema_version)?;
        match event.status {
            JobStatus::Succeeded if event.output.is_none() => {
                return Err(
                    FieldError::new("output", "is required when status is succeeded").into(),
                );
            }
            JobStatus::Failed | JobStatus::Expired | JobStatus::Cancelled
                if event.error.is_none() =>
            {
                return Err(
                    FieldError::new("error", "is required when a job did not succeed").into(),
                );
            }
            _ => {}
        }
        Ok(event)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a status event always serializes")
    }

    /// The first status of a job, made from its request.
    pub fn queued(request: &RequestEvent) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            job_id: request.job_id,
            user_id: request.user_id.clone(),
            model: request.model.clone(),
            status: JobStatus::Queued,
            output: None,
            error: None,
            attempt: 0,
            timings: Timings {
                queued_at: request.submitted_at,
                started_at: None,
                finished_at: None,
            },
            worker_id: None,
            emitted_at: request.submitted_at,
            webhook: request.webhook.clone(),
        }
    }
}

/// Published to the control topic, keyed by `user_id`: "stop this job". Every worker reads the
/// whole control topic; the one holding the job skips it or aborts its model call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelEvent {
    pub schema_version: u32,
    pub job_id: JobId,
    pub user_id: UserId,
    pub requested_at: DateTime<Utc>,
    /// The job's deadline, when known: after it the cancellation needs no remembering.
    #[serde(default)]
    pub deadline: Option<DateTime<Utc>>,
}

impl CancelEvent {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let event: CancelEvent = decode_json(payload)?;
        check_version(event.schema_version)?;
        Ok(event)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a cancel event always serializes")
    }
}
