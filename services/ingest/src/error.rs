//! Every way a submission can be refused, each with one status and one stable code.

use axum::http::{HeaderValue, StatusCode, header};
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
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) | ApiError::BodyRead => StatusCode::BAD_REQUEST,
            ApiError::InvalidField(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = error_response(self.status_code(), self.code(), &self.to_string());
        if let ApiError::Unavailable {
            retry_after_secs,
            reason,
        } = &self
        {
            tracing::warn!(reason = %reason, "submission refused: broker unavailable");
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        response
    }
}
