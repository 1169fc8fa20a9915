//! Every way a submission can be refused, each with one status and one stable code.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_common::http::error_response;
use sluice_schemas::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidField(#[from] FieldError),
    #[error("request body is larger than the {limit}-byte limit")]
    PayloadTooLarge { limit: usize },
    #[error("content-type must be application/json")]
    UnsupportedMediaType,
    #[error("the request queue is not accepting jobs right now: {reason}")]
    Unavailable {
        reason: String,
        retry_after_secs: u32,
    },
    #[error("failed to read the request body")]
    BodyRead,
    #[error(transparent)]
    Unauthorized(#[from] sluice_common::auth::AuthError),
    #[error("user_id does not match the API key's user")]
    Forbidden,
    #[error("rate limit reached; retry after {retry_after_secs} s")]
    RateLimited {
        retry_after_secs: u64,
        headers: HeaderMap,
    },
    #[error("ingest is handling as many submissions as it can; retry shortly")]
    Overloaded,
    #[error("the rate limiter's store is unreachable and SLUICE_REDIS_FAILURE_MODE is closed")]
    LimiterUnavailable,
    #[error("Idempotency-Key must be 1 to 255 printable ASCII characters")]
    InvalidIdempotencyKey,
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed")]
    IdempotencyKeyInProgress,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) | ApiError::BodyRead => StatusCode::BAD_REQUEST,
            ApiError::InvalidField(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable { .. } | ApiError::Overloaded | ApiError::LimiterUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::InvalidIdempotencyKey => StatusCode::BAD_REQUEST,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::IdempotencyKeyInProgress => StatusCode::CONFLICT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidField(_) => "invalid_field",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::BodyRead => "bad_request",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::Overloaded => "overloaded",
            ApiError::LimiterUnavailable => "rate_limiter_unavailable",
            ApiError::InvalidIdempotencyKey => "invalid_idempotency_key",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::IdempotencyKeyInProgress => "idempotency_key_in_progress",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unauthorized(error) = self {
            return error.into_response();
        }
        if matches!(
            self,
            ApiError::RateLimited { .. }
                | ApiError::Overloaded
                | ApiError::Unavailable { .. }
                | ApiError::LimiterUnavailable
        ) {
            metrics::counter!("sluice_admission_rejections_total", "reason" => self.code())
                .increment(1);
        }
        let mut response = error_response(self.status_code(), self.code(), &self.to_string());
        let retry_after = match &self {
            ApiError::Unavailable {
                retry_after_secs,
                reason,
            } => {
                tracing::warn!(reason = %reason, "submission refused: broker unavailable");
                Some(u64::from(*retry_after_secs))
            }
            ApiError::RateLimited {
                retry_after_secs,
                headers,
            } => {
                response.headers_mut().extend(headers.clone());
                Some(*retry_after_secs)
            }
            ApiError::Overloaded | ApiError::LimiterUnavailable => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
