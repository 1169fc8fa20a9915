//! Usage: tokens and cost per user, day and model, recorded from terminal statuses in the
//! transaction that records them (`store.rs`), and served as `GET /v1/usage`.

use crate::AppState;
use crate::api::{ApiError, caller_user};
use crate::state::Job;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use chrono::{Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sluice_common::prices::Prices;
use sqlx::{Postgres, Row, Transaction};
use std::collections::BTreeMap;

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

/// What a job that just ended adds to its user's usage: (user, day, model) and the figures.
fn usage_of(job: &Job, prices: &Prices) -> ((String, NaiveDate, String), Totals) {
    let day = job
        .timings
        .finished_at
        .unwrap_or_else(Utc::now)
        .date_naive();
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
    ((job.user_id.as_str().to_owned(), day, model), totals)
}

/// Adds the usage of the jobs whose terminal status `changes` holds (a terminal change is
/// recorded once per job), summed per row first: one row may not be updated twice in one
/// statement.
pub(crate) async fn record(
    transaction: &mut Transaction<'_, Postgres>,
    changes: &[Job],
    prices: &Prices,
) -> sqlx::Result<()> {
    let mut rows: BTreeMap<(String, NaiveDate, String), Totals> = BTreeMap::new();
    for job in changes.iter().filter(|job| job.status.is_terminal()) {
        let (key, totals) = usage_of(job, prices);
        rows.entry(key).or_default().add(&totals);
    }
    if rows.is_empty() {
        return Ok(());
    }
    let column = |get: fn(&Totals) -> i64| rows.values().map(get).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO usage_daily (user_id, day, model, jobs, cached_jobs, prompt_tokens,
                                  completion_tokens, cost_usd)
         SELECT * FROM UNNEST($1::text[], $2::date[], $3::text[], $4::bigint[], $5::bigint[],
                              $6::bigint[], $7::bigint[], $8::float8[])
         ON CONFLICT (user_id, day, model) DO UPDATE SET
             jobs = usage_daily.jobs + excluded.jobs,
             cached_jobs = usage_daily.cached_jobs + excluded.cached_jobs,
             prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,
             completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,
             cost_usd = usage_daily.cost_usd + excluded.cost_usd",
    )
    .bind(rows.keys().map(|key| key.0.clone()).collect::<Vec<_>>())
    .bind(rows.keys().map(|key| key.1).collect::<Vec<_>>())
    .bind(rows.keys().map(|key| key.2.clone()).collect::<Vec<_>>())
    .bind(column(|totals| totals.jobs))
    .bind(column(|totals| totals.cached_jobs))
    .bind(column(|totals| totals.prompt_tokens))
    .bind(column(|totals| totals.completion_tokens))
    .bind(
        rows.values()
            .map(|totals| totals.cost_usd)
            .collect::<Vec<_>>(),
    )
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

#[derive(Debug, Deserialize)]
pub(crate) struct UsageQuery {
    /// First day, `YYYY-MM-DD` (UTC); default 30 days before `to`.
    #[serde(default)]
    from: Option<String>,
    /// Last day, included; default today.
    #[serde(default)]
    to: Option<String>,
    /// `day` (default) or `model`.
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
}

/// One group's usage.
#[derive(Debug, Serialize)]
pub(crate) struct UsageGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    day: Option<NaiveDate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
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
    Query(query): Query<UsageQuery>,
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
        (None, Some(asked)) => asked,
        (None, None) => return Err(invalid("user_id: is required when API keys are off")),
    };
    let group_by = match query.group_by.as_deref() {
        None | Some("day") => GroupBy::Day,
        Some("model") => GroupBy::Model,
        Some(other) => return Err(invalid(format!("group_by: {other:?} is not day or model"))),
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
        data.push(match group_by {
            GroupBy::Day => UsageGroup {
                day: Some(date("day", &key)?),
                model: None,
                totals,
            },
            GroupBy::Model => UsageGroup {
                day: None,
                model: Some(key),
                totals,
            },
        });
    }
    Ok(Json(UsageReport {
        object: "usage",
        user_id,
        from,
        to,
        group_by: match group_by {
            GroupBy::Day => "day",
            GroupBy::Model => "model",
        },
        data,
        total,
    }))
}
