//! The worker's unit of work: one record in, one outcome out. The consumer loop around it only
//! schedules; everything a job does is here and can be called directly.

use crate::model::ModelClient;
use crate::status::{Abandoned, DeadLetter, StatusPublisher};
use chrono::Utc;
use sluice_schemas::{ErrorCode, JobError, JobStatus, RequestEvent, StatusEvent, Timings};
use std::time::Duration;

/// What a job needs besides its record.
#[derive(Clone)]
pub struct JobContext {
    pub model: ModelClient,
    pub publisher: StatusPublisher,
    pub worker_id: String,
    pub model_timeout: Duration,
}

/// A consumed record, detached from the consumer so a task can own it.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// How a record ended; every variant but `Abandoned` lets its offset be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The job's terminal status was acknowledged by the broker.
    Finished(JobStatus),
    /// The record could not be decoded and was moved to the dead-letter topic.
    DeadLettered,
    /// The worker stopped before the result was acknowledged; the record will be redelivered.
    Abandoned,
}

impl From<Abandoned> for Outcome {
    fn from(_: Abandoned) -> Self {
        Outcome::Abandoned
    }
}

#[tracing::instrument(skip_all, fields(partition = record.partition, offset = record.offset, job_id))]
pub async fn run(context: &JobContext, record: &Record) -> Outcome {
    let request = match RequestEvent::decode(record.payload.as_deref().unwrap_or_default()) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(reason = %error, "dead-lettering an undecodable request event");
            let letter = DeadLetter {
                key: record.key.as_deref(),
                payload: record.payload.as_deref(),
                reason: format!("{}: {error}", error.kind()),
                source_topic: &record.topic,
                source_partition: record.partition,
                source_offset: record.offset,
            };
            return match context.publisher.dead_letter(&letter).await {
                Ok(()) => Outcome::DeadLettered,
                Err(abandoned) => abandoned.into(),
            };
        }
    };
    tracing::Span::current().record("job_id", tracing::field::display(request.job_id));
    match execute(context, &request).await {
        Ok(status) => Outcome::Finished(status),
        Err(abandoned) => abandoned.into(),
    }
}

/// Runs a decoded request: `running`, the model call, then the terminal status.
async fn execute(context: &JobContext, request: &RequestEvent) -> Result<JobStatus, Abandoned> {
    let started_at = Utc::now();
    let until_deadline = (request.deadline - started_at).to_std().unwrap_or_default();
    if until_deadline.is_zero() {
        let error = JobError {
            code: ErrorCode::DeadlineExceeded,
            message: format!(
                "the deadline {} passed while the job was queued",
                request.deadline.to_rfc3339()
            ),
        };
        let mut expired = status_event(context, request, JobStatus::Expired, 0, started_at);
        expired.timings.finished_at = Some(started_at);
        expired.error = Some(error);
        context.publisher.publish(&expired).await?;
        return Ok(JobStatus::Expired);
    }

    // Why not wait for this acknowledgement first: the idempotent producer keeps per-partition
    // order, so `running` lands before the terminal status anyway; waiting would add a broker
    // round trip to every job. Both are awaited before the offset is stored.
    let running = status_event(context, request, JobStatus::Running, 1, started_at);
    let running_published = context.publisher.publish(&running);

    let timeout_is_deadline = until_deadline < context.model_timeout;
    let call = context.model.chat(
        request,
        until_deadline.min(context.model_timeout),
        timeout_is_deadline,
    );
    let (running_result, answer) = tokio::join!(running_published, call);
    running_result?;

    let mut terminal = status_event(context, request, JobStatus::Succeeded, 1, started_at);
    terminal.timings.finished_at = Some(Utc::now());
    terminal.emitted_at = Utc::now();
    match answer {
        Ok(output) => terminal.output = Some(output),
        Err(error) => {
            tracing::info!(code = ?error.code, message = %error.message, "model call failed");
            terminal.status = JobStatus::Failed;
            terminal.error = Some(error);
        }
    }
    context.publisher.publish(&terminal).await?;
    Ok(terminal.status)
}

fn status_event(
    context: &JobContext,
    request: &RequestEvent,
    status: JobStatus,
    attempt: u32,
    started_at: chrono::DateTime<Utc>,
) -> StatusEvent {
    StatusEvent {
        status,
        attempt,
        timings: Timings {
            queued_at: request.submitted_at,
            started_at: Some(started_at),
            finished_at: None,
        },
        worker_id: Some(context.worker_id.clone()),
        emitted_at: Utc::now(),
        ..StatusEvent::queued(request)
    }
}
