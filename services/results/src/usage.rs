//! Usage: tokens and cost per user, day, model and API key, recorded from terminal statuses in the
//! transaction that records them (`store.rs`), and served as `GET /v1/usage`.

use crate::AppState;
use crate::api::ApiQuery;
use crate::api::{ApiError, caller_user};
use crate::state::Job;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sluice_common::prices::Prices;
use sqlx::{Postgres, Row};

/// A span of usage longer than this is refused (ask for it in parts).
const MAX_DAYS: i64 = 366;

/// One usage row's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Totals {
    pub(crate) jobs: i64,
    /// Answered from the cache or an identical call in flight: they count no model tokens.
    pub(crate) cached_jobs: i64,
    pub(crate) prompt_tokens: i64,
    pub(crate) completion_tokens: i64,
    pub(crate) total_tokens: i64,
    pub(crate) cost_usd: f64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.jobs += other.jobs;
        self.cached_jobs += other.cached_jobs;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
        self.cost_usd += other.cost_usd;
    }
}

/// What a job that just ended adds to its user's usage: the model that answered and the figures.
fn usage_of(job: &Job, prices: &Prices) -> (String, Totals) {
    let output = job.output.as_ref();
    // The model that answered: a fallback's name if one did.
    let model = output
        .and_then(|output| output.model.clone())
        .unwrap_or_else(|| job.model.as_str().to_owned());
    let cached = output.is_some_and(|output| output.cached);
    let usage = output
        .filter(|output| !output.cached)
        .and_then(|output| output.usage)
        .unwrap_or_default();
    let (prompt, completion) = (usage.prompt_tokens, usage.completion_tokens);
    let totals = Totals {
        jobs: 1,
        cached_jobs: i64::from(cached),
        prompt_tokens: prompt as i64,
        completion_tokens: completion as i64,
        total_tokens: (prompt + completion) as i64,
        cost_usd: prices.cost(&model, prompt, completion),
    };
    (model, totals)
}

/// The usage of the jobs whose terminal status `changes` holds (a terminal change is recorded
/// once per job), one column per field, for [`ADD_USAGE`].
pub(crate) struct Ended {
    job_ids: Vec<uuid::Uuid>,
    user_ids: Vec<String>,
    days: Vec<NaiveDate>,
    models: Vec<String>,
    cached_jobs: Vec<i64>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cost_usd: Vec<f64>,
}

/// Adds [`Ended`] (bound as `$19` to `$26`) to the usage rows, with the key each job was
/// submitted with (from its row), summed per usage row in the statement: one row may not be
/// updated twice in one statement. A part of the statement that records the changes (`store.rs`),
/// so that usage costs no round trip of its own.
pub(crate) const ADD_USAGE: &str = "INSERT INTO usage_daily (user_id, day, model, key_id, jobs, cached_jobs,
                                  prompt_tokens, completion_tokens, cost_usd)
         SELECT u.user_id, u.day, u.model, coalesce(jobs.key_id, ''), count(*), sum(u.cached),
                sum(u.prompt), sum(u.completion), sum(u.cost)
         FROM UNNEST($19::uuid[], $20::text[], $21::date[], $22::text[], $23::bigint[], $24::bigint[],
                     $25::bigint[], $26::float8[])
             AS u(job_id, user_id, day, model, cached, prompt, completion, cost)
         LEFT JOIN jobs ON jobs.job_id = u.job_id
         GROUP BY u.user_id, u.day, u.model, coalesce(jobs.key_id, '')
         ON CONFLICT (user_id, day, model, key_id) DO UPDATE SET
             jobs = usage_daily.jobs + excluded.jobs,
             cached_jobs = usage_daily.cached_jobs + excluded.cached_jobs,
             prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,
             completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,
             cost_usd = usage_daily.cost_usd + excluded.cost_usd";

impl Ended {
    pub(crate) fn of(changes: &[Job], prices: &Prices) -> Self {
        let mut ended = Self {
            job_ids: Vec::new(),
            user_ids: Vec::new(),
            days: Vec::new(),
            models: Vec::new(),
            cached_jobs: Vec::new(),
            prompt_tokens: Vec::new(),
            completion_tokens: Vec::new(),
            cost_usd: Vec::new(),
        };
        for job in changes.iter().filter(|job| job.status.is_terminal()) {
            let (model, totals) = usage_of(job, prices);
            ended.job_ids.push(job.job_id.as_uuid());
            ended.user_ids.push(job.user_id.as_str().to_owned());
            ended.days.push(
                job.timings
                    .finished_at
                    .unwrap_or_else(Utc::now)
                    .date_naive(),
            );
            ended.models.push(model);
            ended.cached_jobs.push(totals.cached_jobs);
            ended.prompt_tokens.push(totals.prompt_tokens);
            ended.completion_tokens.push(totals.completion_tokens);
            ended.cost_usd.push(totals.cost_usd);
        }
        ended
    }

