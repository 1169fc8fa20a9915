//! Postgres access: one transaction per batch of events, a few set-based statements each.

use crate::state::{Job, JobTimings, QueuePosition, RequestRecord, Update};
use chrono::{DateTime, Utc};
use sluice_schemas::JobStatus;
use sluice_schemas::{JobId, ModelName, UserId};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use uuid::Uuid;

/// The channel `NOTIFY` announces changed job ids on, comma separated.
pub const NOTIFY_CHANNEL: &str = "sluice_job_changed";

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// What the usage recorded with each terminal status costs.
    prices: std::sync::Arc<sluice_common::prices::Prices>,
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
    fn group(snapshots: &[Job], traceparents: &HashMap<JobId, Arc<str>>) -> Vec<Self> {
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
        }
    }

    /// Prices the usage it records with `prices`.
    pub fn with_prices(mut self, prices: sluice_common::prices::Prices) -> Self {
        self.prices = std::sync::Arc::new(prices);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies a batch of updates in one transaction and returns what it recorded, job by job.
    /// Replayed, duplicated or out-of-order updates never move a job back or add a row.
    pub async fn apply(&self, updates: &[Update]) -> sqlx::Result<Vec<Recorded>> {
        // Sorted by job id so every writer takes row locks in the same order (no deadlocks
        // between results replicas that share jobs through the two topics).
        let mut by_job: BTreeMap<JobId, Vec<&Update>> = BTreeMap::new();
        for update in updates {
            by_job.entry(update.job_id).or_default().push(update);
        }
        let mut transaction = self.pool.begin_with(WRITE_BEGIN).await?;
        insert_placeholders(&mut transaction, &by_job).await?;
        let ids: Vec<Uuid> = by_job.keys().map(JobId::as_uuid).collect();
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, traceparent FROM jobs WHERE job_id = ANY($1) ORDER BY job_id FOR UPDATE"
        ))
        .bind(&ids)
        .fetch_all(&mut *transaction)
        .await?;

        let mut changed_jobs = Vec::new();
        let mut events = Vec::new();
        let mut traceparents = HashMap::new();
        for row in rows {
            let mut job = job_from_row(&row)?;
            if let Some(traceparent) = row.try_get::<Option<String>, _>("traceparent")? {
                traceparents.insert(job.job_id, Arc::from(traceparent));
            }
            let mut job_updates = by_job.remove(&job.job_id).unwrap_or_default();
            let (dirty, changes) = job.apply(&mut job_updates);
            if dirty {
                changed_jobs.push(job);
            }
            events.extend(changes);
        }
        let recorded = Recorded::group(&events, &traceparents);
        let ended = crate::usage::Ended::of(&events, &self.prices);
        record_changes(&mut transaction, &changed_jobs, &events, &recorded, ended).await?;
        transaction.commit().await?;
        Ok(recorded)
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
        .fetch_all(&self.pool)
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

/// Starts a write: every statement in it looks jobs up by their key, a few hundred at most, so
/// only nested loops over the primary keys are allowed. Why: the planner's row counts come from
/// the last `ANALYZE`, and a table that grew since (the first minute of a fresh database, a
/// burst) looks small enough to read whole. Measured on a fresh database at 200 jobs/s: a hash
/// join over a sequential scan of `jobs` in the batch update, 1.3 whole-table reads per batch
/// (3,300 rows read per job at 2,000 jobs), and bigger batches under load made it likelier.
/// Key lookups cost the same at any size. And one generic plan per statement: with the joins
/// fixed there is nothing for a plan of each batch's own to choose, and planning it was the
/// write's bind step (Postgres' statement log, 1,400 batches: 0.32 ms a batch planned, 0.04
/// generic). One round trip: the settings ride with `BEGIN`.
const WRITE_BEGIN: &str = "BEGIN; SET LOCAL enable_seqscan = off; \
     SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
     SET LOCAL plan_cache_mode = force_generic_plan";

