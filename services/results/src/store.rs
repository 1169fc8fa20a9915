//! Postgres access: reads of jobs, their events and their places in the queue (the write of a
//! batch of events is `write.rs`).

use crate::state::{Job, JobTimings, QueuePosition};
use sluice_schemas::JobStatus;
use sluice_schemas::{JobId, ModelName, UserId};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// The channel `NOTIFY` announces changed job ids on, comma separated.
pub const NOTIFY_CHANNEL: &str = "sluice_job_changed";

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// What the usage recorded with each terminal status costs.
    pub(crate) prices: std::sync::Arc<sluice_common::prices::Prices>,
    /// Names this store's writes in their notifications, so that its own replica's listener
    /// can tell them from other replicas' (see `notify::listen`).
    writer_id: Arc<str>,
}

/// The status changes one transaction recorded for one job, oldest first.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub job_id: JobId,
    pub events: Vec<JobEvent>,
}

impl Recorded {
    /// Groups event snapshots (ordered by job, then seq) by job, each event with its job's
    /// recorded `traceparent`.
    pub(crate) fn group(snapshots: &[Job], traceparents: &HashMap<JobId, Arc<str>>) -> Vec<Self> {
        let mut recorded: Vec<Recorded> = Vec::new();
        for job in snapshots {
            let event = JobEvent {
                seq: job.seq,
                status: job.status,
                job: Arc::new(serde_json::to_value(job).expect("a job serializes")),
                traceparent: traceparents.get(&job.job_id).cloned(),
            };
            match recorded.last_mut() {
                Some(last) if last.job_id == job.job_id => last.events.push(event),
                _ => recorded.push(Recorded {
                    job_id: job.job_id,
                    events: vec![event],
                }),
            }
        }
        recorded
    }

    /// The highest seq recorded: the job's latest change.
    pub fn latest_seq(&self) -> i64 {
        self.events.iter().map(|event| event.seq).max().unwrap_or(0)
    }
}

