//! The results service's work on the shared Kafka source: reads both topics in batches, writes
//! each batch in one transaction, marks its records done after the commit. Undecodable status
//! events go to the dead-letter topic.

use crate::notify::JobChanges;
use crate::state::Update;
use crate::store::Store;
use rdkafka::producer::FutureProducer;
use sluice_common::kafka::{self, KafkaSource, Record};
use sluice_common::telemetry;
use sluice_schemas::{RequestEvent, StatusEvent};
use std::collections::HashSet;
use tokio_util::sync::CancellationToken;

pub(crate) struct EventLoop {
    pub source: KafkaSource,
    pub producer: FutureProducer,
    pub store: Store,
    /// This replica's SSE streams, handed each committed change.
    pub changes: JobChanges,
    pub requests_topic: String,
    /// The batch lane's request topic: its jobs are recorded as queued too.
    pub batch_requests_topic: String,
    pub dlq_topic: String,
    pub max_batch: usize,
}

impl EventLoop {
    /// Runs until `stop`; a batch being written then is finished unless `give_up` comes first.
    pub(crate) async fn run(
        mut self,
        stop: CancellationToken,
        give_up: CancellationToken,
    ) -> anyhow::Result<()> {
        // A burst becomes one transaction; a lone event is written at once.
        while let Some(batch) = self.source.next_batch(self.max_batch, &stop).await {
            if !self.process(&batch, &give_up).await {
                break;
            }
            self.source.done_all(&batch);
        }
        self.source.close().await;
        Ok(())
    }

    /// Writes one batch. Returns false if it gave up before the batch was written.
    async fn process(&self, batch: &[Record], give_up: &CancellationToken) -> bool {
        let mut updates = Vec::with_capacity(batch.len());
        // One span per event, each in its job's trace, open while the batch is written.
        let mut spans = Vec::with_capacity(batch.len());
        for record in batch {
            let is_request =
                record.topic == self.requests_topic || record.topic == self.batch_requests_topic;
            let decoded = if is_request {
                RequestEvent::decode(record.payload()).map(Update::from)
            } else {
                StatusEvent::decode(record.payload()).map(Update::from)
            };
            match decoded {
                Ok(mut update) => {
                    let span = tracing::info_span!(
                        "results store",
                        otel.kind = "consumer",
                        job_id = %update.job_id,
                        status = update.status.as_str(),
                        trace_id = tracing::field::Empty,
                    );
                    telemetry::adopt(&span, record.trace.context());
                    spans.push(span);
                    update.traceparent = record.trace.traceparent.clone();
                    // Queue positions rank the interactive lane's partitions only: a batch job
                    // waits behind a lane that yields to interactive work, so its place in
                    // its partition says little.
                    if record.topic == self.requests_topic {
                        update.request_record = Some((record.partition, record.offset));
                    }
                    updates.push(update);
                }
                // The worker dead-letters bad request events; here they are only skipped.
                Err(error) if is_request => {
                    tracing::debug!(reason = %error, offset = record.offset, "skipping an undecodable request event");
                }
                Err(error) => {
                    tracing::warn!(reason = %error, offset = record.offset, "dead-lettering an undecodable status event");
                    let reason = format!("{}: {error}", error.kind());
                    let rejection = record.rejection(&reason, "sluice-results");
                    let sent = kafka::dead_letter(
                        &self.producer,
                        &self.dlq_topic,
                        record,
                        &rejection,
                        give_up,
                    )
                    .await;
                    if sent.is_err() {
                        return false;
                    }
                }
            }
        }
        if let Some(created_ms) = batch.first().and_then(|first| first.timestamp_ms) {
            tracing::debug!(
                events = batch.len(),
                first_event_age_ms = chrono::Utc::now().timestamp_millis() - created_ms,
                "batch received"
            );
        }
        if !updates.is_empty() && !self.write(&updates, give_up).await {
            return false;
        }
        drop(spans);
        true
    }

    /// Retries until the write commits: Postgres restarts and deadlocks are waited out.
    async fn write(&self, updates: &[Update], give_up: &CancellationToken) -> bool {
        let started = std::time::Instant::now();
        let written = sluice_common::shutdown::retry_until_done("writing a batch", give_up, || {
            self.store.apply(updates)
        })
        .await;
        let Some(recorded) = written else {
            return false;
        };
        for job in &recorded {
            self.changes.written(job);
        }
        let changed: Vec<sluice_schemas::JobId> = recorded.iter().map(|job| job.job_id).collect();
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
        true
    }
}

/// `sluice_job_end_to_end_seconds` for the jobs this batch made terminal (a replayed terminal
/// event changes nothing and is not counted again).
fn record_end_to_end(updates: &[Update], changed: &[sluice_schemas::JobId]) {
    let now = chrono::Utc::now();
    let changed: HashSet<&sluice_schemas::JobId> = changed.iter().collect();
    for update in updates {
        if update.status.is_terminal() && changed.contains(&update.job_id) {
            let took = (now - update.queued_at).to_std().unwrap_or_default();
            metrics::histogram!("sluice_job_end_to_end_seconds").record(took.as_secs_f64());
        }
    }
}
