//! Publishes request events and turns every broker failure into a prompt 503.

use crate::error::ApiError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_common::kafka::TopicArgs;
use sluice_schemas::{RequestEvent, StatusEvent};
use std::time::Duration;

#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topics: TopicArgs,
    timeout: Duration,
}

impl Publisher {
    pub fn new(producer: FutureProducer, topics: TopicArgs, timeout: Duration) -> Self {
        Self {
            producer,
            topics,
            timeout,
        }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Returns once the broker has acknowledged the event (`acks=all`), or fails within the
    /// publish timeout: a full local queue fails at once, an unreachable broker at the timeout.
    pub async fn publish(&self, event: &RequestEvent) -> Result<(), ApiError> {
        let topic = self.topics.requests_for(event.priority);
        self.send(topic, event.user_id.as_str(), &event.encode())
            .await
    }

    /// Publishes a status event (a cache hit answered at submit time) to `status_topic`.
    pub async fn publish_status(
        &self,
        status_topic: &str,
        event: &StatusEvent,
    ) -> Result<(), ApiError> {
        self.send(status_topic, event.user_id.as_str(), &event.encode())
            .await
    }

    async fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), ApiError> {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(sluice_common::kafka::event_headers());
        // Why Duration::ZERO: a full producer queue means the broker is not keeping up; waiting
        // for room would turn overload into latency, so the caller is told to retry instead.
        let delivery = self.producer.send(record, Duration::ZERO);
        match tokio::time::timeout(self.timeout, delivery).await {
            Ok(Ok(_delivered)) => Ok(()),
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))) => {
                Err(ApiError::Unavailable {
                    reason: "producer queue is full".into(),
                    retry_after_secs: 1,
                })
            }
            Ok(Err((error, _))) => Err(ApiError::Unavailable {
                reason: error.to_string(),
                retry_after_secs: 5,
            }),
            Err(_elapsed) => Err(ApiError::Unavailable {
                reason: format!(
                    "broker did not acknowledge within {} ms",
                    self.timeout.as_millis()
                ),
                retry_after_secs: 5,
            }),
        }
    }

    /// Asks the broker for the topic's metadata; used by `/readyz`.
    pub async fn check_broker(&self) -> Result<(), String> {
        let producer = self.producer.clone();
        let topic = self.topics.requests.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map_err(|error| format!("broker unreachable: {error}"))?;
            let known = metadata
                .topics()
                .iter()
                .any(|found| found.name() == topic && !found.partitions().is_empty());
            if known {
                Ok(())
            } else {
                Err(format!("topic {topic} does not exist"))
            }
        })
        .await
        .map_err(|error| format!("metadata check failed: {error}"))?
    }
}
