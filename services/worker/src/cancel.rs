//! Cancellations: every worker reads the whole control topic and remembers which jobs were
//! cancelled (until their deadline); a running job's task is told through its token.

use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sluice_common::kafka::KafkaArgs;
use sluice_schemas::{CancelEvent, JobId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a cancellation without a known deadline is remembered.
const REMEMBER_WITHOUT_DEADLINE: chrono::Duration = chrono::Duration::hours(1);

#[derive(Debug, Default)]
struct Inner {
    /// Cancelled jobs and when they may be forgotten.
    cancelled: HashMap<JobId, DateTime<Utc>>,
    /// Jobs running on this worker, each with the token that aborts it.
    running: HashMap<JobId, CancellationToken>,
}

#[derive(Debug, Clone, Default)]
pub struct Cancellations {
    inner: Arc<Mutex<Inner>>,
}

/// A job registered as running; dropping it unregisters the job.
pub struct Running {
    cancellations: Cancellations,
    job_id: JobId,
    pub token: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancellations
            .inner
            .lock()
            .expect("cancellations lock")
            .running
            .remove(&self.job_id);
    }
}

impl Cancellations {
    /// Registers `job_id` as running, or returns `None` if it was already cancelled.
    pub fn start(&self, job_id: JobId) -> Option<Running> {
        let mut inner = self.inner.lock().expect("cancellations lock");
        if inner.cancelled.contains_key(&job_id) {
            return None;
        }
        let token = CancellationToken::new();
        inner.running.insert(job_id, token.clone());
        Some(Running {
            cancellations: self.clone(),
            job_id,
            token,
        })
    }

    pub fn cancel(&self, job_id: JobId, forget_after: DateTime<Utc>) {
        let mut inner = self.inner.lock().expect("cancellations lock");
        let now = Utc::now();
        inner.cancelled.retain(|_, until| *until > now);
        inner.cancelled.insert(job_id, forget_after);
        if let Some(token) = inner.running.get(&job_id) {
            tracing::info!(job_id = %job_id, "aborting a running job");
            token.cancel();
        }
    }
}

/// Reads every partition of the control topic from the beginning until `shutdown`.
pub(crate) async fn follow(
    kafka: KafkaArgs,
    topic: String,
    worker_id: String,
    cancellations: Cancellations,
    shutdown: CancellationToken,
) {
    sluice_common::shutdown::retry_until_stopped("reading the control topic", &shutdown, || {
        follow_once(&kafka, &topic, &worker_id, &cancellations, &shutdown)
    })
    .await;
}

async fn follow_once(
    kafka: &KafkaArgs,
    topic: &str,
    worker_id: &str,
    cancellations: &Cancellations,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // Its own group id and no commits: every worker must see every cancellation.
    let mut config = kafka.consumer_config(
        &format!("{worker_id}-control"),
        &format!("{worker_id}-control"),
    );
    config.set("enable.auto.commit", "false");
    let consumer: Arc<StreamConsumer> = Arc::new(config.create()?);
    // Why in a blocking task: the metadata call blocks for up to its timeout.
    let partitions = tokio::task::spawn_blocking({
        let (consumer, topic) = (consumer.clone(), topic.to_owned());
        move || -> anyhow::Result<usize> {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            Ok(metadata
                .topics()
                .first()
                .map_or(0, |found| found.partitions().len()))
        }
    })
    .await??;
    anyhow::ensure!(partitions > 0, "control topic {topic} has no partitions");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, i32::try_from(partition)?, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = consumer.recv() => message?,
        };
        match CancelEvent::decode(message.payload().unwrap_or_default()) {
            Ok(cancel) => {
                let forget_after = cancel
                    .deadline
                    .unwrap_or(cancel.requested_at + REMEMBER_WITHOUT_DEADLINE);
                if forget_after > Utc::now() {
                    cancellations.cancel(cancel.job_id, forget_after);
                }
            }
            Err(error) => {
                tracing::warn!(reason = %error, offset = message.offset(), "skipping an undecodable cancel event")
            }
        }
    }
}