/// One recorded status change, as SSE sends it. The job is shared: every stream of it holds the
/// same one (a job's output may be up to a megabyte).
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub seq: i64,
    pub status: JobStatus,
    pub job: Arc<serde_json::Value>,
    /// The W3C `traceparent` recorded with the job, for the spans of its SSE pushes: read with
    /// the event, so a stream needs no query of its own for it.
    pub traceparent: Option<Arc<str>>,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            prices: Default::default(),
            writer_id: Arc::from(Uuid::now_v7().simple().to_string()),
        }
    }

    /// What names this store's writes in their notifications.
    pub fn writer_id(&self) -> &str {
        &self.writer_id
    }

    /// Prices the usage it records with `prices`.
    pub fn with_prices(mut self, prices: sluice_common::prices::Prices) -> Self {
        self.prices = std::sync::Arc::new(prices);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn job(&self, job_id: JobId) -> sqlx::Result<Option<Job>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1"))
            .bind(job_id.as_uuid())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Jobs as `filter` asks, newest first: one more than its limit, to tell whether a page
    /// follows.
    pub async fn jobs(&self, filter: &crate::list::JobFilter) -> sqlx::Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE ($1::text IS NULL OR user_id = $1)
               AND ($2::uuid IS NULL OR job_id < $2)
               AND ($3::text IS NULL OR status = $3)
               AND ($4::text IS NULL OR model = $4)
             ORDER BY job_id DESC
             LIMIT $5"
        ))
        .bind(filter.user_id.as_deref())
        .bind(filter.after.as_ref().map(JobId::as_uuid))
        .bind(filter.status.map(|status| status.as_str()))
        .bind(filter.model.as_deref())
        .bind(filter.limit + 1)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The positions of those of `job_ids` that are queued, in one query: every queued job
    /// ranked by offset within its lane's partition, and each such partition's recent start rate.
    pub async fn queue_positions(
        &self,
        job_ids: &[JobId],
    ) -> sqlx::Result<std::collections::HashMap<JobId, QueuePosition>> {
        let ids: Vec<Uuid> = job_ids.iter().map(JobId::as_uuid).collect();
        let rows: Vec<PositionRow> = sqlx::query_as(
            "WITH ranked AS (
                 SELECT job_id, request_lane, request_partition,
                        row_number() OVER (PARTITION BY request_lane, request_partition ORDER BY request_offset) - 1
                            AS position
                 FROM jobs WHERE status = 'queued' AND request_partition IS NOT NULL
             ), wanted AS (
                 SELECT * FROM ranked WHERE job_id = ANY($1)
             ), partitions AS (
                 SELECT DISTINCT request_lane, request_partition FROM wanted
             ), rates AS (
                 SELECT p.request_lane, p.request_partition, count(*) AS started,
                        extract(epoch FROM max(r.started_at) - min(r.started_at))::float8 AS span,
                        extract(epoch FROM now() - max(r.started_at))::float8 AS since_last
                 FROM partitions p CROSS JOIN LATERAL (
                     SELECT started_at FROM jobs
                     WHERE jobs.request_lane = p.request_lane AND jobs.request_partition = p.request_partition
                       AND started_at IS NOT NULL
                     ORDER BY started_at DESC LIMIT 20
                 ) r
                 GROUP BY p.request_lane, p.request_partition
             )
             SELECT w.job_id, w.position, coalesce(r.started, 0), r.span, r.since_last
             FROM wanted w LEFT JOIN rates r USING (request_lane, request_partition)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(job_id, position, started, span, since_last)| {
                let job_id =
                    JobId::try_from(job_id).map_err(|error| decode_error(error.to_string()))?;
                let queue = QueuePosition {
                    position,
                    eta_ms: eta_ms(position, started, span, since_last),
                };
                Ok((job_id, queue))
            })
            .collect()
    }

    /// [`Self::events_after`] for each of `reads`, in one query; the answers in their order.
    /// (The traceparent in the same round trip: a scalar subquery per event on its job's key.)
    pub async fn events_after_each(
        &self,
        reads: &[crate::reads::ReadOf],
    ) -> sqlx::Result<Vec<Vec<JobEvent>>> {
        let mut connection = self.pool.acquire().await?;
        self.events_after_each_on(&mut connection, reads).await
    }

    /// [`Self::events_after_each`] on `connection` (the gatherer's kept one: `kept.rs`).
    pub async fn events_after_each_on(
        &self,
        connection: &mut sqlx::PgConnection,
        reads: &[crate::reads::ReadOf],
    ) -> sqlx::Result<Vec<Vec<JobEvent>>> {
        // Why `OFFSET 0`: it keeps the planner from turning the lateral part into a join that
        // may read `job_events` whole; each read stays a lookup on the primary key.
        let rows = sqlx::query(
            "SELECT r.i, e.seq, e.status, e.job,
                    (SELECT traceparent FROM jobs WHERE jobs.job_id = r.job_id) AS traceparent
             FROM UNNEST($1::uuid[], $2::bigint[], $3::text[]) WITH ORDINALITY AS r(job_id, after_seq, reader, i)
             CROSS JOIN LATERAL (
                 SELECT seq, status, job FROM job_events
                 WHERE job_events.job_id = r.job_id AND job_events.seq > r.after_seq
                   AND (r.reader IS NULL OR job_events.job->>'user_id' = r.reader)
                 ORDER BY seq OFFSET 0
             ) e
             ORDER BY r.i, e.seq",
        )
        .bind(reads.iter().map(|read| read.job_id.as_uuid()).collect::<Vec<_>>())
        .bind(reads.iter().map(|read| read.after_seq).collect::<Vec<_>>())
        .bind(reads.iter().map(|read| read.user.clone()).collect::<Vec<_>>())
        .fetch_all(connection)
        .await?;
        let mut answers = vec![Vec::new(); reads.len()];
        for row in rows {
            let index: i64 = row.try_get("i")?;
            let event = event_from_row(&row)?;
            let answer = usize::try_from(index - 1)
                .ok()
                .and_then(|index| answers.get_mut(index))
                .ok_or_else(|| decode_error(format!("no read {index}")))?;
            answer.push(event);
        }
        Ok(answers)
    }

    /// The latest seq of each of `job_ids` that has a row.
    pub async fn latest_seqs(&self, job_ids: &[JobId]) -> sqlx::Result<HashMap<JobId, i64>> {
        let ids: Vec<Uuid> = job_ids.iter().map(JobId::as_uuid).collect();
        let rows: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT job_id, seq FROM jobs WHERE job_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(job_id, seq)| {
                let job_id =
                    JobId::try_from(job_id).map_err(|error| decode_error(error.to_string()))?;
                Ok((job_id, seq))
            })
            .collect()
    }

    /// Status changes of a job after `after_seq`, oldest first.
    /// With `user`, only if the job is that user's: another user's job looks like no job at all.
    pub async fn events_after(
        &self,
        job_id: JobId,
        after_seq: i64,
        user: Option<&str>,
    ) -> sqlx::Result<Vec<JobEvent>> {
        let read = crate::reads::ReadOf {
            job_id,
            after_seq,
            user: user.map(str::to_owned),
        };
        let mut answers = self.events_after_each(std::slice::from_ref(&read)).await?;
        Ok(answers.pop().unwrap_or_default())
    }
}

