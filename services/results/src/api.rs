//! `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/events` (Server-Sent Events).

use crate::AppState;
use crate::notify::Wake;
use crate::state::Job;
use crate::store::JobEvent;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use sluice_common::http::error_response;
use sluice_common::metrics::GaugeGuard;
use sluice_common::propagation::TraceHeaders;
use sluice_common::telemetry;
use sluice_schemas::JobId;
use std::convert::Infallible;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the path's job id is not a job id (a UUIDv7): {0}")]
    InvalidJobId(String),
    #[error("no job with id {0}")]
    NotFound(JobId),
    #[error("Last-Event-ID must be a non-negative integer")]
    InvalidLastEventId,
    #[error("job {job_id} already {status}; nothing to cancel")]
    AlreadyFinished { job_id: JobId, status: &'static str },
    #[error("cannot reach the broker to cancel: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Unauthorized(#[from] sluice_common::auth::AuthError),
    #[error("internal error")]
    Database(#[from] sqlx::Error),
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidJobId(_) | ApiError::InvalidLastEventId => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::AlreadyFinished { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJobId(_) => "invalid_job_id",
            ApiError::NotFound(_) => "job_not_found",
            ApiError::InvalidLastEventId => "invalid_last_event_id",
            ApiError::AlreadyFinished { .. } => "job_finished",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Unauthorized(_) => "unauthorized",
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
        if matches!(self, ApiError::Unavailable(_)) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(5),
            );
        }
        response
    }
}

/// With API keys on, the caller's user id: they see only their own jobs. `None` when keys are off.
async fn caller_user(state: &AppState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match &state.keys {
        Some(keys) => Ok(Some(keys.authenticate(headers).await?.user_id)),
        None => Ok(None),
    }
}

/// The job, if it exists and the caller may see it; another user's job is as unknown.
async fn visible_job(state: &AppState, job_id: JobId, user: Option<&str>) -> Result<Job, ApiError> {
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
pub(crate) struct JobPath(JobId);

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(job_id) = Path::<JobId>::from_request_parts(parts, state).await?;
        Ok(Self(job_id))
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
    headers: HeaderMap,
) -> Result<Json<Job>, ApiError> {
    let user = caller_user(&state, &headers).await?;
    Ok(Json(visible_job(&state, job_id, user.as_deref()).await?))
}

/// One SSE event per recorded status change: `id` the change's sequence number, `event` the
/// status, `data` the job. Opened before the job exists, it waits for it; it ends after a
/// terminal status; `Last-Event-ID` resumes after the given change.
#[tracing::instrument(skip_all, fields(job_id = %job_id))]
pub(crate) async fn job_events(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let user = caller_user(&state, &headers).await?;
    let last_seen = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .filter(|seq| *seq >= 0)
            .ok_or(ApiError::InvalidLastEventId)?,
    };
    // Subscribed before the first read, so a change committed in between is not missed.
    let mut changes = state.changes.subscribe(job_id);
    let store = state.store.clone();
    let recheck = state.sse_recheck;
    let stopping = state.stopping.clone();
    let stream = async_stream::stream! {
        let _open = GaugeGuard::new(metrics::gauge!("sluice_sse_connections"));
        let mut last_seen = last_seen;
        // The job's trace, read once there is something to push.
        let mut trace: Option<TraceHeaders> = None;
        // The first read is always from Postgres: it holds what happened before subscribing.
        let mut wake = Wake::Recheck;
        loop {
            let written = match wake {
                Wake::Changed => changes.written_after(last_seen),
                Wake::Recheck => None,
            };
            let read = match written {
                Some(events) => Ok(visible_to(events, user.as_deref())),
                None => store.events_after(job_id, last_seen, user.as_deref()).await,
            };
            match read {
                Ok(events) => {
                    if trace.is_none() && !events.is_empty() {
                        trace = Some(TraceHeaders::from_traceparent(store.traceparent(job_id).await.ok().flatten()));
                    }
                    for JobEvent { seq, status, job } in events {
                        last_seen = seq;
                        let span = tracing::info_span!(
                            "sse push",
                            otel.kind = "producer",
                            job_id = %job_id,
                            status = status.as_str(),
                            seq,
                            trace_id = tracing::field::Empty,
                        );
                        telemetry::adopt(&span, trace.as_ref().map(TraceHeaders::context).unwrap_or_default());
                        // The span covers handing the event to the connection.
                        let event = span.in_scope(|| Event::default().id(seq.to_string()).event(status.as_str()).data(job.to_string()));
                        yield Ok(event);
                        drop(span);
                        if status.is_terminal() {
                            return;
                        }
                    }
                }
                Err(error) => tracing::warn!(error = %error, "reading job events failed; retrying"),
            }
            // Why: graceful shutdown waits for open responses, and a stream may wait for ever.
            wake = tokio::select! {
                _ = stopping.cancelled() => return,
                wake = changes.changed(recheck) => wake,
            };
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(state.keepalive)))
}

/// Events this replica wrote, as `Store::events_after` would show them to `user`: another user's
/// job shows nothing.
fn visible_to(events: Vec<JobEvent>, user: Option<&str>) -> Vec<JobEvent> {
    match user {
        Some(user) => events
            .into_iter()
            .filter(|event| event.job.get("user_id").and_then(|id| id.as_str()) == Some(user))
            .collect(),
        None => events,
    }
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
    state
        .canceller
        .publish(&job)
        .await
        .map_err(ApiError::Unavailable)?;
    let body = serde_json::json!({"job_id": job_id, "status": "cancelling"});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
