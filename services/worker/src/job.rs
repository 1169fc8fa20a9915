//! The worker's unit of work: one record in, one outcome out. The consumer loop around it only
//! schedules; everything a job does is here and can be called directly.

use crate::attempt::{self, Attempt, Progress};
use crate::coalesce::{self, Turn};
pub use crate::context::JobContext;
use crate::context::{status_event, time_left};
use crate::retry::Next;
use crate::status::Abandoned;
use chrono::{DateTime, Utc};
use sluice_common::cache::cache_key;
pub use sluice_common::kafka::Record;
use sluice_common::telemetry;
use sluice_schemas::{DecodeError, ErrorCode, JobError, JobStatus, Output, RequestEvent};
use std::sync::atomic::Ordering;
use tracing::Instrument;

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

/// A job's end as the consumer loop sees it: the outcome, and the answer it published (the fair
/// queue settles the user's share against its usage).
pub(crate) struct Ran {
    pub outcome: Outcome,
    pub output: Option<Output>,
}

/// Runs one request record in the job's worker span, a child of the span that published it.
pub async fn run(context: &JobContext, record: &Record) -> Outcome {
    run_decoded(context, record, RequestEvent::decode(record.payload()))
        .await
        .outcome
}

/// [`run`], for a record the consumer loop has already decoded (to schedule it by its tokens).
pub(crate) async fn run_decoded(
    context: &JobContext,
    record: &Record,
    request: Result<RequestEvent, DecodeError>,
) -> Ran {
    let span = tracing::info_span!(
        "worker job",
        otel.kind = "consumer",
        partition = record.partition,
        offset = record.offset,
        job_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::adopt(&span, record.trace.context());
    run_in_span(context, record, request).instrument(span).await
}

async fn run_in_span(
    context: &JobContext,
    record: &Record,
    request: Result<RequestEvent, DecodeError>,
) -> Ran {
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(reason = %error, "dead-lettering an undecodable request event");
            let reason = format!("{}: {error}", error.kind());
            let outcome = match context.publisher.dead_letter(record, &reason).await {
                Ok(()) => Outcome::DeadLettered,
                Err(abandoned) => abandoned.into(),
            };
            return Ran {
                outcome,
                output: None,
            };
        }
    };
    tracing::Span::current().record("job_id", tracing::field::display(request.job_id));
    let Some(running) = context.cancellations.start(request.job_id) else {
        return finished(cancel(context, &request, 0, "cancelled before it started").await);
    };
    let progress = Progress::default();
    let result = tokio::select! {
        // Why biased: once cancelled, the job must not go on to publish another status.
        biased;
        _ = running.token.cancelled() => {
            // Dropping `execute` here drops the model call and closes its connection.
            let made = progress.attempts.load(Ordering::SeqCst);
            cancel(context, &request, made, "cancelled while running; the model call was aborted").await
        }
        result = execute(context, &request, &progress) => result,
    };
    finished(result)
}

fn finished(result: Result<(JobStatus, Option<Output>), Abandoned>) -> Ran {
    match result {
        Ok((status, output)) => Ran {
            outcome: Outcome::Finished(status),
            output,
        },
        Err(abandoned) => Ran {
            outcome: abandoned.into(),
            output: None,
        },
    }
}

async fn cancel(
    context: &JobContext,
    request: &RequestEvent,
    attempt: u32,
    message: &str,
) -> Result<(JobStatus, Option<Output>), Abandoned> {
    let now = Utc::now();
    let mut cancelled = status_event(context, request, JobStatus::Cancelled, attempt, now);
    cancelled.timings.finished_at = Some(now);
    cancelled.error = Some(JobError {
        code: ErrorCode::Cancelled,
        message: message.to_owned(),
    });
    tracing::info!(message, "job cancelled");
    context.publisher.publish(&cancelled).await?;
    Ok((JobStatus::Cancelled, None))
}