const JOB_COLUMNS: &str = "job_id, user_id, model, status, attempt, seq, output, error, worker_id, \
     submitted_at, deadline, queued_at, started_at, finished_at";

fn decode_error(message: String) -> sqlx::Error {
    sqlx::Error::Decode(message.into())
}

fn job_from_row(row: &PgRow) -> sqlx::Result<Job> {
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

/// Makes sure a row exists for every job in the batch, so the next statement can lock them all.
async fn insert_placeholders(
    transaction: &mut Transaction<'_, Postgres>,
    by_job: &BTreeMap<JobId, Vec<&Update>>,
) -> sqlx::Result<()> {
    let placeholders: Vec<Job> = by_job
        .values()
        .map(|updates| Job::placeholder(updates[0]))
        .collect();
    // Any event of a job carries its trace: the request event the root span's, status events
    // the worker span's, a child of it.
    let traceparents: Vec<Option<String>> = by_job
        .values()
        .map(|updates| updates.iter().find_map(|update| update.traceparent.clone()))
        .collect();
    let request_records: Vec<Option<RequestRecord>> = by_job
        .values()
        .map(|updates| updates.iter().find_map(|update| update.request_record))
        .collect();
    let key_ids: Vec<Option<String>> = by_job
        .values()
        .map(|updates| updates.iter().find_map(|update| update.key_id.clone()))
        .collect();
    // Why DO UPDATE: a status event may have made the row before its request event came; the
    // request's place in its lane and its key are filled in then, once.
    sqlx::query(
        "INSERT INTO jobs (job_id, user_id, model, status, status_rank, attempt, seq, queued_at, traceparent,
                           request_lane, request_partition, request_offset, key_id)
         SELECT job_id, user_id, model, 'queued', 0, 0, 0, queued_at, traceparent,
                coalesce(request_lane, 'interactive'), request_partition, request_offset, key_id
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::int[],
                     $8::bigint[], $9::text[])
             AS p(job_id, user_id, model, queued_at, traceparent, request_lane, request_partition, request_offset,
                  key_id)
         ON CONFLICT (job_id) DO UPDATE
             SET request_lane = CASE WHEN jobs.request_partition IS NULL THEN EXCLUDED.request_lane
                                     ELSE jobs.request_lane END,
                 request_partition = coalesce(jobs.request_partition, EXCLUDED.request_partition),
                 request_offset = coalesce(jobs.request_offset, EXCLUDED.request_offset),
                 key_id = coalesce(jobs.key_id, EXCLUDED.key_id)
             WHERE (jobs.request_partition IS NULL AND EXCLUDED.request_partition IS NOT NULL)
                OR (jobs.key_id IS NULL AND EXCLUDED.key_id IS NOT NULL)",
    )
    .bind(placeholders.iter().map(|job| job.job_id.as_uuid()).collect::<Vec<_>>())
    .bind(placeholders.iter().map(|job| job.user_id.as_str()).collect::<Vec<_>>())
    .bind(placeholders.iter().map(|job| job.model.as_str()).collect::<Vec<_>>())
    .bind(placeholders.iter().map(|job| job.timings.queued_at).collect::<Vec<_>>())
    .bind(traceparents)
    .bind(request_records.iter().map(|record| record.map(|record| record.lane.as_str())).collect::<Vec<_>>())
    .bind(request_records.iter().map(|record| record.map(|record| record.partition)).collect::<Vec<_>>())
    .bind(request_records.iter().map(|record| record.map(|record| record.offset)).collect::<Vec<_>>())
    .bind(key_ids)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

fn to_json_text<T: serde::Serialize>(value: &Option<T>) -> Option<String> {
    value.as_ref().map(jsonb_text)
}

