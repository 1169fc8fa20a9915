//! Producing: the headers on every event, sending until acknowledged, and the dead-letter topic.

use super::Record;
use rdkafka::message::{Header, OwnedHeaders, ToBytes};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_schemas::{SCHEMA_VERSION, headers};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Headers on every event Sluice writes: content type, schema version, and the current span's
/// W3C trace context (`traceparent`, `tracestate`).
pub fn event_headers() -> OwnedHeaders {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: headers::CONTENT_TYPE,
            value: Some("application/json"),
        })
        .insert(Header {
            key: headers::SCHEMA_VERSION,
            value: Some(SCHEMA_VERSION.to_string().as_str()),
        });
    crate::propagation::with_current_trace(headers)
}

/// Where a rejected record came from, and why it was rejected.
#[derive(Debug, Clone, Copy)]
pub struct Rejection<'a> {
    pub reason: &'a str,
    pub source_topic: &'a str,
    pub source_partition: i32,
    pub source_offset: i64,
    pub rejected_by: &'a str,
}

impl Rejection<'_> {
    /// The headers of the record's copy on a dead-letter topic.
    pub fn headers(&self) -> OwnedHeaders {
        let partition = self.source_partition.to_string();
        let offset = self.source_offset.to_string();
        OwnedHeaders::new()
            .insert(Header {
                key: headers::DLQ_REASON,
                value: Some(self.reason),
            })
            .insert(Header {
                key: headers::DLQ_SOURCE_TOPIC,
                value: Some(self.source_topic),
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
                value: Some(self.rejected_by),
            })
    }
}

/// The service had to stop before the broker acknowledged a record; its offset must not be stored.
#[derive(Debug, thiserror::Error)]
#[error("stopped before the broker acknowledged the record")]
pub struct Abandoned;

/// Sends the record `make_record` builds until the broker acknowledges it, backing off between
/// attempts, or until `give_up` is cancelled.
pub async fn send_until_acked<'a, K, P>(
    producer: &FutureProducer,
    make_record: impl Fn() -> FutureRecord<'a, K, P>,
    give_up: &CancellationToken,
) -> Result<(), Abandoned>
where
    K: ToBytes + ?Sized + 'a,
    P: ToBytes + ?Sized + 'a,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        let error = tokio::select! {
            biased;
            _ = give_up.cancelled() => return Err(Abandoned),
            delivery = producer.send(make_record(), Duration::from_secs(5)) => match delivery {
                Ok(_) => return Ok(()),
                Err((error, _)) => error,
            },
        };
        tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64, "publishing failed, retrying");
        tokio::select! {
            _ = give_up.cancelled() => return Err(Abandoned),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Copies a rejected record, key and value unchanged, to `dlq_topic` with the reason (and who
/// rejected it) in headers.
pub async fn dead_letter(
    producer: &FutureProducer,
    dlq_topic: &str,
    record: &Record,
    rejection: &Rejection<'_>,
    give_up: &CancellationToken,
) -> Result<(), Abandoned> {
    // The reason's code: what comes before the first `:` (`invalid_field: ...`).
    let code = rejection
        .reason
        .split(':')
        .next()
        .unwrap_or("unknown")
        .to_owned();
    metrics::counter!("sluice_dead_lettered_total", "topic" => rejection.source_topic.to_owned(), "reason" => code)
        .increment(1);
    let make_record = || {
        let mut copy: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(dlq_topic).headers(rejection.headers());
        if let Some(key) = &record.key {
            copy = copy.key(key);
        }
        if let Some(payload) = &record.payload {
            copy = copy.payload(payload);
        }
        copy
    };
    send_until_acked(producer, make_record, give_up).await
}

/// Flushes what a producer still holds, in a blocking task (the flush waits on the broker).
pub async fn flush(producer: FutureProducer) -> anyhow::Result<()> {
    use anyhow::Context;
    use rdkafka::producer::Producer;
    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
        .await?
        .context("flushing the Kafka producer")
}
