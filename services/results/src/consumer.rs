//! Reads both topics in batches, writes each batch in one transaction, stores offsets after
//! the commit. Undecodable status events go to the dead-letter topic.

use crate::notify::JobChanges;
use crate::state::Update;
use crate::store::Store;
use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use sluice_common::kafka::{self, RebalanceContext, Rejection};
use sluice_common::propagation::TraceHeaders;
use sluice_common::telemetry;
use sluice_schemas::{RequestEvent, StatusEvent};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(crate) type ResultsConsumer = StreamConsumer<RebalanceContext>;

pub(crate) struct EventLoop {
    pub consumer: Arc<ResultsConsumer>,
    pub producer: FutureProducer,
    pub store: Store,
    /// This replica's SSE streams, handed each committed change.
    pub changes: JobChanges,
    pub requests_topic: String,
    pub dlq_topic: String,
    pub max_batch: usize,
}

impl EventLoop {
    pub(crate) async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                received = self.consumer.recv() => received,
            };
            let first = match first {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(error = %error, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Why now_or_never: take what librdkafka has already fetched, without waiting,
            // so a burst becomes one transaction and a lone event is written at once.
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(message)) => batch.push(message),
                    _ => break,
                }
            }
            if !self.process(&batch, &shutdown).await {
                break;
            }
        }
        kafka::commit_stored(self.consumer.as_ref(), "at shutdown");
        Ok(())
    }

    /// Writes one batch and stores its offsets. Returns false if stopped before it was written.
    async fn process(&self, batch: &[BorrowedMessage<'_>], shutdown: &CancellationToken) -> bool {
        let mut updates = Vec::with_capacity(batch.len());
        // One span per event, each in its job's trace, open while the batch is written.
        let mut spans = Vec::with_capacity(batch.len());
        for message in batch {
            let payload = message.payload().unwrap_or_default();
            let decoded = if message.topic() == self.requests_topic {
                RequestEvent::decode(payload).map(Update::from)
            } else {
                StatusEvent::decode(payload).map(Update::from)
            };
            match decoded {
                Ok(mut update) => {
                    let trace = TraceHeaders::from_kafka(message.headers());
                    let span = tracing::info_span!(
                        "results store",
                        otel.kind = "consumer",
                        job_id = %update.job_id,
                        status = update.status.as_str(),
                        trace_id = tracing::field::Empty,
                    );
                    telemetry::adopt(&span, trace.context());
                    spans.push(span);
                    update.traceparent = trace.traceparent;
                    updates.push(update);
                }
                // The worker dead-letters bad request events; here they are only skipped.
                Err(error) if message.topic() == self.requests_topic => {
                    tracing::debug!(reason = %error, offset = message.offset(), "skipping an undecodable request event");
                }
                Err(error) => {
                    tracing::warn!(reason = %error, offset = message.offset(), "dead-lettering an undecodable status event");
                    if !self
                        .dead_letter(message, &format!("{}: {error}", error.kind()), shutdown)
                        .await
                    {
                        return false;
                    }
                }
            }
        }
        if let Some(created_ms) = batch
            .first()
            .and_then(|first| first.timestamp().to_millis())
        {
            tracing::debug!(
                events = batch.len(),
                first_event_age_ms = chrono::Utc::now().timestamp_millis() - created_ms,
                "batch received"
            );
        }
        if !updates.is_empty() && !self.write(&updates, shutdown).await {
            return false;
        }
        drop(spans);
        self.store_offsets(batch);
        true
    }

    /// Retries until the write commits: Postgres restarts and deadlocks are waited out.
    async fn write(&self, updates: &[Update], shutdown: &CancellationToken) -> bool {
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = std::time::Instant::now();
            match self.store.apply(updates).await {
                Ok(recorded) => {
                    for job in &recorded {
                        self.changes.written(job);
                    }
                    let changed: Vec<uuid::Uuid> = recorded.iter().map(|job| job.job_id).collect();
                    metrics::histogram!("sluice_results_write_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("sluice_results_batch_events").record(updates.len() as f64);
                    record_end_to_end(updates, &changed);
                    tracing::debug!(
                        events = updates.len(),
                        changed = changed.len(),
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "batch written"
                    );
                    return true;
                }
                Err(error) => {
                    tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64, "writing a batch failed")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn dead_letter(
        &self,
        message: &BorrowedMessage<'_>,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let rejection = Rejection {
            reason,
            source_topic: message.topic(),
            source_partition: message.partition(),
            source_offset: message.offset(),
            rejected_by: "sluice-results",
        };
        kafka::dead_letter(
            &self.producer,
            &self.dlq_topic,
            message.key(),
            message.payload(),
            &rejection,
            shutdown,
        )
        .await
        .is_ok()
    }

    fn store_offsets(&self, batch: &[BorrowedMessage<'_>]) {
        let mut highest: HashMap<(&str, i32), i64> = HashMap::new();
        for message in batch {
            let entry = highest
                .entry((message.topic(), message.partition()))
                .or_insert(message.offset());
            *entry = (*entry).max(message.offset());
        }
        for ((topic, partition), offset) in highest {
            // Why not +1: rd_kafka_offset_store stores offset + 1, the next record to read.
            if let Err(error) = self.consumer.store_offset(topic, partition, offset) {
                tracing::debug!(error = %error, partition, "offset not stored; partition no longer ours");
            }
        }
    }
}

/// `sluice_job_end_to_end_seconds` for the jobs this batch made terminal (a replayed terminal
/// event changes nothing and is not counted again).
fn record_end_to_end(updates: &[Update], changed: &[uuid::Uuid]) {
    let now = chrono::Utc::now();
    let changed: HashSet<&uuid::Uuid> = changed.iter().collect();
    for update in updates {
        if update.status.is_terminal() && changed.contains(&update.job_id) {
            let took = (now - update.queued_at).to_std().unwrap_or_default();
            metrics::histogram!("sluice_job_end_to_end_seconds").record(took.as_secs_f64());
        }
    }
}
