//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
//! statuses the official SDKs act on: they retry 408, 409, 429 and 5xx unless the answer says
//! `x-should-retry: false`, which Sluice says when retrying could only repeat a job that
//! already ran with its own retries and fallbacks.

use crate::error::ApiError;
use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_schemas::{ErrorCode, JobError, JobId};

#[derive(Debug)]
pub(crate) struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Extra headers: `Retry-After`, the rate-limit headers, `x-should-retry`.
    pub headers: HeaderMap,
}

impl OpenAiError {
    fn new(status: StatusCode, kind: &'static str, code: &str, message: String) -> Self {
        Self {
            status,
            message,
            kind,
            param: None,
            code: Some(code.to_owned()),
            headers: HeaderMap::new(),
        }
    }

    pub(crate) fn unknown_model(model: &str) -> Self {
        let mut error = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model `{model}` does not exist here; GET /v1/models lists them"),
        );
        error.param = Some("model".to_owned());
        error
    }

    /// A job that ended without an answer. Its deadline passing is a 504 (the model side did
    /// not answer in time; a 408 would say the client was too slow to send, and the SDKs
    /// resubmit on 408); a failure is a 502 carrying the job's error code; a cancelled job is a
    /// 409. None is retried by the SDK: the worker already retried and fell back.
    pub(crate) fn from_job(job_id: JobId, error: Option<&JobError>, cancelled: bool) -> Self {
        let (code, message) = match error {
            Some(error) => (error.code, error.message.clone()),
            None => (
                ErrorCode::Internal,
                "the job ended without an answer".to_owned(),
            ),
        };
        let code_text = serde_json::to_value(code)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_else(|| "internal".to_owned());
        let status = match code {
            _ if cancelled => StatusCode::CONFLICT,
            ErrorCode::DeadlineExceeded | ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        let mut error = Self::new(
            status,
            "server_error",
            &code_text,
            format!("job {job_id}: {message}"),
        );
        error.no_retry();
        error
    }

    /// Sluice itself failed: logged here, opaque to the caller.
    pub(crate) fn internal(detail: String) -> Self {
        tracing::error!(detail = %detail, "internal error on an OpenAI route");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal",
            "internal error".to_owned(),
        )
    }

    /// Waiting for the job failed or outlasted its deadline; the job may still finish.
    pub(crate) fn lost_track(job_id: JobId, why: String) -> Self {
        let mut error = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "timeout",
            format!("job {job_id}: {why}; GET /v1/jobs/{job_id} shows where it is"),
        );
        error.no_retry();
        error
    }

    /// A streamed answer whose end does not continue what was relayed (a fallback answered
    /// after the first pieces): the client is told rather than given a garbled text.
    pub(crate) fn diverged(job_id: JobId) -> Self {
        let mut error = Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "stream_diverged",
            format!(
                "job {job_id}: the final answer does not continue the streamed part; GET /v1/jobs/{job_id} has it whole"
            ),
        );
        error.no_retry();
        error
    }

    fn no_retry(&mut self) {
        self.headers
            .insert("x-should-retry", HeaderValue::from_static("false"));
    }

    /// The body of this error, for a final chunk of a stream that has started.
    pub(crate) fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        let message = error.to_string();
        let code = error.code();
        let (status, kind) = match &error {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "authentication_error"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "permission_error"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            ApiError::BudgetExceeded { .. } => (StatusCode::PAYMENT_REQUIRED, "insufficient_quota"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error")
            }
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error")
            }
            // Validation is a 400 in OpenAI's API, where `/v1/jobs` says 422.
            ApiError::InvalidField(_) | ApiError::InvalidJson(_) | ApiError::BodyRead => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            ApiError::IdempotencyKeyReused
            | ApiError::InvalidIdempotencyKey
            | ApiError::TokensExceedLimit { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            ApiError::IdempotencyKeyInProgress => (StatusCode::CONFLICT, "invalid_request_error"),
            ApiError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error"),
            ApiError::Unavailable { .. }
            | ApiError::Overloaded
            | ApiError::LimiterUnavailable
            | ApiError::DeadlineUnreachable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error")
            }
        };
        let param = match &error {
            ApiError::InvalidField(field) => Some(field.field.clone()),
            ApiError::TokensExceedLimit { .. } => Some("max_tokens".to_owned()),
            _ => None,
        };
        // Retry-After and the rate-limit headers, as `/v1/jobs` answers them.
        let headers = error.into_response().headers().clone();
        let mut error = Self::new(status, kind, code, message);
        error.param = param;
        error.headers = headers
            .iter()
            .filter(|(name, _)| {
                *name == header::RETRY_AFTER || name.as_str().starts_with("ratelimit")
            })
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        error
    }
}

impl From<sluice_schemas::FieldError> for OpenAiError {
    fn from(error: sluice_schemas::FieldError) -> Self {
        ApiError::InvalidField(error).into()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        response.headers_mut().extend(self.headers);
        response
    }
}
