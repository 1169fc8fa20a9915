//! The broker's own produce-to-consume latency, measured beside the pipeline so its overhead
//! can be read against the hops it cannot avoid: one producer, one consumer, one partition,
//! the same client settings the services use (linger, `fetch.wait.max.ms`).

use crate::Percentiles;
use anyhow::Context;
use hdrhistogram::Histogram;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use sluice_common::kafka::KafkaArgs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the probe sends its records.
#[derive(Debug, Clone)]
pub struct HopProbe {
    pub kafka: KafkaArgs,
    pub topic: String,
    pub rate_per_sec: f64,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HopReport {
    pub sent: u64,
    pub received: u64,
    /// Produce call until the consumer held the record.
    pub latency: Percentiles,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_micros() as u64)
        .unwrap_or_default()
}

impl HopProbe {
    pub async fn run(&self) -> anyhow::Result<HopReport> {
        let kafka = KafkaArgs {
            topic_partitions: 1,
            ..self.kafka.clone()
        };
        kafka.ensure_topics(&[&self.topic], &[]).await?;
        let consumer: StreamConsumer = kafka
            .consumer_config("sluice-bench-hop", "sluice-bench-hop")
            .create()
            .context("creating the hop consumer")?;
        // Assigned, not subscribed: no group join to wait for, and only records sent from now.
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.topic, 0, Offset::End)?;
        consumer.assign(&assignment)?;
        let producer: FutureProducer = kafka
            .producer_config("sluice-bench-hop")
            .create()
            .context("creating the hop producer")?;
        // Let the consumer find its position before the first record goes out.
        let _ = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await;

        let topic = self.topic.clone();
        let (rate, duration) = (self.rate_per_sec, self.duration);
        let sender = tokio::spawn(async move {
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let until = tokio::time::Instant::now() + duration;
            while tokio::time::Instant::now() < until {
                tick.tick().await;
                let payload = now_micros().to_string();
                let record = FutureRecord::<(), _>::to(&topic).payload(&payload);
                if producer.send_result(record).is_ok() {
                    sent += 1;
                }
            }
            producer.flush(Duration::from_secs(5)).ok();
            sent
        });

        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let stop_at = tokio::time::Instant::now() + duration + Duration::from_secs(3);
        while let Ok(Ok(message)) = tokio::time::timeout_at(stop_at, consumer.recv()).await {
            let received_at = now_micros();
            if let Some(sent_at) = message
                .payload()
                .and_then(|payload| std::str::from_utf8(payload).ok())
                .and_then(|text| text.parse::<u64>().ok())
            {
                histogram.saturating_record(received_at.saturating_sub(sent_at).max(1));
            }
        }
        let sent = sender.await.context("the hop producer task")?;
        Ok(HopReport {
            sent,
            received: histogram.len(),
            latency: Percentiles::of(&histogram),
        })
    }
}
