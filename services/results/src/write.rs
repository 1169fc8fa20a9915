//! The write of a batch of events: one transaction, five round trips (`BEGIN` with the write's
//! settings, the rows of jobs not seen before, the rows locked and read, the changes with their
//! events, usage and notifications in one statement, `COMMIT`); the state machine (`state.rs`)
//! applies the batch to the rows in between.
//!
//! Tried and not kept (2026-12-02): two statements each in a transaction of its own, the rows
//! made and read without locks and each job written only if its `seq` was still the one read
//! (two round trips, a job written meanwhile read and applied again). On fresh stacks at 400
//! and 600 jobs/s the writer took the same time per event (0.74 and 0.49 ms both ways): each
//! statement cost 1 to 2 ms of wall time on a loaded machine whatever its round trips.

use crate::state::{Job, RequestRecord, Update};
use crate::store::{JOB_COLUMNS, NOTIFY_CHANNEL, Recorded, Store, job_from_row};
use chrono::{DateTime, Utc};
use sluice_schemas::JobId;
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use uuid::Uuid;

impl Store {
    /// Applies a batch of updates in one transaction and returns what it recorded, job by job.
    /// Replayed, duplicated or out-of-order updates never move a job back or add a row.
    pub async fn apply(&self, updates: &[Update]) -> sqlx::Result<Vec<Recorded>> {
        let mut connection = self.pool().acquire().await?;
        self.apply_on(&mut connection, updates).await
    }

    /// [`Self::apply`] on `connection` (the writer's kept one: `kept.rs`).
    pub async fn apply_on(
        &self,
        connection: &mut PgConnection,
        updates: &[Update],
    ) -> sqlx::Result<Vec<Recorded>> {
        // Sorted by job id so every writer takes row locks in the same order (no deadlocks
        // between results replicas that share jobs through the two topics).
        let mut by_job: BTreeMap<JobId, Vec<&Update>> = BTreeMap::new();
        for update in updates {
            by_job.entry(update.job_id).or_default().push(update);
        }
        let mut transaction = connection.begin_with(WRITE_BEGIN).await?;
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
        let notifications = notify_payloads(self.writer_id(), &recorded);
        record_changes(
            &mut transaction,
            &changed_jobs,
            &events,
            &recorded,
            ended,
            notifications,
        )
        .await?;
        transaction.commit().await?;
        Ok(recorded)
    }
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
    notifications: Vec<String>,
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
        .bind(notifications);
    ended.bind(query).execute(&mut **transaction).await?;
    Ok(())
}

/// `writer:<id>` (the store that wrote them: `Store::writer_id`), then the changed jobs as
/// `job_id:seq` (the job's latest change), comma separated, in as few notifications as fit
/// Postgres' payload limit (under 8,000 bytes): one per transaction in all but the largest
/// batches. Why inside the transaction: Postgres delivers a NOTIFY only when its transaction
/// commits, so a listener never hears of a change it cannot read yet.
pub(crate) fn notify_payloads(writer_id: &str, recorded: &[Recorded]) -> Vec<String> {
    // 7 + 32 + 1 + 130 x (36 + 1 + 19 + 1) bytes = 7,450 at most
    const JOBS_PER_NOTIFICATION: usize = 130;
    recorded
        .chunks(JOBS_PER_NOTIFICATION)
        .map(|chunk| {
            let mut payload = format!("{WRITER_PREFIX}{writer_id}");
            for job in chunk {
                payload.push_str(&format!(",{}:{}", job.job_id, job.latest_seq()));
            }
            payload
        })
        .collect()
}

const WRITER_PREFIX: &str = "writer:";

/// The writer a notification names, if it names one.
pub(crate) fn notified_by(payload: &str) -> Option<&str> {
    payload.split(',').next()?.strip_prefix(WRITER_PREFIX)
}

/// The `(job_id, seq)` pairs in one notification's payload; what does not parse (the writer's
/// name) is skipped.
pub(crate) fn notified_changes(payload: &str) -> impl Iterator<Item = (JobId, i64)> + '_ {
    payload.split(',').filter_map(|item| {
        let (id, seq) = item.trim().split_once(':')?;
        Some((JobId::parse(id).ok()?, seq.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::JobEvent;
    use sluice_schemas::JobStatus;

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
    fn notification_payloads_stay_under_the_limit_and_carry_every_change() {
        let changes: Vec<Recorded> = (0..300)
            .map(|index| recorded(JobId::new(), i64::MAX - index))
            .collect();
        let writer = uuid::Uuid::now_v7().simple().to_string();
        let payloads = notify_payloads(&writer, &changes);
        assert_eq!(payloads.len(), 3, "130 + 130 + 40");
        assert!(payloads.iter().all(|payload| payload.len() < 8000));
        assert!(
            payloads
                .iter()
                .all(|payload| notified_by(payload) == Some(writer.as_str()))
        );
        assert_eq!(notified_by("0190a1b2-0000-7000-8000-000000000000:3"), None);
        let parsed: Vec<(JobId, i64)> = payloads
            .iter()
            .flat_map(|payload| notified_changes(payload))
            .collect();
        let expected: Vec<(JobId, i64)> = changes
            .iter()
            .map(|change| (change.job_id, change.latest_seq()))
            .collect();
        assert_eq!(parsed, expected);
        assert!(notify_payloads(&writer, &[]).is_empty());
    }
}
