//! Publishes status and dead-letter records, retrying until the broker acknowledges them.

use rdkafka::producer::{FutureProducer, FutureRecord};
pub(crate) use sluice_common::kafka::Abandoned;
use sluice_common::kafka::{self, Record};
use sluice_schemas::StatusEvent;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct StatusPublisher {
    producer: FutureProducer,
    status_topic: String,
    dlq_topic: String,
    /// Cancelled when the worker's drain deadline passes: retries stop then.
    give_up: CancellationToken,
}

impl StatusPublisher {
    pub fn new(
        producer: FutureProducer,
        status_topic: String,
        dlq_topic: String,
        give_up: CancellationToken,
    ) -> Self {
        Self {
            producer,
            status_topic,
            dlq_topic,
            give_up,
        }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Returns once the status event is acknowledged (`acks=all`).
    pub async fn publish(&self, event: &StatusEvent) -> Result<(), Abandoned> {
        let payload = event.encode();
        let make_record = || {
            FutureRecord::to(&self.status_topic)
                .key(event.user_id.as_str())
                .payload(&payload)
                .headers(kafka::event_headers())
        };
        kafka::send_until_acked(&self.producer, make_record, &self.give_up).await
    }

    /// Moves a rejected record to the dead-letter topic, as it was, with the reason in headers.
    pub async fn dead_letter(&self, record: &Record, reason: &str) -> Result<(), Abandoned> {
        let rejection = record.rejection(reason, "sluice-worker");
        kafka::dead_letter(
            &self.producer,
            &self.dlq_topic,
            record,
            &rejection,
            &self.give_up,
        )
        .await
    }
}
