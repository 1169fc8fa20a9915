//! What a job needs besides its record, built the same way by the service and the tests; and
//! the two facts every step of a job asks: the status event it would publish, and the time
//! left before its deadline.

use crate::cancel::Cancellations;
use crate::coalesce::Coalescer;
use crate::retry::RetryPolicy;
use crate::routing::Routes;
use crate::status::StatusPublisher;
use crate::streaming::DeltaTopic;
use chrono::Utc;
use sluice_common::cache::ResponseCache;
use sluice_schemas::{JobStatus, RequestEvent, StatusEvent, Timings};
use std::sync::Arc;
use std::time::Duration;

/// What a job needs besides its record.
#[derive(Clone)]
pub struct JobContext {
    pub routes: Routes,
    pub publisher: StatusPublisher,
    pub worker_id: String,
    pub retry: RetryPolicy,
    pub cancellations: Cancellations,
    pub cache: Arc<ResponseCache>,
    pub coalescer: Coalescer,
    /// Where streamed answers' pieces go.
    pub deltas: DeltaTopic,
    /// How long an attempt runs before its `running` status is published.
    pub running_after: Duration,
}

impl JobContext {
    /// Everything a job needs, from the worker's settings: the service and the tests build it
    /// the same way. `give_up` is the drain deadline: status publishing stops retrying then.
    pub async fn from_config(
        config: &crate::Config,
        producer: rdkafka::producer::FutureProducer,
        give_up: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            routes: config.routes().await?,
            deltas: DeltaTopic {
                producer: producer.clone(),
                topic: config.topics.deltas.clone(),
                flush: config.delta_flush,
            },
            publisher: StatusPublisher::new(
                producer,
                config.topics.status.clone(),
                config.topics.requests_dlq.clone(),
                give_up,
            ),
            worker_id: config.worker_id(),
            retry: config.retry_policy(),
            cancellations: Cancellations::default(),
            cache: Arc::new(config.response_cache().await?),
            coalescer: Coalescer::default(),
            running_after: config.running_after,
        })
    }
}

pub(crate) fn time_left(request: &RequestEvent) -> Duration {
    (request.deadline - Utc::now()).to_std().unwrap_or_default()
}

pub(crate) fn status_event(
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
