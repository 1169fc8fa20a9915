//! `POST /v1/jobs`: parse the body once into a request event, publish it, answer 202.

use crate::AppState;
use crate::error::ApiError;
use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sluice_schemas::{
    DecodeError, FieldError, JobId, Message, ModelName, Params, RequestEvent, SCHEMA_VERSION,
    UserId,
};

/// The body of `POST /v1/jobs`, as sent. Unknown fields are refused so a typo is not ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    pub user_id: String,
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub params: Option<Params>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The 202 answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub job_id: JobId,
    pub status: String,
    pub deadline: DateTime<Utc>,
    pub status_url: String,
    pub events_url: String,
}

/// Limits a submission is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
}

/// Turns a sent body into the event to publish, or names the field that is wrong.
pub fn to_request_event(
    body: SubmitBody,
    limits: Limits,
    now: DateTime<Utc>,
) -> Result<RequestEvent, FieldError> {
    let user_id = UserId::parse(body.user_id)?;
    let model = ModelName::parse(body.model)?;
    if body.messages.is_empty() {
        return Err(FieldError::new(
            "messages",
            "must hold at least one message",
        ));
    }
    let timeout_ms = match body.timeout_ms {
        Some(0) => return Err(FieldError::new("timeout_ms", "must be above 0")),
        Some(asked) => asked.min(limits.max_timeout_ms),
        None => limits.default_timeout_ms,
    };
    let deadline =
        now + chrono::Duration::milliseconds(i64::try_from(timeout_ms).unwrap_or(i64::MAX));
    let event = RequestEvent {
        schema_version: SCHEMA_VERSION,
        job_id: JobId::new(),
        user_id,
        model,
        messages: body.messages,
        params: body.params.unwrap_or_default(),
        submitted_at: now,
        deadline,
    };
    // The decoder holds the rules every consumer applies (message count, empty content, ...);
    // running them here means ingest never publishes what a worker would dead-letter.
    RequestEvent::decode(&event.encode()).map_err(|error| match error {
        DecodeError::Field(field) => field,
        other => FieldError::new("body", other.to_string()),
    })
}

fn parse_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    max_body_bytes: usize,
) -> Result<SubmitBody, ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let is_json = content_type.to_str().is_ok_and(|value| {
            let essence = value.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
                || essence.to_ascii_lowercase().ends_with("+json")
        });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: max_body_bytes,
            }
        } else {
            ApiError::BodyRead
        }
    })?;
    sluice_schemas::decode_json(&bytes).map_err(|error| match error {
        DecodeError::Field(field) => ApiError::InvalidField(field),
        DecodeError::Json(text) => ApiError::InvalidJson(text),
        other => ApiError::InvalidJson(other.to_string()),
    })
}

#[tracing::instrument(skip_all, fields(job_id))]
pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = parse_body(&headers, body, state.config.max_body_bytes)?;
    let limits = Limits {
        default_timeout_ms: state.config.default_timeout_ms,
        max_timeout_ms: state.config.max_timeout_ms,
    };
    let event = to_request_event(body, limits, Utc::now())?;
    tracing::Span::current().record("job_id", tracing::field::display(event.job_id));

    state.publisher.publish(&event).await?;

    let status_url = format!(
        "{}/v1/jobs/{}",
        state.config.results_url.trim_end_matches('/'),
        event.job_id
    );
    let accepted = Accepted {
        job_id: event.job_id,
        status: "queued".to_owned(),
        deadline: event.deadline,
        events_url: format!("{status_url}/events"),
        status_url,
    };
    let location = HeaderValue::from_str(&accepted.status_url)
        .expect("a URL made of a URL and a UUID is a header value");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(accepted),
    )
        .into_response())
}
