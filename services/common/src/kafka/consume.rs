//! Consuming Kafka at least once, written once for every consumer in Sluice (the worker, the
//! results service, the cancel follower, and whatever comes next). The caller receives records
//! and says when each one's work is durable; this component does the rest: the rebalance
//! context, forgetting revoked partitions, contiguous offsets with out-of-order completion,
//! pausing for backpressure, readiness, and the final commit on shutdown.

use super::offsets::OffsetTracker;
use super::rebalance::{RebalanceContext, commit_stored};
use super::{KafkaArgs, Rejection};
use crate::propagation::TraceHeaders;
use anyhow::Context;
use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

type GroupConsumer = StreamConsumer<RebalanceContext>;

/// A consumed record, detached from the consumer so a task can own it.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The W3C trace context the record carried: the work's span continues that trace.
    pub trace: TraceHeaders,
    /// When the producer (or the broker) stamped the record, in Unix milliseconds.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            trace: TraceHeaders::from_kafka(message.headers()),
            timestamp_ms: message.timestamp().to_millis(),
        }
    }

    pub fn payload(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }

    /// Why `service` rejected this record, for its copy on a dead-letter topic.
    pub fn rejection<'a>(&'a self, reason: &'a str, service: &'a str) -> Rejection<'a> {
        Rejection {
            reason,
            source_topic: &self.topic,
            source_partition: self.partition,
            source_offset: self.offset,
            rejected_by: service,
        }
    }
}

/// What `recv` hands the caller, in the order it happened.
#[derive(Debug)]
pub enum Received {
    Record(Record),
    /// These partitions now belong to another member: drop what was buffered from them. Their
    /// running work may finish, but `done` no longer stores its offsets.
    Revoked(Vec<(String, i32)>),
}

/// A consumer that stores an offset only once every record up to it is done.
pub struct KafkaSource {
    consumer: Arc<GroupConsumer>,
    tracker: OffsetTracker,
    /// False for a follower that reads a topic from the beginning outside any group.
    commits: bool,
    /// The topics read, sorted.
    topics: Vec<String>,
    /// The topics whose partitions are paused, sorted.
    paused: Vec<String>,
    /// A record that arrived together with a revocation, handed out after the revocation.
    held: Option<Record>,
    health: SourceHealth,
}

impl KafkaSource {
    /// Joins `group_id` and subscribes to `topics`.
    pub fn subscribe(
        kafka: &KafkaArgs,
        client_id: &str,
        group_id: &str,
        topics: &[&str],
    ) -> anyhow::Result<Self> {
        let consumer: GroupConsumer = kafka
            .consumer_config(client_id, group_id)
            .create_with_context(RebalanceContext::default())
            .context("creating the Kafka consumer")?;
        consumer
            .subscribe(topics)
            .with_context(|| format!("subscribing to {topics:?}"))?;
        Ok(Self::new(consumer, true, topics))
    }

    /// Reads every partition of `topic` from the beginning, outside any group and without
    /// committing: for state every member must see in full (cancellations).
    pub async fn follow_from_beginning(
        kafka: &KafkaArgs,
        client_id: &str,
        topic: &str,
    ) -> anyhow::Result<Self> {
        Self::follow(kafka, client_id, topic, Offset::Beginning).await
    }

    /// Reads every partition of `topic` from now on, outside any group and without committing:
    /// for events a member only wants while it waits for them (streamed answers).
    pub async fn follow_from_end(
        kafka: &KafkaArgs,
        client_id: &str,
        topic: &str,
    ) -> anyhow::Result<Self> {
        Self::follow(kafka, client_id, topic, Offset::End).await
    }

