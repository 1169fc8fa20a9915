//! A consumer group's backlog, read from outside the group: for every partition of its topics,
//! the end offset less the group's committed offset. Ingest's capacity estimate reads it; the
//! reader never joins the group (it only asks for offsets), so it moves no partition.

use super::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the partition list is asked for again (a topic may gain partitions).
const METADATA_REFRESH: Duration = Duration::from_secs(30);

/// One reading of a group's position on its topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagReading {
    /// Records the group has not committed yet: waiting, or taken and not finished.
    pub backlog: u64,
    /// Records the group has committed, summed over the partitions: it grows by one per record
    /// finished, so its rate of change is the group's throughput.
    pub committed: u64,
}

/// (topic, partition) pairs.
type Partitions = Vec<(String, i32)>;

pub struct GroupLag {
    consumer: BaseConsumer,
    topics: Vec<String>,
    /// The partitions, and when they were read.
    partitions: Mutex<Option<(Instant, Partitions)>>,
}

impl GroupLag {
    /// A reader of `group_id`'s lag on `topics`; connects in the background.
    pub fn new(kafka: &KafkaArgs, group_id: &str, topics: Vec<String>) -> anyhow::Result<Self> {
        let mut config = kafka.base();
        config
            .set("client.id", "sluice-lag-reader")
            .set("group.id", group_id)
            .set("enable.auto.commit", "false");
        let consumer = kafka.with_extras(config).create()?;
        Ok(Self {
            consumer,
            topics,
            partitions: Mutex::new(None),
        })
    }

    /// Reads the backlog now. Blocking (several broker round trips): call it off the runtime.
    pub fn read(&self, timeout: Duration) -> KafkaResult<LagReading> {
        let partitions = self.partitions(timeout)?;
        let mut list = TopicPartitionList::new();
        for (topic, partition) in &partitions {
            list.add_partition(topic, *partition);
        }
        let committed = self.consumer.committed_offsets(list, timeout)?;
        let mut reading = LagReading {
            backlog: 0,
            committed: 0,
        };
        for (topic, partition) in &partitions {
            let (low, high) = self.consumer.fetch_watermarks(topic, *partition, timeout)?;
            // Why the low watermark when nothing is committed: the group starts from the
            // earliest record (`auto.offset.reset=earliest`), so all that is kept is ahead of it.
            let position = match committed
                .find_partition(topic, *partition)
                .map(|element| element.offset())
            {
                Some(Offset::Offset(offset)) => offset.clamp(low, high),
                _ => low,
            };
            reading.backlog += (high - position).max(0) as u64;
            reading.committed += position.max(0) as u64;
        }
        Ok(reading)
    }

    fn partitions(&self, timeout: Duration) -> KafkaResult<Partitions> {
        let mut cached = self.partitions.lock().expect("partition list");
        if let Some((read_at, partitions)) = cached.as_ref()
            && read_at.elapsed() < METADATA_REFRESH
        {
            return Ok(partitions.clone());
        }
        let mut partitions = Vec::new();
        for topic in &self.topics {
            let metadata = self.consumer.fetch_metadata(Some(topic), timeout)?;
            for found in metadata
                .topics()
                .iter()
                .filter(|found| found.name() == topic)
            {
                partitions.extend(
                    found
                        .partitions()
                        .iter()
                        .map(|partition| (topic.clone(), partition.id())),
                );
            }
        }
        *cached = Some((Instant::now(), partitions.clone()));
        Ok(partitions)
    }
}
