//! Every way a submission can be refused, each with one status and one stable code.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_common::http::error_response;
use sluice_schemas::FieldError;

/// Which rate limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateGate {
    /// The user's tier's requests per second.
    User,
    /// The deployment's requests per second, over every user.
    Global,
    /// The user's tier's model tokens per minute.
    Tokens,
}

impl RateGate {
    fn name(self) -> &'static str {
        match self {
            RateGate::User => "the user's",
            RateGate::Global => "the global",
            RateGate::Tokens => "the user's token",
        }
    }
}

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
    #[error("the request body did not arrive within SLUICE_BODY_TIMEOUT_MS")]
    BodyTimeout,
    #[error(transparent)]
    Unauthorized(#[from] sluice_common::auth::AuthError),
    #[error("user_id does not match the API key's user")]
    Forbidden,
    #[error("{} rate limit reached; retry after {retry_after_secs} s", gate.name())]
    RateLimited {
        gate: RateGate,
        retry_after_secs: u64,
        headers: HeaderMap,
    },
    #[error(
        "the pipeline cannot finish this job before its deadline: the jobs ahead of it would take about {:.1} s ({backlog} jobs at {rate_per_sec:.0}/s) and its deadline is {:.1} s away; retry after {retry_after_secs} s or ask for a longer timeout_ms",
        wait.as_secs_f64(),
        time_left.as_secs_f64()
    )]
    DeadlineUnreachable {
        wait: std::time::Duration,
        backlog: u64,
        rate_per_sec: f64,
        time_left: std::time::Duration,
        retry_after_secs: u64,
    },
    #[error(
        "the job is estimated at {} tokens ({} of prompt, {} of answer: its max_tokens or SLUICE_DEFAULT_MAX_TOKENS) and tier `{tier}` holds at most {burst} at once; lower max_tokens or shorten the prompt",
        prompt + completion, prompt, completion
    )]
    TokensExceedLimit {
        prompt: u64,
        completion: u64,
        tier: String,
        burst: u32,
    },
    #[error(
        "the {period} budget of {budget:.4} ({whose}) would be passed: {spent:.4} spent, {held:.4} held by the user's jobs still running, this job up to {cost:.4}; it resets at {}",
        resets_at.to_rfc3339()
    )]
    BudgetExceeded {
        period: &'static str,
        /// Whose budget: the user's under a tier, or a key's.
        whose: String,
        budget: f64,
        spent: f64,
        held: f64,
        cost: f64,
        resets_at: chrono::DateTime<chrono::Utc>,
        retry_after_secs: u64,
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
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::InvalidField(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable { .. }
            | ApiError::Overloaded
            | ApiError::LimiterUnavailable
            | ApiError::DeadlineUnreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BudgetExceeded { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::InvalidIdempotencyKey | ApiError::TokensExceedLimit { .. } => {
                StatusCode::BAD_REQUEST
            }
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
            ApiError::BodyTimeout => "request_body_timeout",
            ApiError::RateLimited {
                gate: RateGate::User,
                ..
            } => "user_rate_limited",
            ApiError::RateLimited {
                gate: RateGate::Global,
                ..
            } => "global_rate_limited",
            ApiError::RateLimited {
                gate: RateGate::Tokens,
                ..
            } => "token_rate_limited",
            ApiError::TokensExceedLimit { .. } => "tokens_exceed_limit",
            ApiError::BudgetExceeded { .. } => "budget_exceeded",
            ApiError::DeadlineUnreachable { .. } => "deadline_unreachable",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::Overloaded => "overloaded",
            ApiError::LimiterUnavailable => "rate_limiter_unavailable",
            ApiError::InvalidIdempotencyKey => "invalid_idempotency_key",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::IdempotencyKeyInProgress => "idempotency_key_in_progress",
        }
    }

    /// The admission gate that refused the request, for the metric's `gate` label; `None` for a
    /// request that was not refused by admission (a bad body, a wrong key).
    pub fn gate(&self) -> Option<&'static str> {
        match self {
            ApiError::RateLimited {
                gate: RateGate::User,
                ..
            } => Some("user_limit"),
            ApiError::RateLimited {
                gate: RateGate::Global,
                ..
            } => Some("global_limit"),
            ApiError::RateLimited {
                gate: RateGate::Tokens,
                ..
            }
            | ApiError::TokensExceedLimit { .. } => Some("tokens"),
            ApiError::BudgetExceeded { .. } => Some("budget"),
            ApiError::DeadlineUnreachable { .. } => Some("capacity"),
            ApiError::Overloaded => Some("submissions"),
            ApiError::Unavailable { .. } => Some("broker"),
            ApiError::LimiterUnavailable => Some("limiter_store"),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unauthorized(error) = self {
            return error.into_response();
        }
        if let Some(gate) = self.gate() {
            metrics::counter!("sluice_admission_rejections_total", "reason" => self.code(), "gate" => gate)
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
                ..
            } => {
                response.headers_mut().extend(headers.clone());
                Some(*retry_after_secs)
            }
            ApiError::DeadlineUnreachable {
                retry_after_secs, ..
            }
            | ApiError::BudgetExceeded {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
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