    async fn follow(
        kafka: &KafkaArgs,
        client_id: &str,
        topic: &str,
        from: Offset,
    ) -> anyhow::Result<Self> {
        let mut config = kafka.consumer_config(client_id, client_id);
        config.set("enable.auto.commit", "false");
        let consumer: GroupConsumer = config
            .create_with_context(RebalanceContext::default())
            .context("creating the Kafka consumer")?;
        let consumer = Arc::new(consumer);
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
        anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, i32::try_from(partition)?, from)?;
        }
        consumer.assign(&assignment)?;
        let consumer = Arc::into_inner(consumer).expect("the metadata task has ended");
        Ok(Self::new(consumer, false, &[topic]))
    }

    fn new(consumer: GroupConsumer, commits: bool, topics: &[&str]) -> Self {
        let consumer = Arc::new(consumer);
        let mut sorted: Vec<String> = topics.iter().map(|topic| (*topic).to_owned()).collect();
        sorted.sort();
        Self {
            health: SourceHealth {
                consumer: consumer.clone(),
                topic: topics.first().map(|topic| (*topic).to_owned()),
            },
            topics: sorted,
            consumer,
            tracker: OffsetTracker::default(),
            commits,
            paused: Vec::new(),
            held: None,
        }
    }

    /// The next record or revocation. Cancel-safe: the only await is the consumer's own
    /// `recv` (or the pause after an error), so it can sit in a `select!`.
    pub async fn recv(&mut self) -> Received {
        if let Some(revoked) = self.forget_revoked() {
            return Received::Revoked(revoked);
        }
        if let Some(record) = self.held.take() {
            return self.started(record);
        }
        loop {
            let record = match self.consumer.recv().await {
                Ok(message) => Record::from_message(&message),
                Err(error) => {
                    tracing::warn!(error = %error, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Why check again: a rebalance runs inside `recv`, before it returns the first
            // record of the new assignment. Forgetting the revoked partitions after starting
            // this record would forget it too, and let its offset be skipped.
            if let Some(revoked) = self.forget_revoked() {
                self.held = Some(record);
                return Received::Revoked(revoked);
            }
            return self.started(record);
        }
    }

    /// The next batch of records: waits for one (or for `stop`: `None`), then takes what
    /// librdkafka has already fetched, without waiting, up to `max`. So a burst becomes one batch
    /// and a lone record goes at once. Revocations are handled inside and not returned.
    pub async fn next_batch(
        &mut self,
        max: usize,
        stop: &CancellationToken,
    ) -> Option<Vec<Record>> {
        let first = loop {
            let received = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                received = self.recv() => received,
            };
            if let Received::Record(record) = received {
                break record;
            }
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match self.recv_ready() {
                Some(Received::Record(record)) => batch.push(record),
                _ => break,
            }
        }
        Some(batch)
    }

    /// What has already been fetched, without waiting: `None` if nothing is ready.
    pub fn recv_ready(&mut self) -> Option<Received> {
        self.recv().now_or_never()
    }

    fn started(&mut self, record: Record) -> Received {
        tracing::trace!(
            partition = record.partition,
            offset = record.offset,
            "record received"
        );
        self.tracker
            .start(&record.topic, record.partition, record.offset);
        Received::Record(record)
    }

    fn forget_revoked(&mut self) -> Option<Vec<(String, i32)>> {
        let revoked = self.consumer.context().state.take_revoked();
        if revoked.is_empty() {
            return None;
        }
        for (topic, partition) in &revoked {
            self.tracker.forget(topic, *partition);
            if self
                .held
                .as_ref()
                .is_some_and(|held| held.topic == *topic && held.partition == *partition)
            {
                self.held = None;
            }
        }
        Some(revoked)
    }

    /// The record's work is durable (or it was dead-lettered): its offset may be committed once
    /// every earlier record of its partition is done too.
    pub fn done(&mut self, record: &Record) {
        self.done_all(std::slice::from_ref(record));
    }

    /// `done` for many records, storing each partition's offset once.
    pub fn done_all(&mut self, records: &[Record]) {
        let mut highest: HashMap<(&str, i32), i64> = HashMap::new();
        for record in records {
            let completed = self
                .tracker
                .complete(&record.topic, record.partition, record.offset);
            if let Some(offset) = completed {
                let entry = highest
                    .entry((record.topic.as_str(), record.partition))
                    .or_insert(offset);
                *entry = (*entry).max(offset);
            }
        }
        if !self.commits {
            return;
        }
        for ((topic, partition), offset) in highest {
            // Why not +1: rd_kafka_offset_store stores offset + 1, the next record to read.
            if let Err(error) = self.consumer.store_offset(topic, partition, offset) {
                tracing::debug!(error = %error, partition, "offset not stored; partition no longer ours");
            }
        }
    }

    /// Pauses (or resumes) every assigned partition. Call it on every turn of the loop: a
    /// partition assigned while paused is paused too. `recv` goes on serving rebalances and
    /// keeping the member in its group while paused.
    pub fn set_paused(&mut self, pause: bool) {
        self.pause_where(|_| pause);
    }

    /// Pauses the partitions of the topics `paused` says yes to and resumes the others': a
    /// consumer of several topics (the worker's lanes) holds back one while reading on.
    pub fn pause_where(&mut self, paused: impl Fn(&str) -> bool) {
        let reassigned = self.consumer.context().state.take_assigned_again();
        let wanted: Vec<String> = self
            .topics
            .iter()
            .filter(|topic| paused(topic))
            .cloned()
            .collect();
        // Why re-pause after a reassignment: newly assigned partitions start unpaused.
        if wanted == self.paused && (!reassigned || wanted.is_empty()) {
            return;
        }
        let assignment = match self.consumer.assignment() {
            Ok(assignment) => assignment,
            Err(error) => {
                tracing::warn!(error = %error, "reading the assignment to pause or resume failed");
                return;
            }
        };
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        for element in assignment.elements() {
            let list = if wanted.iter().any(|topic| topic == element.topic()) {
                &mut pause
            } else {
                &mut resume
            };
            list.add_partition(element.topic(), element.partition());
        }
        let result = self
            .consumer
            .pause(&pause)
            .and_then(|()| self.consumer.resume(&resume));
        match result {
            Ok(()) => {
                tracing::debug!(paused = ?wanted, "consumption paused or resumed");
                self.paused = wanted;
            }
            Err(error) => {
                tracing::warn!(error = %error, paused = ?wanted, "pausing or resuming partitions failed")
            }
        }
    }

    /// Records received and not yet done.
    pub fn pending(&self) -> usize {
        self.tracker.pending()
    }

    pub fn health(&self) -> SourceHealth {
        self.health.clone()
    }

    /// Commits what is done, synchronously, then leaves the group. Call it after the caller's
    /// own drain: whatever is not done by then is redelivered to the next owner.
    pub async fn close(self) {
        let Self {
            consumer,
            commits,
            health,
            ..
        } = self;
        drop(health);
        // Why in a blocking task: the commit and leaving the group wait on the broker.
        let closed = tokio::task::spawn_blocking(move || {
            if commits {
                commit_stored(consumer.as_ref(), "at shutdown");
                consumer.unsubscribe();
            }
            drop(consumer);
        })
        .await;
        if let Err(error) = closed {
            tracing::warn!(error = %error, "closing the consumer failed");
        }
    }
}

/// What `/readyz` asks of a consumer: has it joined its group, and does the broker answer.
#[derive(Clone)]
pub struct SourceHealth {
    consumer: Arc<GroupConsumer>,
    topic: Option<String>,
}

impl SourceHealth {
    /// Why the consumer is not ready; empty when it is.
    pub async fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.consumer.context().state.is_joined() {
            problems.push("consumer has not joined its group yet".to_owned());
        }
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        let broker = tokio::task::spawn_blocking(move || {
            consumer.fetch_metadata(topic.as_deref(), Duration::from_secs(2))
        })
        .await;
        match broker {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => problems.push(format!("broker unreachable: {error}")),
            Err(error) => problems.push(format!("metadata check failed: {error}")),
        }
        problems
    }
}
