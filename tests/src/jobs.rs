//! What every test that runs jobs checks in the results service's Postgres: that they ended, and
//! that each ended exactly once.

use crate::infra::wait_until;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// Waits until every job in `ids` has a terminal status.
pub async fn wait_terminal(pool: &PgPool, ids: &[Uuid], timeout: Duration) {
    wait_until(
        &format!("{} jobs to finish", ids.len()),
        timeout,
        || async {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND status_rank = 2",
            )
            .bind(ids)
            .fetch_one(pool)
            .await
            .ok()?;
            (done == ids.len() as i64).then_some(())
        },
    )
    .await;
}

/// How many of `ids` recorded a terminal status other than exactly once.
pub async fn terminal_not_once(pool: &PgPool, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT job_id FROM job_events WHERE job_id = ANY($1)
             AND status IN ('succeeded', 'failed', 'expired', 'cancelled')
             GROUP BY job_id HAVING count(*) <> 1) AS odd",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .expect("counting terminal statuses")
}
