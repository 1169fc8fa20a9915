//! The job state machine: which events move a job forward, and what each change looks like.
//! Pure code, so ordering, replay and duplication rules are tested without a database.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sluice_schemas::{
    JobError, JobId, JobStatus, ModelName, Output, Priority, RequestEvent, StatusEvent, UserId,
};

/// One incoming fact about a job, from either topic.
#[derive(Debug, Clone)]
pub struct Update {
    pub job_id: JobId,
    pub user_id: UserId,
    pub model: ModelName,
    pub status: JobStatus,
    pub attempt: i32,
    pub output: Option<Output>,
    pub error: Option<JobError>,
    pub worker_id: Option<String>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub deadline: Option<DateTime<Utc>>,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The W3C `traceparent` the event carried; kept with the job for its SSE spans.
    pub traceparent: Option<String>,
    /// Where a request event was read: its place in its lane's queue.
    pub request_record: Option<RequestRecord>,
    /// The API key that submitted the job (request events), for usage per key.
    pub key_id: Option<String>,
}

/// Where a job's request event sits: its lane's topic, the partition and the offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRecord {
    pub lane: Priority,
    pub partition: i32,
    pub offset: i64,
}

impl Update {
    /// Progress order: a higher status rank wins, and within `running` a later attempt.
    fn progress(&self) -> (i16, i32) {
        (self.status.rank(), self.attempt)
    }
}

/// Postgres keeps microseconds; rounding here keeps stored snapshots equal to stored rows.
fn micros(time: DateTime<Utc>) -> DateTime<Utc> {
    time.trunc_subsecs(6)
}

impl From<RequestEvent> for Update {
    fn from(event: RequestEvent) -> Self {
        Update {
            job_id: event.job_id,
            user_id: event.user_id,
            model: event.model,
            status: JobStatus::Queued,
            attempt: 0,
            output: None,
            error: None,
            worker_id: None,
            submitted_at: Some(micros(event.submitted_at)),
            deadline: Some(micros(event.deadline)),
            queued_at: micros(event.submitted_at),
            started_at: None,
            finished_at: None,
            traceparent: None,
            request_record: None,
            key_id: event.key_id,
        }
    }
}

impl From<StatusEvent> for Update {
    fn from(event: StatusEvent) -> Self {
        Update {
            job_id: event.job_id,
            user_id: event.user_id,
            model: event.model,
            status: event.status,
            attempt: i32::try_from(event.attempt).unwrap_or(i32::MAX),
            output: event.output,
            error: event.error,
            worker_id: event.worker_id,
            submitted_at: None,
            deadline: None,
            queued_at: micros(event.timings.queued_at),
            started_at: event.timings.started_at.map(micros),
            finished_at: event.timings.finished_at.map(micros),
            traceparent: None,
            request_record: None,
            key_id: None,
        }
    }
}

/// A job as stored, and as `GET /v1/jobs/{id}` and every SSE event show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: JobId,
    pub user_id: UserId,
    pub model: ModelName,
    pub status: JobStatus,
    pub attempt: i32,
    /// Number of status changes so far; the SSE event id of the latest.
    pub seq: i64,
    pub output: Option<Output>,
    pub error: Option<JobError>,
    pub worker_id: Option<String>,
    pub timings: JobTimings,
    /// While queued, where the job stands (`GET` fills it in; stored changes never hold it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueuePosition>,
}

/// Where a queued job stands: the jobs that will start before it, and when it should start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    pub position: i64,
    /// Milliseconds until it starts, at the rate its partition's jobs started lately; `None`
    /// until a few have.
    pub eta_ms: Option<i64>,
}

/// When the job reached each stage. Serialized with two derived figures: `queue_wait_ms`
/// (queued until a worker started it) and `run_ms` (started until finished).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobTimings {
    pub submitted_at: Option<DateTime<Utc>>,
    pub deadline: Option<DateTime<Utc>>,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Serialize for JobTimings {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let millis = |from: DateTime<Utc>, to: Option<DateTime<Utc>>| {
            to.map(|to| (to - from).num_milliseconds().max(0))
        };
        let mut timings = serializer.serialize_struct("JobTimings", 7)?;
        timings.serialize_field("submitted_at", &self.submitted_at)?;
        timings.serialize_field("deadline", &self.deadline)?;
        timings.serialize_field("queued_at", &self.queued_at)?;
        timings.serialize_field("started_at", &self.started_at)?;
        timings.serialize_field("finished_at", &self.finished_at)?;
        timings.serialize_field("queue_wait_ms", &millis(self.queued_at, self.started_at))?;
        timings.serialize_field(
            "run_ms",
            &self
                .started_at
                .and_then(|started| millis(started, self.finished_at)),
        )?;
        timings.end()
    }
}