/// A row with `seq`, `status`, `job` and `traceparent` as a job event.
fn event_from_row(row: &PgRow) -> sqlx::Result<JobEvent> {
    let status: String = row.try_get("status")?;
    Ok(JobEvent {
        seq: row.try_get("seq")?,
        status: JobStatus::parse(&status)
            .ok_or_else(|| decode_error(format!("unknown status {status}")))?,
        job: Arc::new(row.try_get("job")?),
        traceparent: row
            .try_get::<Option<String>, _>("traceparent")?
            .map(Arc::from),
    })
}

/// A queued job's rank in its partition, and the partition's recent starts: how many, over how
/// long, and how long since the latest.
type PositionRow = (Uuid, i64, i64, Option<f64>, Option<f64>);

/// When a job `position` places from the front starts: one start interval (the partition's
/// recent `started` jobs over `span_secs`) per job ahead and one for itself, less the time since
/// the last start. `None` until at least three jobs have started there.
fn eta_ms(
    position: i64,
    started: i64,
    span_secs: Option<f64>,
    since_last_secs: Option<f64>,
) -> Option<i64> {
    let span = span_secs.filter(|span| *span > 0.0)?;
    if started < 3 {
        return None;
    }
    let interval = span / (started - 1) as f64;
    let wait = (position + 1) as f64 * interval - since_last_secs.unwrap_or(0.0).min(interval);
    Some((wait.max(0.0) * 1000.0).round() as i64)
}

pub(crate) const JOB_COLUMNS: &str = "job_id, user_id, model, status, attempt, seq, output, error, worker_id, \
     submitted_at, deadline, queued_at, started_at, finished_at";

pub(crate) fn decode_error(message: String) -> sqlx::Error {
    sqlx::Error::Decode(message.into())
}

pub(crate) fn job_from_row(row: &PgRow) -> sqlx::Result<Job> {
    let status: String = row.try_get("status")?;
    let json = |column: &str| -> sqlx::Result<Option<serde_json::Value>> { row.try_get(column) };
    let output = json("output")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|error| decode_error(error.to_string()))?;
    let error = json("error")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|error| decode_error(error.to_string()))?;
    Ok(Job {
        job_id: JobId::try_from(row.try_get::<Uuid, _>("job_id")?)
            .map_err(|error| decode_error(error.to_string()))?,
        user_id: UserId::try_from(row.try_get::<String, _>("user_id")?)
            .map_err(|error| decode_error(error.to_string()))?,
        model: ModelName::try_from(row.try_get::<String, _>("model")?)
            .map_err(|error| decode_error(error.to_string()))?,
        status: JobStatus::parse(&status)
            .ok_or_else(|| decode_error(format!("unknown status {status}")))?,
        attempt: row.try_get("attempt")?,
        seq: row.try_get("seq")?,
        output,
        error,
        worker_id: row.try_get("worker_id")?,
        timings: JobTimings {
            submitted_at: row.try_get("submitted_at")?,
            deadline: row.try_get("deadline")?,
            queued_at: row.try_get("queued_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
        },
        queue: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eta_is_one_start_interval_per_job_ahead_and_one_for_itself() {
        // 11 starts over 5 s: one every 0.5 s; the last 0.2 s ago.
        assert_eq!(eta_ms(3, 11, Some(5.0), Some(0.2)), Some(1800));
        assert_eq!(eta_ms(0, 11, Some(5.0), Some(2.0)), Some(0), "overdue");
        assert_eq!(eta_ms(3, 2, Some(5.0), Some(0.2)), None, "too few starts");
        assert_eq!(eta_ms(3, 11, None, None), None);
    }
}