    /// Binds the columns as `$19` to `$26` of [`ADD_USAGE`].
    pub(crate) fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.job_ids)
            .bind(self.user_ids)
            .bind(self.days)
            .bind(self.models)
            .bind(self.cached_jobs)
            .bind(self.prompt_tokens)
            .bind(self.completion_tokens)
            .bind(self.cost_usd)
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct UsageQuery {
    /// First day, `YYYY-MM-DD` (UTC); default 30 days before `to`.
    #[serde(default)]
    from: Option<String>,
    /// Last day, included; default today.
    #[serde(default)]
    to: Option<String>,
    /// `day` (default), `model` or `key`.
    #[serde(default)]
    group_by: Option<String>,
    /// With API keys off, whose usage (required then).
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum GroupBy {
    Day,
    Model,
    Key,
}

/// One group's usage.
#[derive(Debug, Serialize)]
pub(crate) struct UsageGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    day: Option<NaiveDate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// With `group_by=key`: the API key's id (empty for jobs submitted without keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(flatten)]
    totals: Totals,
}

#[derive(Debug, Serialize)]
pub(crate) struct UsageReport {
    object: &'static str,
    user_id: String,
    from: NaiveDate,
    to: NaiveDate,
    group_by: &'static str,
    data: Vec<UsageGroup>,
    total: Totals,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidQuery(message.into())
}

fn date(name: &str, text: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| invalid(format!("{name}: must be a date, YYYY-MM-DD (UTC)")))
}

/// `GET /v1/usage`: the caller's usage between two days, by day or by model.
#[tracing::instrument(skip_all)]
pub(crate) async fn usage(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UsageQuery>,
    headers: HeaderMap,
) -> Result<Json<UsageReport>, ApiError> {
    let caller = caller_user(&state, &headers).await?;
    let user_id = match (caller, query.user_id) {
        (Some(caller), Some(asked)) if asked != caller => {
            return Err(invalid(
                "user_id: with API keys you see your own usage; leave it out",
            ));
        }
        (Some(caller), _) => caller,
        (None, Some(asked)) => {
            crate::list::checked(Some(asked), sluice_schemas::UserId::parse)?.unwrap_or_default()
        }
        (None, None) => return Err(invalid("user_id: is required when API keys are off")),
    };
    let group_by = match query.group_by.as_deref() {
        None | Some("day") => GroupBy::Day,
        Some("model") => GroupBy::Model,
        Some("key") => GroupBy::Key,
        Some(other) => {
            return Err(invalid(format!(
                "group_by: {other:?} is not day, model or key"
            )));
        }
    };
    let to = match &query.to {
        Some(text) => date("to", text)?,
        None => Utc::now().date_naive(),
    };
    let from = match &query.from {
        Some(text) => date("from", text)?,
        None => to - Duration::days(30),
    };
    if from > to {
        return Err(invalid("from: must not be after to"));
    }
    if (to - from).num_days() >= MAX_DAYS {
        return Err(invalid(format!(
            "from..to: at most {MAX_DAYS} days at once"
        )));
    }
    let group = match group_by {
        GroupBy::Day => "day::text",
        GroupBy::Model => "model",
        GroupBy::Key => "key_id",
    };
    let rows = sqlx::query(&format!(
        "SELECT {group} AS key, sum(jobs)::bigint AS jobs, sum(cached_jobs)::bigint AS cached_jobs,
                sum(prompt_tokens)::bigint AS prompt_tokens,
                sum(completion_tokens)::bigint AS completion_tokens,
                sum(cost_usd)::float8 AS cost_usd
         FROM usage_daily WHERE user_id = $1 AND day BETWEEN $2 AND $3
         GROUP BY {group} ORDER BY {group}"
    ))
    .bind(&user_id)
    .bind(from)
    .bind(to)
    .fetch_all(state.store.pool())
    .await?;
    let mut total = Totals::default();
    let mut data = Vec::with_capacity(rows.len());
    for row in rows {
        let key: String = row.try_get("key")?;
        let (prompt_tokens, completion_tokens): (i64, i64) = (
            row.try_get("prompt_tokens")?,
            row.try_get("completion_tokens")?,
        );
        let totals = Totals {
            jobs: row.try_get("jobs")?,
            cached_jobs: row.try_get("cached_jobs")?,
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            cost_usd: row.try_get("cost_usd")?,
        };
        total.add(&totals);
        let mut group = UsageGroup {
            day: None,
            model: None,
            key_id: None,
            totals,
        };
        match group_by {
            GroupBy::Day => group.day = Some(date("day", &key)?),
            GroupBy::Model => group.model = Some(key),
            GroupBy::Key => group.key_id = Some(key),
        }
        data.push(group);
    }
    Ok(Json(UsageReport {
        object: "usage",
        user_id,
        from,
        to,
        group_by: match group_by {
            GroupBy::Day => "day",
            GroupBy::Model => "model",
            GroupBy::Key => "key",
        },
        data,
        total,
    }))
}
