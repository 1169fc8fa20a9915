//! `GET /v1/jobs`: the caller's own jobs, newest first, a page at a time. Pages are cut by the
//! last job id seen (`after`), not by an offset, so a page costs the same however deep it is and
//! jobs submitted meanwhile neither repeat nor vanish between pages.

use crate::AppState;
use crate::api::ApiQuery;
use crate::api::{ApiError, caller_user};
use crate::state::Job;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use sluice_schemas::{JobId, JobStatus};

/// Jobs in one page unless `limit` says otherwise, and at most.
const DEFAULT_LIMIT: i64 = 20;
const MAX_LIMIT: i64 = 100;

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    /// The `last_id` of the previous page.
    #[serde(default)]
    after: Option<String>,
    /// With API keys off, whose jobs (all users' without it).
    #[serde(default)]
    user_id: Option<String>,
}

/// A page of jobs, as OpenAI's list endpoints have it.
#[derive(Debug, Serialize)]
pub(crate) struct JobPage {
    object: &'static str,
    data: Vec<Job>,
    /// Whether a page follows: ask again with `after` = `last_id`.
    has_more: bool,
    first_id: Option<JobId>,
    last_id: Option<JobId>,
}

/// What the store reads: the filters, parsed.
#[derive(Debug, Clone)]
pub struct JobFilter {
    pub user_id: Option<String>,
    pub status: Option<JobStatus>,
    pub model: Option<String>,
    pub after: Option<JobId>,
    pub limit: i64,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidQuery(message.into())
}

/// A query's user id or model name, held to the rules a job's are held to (no NUL reaches
/// Postgres, which refuses it); the error names the field.
pub(crate) fn checked<T>(
    value: Option<String>,
    parse: impl Fn(String) -> Result<T, sluice_schemas::FieldError>,
) -> Result<Option<String>, ApiError> {
    value
        .map(|text| {
            parse(text.clone())
                .map(|_| text)
                .map_err(|error| invalid(format!("{}: {}", error.field, error.message)))
        })
        .transpose()
}

impl ListQuery {
    fn parse(self, caller: Option<String>) -> Result<JobFilter, ApiError> {
        let status = self
            .status
            .map(|status| {
                JobStatus::parse(&status).ok_or_else(|| {
                    invalid(format!(
                        "status: {status:?} is not a status (queued, running, succeeded, failed, expired, cancelled)"
                    ))
                })
            })
            .transpose()?;
        let limit = match self.limit {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                .ok_or_else(|| {
                    invalid(format!(
                        "limit: must be a whole number from 1 to {MAX_LIMIT}"
                    ))
                })?,
        };
        let after = self
            .after
            .map(|after| {
                JobId::parse(&after)
                    .map_err(|_| invalid("after: must be a job id (a page's last_id)"))
            })
            .transpose()?;
        let user_id = match caller {
            // With keys, a user lists their own jobs only.
            Some(caller) => {
                if self.user_id.as_ref().is_some_and(|asked| *asked != caller) {
                    return Err(invalid(
                        "user_id: with API keys you list your own jobs; leave it out",
                    ));
                }
                Some(caller)
            }
            None => checked(self.user_id, sluice_schemas::UserId::parse)?,
        };
        Ok(JobFilter {
            user_id,
            status,
            // A model name as a job has it: no control character (nor NUL, which Postgres refuses).
            model: checked(self.model, sluice_schemas::ModelName::parse)?,
            after,
            limit,
        })
    }
}

#[tracing::instrument(skip_all)]
pub(crate) async fn list_jobs(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
    headers: HeaderMap,
) -> Result<Json<JobPage>, ApiError> {
    let caller = caller_user(&state, &headers).await?;
    let filter = query.parse(caller)?;
    let mut data = state.store.jobs(&filter).await?;
    let has_more = data.len() as i64 > filter.limit;
    data.truncate(usize::try_from(filter.limit).unwrap_or(usize::MAX));
    Ok(Json(JobPage {
        object: "list",
        first_id: data.first().map(|job| job.job_id),
        last_id: data.last().map(|job| job.job_id),
        data,
        has_more,
    }))
}
