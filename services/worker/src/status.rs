//! Publishes status and dead-letter records, retrying until the broker acknowledges them.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_schemas::{SCHEMA_VERSION, StatusEvent, headers};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The broker did not take a record before the worker had to stop; its offset must not be stored.
#[derive(Debug, thiserror::Error)]
#[error("stopped before the broker acknowledged the record")]
pub struct Abandoned;

#[derive(Clone)]
pub struct StatusPublisher {
    producer: FutureProducer,
    status_topic: String,
    dlq_topic: String,
    /// Cancelled when the worker's drain deadline passes: retries stop then.
    give_up: CancellationToken,
}

/// Where a dead-lettered record came from and why it was rejected.
pub struct DeadLetter<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub reason: String,
    pub source_topic: &'a str,
    pub source_partition: i32,
    pub source_offset: i64,
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
        let version = SCHEMA_VERSION.to_string();
        let make_record = || {
            FutureRecord::to(&self.status_topic)
                .key(event.user_id.as_str())
                .payload(&payload)
                .headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: headers::CONTENT_TYPE,
                            value: Some("application/json"),
                        })
                        .insert(Header {
                            key: headers::SCHEMA_VERSION,
                            value: Some(version.as_str()),
                        }),
                )
        };
        self.send_until_acked(make_record).await
    }

    /// Moves a rejected record to the dead-letter topic, as it was, with the reason in headers.
    pub async fn dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), Abandoned> {
        let partition = letter.source_partition.to_string();
        let offset = letter.source_offset.to_string();
        let make_record = || {
            let mut record = FutureRecord::to(&self.dlq_topic).headers(
                OwnedHeaders::new()
                    .insert(Header {
                        key: headers::DLQ_REASON,
                        value: Some(letter.reason.as_str()),
                    })
                    .insert(Header {
                        key: headers::DLQ_SOURCE_TOPIC,
                        value: Some(letter.source_topic),
                    })
                    .insert(Header {
                        key: headers::DLQ_SOURCE_PARTITION,
                        value: Some(partition.as_str()),
                    })
                    .insert(Header {
                        key: headers::DLQ_SOURCE_OFFSET,
                        value: Some(offset.as_str()),
                    })
                    .insert(Header {
                        key: headers::DLQ_REJECTED_BY,
                        value: Some("sluice-worker"),
                    }),
            );
            if let Some(key) = letter.key {
                record = record.key(key);
            }
            if let Some(payload) = letter.payload {
                record = record.payload(payload);
            }
            record
        };
        self.send_until_acked(make_record).await
    }

    async fn send_until_acked<'a, K, P>(
        &self,
        make_record: impl Fn() -> FutureRecord<'a, K, P>,
    ) -> Result<(), Abandoned>
    where
        K: rdkafka::message::ToBytes + ?Sized + 'a,
        P: rdkafka::message::ToBytes + ?Sized + 'a,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            let error = tokio::select! {
                biased;
                _ = self.give_up.cancelled() => return Err(Abandoned),
                delivery = self.producer.send(make_record(), Duration::from_secs(5)) => match delivery {
                    Ok(_) => return Ok(()),
                    Err((error, _)) => error,
                },
            };
            tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64, "publishing failed, retrying");
            tokio::select! {
                _ = self.give_up.cancelled() => return Err(Abandoned),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
