//! The results service's work on the shared Kafka source: reads both topics in batches, writes
//! each batch in one transaction, marks its records done after the commit. Undecodable status
//! events go to the dead-letter topic, and so does an event Postgres refuses for what it holds
//! (found by writing the batch's events one by one): the rest are stored and the pipeline goes
//! on, where retrying the batch would stop it for good.

use crate::kept::KeptConnection;
use crate::notify::JobChanges;
use crate::state::{RequestRecord, Update};
use crate::store::Store;
use rdkafka::producer::FutureProducer;
use sluice_common::kafka::{self, KafkaSource, Record};
use sluice_common::telemetry;
use sluice_schemas::{Priority, RequestEvent, StatusEvent};
use std::collections::HashSet;
use tokio_util::sync::CancellationToken;

pub(crate) struct EventLoop {
    pub source: KafkaSource,
    pub producer: FutureProducer,
    pub store: Store,
    /// The writer's connection, kept from one batch to the next.
    pub connection: KeptConnection,
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
        // The record each update came from, for the dead-letter topic.
        let mut sources = Vec::with_capacity(batch.len());
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
                    // Only a trace shows it: it is never entered.
                    if telemetry::exporting() {
                        let span = tracing::info_span!(
                            "results store",
                            otel.kind = "consumer",
                            job_id = %update.job_id,
                            status = update.status.as_str(),
                            trace_id = tracing::field::Empty,
                        );
                        telemetry::adopt(&span, record.trace.context());
                        spans.push(span);
                    }
                    update.traceparent = record.trace.traceparent.clone();
                    // A job's queue position is its place among its lane's queued jobs.
                    if is_request {
                        update.request_record = Some(RequestRecord {
                            lane: if record.topic == self.requests_topic {
                                Priority::Interactive
                            } else {
                                Priority::Batch
                            },
                            partition: record.partition,
                            offset: record.offset,
                        });
                    }
                    updates.push(update);
                    sources.push(record);
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
        if !updates.is_empty() && !self.write(&updates, &sources, give_up).await {
            return false;
        }
        drop(spans);
        true
    }

    /// Retries until the write commits: Postgres restarts and deadlocks are waited out. A batch
    /// Postgres refuses for its data is written again one event at a time, and an event it
    /// refuses alone goes to the dead-letter topic with Postgres's reason. False if it gave up.
    async fn write(
        &self,
        updates: &[Update],
        sources: &[&Record],
        give_up: &CancellationToken,
    ) -> bool {
        let started = std::time::Instant::now();
        let written = sluice_common::shutdown::retry_unless(
            "writing a batch",
            give_up,
            || {
                self.connection
                    .run(async |connection| self.store.apply_on(connection, updates).await)
            },
            |error| refused_for_its_data(error).is_some(),
        )
        .await;
        let recorded = match written {
            None => return false,
            Some(Ok(recorded)) => recorded,
            Some(Err(error)) => {
                let reason = refused_for_its_data(&error).unwrap_or_default();
                return self.write_apart(updates, sources, reason, give_up).await;
            }
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

    /// After Postgres refused `updates` for their data: each written alone, and the one it
    /// refuses alone dead-lettered.
    async fn write_apart(
        &self,
        updates: &[Update],
        sources: &[&Record],
        reason: String,
        give_up: &CancellationToken,
    ) -> bool {
        if let ([update], [record]) = (updates, sources) {
            tracing::warn!(job_id = %update.job_id, reason, offset = record.offset, "dead-lettering an event Postgres refuses");
            let rejection = record.rejection(&reason, "sluice-results");
            return kafka::dead_letter(
                &self.producer,
                &self.dlq_topic,
                record,
                &rejection,
                give_up,
            )
            .await
            .is_ok();
        }
        tracing::warn!(
            events = updates.len(),
            reason,
            "Postgres refused a batch for its data; writing its events one by one"
        );
        for (update, record) in updates.iter().zip(sources) {
            let one = Box::pin(self.write(
                std::slice::from_ref(update),
                std::slice::from_ref(record),
                give_up,
            ));
            if !one.await {
                return false;
            }
        }
        true
    }
}

/// The dead letter's reason when Postgres refused a write for the data it holds, which writing
/// it again cannot mend: a data exception (SQLSTATE class 22: a value out of range, a bad
/// encoding), a `NOT NULL` or a `CHECK` violated (23502, 23514). Not a unique or foreign-key
/// violation: two writers of one job can meet those and the retry finds the row.
fn refused_for_its_data(error: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(database) = error else {
        return None;
    };
    let code = database.code()?;
    let refused = code.starts_with("22") || code == "23502" || code == "23514";
    refused.then(|| format!("rejected_by_store: Postgres {code}: {}", database.message()))
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
