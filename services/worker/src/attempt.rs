//! One model attempt: a slot toward the backend, its circuit, the `running` status published
//! beside the call (once it has run for `SLUICE_RUNNING_AFTER_MS`), and what the attempt teaches
//! the breaker and the concurrency limit.

use crate::context::{JobContext, status_event, time_left};
use crate::limit::Permit;
use crate::model::{CallError, Failure};
use crate::routing::Backend;
use crate::status::Abandoned;
use crate::streaming::DeltaSink;
use chrono::{DateTime, Utc};
use sluice_schemas::{ErrorCode, JobError, JobStatus, Output, RequestEvent};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

/// How one attempt ended.
#[derive(Debug)]
pub(crate) enum Attempt {
    Answered(Box<Output>),
    Failed(CallError),
    /// The backend's circuit is open: no call was made; the next model may try.
    CircuitOpen(JobError),
    /// The deadline passed waiting for a slot toward the backend.
    NoSlot(JobError),
}

/// What a job's attempts have done so far, across its whole chain.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Calls made to a model; the `running` event carries the count.
    pub(crate) attempts: AtomicU32,
    /// Part of an answer went out as delta events: nothing else may answer the job after it.
    pub(crate) streamed: AtomicBool,
}

/// Calls `model` on `backend` once, counting it in `progress`.
pub(crate) async fn run(
    context: &JobContext,
    request: &RequestEvent,
    model: &str,
    backend: &Backend,
    progress: &Progress,
    started_at: DateTime<Utc>,
) -> Result<Attempt, Abandoned> {
    let Ok(mut permit) = tokio::time::timeout(
        time_left(request),
        backend.limit.acquire_as(request.priority),
    )
    .await
    else {
        return Ok(Attempt::NoSlot(JobError {
            code: ErrorCode::Timeout,
            message: format!(
                "the deadline passed waiting for a slot toward backend {}",
                backend.name
            ),
        }));
    };
    if !backend.breaker.try_acquire(Instant::now()) {
        backend.breaker.report(&backend.name, Instant::now());
        return Ok(Attempt::CircuitOpen(JobError {
            code: ErrorCode::CircuitOpen,
            message: format!(
                "the circuit to backend {} is open after repeated failures",
                backend.name
            ),
        }));
    }
    let attempt = progress.attempts.fetch_add(1, Ordering::SeqCst) + 1;
    let remaining = time_left(request);
    let per_attempt = context.retry.attempt_timeout;
    let span = tracing::info_span!(
        "model attempt",
        otel.kind = "client",
        model = %model,
        backend = %backend.name,
        attempt,
        outcome = tracing::field::Empty,
    );
    // A job asked to be streamed has its answer's pieces published as they come.
    let mut sink = (request.stream && !request.task.is_embedding()).then(|| {
        DeltaSink::new(
            context.deltas.clone(),
            request.job_id,
            request.user_id.clone(),
            attempt,
        )
    });
    // A streamed job's pieces follow its `running`, so it goes out at once.
    let running_after = if sink.is_some() {
        Duration::ZERO
    } else {
        context.running_after
    };
    // A streamed call's first token reaches the limit as it comes, not when the answer ends.
    let first_text = sink.as_ref().map(DeltaSink::watch_first_text);
    let call = backend
        .client
        .call(
            request,
            model,
            remaining.min(per_attempt),
            remaining < per_attempt,
            sink.as_mut(),
        )
        .instrument(span.clone());
    let call_started = Instant::now();
    let call = counting_first_token(call, first_text, &mut permit, call_started);
    // Published beside the call, not before it: the idempotent producer keeps per-partition
    // order, so `running` lands before the terminal status anyway. Made when it goes out, so its
    // `emitted_at` says when that was.
    let running = async {
        let event = status_event(context, request, JobStatus::Running, attempt, started_at);
        context.publisher.publish(&event).await
    };
    let (published, result) = alongside_once_running(running, call, running_after).await;
    let answered_in = call_started.elapsed();
    published?;

    let outcome = match &result {
        Ok(_) => "ok",
        Err(failed) => match failed.failure {
            Failure::Fatal => "fatal",
            Failure::Retryable => "retryable",
            Failure::DeadlineCut => "deadline",
        },
    };
    span.record("outcome", outcome);
    metrics::histogram!("sluice_model_request_duration_seconds", "model" => model.to_owned(), "outcome" => outcome)
        .record(answered_in.as_secs_f64());
    let now = Instant::now();
    // A 4xx about the request says nothing about the backend's health or capacity.
    // A streamed answer's length is the answer's: the time to its first text is the backend's.
    let first_text = sink
        .as_ref()
        .and_then(DeltaSink::first_text_at)
        .map(|at| at.saturating_duration_since(call_started));
    let answered = first_text.map_or(
        crate::limit::Sample::Answered(answered_in),
        crate::limit::Sample::FirstToken,
    );
    let (healthy, sample) = match result.as_ref().map_err(|failed| failed.failure) {
        Ok(_) | Err(Failure::Fatal) => (true, answered),
        Err(Failure::Retryable) => (false, crate::limit::Sample::Overloaded),
        Err(Failure::DeadlineCut) => (false, crate::limit::Sample::Ignored),
    };
    backend.breaker.record(healthy, now);
    backend.breaker.report(&backend.name, now);
    permit.release(sample);
    backend.limit.report(&backend.name);
    Ok(match result {
        Ok(output) => Attempt::Answered(Box::new(output)),
        Err(mut failed) => {
            // Part of the answer is out: another attempt or model would start it again and
            // garble what the reader has. The job fails with what went wrong.
            if sink.as_ref().is_some_and(DeltaSink::sent_any) {
                progress.streamed.store(true, Ordering::SeqCst);
                failed.failure = Failure::Fatal;
                failed.error.message = format!(
                    "{} (after part of the answer was streamed, so not retried)",
                    failed.error.message
                );
            }
            tracing::info!(model, attempt, code = ?failed.error.code, message = %failed.error.message, "model call failed");
            Attempt::Failed(failed)
        }
    })
}

