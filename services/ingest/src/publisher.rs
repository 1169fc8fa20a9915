//! Publishes request events and turns every broker failure into a prompt 503.
//!
//! While the broker is unreachable, waiting out the publish timeout for every submission would
//! hold each client (and a connection) for seconds. Once a publish has failed, the broker counts
//! as down: one submission at a time probes it (and waits up to the timeout), every other is
//! refused at once with `503` and `Retry-After: 1`, until a publish is acknowledged again.

use crate::error::ApiError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_common::kafka::TopicArgs;
use sluice_schemas::{RequestEvent, StatusEvent};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topics: TopicArgs,
    timeout: Duration,
    outage: Arc<Outage>,
}

impl Publisher {
    pub fn new(producer: FutureProducer, topics: TopicArgs, timeout: Duration) -> Self {
        Self {
            producer,
            topics,
            timeout,
            outage: Arc::default(),
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
        let _probe = self.outage.admit()?;
        let result = self.send_now(topic, key, payload).await;
        self.outage.record(&result);
        result
    }

    async fn send_now(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), ApiError> {
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
                    reason: QUEUE_FULL.into(),
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

/// Whether the broker is down, as the last publishes found it.
#[derive(Default)]
struct Outage {
    /// When a publish first failed since the last one acknowledged; `None` while all is well.
    since: Mutex<Option<Instant>>,
    /// A submission is finding out whether the broker is back.
    probing: AtomicBool,
}

/// Held by the one submission probing a broker that is down.
struct Probe<'a>(&'a AtomicBool);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Outage {
    /// Lets a submission publish: any while the broker is up, one at a time (the probe) while
    /// it is down; the others are refused at once.
    fn admit(&self) -> Result<Option<Probe<'_>>, ApiError> {
        let Some(since) = *self.since.lock().expect("outage lock") else {
            return Ok(None);
        };
        if self.probing.swap(true, Ordering::AcqRel) {
            return Err(ApiError::Unavailable {
                reason: format!(
                    "the broker has acknowledged no publish for {:.1} s",
                    since.elapsed().as_secs_f64()
                ),
                retry_after_secs: 1,
            });
        }
        Ok(Some(Probe(&self.probing)))
    }

    fn record(&self, result: &Result<(), ApiError>) {
        let mut since = self.since.lock().expect("outage lock");
        match result {
            Ok(()) => {
                if let Some(began) = since.take() {
                    tracing::info!(
                        down_for_secs = began.elapsed().as_secs_f64(),
                        "the broker acknowledges publishes again"
                    );
                }
            }
            // A full local queue is the broker being slow, not gone: the queue refuses at once.
            Err(ApiError::Unavailable { reason, .. }) if reason != QUEUE_FULL => {
                since.get_or_insert_with(Instant::now);
            }
            Err(_) => {}
        }
    }
}

const QUEUE_FULL: &str = "producer queue is full";

#[cfg(test)]
mod tests {
    use super::*;

    fn timed_out() -> Result<(), ApiError> {
        Err(ApiError::Unavailable {
            reason: "broker did not acknowledge within 5000 ms".into(),
            retry_after_secs: 5,
        })
    }

    #[test]
    fn once_a_publish_fails_one_probe_at_a_time_goes_through_until_one_succeeds() {
        let outage = Outage::default();
        assert!(
            outage.admit().unwrap().is_none(),
            "all well: no probe needed"
        );
        outage.record(&timed_out());
        let probe = outage.admit().expect("the first after a failure probes");
        assert!(probe.is_some());
        let refused = outage
            .admit()
            .err()
            .expect("a second is refused while one probes");
        assert_eq!(
            refused.status_code(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        drop(probe);
        outage.record(&Ok(()));
        assert!(
            outage.admit().unwrap().is_none(),
            "up again: everyone publishes"
        );
    }

    #[test]
    fn a_full_queue_does_not_count_as_the_broker_being_down() {
        let outage = Outage::default();
        outage.record(&Err(ApiError::Unavailable {
            reason: QUEUE_FULL.into(),
            retry_after_secs: 1,
        }));
        assert!(outage.admit().unwrap().is_none());
    }
}
