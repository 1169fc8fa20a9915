//! The webhook routes: a user's signing secret (`GET /v1/webhooks/secret`, rotated with
//! `POST /v1/webhooks/secret/rotate`), a job's deliveries (`GET /v1/jobs/{id}/webhooks`) and
//! delivering one again now (`POST /v1/jobs/{id}/webhooks/{delivery}/redeliver`). The
//! webhooks service delivers; these read and steer what it does.

use crate::AppState;
use crate::api::ApiQuery;
use crate::api::{ApiError, JobPath, caller_user, visible_job};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_common::webhooks::secrets::{self, SealingKey, SigningSecrets};
use sluice_common::webhooks::sign::display_secret;

/// With keys off, whose secret (`?user_id=`).
#[derive(Debug, Deserialize)]
pub(crate) struct UserQuery {
    #[serde(default)]
    user_id: Option<String>,
}

/// The user a secret route is for: the key's, or with keys off the one named.
async fn secret_owner(
    state: &AppState,
    headers: &HeaderMap,
    query: UserQuery,
) -> Result<String, ApiError> {
    match caller_user(state, headers).await? {
        Some(user) => Ok(user),
        None => query
            .user_id
            .filter(|user| !user.is_empty())
            .ok_or_else(|| {
                ApiError::InvalidQuery("user_id: with API keys off, name the user".into())
            }),
    }
}

fn shown(secrets: &SigningSecrets) -> serde_json::Value {
    let now = Utc::now();
    let previous = secrets.previous.as_ref().filter(|(_, until)| now < *until);
    json!({
        "secret": display_secret(&secrets.current),
        "previous_secret": previous.map(|(secret, _)| display_secret(secret)),
        "previous_signs_until": previous.map(|(_, until)| until),
    })
}

fn unavailable(error: anyhow::Error) -> ApiError {
    tracing::error!(error = %format!("{error:#}"), "webhook secrets");
    ApiError::Unavailable("webhook signing secrets are not available".into())
}

/// `GET /v1/webhooks/secret`: the caller's signing secret, made on first use.
pub(crate) async fn secret(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UserQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (user, key) = owner_and_key(&state, &headers, query).await?;
    let secrets = secrets::secrets_of(state.store.pool(), key, &user)
        .await
        .map_err(unavailable)?;
    Ok(Json(shown(&secrets)))
}

/// `POST /v1/webhooks/secret/rotate`: a new secret; the old one signs too for 24 hours.
pub(crate) async fn rotate(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UserQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (user, key) = owner_and_key(&state, &headers, query).await?;
    let secrets = secrets::rotate(state.store.pool(), key, &user)
        .await
        .map_err(unavailable)?;
    tracing::info!(user_id = %user, "webhook signing secret rotated");
    Ok(Json(shown(&secrets)))
}

/// Whose secret, and the key it is sealed with (none: webhooks are off here).
async fn owner_and_key<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    query: UserQuery,
) -> Result<(String, &'a SealingKey), ApiError> {
    let user = secret_owner(state, headers, query).await?;
    let key = state.webhook_key.as_ref().ok_or(ApiError::WebhooksOff)?;
    Ok((user, key))
}

/// One delivery, as the list shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct Delivery {
    delivery_id: i64,
    webhook_id: String,
    event_type: String,
    url: String,
    state: String,
    attempts: i32,
    last_status: Option<i32>,
    last_error: Option<String>,
    next_attempt_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

/// `GET /v1/jobs/{id}/webhooks`: the job's deliveries, oldest first.
pub(crate) async fn deliveries(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = caller_user(&state, &headers).await?;
    visible_job(&state, job_id, user.as_deref()).await?;
    let rows: Vec<Delivery> = sqlx::query_as(
        "SELECT delivery_id, webhook_id, event_type, url, state, attempts, last_status, last_error,
                CASE WHEN state = 'pending' THEN next_attempt_at END AS next_attempt_at,
                delivered_at, created_at
         FROM webhook_deliveries WHERE job_id = $1 ORDER BY delivery_id",
    )
    .bind(job_id.as_uuid())
    .fetch_all(state.store.pool())
    .await?;
    Ok(Json(json!({"object": "list", "data": rows})))
}

/// `POST /v1/jobs/{id}/webhooks/{delivery}/redeliver`: attempt it again now, whatever its state.
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    Path((job_id, delivery_id)): Path<(String, i64)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job_id = sluice_schemas::JobId::parse(&job_id)
        .map_err(|error| ApiError::InvalidJobId(error.to_string()))?;
    let user = caller_user(&state, &headers).await?;
    visible_job(&state, job_id, user.as_deref()).await?;
    let updated = sqlx::query(
        "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = now(), leased_until = NULL
         WHERE job_id = $1 AND delivery_id = $2",
    )
    .bind(job_id.as_uuid())
    .bind(delivery_id)
    .execute(state.store.pool())
    .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::NoDelivery(delivery_id));
    }
    let body = json!({"delivery_id": delivery_id, "state": "pending"});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