/// JSON text for a `jsonb` column. Postgres' `jsonb` cannot hold U+0000 and refuses the whole
/// statement for one `\u0000`, which a model's answer or a producer's event may carry: left
/// alone, one such job would stop its partition for ever. It is stored as U+FFFD, the
/// replacement character. The check is a substring search; the rewrite costs only such values.
pub(crate) fn jsonb_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    fn replace_nul(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(text) => *text = text.replace('\0', "\u{FFFD}"),
            serde_json::Value::Array(items) => items.iter_mut().for_each(replace_nul),
            serde_json::Value::Object(fields) => {
                let old = std::mem::take(fields);
                for (key, mut field) in old {
                    replace_nul(&mut field);
                    fields.insert(key.replace('\0', "\u{FFFD}"), field);
                }
            }
            _ => {}
        }
    }
    let text = serde_json::to_string(value).expect("job fields serialize");
    if !text.contains("\\u0000") {
        return text;
    }
    let mut value = serde_json::to_value(value).expect("job fields serialize");
    replace_nul(&mut value);
    value.to_string()
}

/// Writes the changed jobs, their new event rows, the usage of those that ended and the
/// notifications in one statement: one round trip instead of four. Data-modifying `WITH` parts
/// run once, to completion, whether or not the outer query reads them.
async fn record_changes(
    transaction: &mut Transaction<'_, Postgres>,
    jobs: &[Job],
    events: &[Job],
    recorded: &[Recorded],
    ended: crate::usage::Ended,
) -> sqlx::Result<()> {
    if jobs.is_empty() && events.is_empty() {
        return Ok(());
    }
    let column = |get: fn(&Job) -> Option<DateTime<Utc>>| jobs.iter().map(get).collect::<Vec<_>>();
    static STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
        "WITH updated AS (
             UPDATE jobs SET status = u.status, status_rank = u.status_rank, attempt = u.attempt, seq = u.seq,
                 output = u.output::jsonb, error = u.error::jsonb, worker_id = u.worker_id,
                 submitted_at = u.submitted_at, deadline = u.deadline, started_at = u.started_at,
                 finished_at = u.finished_at, updated_at = now()
             FROM UNNEST($1::uuid[], $2::text[], $3::smallint[], $4::int[], $5::bigint[], $6::text[], $7::text[],
                         $8::text[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[], $12::timestamptz[])
                 AS u(job_id, status, status_rank, attempt, seq, output, error, worker_id,
                      submitted_at, deadline, started_at, finished_at)
             WHERE jobs.job_id = u.job_id
         ), recorded AS (
             INSERT INTO job_events (job_id, seq, status, job)
             SELECT job_id, seq, status, job::jsonb
             FROM UNNEST($13::uuid[], $14::bigint[], $15::text[], $16::text[]) AS e(job_id, seq, status, job)
             ON CONFLICT (job_id, seq) DO NOTHING
         ), usage AS (
             {ADD_USAGE}
         )
         SELECT pg_notify($17, payload) FROM UNNEST($18::text[]) AS payload",
        ADD_USAGE = crate::usage::ADD_USAGE,
        )
    });
    let query = sqlx::query(&STATEMENT)
        .bind(
            jobs.iter()
                .map(|job| job.job_id.as_uuid())
                .collect::<Vec<_>>(),
        )
        .bind(
            jobs.iter()
                .map(|job| job.status.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|job| job.status.rank()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|job| job.attempt).collect::<Vec<_>>())
        .bind(jobs.iter().map(|job| job.seq).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|job| to_json_text(&job.output))
                .collect::<Vec<_>>(),
        )
        .bind(
            jobs.iter()
                .map(|job| to_json_text(&job.error))
                .collect::<Vec<_>>(),
        )
        .bind(
            jobs.iter()
                .map(|job| job.worker_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(column(|job| job.timings.submitted_at))
        .bind(column(|job| job.timings.deadline))
        .bind(column(|job| job.timings.started_at))
        .bind(column(|job| job.timings.finished_at))
        .bind(
            events
                .iter()
                .map(|job| job.job_id.as_uuid())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|job| job.seq).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|job| job.status.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(
            recorded
                .iter()
                .flat_map(|job| job.events.iter().map(|event| jsonb_text(&event.job)))
                .collect::<Vec<_>>(),
        )
        .bind(NOTIFY_CHANNEL)
        .bind(notify_payloads(recorded));
    ended.bind(query).execute(&mut **transaction).await?;
    Ok(())
}

/// Changed jobs as `job_id:seq` (the job's latest change), comma separated, in as few
/// notifications as fit Postgres' payload limit (under 8,000 bytes): one per transaction in all
/// but the largest batches. Why inside the transaction: Postgres delivers a NOTIFY only when
/// its transaction commits, so a listener never hears of a change it cannot read yet.
pub(crate) fn notify_payloads(recorded: &[Recorded]) -> Vec<String> {
    const JOBS_PER_NOTIFICATION: usize = 130; // 130 x (36 + 1 + 19 + 1) bytes = 7,410 at most
    recorded
        .chunks(JOBS_PER_NOTIFICATION)
        .map(|chunk| {
            chunk
                .iter()
                .map(|job| format!("{}:{}", job.job_id, job.latest_seq()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// The `(job_id, seq)` pairs in one notification's payload; what does not parse is skipped.
pub(crate) fn notified_changes(payload: &str) -> impl Iterator<Item = (JobId, i64)> + '_ {
    payload.split(',').filter_map(|item| {
        let (id, seq) = item.trim().split_once(':')?;
        Some((JobId::parse(id).ok()?, seq.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonb_text_stores_nul_as_the_replacement_character_and_leaves_the_rest() {
        let value = serde_json::json!({"text": "a\u{0}b", "k\u{0}": ["\u{0}"], "plain": "\\u0000"});
        let text = jsonb_text(&value);
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["text"], "a\u{FFFD}b");
        assert_eq!(back["k\u{FFFD}"][0], "\u{FFFD}");
        assert_eq!(
            back["plain"], "\\u0000",
            "a backslash and u0000 as text are text"
        );
        assert_eq!(jsonb_text(&serde_json::json!({"a": 1})), r#"{"a":1}"#);
    }

    fn recorded(job_id: JobId, seq: i64) -> Recorded {
        Recorded {
            job_id,
            events: vec![JobEvent {
                seq,
                status: JobStatus::Running,
                job: Arc::new(serde_json::Value::Null),
                traceparent: None,
            }],
        }
    }

    #[test]
    fn an_eta_is_one_start_interval_per_job_ahead_and_one_for_itself() {
        // 11 starts over 5 s: one every 0.5 s; the last 0.2 s ago.
        assert_eq!(eta_ms(3, 11, Some(5.0), Some(0.2)), Some(1800));
        assert_eq!(eta_ms(0, 11, Some(5.0), Some(2.0)), Some(0), "overdue");
        assert_eq!(eta_ms(3, 2, Some(5.0), Some(0.2)), None, "too few starts");
        assert_eq!(eta_ms(3, 11, None, None), None);
    }

    #[test]
    fn notification_payloads_stay_under_the_limit_and_carry_every_change() {
        let changes: Vec<Recorded> = (0..300)
            .map(|index| recorded(JobId::new(), i64::MAX - index))
            .collect();
        let payloads = notify_payloads(&changes);
        assert_eq!(payloads.len(), 3, "130 + 130 + 40");
        assert!(payloads.iter().all(|payload| payload.len() < 8000));
        let parsed: Vec<(JobId, i64)> = payloads
            .iter()
            .flat_map(|payload| notified_changes(payload))
            .collect();
        let expected: Vec<(JobId, i64)> = changes
            .iter()
            .map(|change| (change.job_id, change.latest_seq()))
            .collect();
        assert_eq!(parsed, expected);
        assert!(notify_payloads(&[]).is_empty());
    }
}