/// Runs `call` and, once it has run for `after`, `publish` beside it; a call that ends sooner
/// ends without it (`Ok`). A publish that has started is finished before this returns, so the
/// terminal status the caller publishes next lands after it.
async fn alongside_once_running<P, C>(
    publish: P,
    call: C,
    after: Duration,
) -> (P::Output, C::Output)
where
    P: std::future::Future<Output = Result<(), Abandoned>>,
    C: std::future::Future,
{
    if after.is_zero() {
        return tokio::join!(publish, call);
    }
    let mut call = std::pin::pin!(call);
    tokio::select! {
        result = &mut call => (Ok(()), result),
        () = tokio::time::sleep(after) => tokio::join!(publish, call),
    }
}

/// Runs `call`, handing the limit the call's first token when `first_text` sees it (a streamed
/// call), so the limit learns at the pace of first tokens rather than of whole answers.
async fn counting_first_token<T>(
    call: impl std::future::Future<Output = T>,
    mut first_text: Option<watch::Receiver<Option<Instant>>>,
    permit: &mut Permit<'_>,
    call_started: Instant,
) -> T {
    let mut call = std::pin::pin!(call);
    loop {
        let Some(watch) = first_text.as_mut() else {
            return call.await;
        };
        tokio::select! {
            result = &mut call => return result,
            changed = watch.changed() => {
                let at = *watch.borrow_and_update();
                match (changed, at) {
                    (Ok(()), Some(at)) => {
                        permit.first_token(at.saturating_duration_since(call_started));
                        first_text = None;
                    }
                    (Err(_), _) => first_text = None,
                    (Ok(()), None) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    async fn published(count: &AtomicUsize) -> Result<(), Abandoned> {
        count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn answered_in(time: Duration) -> &'static str {
        tokio::time::sleep(time).await;
        "answer"
    }

    #[tokio::test]
    async fn running_goes_out_with_the_call_only_once_the_call_has_run_that_long() {
        let count = AtomicUsize::new(0);
        let at_once = alongside_once_running(
            published(&count),
            answered_in(Duration::from_millis(10)),
            Duration::ZERO,
        )
        .await;
        assert_eq!((at_once.1, count.load(Ordering::SeqCst)), ("answer", 1));

        let quick = alongside_once_running(
            published(&count),
            answered_in(Duration::from_millis(10)),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            (quick.0.is_ok(), quick.1, count.load(Ordering::SeqCst)),
            (true, "answer", 1),
            "a call answered before the delay publishes nothing"
        );

        let slow = alongside_once_running(
            published(&count),
            answered_in(Duration::from_millis(300)),
            Duration::from_millis(20),
        )
        .await;
        assert_eq!((slow.1, count.load(Ordering::SeqCst)), ("answer", 2));
    }
}
