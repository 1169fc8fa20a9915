//! Spend budgets: a tier's budget per user per day and per month (UTC), and a key's own (`keys
//! create --budget-per-day`), in the currency of `SLUICE_MODEL_PRICES`. A job is refused before
//! it is queued when what its user (or its key) has spent (the usage the results service
//! records from terminal statuses, `usage_daily`), what the user's jobs admitted here still
//! hold (whatever their key: a key's budget counts them all, erring on the side of refusing),
//! and this job's own estimated cost (its prompt and its answer's cap, priced) would pass a
//! budget. Spending is read from Postgres at most once a second per user and per key, so a burst
//! of concurrent submissions can pass a budget by what they hold together.

use crate::error::ApiError;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use sluice_common::auth::KeyBudget;
use sluice_common::prices::Prices;
use sluice_common::tiers::Tier;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a user's spending, once read, is used without reading it again.
const FRESH_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Spent {
    read_at: Instant,
    day: NaiveDate,
    today: f64,
    this_month: f64,
}

pub struct Budgets {
    /// Where the usage is; `None` when no tier has a budget.
    pool: Option<PgPool>,
    pub prices: Prices,
    spent: Mutex<HashMap<String, Spent>>,
}

/// What a budget check found: the job's estimated cost, to hold while it runs.
pub struct Priced {
    pub cost: f64,
}

fn next_day(day: NaiveDate) -> DateTime<Utc> {
    let next = day.succ_opt().unwrap_or(day);
    Utc.from_utc_datetime(&next.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn next_month(day: NaiveDate) -> DateTime<Utc> {
    let (year, month) = match day.month() {
        12 => (day.year() + 1, 1),
        month => (day.year(), month + 1),
    };
    let first = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(day);
    Utc.from_utc_datetime(&first.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn first_of_month(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

impl Budgets {
    pub fn new(pool: Option<PgPool>, prices: Prices) -> Self {
        Self {
            pool,
            prices,
            spent: Mutex::new(HashMap::new()),
        }
    }

    /// The job's estimated cost, or the refusal naming the budget it would pass and when that
    /// budget resets. `held` is what the user's jobs admitted here still hold; `key` is the
    /// caller's key and its own budgets.
    pub async fn check(
        &self,
        user: &str,
        tier_name: &str,
        tier: &Tier,
        key: Option<(&str, KeyBudget)>,
        cost: f64,
        held: f64,
    ) -> Result<Priced, ApiError> {
        let key_budget = key.map(|(_, budget)| budget).unwrap_or_default();
        let budgets = [
            (None, "daily", tier.budget_per_day),
            (None, "monthly", tier.budget_per_month),
            (key.map(|(id, _)| id), "daily", key_budget.per_day),
            (key.map(|(id, _)| id), "monthly", key_budget.per_month),
        ];
        if budgets.iter().all(|(_, _, budget)| budget.is_none()) {
            return Ok(Priced { cost });
        }
        let Some(pool) = &self.pool else {
            return Ok(Priced { cost });
        };
        let now = Utc::now();
        for (key_id, period, budget) in budgets {
            let Some(budget) = budget else { continue };
            let spent = self.spent(pool, user, key_id, now).await?;
            let (spent_so_far, resets_at) = match period {
                "daily" => (spent.today, next_day(spent.day)),
                _ => (spent.this_month, next_month(spent.day)),
            };
            if spent_so_far + held + cost > budget {
                let whose = match key_id {
                    Some(key_id) => format!("key `{key_id}`"),
                    None => format!("the user's, tier `{tier_name}`"),
                };
                return Err(ApiError::BudgetExceeded {
                    period,
                    whose,
                    budget,
                    spent: spent_so_far,
                    held,
                    cost,
                    resets_at,
                    retry_after_secs: (resets_at - now).num_seconds().max(1) as u64,
                });
            }
        }
        Ok(Priced { cost })
    }

    /// What `user` (with `key_id`, what that key of theirs) spent today and this month.
    async fn spent(
        &self,
        pool: &PgPool,
        user: &str,
        key_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Spent, ApiError> {
        let today = now.date_naive();
        // Why the NUL: a user id cannot hold one, so a user's entry and a key's never collide.
        let cached_as = match key_id {
            Some(key_id) => format!("{user}\0{key_id}"),
            None => user.to_owned(),
        };
        if let Some(spent) = self
            .spent
            .lock()
            .expect("budget cache")
            .get(&cached_as)
            .copied()
            && spent.read_at.elapsed() < FRESH_FOR
            && spent.day == today
        {
            return Ok(spent);
        }
        let (today_cost, month_cost): (f64, f64) = sqlx::query_as(
            "SELECT coalesce(sum(cost_usd) FILTER (WHERE day = $2), 0)::float8,
                    coalesce(sum(cost_usd), 0)::float8
             FROM usage_daily WHERE user_id = $1 AND day >= $3 AND day <= $2
                AND ($4::text IS NULL OR key_id = $4)",
        )
        .bind(user)
        .bind(today)
        .bind(first_of_month(today))
        .bind(key_id)
        .fetch_one(pool)
        .await
        .map_err(|error| {
            tracing::warn!(error = %error, "reading a user's spending failed");
            ApiError::Unavailable {
                reason: "the usage store is unreachable; budgets cannot be checked".into(),
                retry_after_secs: 1,
            }
        })?;
        let spent = Spent {
            read_at: Instant::now(),
            day: today,
            today: today_cost,
            this_month: month_cost,
        };
        let mut cache = self.spent.lock().expect("budget cache");
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(cached_as, spent);
        Ok(spent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_reset_at_the_next_utc_midnight_and_the_first_of_the_next_month() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 31).unwrap();
        assert_eq!(next_day(day).to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert_eq!(next_month(day).to_rfc3339(), "2027-01-01T00:00:00+00:00");
        let day = NaiveDate::from_ymd_opt(2026, 2, 14).unwrap();
        assert_eq!(next_month(day).to_rfc3339(), "2026-03-01T00:00:00+00:00");
        assert_eq!(first_of_month(day).to_string(), "2026-02-01");
    }
}