impl Job {
    /// A job first seen through `update`, before any change is recorded (seq 0).
    pub fn placeholder(update: &Update) -> Self {
        Job {
            job_id: update.job_id,
            user_id: update.user_id.clone(),
            model: update.model.clone(),
            status: JobStatus::Queued,
            attempt: 0,
            seq: 0,
            output: None,
            error: None,
            worker_id: None,
            timings: JobTimings {
                submitted_at: None,
                deadline: None,
                queued_at: update.queued_at,
                started_at: None,
                finished_at: None,
            },
            queue: None,
        }
    }

    /// Applies `updates` in progress order and returns the snapshots of the changes made.
    /// A job's first change is always `queued`, even when a later status arrives first.
    pub fn apply(&mut self, updates: &mut [&Update]) -> (bool, Vec<Job>) {
        updates.sort_by_key(|update| update.progress());
        let mut changes = Vec::new();
        let mut dirty = false;
        for update in updates.iter() {
            if self.timings.submitted_at.is_none() && update.submitted_at.is_some() {
                self.timings.submitted_at = update.submitted_at;
                self.timings.deadline = update.deadline;
                dirty = true;
            }
            if self.seq == 0 {
                self.seq = 1;
                changes.push(self.clone());
            }
            let moves_forward = !self.status.is_terminal()
                && update.progress() > (self.status.rank(), self.attempt);
            if !moves_forward {
                continue;
            }
            self.status = update.status;
            self.attempt = update.attempt;
            self.output = update.output.clone();
            self.error = update.error.clone();
            self.worker_id = update.worker_id.clone().or(self.worker_id.take());
            self.timings.started_at = update.started_at.or(self.timings.started_at);
            self.timings.finished_at = update.finished_at.or(self.timings.finished_at);
            self.seq += 1;
            changes.push(self.clone());
        }
        (dirty || !changes.is_empty(), changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::ErrorCode;

    fn update(status: JobStatus, attempt: i32) -> Update {
        Update {
            job_id: JobId::new(),
            user_id: UserId::parse("u").unwrap(),
            model: ModelName::parse("m").unwrap(),
            status,
            attempt,
            output: (status == JobStatus::Succeeded).then(|| Output {
                content: "ok".into(),
                ..Output::default()
            }),
            error: (status == JobStatus::Failed).then(|| JobError {
                code: ErrorCode::BackendError,
                message: "x".into(),
            }),
            worker_id: Some("w".into()),
            submitted_at: (status == JobStatus::Queued).then(Utc::now),
            deadline: None,
            queued_at: Utc::now(),
            started_at: None,
            finished_at: None,
            traceparent: None,
            request_record: None,
            key_id: None,
        }
    }

    fn statuses(changes: &[Job]) -> Vec<JobStatus> {
        changes.iter().map(|job| job.status).collect()
    }

    #[test]
    fn in_order_events_record_every_change_once() {
        let (queued, running, done) = (
            update(JobStatus::Queued, 0),
            update(JobStatus::Running, 1),
            update(JobStatus::Succeeded, 1),
        );
        let mut job = Job::placeholder(&queued);
        let (_, changes) = job.apply(&mut [&queued, &running, &done]);
        assert_eq!(
            statuses(&changes),
            [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded]
        );
        assert_eq!(
            changes.iter().map(|job| job.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let (dirty, replayed) = job.apply(&mut [&running, &queued, &done]);
        assert!(!dirty && replayed.is_empty(), "a replay changes nothing");
    }

    #[test]
    fn a_late_request_event_fills_in_fields_but_never_moves_a_job_back() {
        let (queued, running) = (update(JobStatus::Queued, 0), update(JobStatus::Running, 1));
        let mut job = Job::placeholder(&running);
        let (_, changes) = job.apply(&mut [&running]);
        assert_eq!(
            statuses(&changes),
            [JobStatus::Queued, JobStatus::Running],
            "queued is recorded first"
        );
        let (dirty, changes) = job.apply(&mut [&queued]);
        assert!(dirty && changes.is_empty());
        assert_eq!(job.status, JobStatus::Running);
        assert!(job.timings.submitted_at.is_some());
    }

    #[test]
    fn the_first_terminal_status_is_final() {
        let (failed, succeeded, retry) = (
            update(JobStatus::Failed, 1),
            update(JobStatus::Succeeded, 2),
            update(JobStatus::Running, 2),
        );
        let mut job = Job::placeholder(&failed);
        job.apply(&mut [&failed]);
        let (dirty, changes) = job.apply(&mut [&retry, &succeeded]);
        assert!(!dirty && changes.is_empty());
        assert_eq!(job.status, JobStatus::Failed);
    }
}