/// Runs a decoded request: for each model in its chain, up to `max_attempts` calls with
/// backoff, all within the deadline; then the static fallback, if any; then the terminal status.
async fn execute(
    context: &JobContext,
    request: &RequestEvent,
    progress: &Progress,
) -> Result<(JobStatus, Option<Output>), Abandoned> {
    let started_at = Utc::now();
    let waited = (started_at - request.submitted_at)
        .to_std()
        .unwrap_or_default();
    metrics::histogram!("sluice_job_queue_wait_seconds").record(waited.as_secs_f64());
    if time_left(request).is_zero() {
        let mut expired = status_event(context, request, JobStatus::Expired, 0, started_at);
        expired.timings.finished_at = Some(started_at);
        expired.error = Some(JobError {
            code: ErrorCode::DeadlineExceeded,
            message: format!(
                "the deadline {} passed while the job was queued",
                request.deadline.to_rfc3339()
            ),
        });
        context.publisher.publish(&expired).await?;
        return Ok((JobStatus::Expired, None));
    }

    let answer = answer(context, request, started_at, progress).await?;
    let attempt = progress.attempts.load(Ordering::SeqCst);
    let mut terminal = status_event(context, request, JobStatus::Succeeded, attempt, started_at);
    terminal.timings.finished_at = Some(Utc::now());
    match answer {
        Ok(output) => {
            if output
                .model
                .as_deref()
                .is_some_and(|answered_by| answered_by != request.model.as_str())
            {
                metrics::counter!("sluice_model_fallbacks_total", "model" => request.model.as_str().to_owned(), "to" => "model")
                    .increment(1);
            }
            terminal.output = Some(output);
        }
        // Part of an answer already went out: a fallback text after it would garble it.
        Err(error) => match context
            .routes
            .static_fallback(request.model.as_str())
            .filter(|_| !progress.streamed.load(Ordering::SeqCst))
        {
            Some(text) => {
                metrics::counter!("sluice_model_fallbacks_total", "model" => request.model.as_str().to_owned(), "to" => "static")
                    .increment(1);
                tracing::info!(code = ?error.code, "every model failed; answering with the static fallback");
                terminal.output = Some(Output {
                    content: text.to_owned(),
                    degraded: true,
                    ..Output::default()
                });
            }
            None => {
                tracing::info!(code = ?error.code, message = %error.message, "job failed");
                terminal.status = JobStatus::Failed;
                terminal.error = Some(error);
            }
        },
    }
    if let Some(output) = &mut terminal.output {
        // Readers of the job's deltas take what the pieces did not carry (all of it, for a
        // cache hit or a shared answer) from this output.
        output.streamed = request.stream && !request.task.is_embedding();
    }
    context.publisher.publish(&terminal).await?;
    let ran = (Utc::now() - started_at).to_std().unwrap_or_default();
    metrics::histogram!("sluice_job_run_seconds").record(ran.as_secs_f64());
    metrics::counter!("sluice_jobs_finished_total", "status" => terminal.status.as_str())
        .increment(1);
    tracing::debug!(status = terminal.status.as_str(), "job finished");
    Ok((terminal.status, terminal.output))
}

/// The answer from the cache, from an identical call in flight, or from the models.
async fn answer(
    context: &JobContext,
    request: &RequestEvent,
    started_at: DateTime<Utc>,
    progress: &Progress,
) -> Result<Result<Output, JobError>, Abandoned> {
    if !request.cache {
        return call_chain(context, request, started_at, progress).await;
    }
    let key = cache_key(request);
    if let Some(output) = context.cache.get(&key).await {
        return Ok(Ok(output));
    }
    let leader = match context.coalescer.join(&key) {
        Turn::Leader(leader) => leader,
        Turn::Follower(receiver) => {
            let shared = tokio::time::timeout(time_left(request), coalesce::follow(receiver)).await;
            if let Ok(Some(mut output)) = shared {
                output.cached = true;
                return Ok(Ok(output));
            }
            // The leader failed or went away: this job makes its own call.
            return call_chain(context, request, started_at, progress).await;
        }
    };
    let result = call_chain(context, request, started_at, progress).await?;
    match &result {
        Ok(output) => {
            context.cache.put(&key, output).await;
            leader.finish(Some(output.clone()));
        }
        Err(_) => leader.finish(None),
    }
    Ok(result)
}

/// Tries each model of the chain, each up to the retry policy's attempts, within the deadline.
async fn call_chain(
    context: &JobContext,
    request: &RequestEvent,
    started_at: DateTime<Utc>,
    progress: &Progress,
) -> Result<Result<Output, JobError>, Abandoned> {
    let mut last_error = JobError {
        code: ErrorCode::Internal,
        message: "no model was tried".to_owned(),
    };
    for model in context.routes.chain(request.model.as_str()) {
        let backend = context.routes.backend_for(&model);
        for try_number in 1..=context.retry.max_attempts {
            if time_left(request).is_zero() {
                return Ok(Err(deadline_passed(request, last_error)));
            }
            match attempt::run(context, request, &model, backend, progress, started_at).await? {
                Attempt::Answered(output) => return Ok(Ok(*output)),
                Attempt::NoSlot(error) => return Ok(Err(error)),
                Attempt::CircuitOpen(error) => {
                    last_error = error;
                    break;
                }
                Attempt::Failed(failed) => {
                    let next = context.retry.next(try_number, &failed, time_left(request));
                    last_error = failed.error;
                    match next {
                        Next::Stop => return Ok(Err(last_error)),
                        Next::OtherModel => break,
                        Next::RetryAfter(delay) => {
                            metrics::counter!("sluice_model_retries_total", "model" => model.clone())
                                .increment(1);
                            tokio::time::sleep(delay).await;
                        }
                    }
                }
            }
        }
    }
    Ok(Err(last_error))
}

fn deadline_passed(request: &RequestEvent, last_error: JobError) -> JobError {
    JobError {
        code: ErrorCode::Timeout,
        message: format!(
            "the deadline {} passed between attempts; last error: {}",
            request.deadline.to_rfc3339(),
            last_error.message
        ),
    }
}
