//! `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}`, and the errors of every job route.

use crate::AppState;
use crate::state::Job;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_common::http::error_response;
use sluice_common::tokens::TokenError;
use sluice_schemas::JobId;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the path's job id is not a job id (a UUIDv7): {0}")]
    InvalidJobId(String),
    #[error("no job with id {0}")]
    NotFound(JobId),
    #[error("bad query: {0}")]
    InvalidQuery(String),
    #[error(
        "Last-Event-ID must be an event id this stream sent: `<seq>`, `<seq>q<position>` or `<seq>.<answer bytes>`"
    )]
    InvalidLastEventId,
    #[error("job {job_id} already {status}; nothing to cancel")]
    AlreadyFinished { job_id: JobId, status: &'static str },
    #[error("{0}")]
    Unavailable(String),
    #[error("webhooks are off here: SLUICE_WEBHOOK_SECRET_KEY is not set")]
    WebhooksOff,
    #[error("the job has no webhook delivery {0}")]
    NoDelivery(i64),
    #[error(transparent)]
    Unauthorized(#[from] sluice_common::auth::AuthError),
    #[error(transparent)]
    Token(TokenError),
    #[error("this reader already holds {0} open event streams; close one first")]
    TooManyStreams(usize),
    #[error("this replica already serves {0} event streams; retry shortly")]
    StreamsFull(usize),
    #[error("internal error")]
    Database(#[from] sqlx::Error),
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidJobId(_)
            | ApiError::InvalidLastEventId
            | ApiError::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) | ApiError::NoDelivery(_) => StatusCode::NOT_FOUND,
            ApiError::WebhooksOff => StatusCode::NOT_IMPLEMENTED,
            ApiError::AlreadyFinished { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable(_) | ApiError::StreamsFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized(_) | ApiError::Token(_) => StatusCode::UNAUTHORIZED,
            ApiError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJobId(_) => "invalid_job_id",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::NotFound(_) => "job_not_found",
            ApiError::NoDelivery(_) => "delivery_not_found",
            ApiError::WebhooksOff => "webhooks_off",
            ApiError::InvalidLastEventId => "invalid_last_event_id",
            ApiError::AlreadyFinished { .. } => "job_finished",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::TooManyStreams(_) => "too_many_streams",
            ApiError::StreamsFull(_) => "streams_full",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Token(error) => error.code(),
            ApiError::Database(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unauthorized(error) = self {
            return error.into_response();
        }
        if let ApiError::Database(error) = &self {
            tracing::error!(error = %error, "database error");
        }
        let mut response = error_response(self.status_code(), self.code(), &self.to_string());
        if matches!(
            self,
            ApiError::Unavailable(_) | ApiError::TooManyStreams(_) | ApiError::StreamsFull(_)
        ) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(5),
            );
        }
        response
    }
}

/// With API keys on, the caller's user id: they see only their own jobs. `None` when keys are off.
pub(crate) async fn caller_user(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    match &state.keys {
        Some(keys) => Ok(Some(keys.authenticate(headers).await?.user_id)),
        None => Ok(None),
    }
}

/// `?token=`: a job's stream token, for the two routes that read one job.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct TokenQuery {
    #[serde(default)]
    pub(crate) token: Option<String>,
    /// For a client that cannot send `Last-Event-ID` (a new `EventSource` after the old one
    /// gave up): the same, in the query. The header wins.
    #[serde(default)]
    pub(crate) last_event_id: Option<String>,
    /// Status changes only: no `queue` or `delta` events (for a follower that needs the end only,
    /// such as ingest's OpenAI routes, which relay pieces from the deltas topic themselves).
    #[serde(default)]
    pub(crate) status_only: bool,
}

/// Who may read `job_id`: with the job's stream token, the bearer (whoever holds the job's
/// `events_url`); otherwise as [`caller_user`]. `None`: no user filter.
pub(crate) async fn job_reader(
    state: &AppState,
    headers: &HeaderMap,
    query: &TokenQuery,
    job_id: JobId,
) -> Result<Option<String>, ApiError> {
    if let (Some(token), Some(tokens)) = (&query.token, &state.tokens) {
        return match tokens.verify(token, job_id, chrono::Utc::now()) {
            Ok(()) => Ok(None),
            // A token for another job: to its bearer, this job is unknown.
            Err(TokenError::OtherJob) => Err(ApiError::NotFound(job_id)),
            Err(error) => Err(ApiError::Token(error)),
        };
    }
    caller_user(state, headers).await
}

/// The job, if it exists and the caller may see it; another user's job is as unknown.
pub(crate) async fn visible_job(
    state: &AppState,
    job_id: JobId,
    user: Option<&str>,
) -> Result<Job, ApiError> {
    let job = state
        .store
        .job(job_id)
        .await?
        .ok_or(ApiError::NotFound(job_id))?;
    if user.is_some_and(|user| user != job.user_id.as_str()) {
        return Err(ApiError::NotFound(job_id));
    }
    Ok(job)
}

/// The `{id}` of the path, parsed once into a `JobId` at the edge; a bad one is our JSON 400.
pub(crate) struct JobPath(pub(crate) JobId);

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state).await?;
        let job_id = JobId::parse(&text).map_err(|error| {
            ApiError::InvalidJobId(format!("{}: {}", error.field, error.message))
        })?;
        Ok(Self(job_id))
    }
}

/// A query string of type `T`; one that does not parse is our JSON `400 invalid_query` (axum's
/// own rejection is plain text), naming what is wrong.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(query) =
            Query::<T>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| {
                    ApiError::InvalidQuery(rejection.body_text().chars().take(200).collect())
                })?;
        Ok(Self(query))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::InvalidJobId(rejection.body_text().chars().take(200).collect())
    }
}

#[tracing::instrument(skip_all, fields(job_id = %job_id))]
pub(crate) async fn get_job(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
    ApiQuery(query): ApiQuery<TokenQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = job_reader(&state, &headers, &query, job_id).await?;
    let mut job = visible_job(&state, job_id, user.as_deref()).await?;
    if job.status == sluice_schemas::JobStatus::Queued {
        job.queue = state
            .store
            .queue_positions(&[job_id])
            .await?
            .remove(&job_id);
    }
    let mut body = serde_json::to_value(&job).expect("a job serializes");
    // The owner (by key) gets a URL to hand to a browser, with a fresh token.
    if let (Some(tokens), None) = (&state.tokens, &query.token) {
        let token = tokens.issue(job_id, chrono::Utc::now());
        body["events_url"] = format!(
            "{}/v1/jobs/{job_id}/events?token={token}",
            state.results_url
        )
        .into();
    }
    Ok(Json(body))
}

/// `DELETE /v1/jobs/{id}`: asks the workers to stop the job. A job not started yet is skipped; a
/// running one has its model call aborted. Either way it ends `cancelled` (SSE shows it). A job
/// that already finished is left as it is: 409 `job_finished`.
#[tracing::instrument(skip_all, fields(job_id = %job_id))]
pub(crate) async fn cancel_job(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = caller_user(&state, &headers).await?;
    let job = visible_job(&state, job_id, user.as_deref()).await?;
    if job.status.is_terminal() {
        return Err(ApiError::AlreadyFinished {
            job_id,
            status: job.status.as_str(),
        });
    }
    state.canceller.publish(&job).await.map_err(|error| {
        ApiError::Unavailable(format!("cannot reach the broker to cancel: {error}"))
    })?;
    let body = serde_json::json!({"job_id": job_id, "status": "cancelling"});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
