//! Kafka, written once for every service: client settings and topic creation here; consuming at
//! least once (`consume`), producing until acknowledged (`produce`), rebalances (`rebalance`).

mod consume;
mod follow;
mod lag;
mod offsets;
mod produce;
mod rebalance;

pub use consume::{KafkaSource, Received, Record, SourceHealth};
pub use follow::{Start, follow};
pub use lag::{GroupLag, LagReading};
pub use offsets::OffsetTracker;
pub use produce::{Abandoned, Rejection, dead_letter, event_headers, flush, send_until_acked};
pub use rebalance::{RebalanceContext, RebalanceState, commit_stored};

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use sluice_schemas::topics;
use std::time::Duration;

/// Where the brokers are and how Sluice talks to them.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers, comma separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,

    /// Longest a consumer's fetch waits at the broker when there is no data (librdkafka's
    /// default). Kafka answers a waiting fetch as soon as records arrive, so this bounds only
    /// idle polling, not latency.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MAX_MS", default_value_t = 500)]
    pub fetch_wait_max_ms: u32,

    /// Bytes a fetch waits for at the broker (up to `fetch_wait_max_ms`) before it is answered:
    /// librdkafka's default of 1, more for a consumer that may wait (`gathering_fetches`). Not
    /// a flag.
    #[arg(skip = 1_u32)]
    pub fetch_min_bytes: u32,

    /// Consumer group protocol: `consumer` (KIP-848, Kafka 4: the broker assigns partitions
    /// incrementally, member by member) or `classic` (join/sync with the cooperative-sticky
    /// assignor).
    #[arg(long, env = "KAFKA_GROUP_PROTOCOL", value_enum, default_value_t = GroupProtocol::Classic)]
    pub group_protocol: GroupProtocol,

    /// Classic protocol only: how long the group waits for a silent member before giving its
    /// partitions to others (a killed worker's jobs wait this long). With the `consumer`
    /// protocol the broker sets it (`group.consumer.session.timeout.ms`).
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,

    /// Partitions for topics this service creates. Fixed once a topic exists.
    #[arg(long, env = "SLUICE_TOPIC_PARTITIONS", default_value_t = 12)]
    pub topic_partitions: i32,

    /// Replication factor for topics this service creates.
    #[arg(long, env = "SLUICE_TOPIC_REPLICATION", default_value_t = 1)]
    pub topic_replication: i32,

    /// Producer linger: how long a record may wait to share a batch with others.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u32,

    /// Most time a produced record may take to be acknowledged before the send fails.
    #[arg(long, env = "KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 30_000)]
    pub message_timeout_ms: u32,

    /// Extra librdkafka properties, `key=value` comma separated (e.g. `security.protocol=ssl`).
    #[arg(long, env = "KAFKA_EXTRA_PROPERTIES", default_value = "", value_parser = parse_properties)]
    pub extra_properties: Properties,
}

/// How a consumer group shares partitions among its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupProtocol {
    Classic,
    Consumer,
}

/// The topics Sluice uses; every service reads the same settings.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicArgs {
    /// Request events, keyed by user id.
    #[arg(long = "requests-topic", env = "SLUICE_REQUESTS_TOPIC", default_value = topics::REQUESTS)]
    pub requests: String,

    /// Request events of the batch lane (`priority: "batch"`), keyed by user id: a topic of
    /// their own, so batch work never sits ahead of interactive work in a partition.
    #[arg(long = "batch-requests-topic", env = "SLUICE_BATCH_REQUESTS_TOPIC", default_value = topics::BATCH_REQUESTS)]
    pub batch_requests: String,

    /// Status events, keyed by user id.
    #[arg(long = "status-topic", env = "SLUICE_STATUS_TOPIC", default_value = topics::STATUS)]
    pub status: String,

    /// Where workers move request events they cannot decode.
    #[arg(long = "requests-dlq-topic", env = "SLUICE_REQUESTS_DLQ_TOPIC", default_value = topics::REQUESTS_DLQ)]
    pub requests_dlq: String,

    /// Where the results service moves status events it cannot decode.
    #[arg(long = "status-dlq-topic", env = "SLUICE_STATUS_DLQ_TOPIC", default_value = topics::STATUS_DLQ)]
    pub status_dlq: String,

    /// Cancellations, read by every worker.
    #[arg(long = "control-topic", env = "SLUICE_CONTROL_TOPIC", default_value = topics::CONTROL)]
    pub control: String,

    /// Pieces of streamed answers, keyed by job id, kept for `SLUICE_DELTAS_RETENTION_MS`.
    #[arg(long = "deltas-topic", env = "SLUICE_DELTAS_TOPIC", default_value = topics::DELTAS)]
    pub deltas: String,

    /// How long the deltas topic keeps a piece: long enough for a reader to catch up, no more
    /// (the terminal status keeps the whole answer).
    #[arg(
        long = "deltas-retention-ms",
        env = "SLUICE_DELTAS_RETENTION_MS",
        default_value_t = 3_600_000
    )]
    pub deltas_retention_ms: u64,

    /// Create missing topics at start-up with the admin API.
    #[arg(long = "create-topics", env = "SLUICE_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create: bool,
}

impl TopicArgs {
    /// The request topic of a lane.
    pub fn requests_for(&self, priority: sluice_schemas::Priority) -> &str {
        match priority {
            sluice_schemas::Priority::Interactive => &self.requests,
            sluice_schemas::Priority::Batch => &self.batch_requests,
        }
    }

    /// Creates the topics if `create` is set and they are missing.
    pub async fn ensure(&self, kafka: &KafkaArgs) -> anyhow::Result<()> {
        if !self.create {
            return Ok(());
        }
        kafka
            .ensure_topics(
                &[
                    &self.requests,
                    &self.batch_requests,
                    &self.status,
                    &self.requests_dlq,
                    &self.status_dlq,
                ],
                &[],
            )
            .await?;
        let retention = self.deltas_retention_ms.to_string();
        kafka
            .ensure_topics(&[&self.deltas], &[("retention.ms", &retention)])
            .await?;
        // Every worker reads every partition of the control topic, and cancellations are few:
        // one partition keeps that reading cheap.
        let control = KafkaArgs {
            topic_partitions: 1,
            ..kafka.clone()
        };
        control.ensure_topics(&[&self.control], &[]).await
    }
}

/// `key=value` pairs passed to librdkafka as they are.
#[derive(Debug, Clone, Default)]
pub struct Properties(pub Vec<(String, String)>);

fn parse_properties(text: &str) -> Result<Properties, String> {
    let mut pairs = Vec::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}` is not key=value"))?;
        pairs.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(Properties(pairs))
}

impl KafkaArgs {
    /// The same settings for a consumer whose records may wait up to `wait` at the broker:
    /// each fetch is answered when `wait` has passed (or a mebibyte is ready), not when the
    /// first record arrives. Why: every fetch costs the broker about as much as a small
    /// produce, and a consumer that is answered at once fetches once per produce request on
    /// its topics, under load a few hundred times a second.
    pub fn gathering_fetches(&self, wait: Duration) -> Self {
        Self {
            fetch_wait_max_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1),
            fetch_min_bytes: 1 << 20,
            ..self.clone()
        }
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config
    }

    /// The operator's `KAFKA_EXTRA_PROPERTIES`, set last on every client so that they win over
    /// Sluice's own settings (TLS and SASL, or a tuned `linger.ms`).
    fn with_extras(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.extra_properties.0 {
            config.set(key, value);
        }
        config
    }

    /// An idempotent producer: `acks=all`, no duplicates or reordering on retry, short linger.
    pub fn producer_config(&self, client_id: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("client.id", client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", self.linger_ms.to_string())
            .set("message.timeout.ms", self.message_timeout_ms.to_string())
            .set("compression.type", "lz4");
        self.with_extras(config)
    }

    /// A group consumer that stores offsets only when told to (`store_offset`), and commits
    /// what was stored in the background; services commit synchronously on revoke and shutdown.
    pub fn consumer_config(&self, client_id: &str, group_id: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("client.id", client_id)
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Why: an offset is stored only after the record's work is durable downstream.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string())
            .set("fetch.min.bytes", self.fetch_min_bytes.to_string())
            .set("max.poll.interval.ms", "300000")
            // For `sluice_consumer_lag`: librdkafka reports each partition's lag in its statistics.
            .set("statistics.interval.ms", "5000");
        match self.group_protocol {
            // Why cooperative-sticky: a member joining or leaving moves only the partitions that
            // must move; the others keep being consumed through the rebalance.
            GroupProtocol::Classic => config
                .set("group.protocol", "classic")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", self.session_timeout_ms.to_string())
                .set(
                    "heartbeat.interval.ms",
                    (self.session_timeout_ms / 10).max(100).to_string(),
                ),
            // The broker owns the assignor, session timeout and heartbeat interval; librdkafka
            // refuses those settings with this protocol.
            GroupProtocol::Consumer => config.set("group.protocol", "consumer"),
        };
        self.with_extras(config)
    }

    /// Creates the topics that do not exist yet, with the topic `configs` given; existing ones
    /// are left as they are.
    pub async fn ensure_topics(
        &self,
        names: &[&str],
        configs: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .with_extras(self.base())
            .create()
            .context("creating the Kafka admin client")?;
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| {
                configs.iter().fold(
                    NewTopic::new(
                        name,
                        self.topic_partitions,
                        TopicReplication::Fixed(self.topic_replication),
                    ),
                    |topic, (key, value)| topic.set(key, value),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&topics, &options)
            .await
            .with_context(|| format!("creating topics {names:?} at {}", self.brokers))?;
        for result in results {
            match result {
                Ok(name) => {
                    tracing::info!(topic = %name, partitions = self.topic_partitions, "created topic")
                }
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic = %name, "topic exists")
                }
                Err((name, code)) => anyhow::bail!("creating topic {name} failed: {code}"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn parsed(args: &[&str]) -> KafkaArgs {
        Cli::parse_from(std::iter::once("sluice").chain(args.iter().copied())).kafka
    }

    fn fetch_settings(config: &ClientConfig) -> (Option<&str>, Option<&str>) {
        (
            config.get("fetch.wait.max.ms"),
            config.get("fetch.min.bytes"),
        )
    }

    #[test]
    fn a_consumer_is_answered_at_once_unless_it_gathers_fetches_and_extras_win_over_both() {
        let kafka = parsed(&["--fetch-wait-max-ms", "300"]);
        assert_eq!(
            fetch_settings(&kafka.consumer_config("c", "g")),
            (Some("300"), Some("1"))
        );
        let gathering = kafka.gathering_fetches(Duration::from_millis(100));
        assert_eq!(
            fetch_settings(&gathering.consumer_config("c", "g")),
            (Some("100"), Some("1048576"))
        );
        let tuned = parsed(&["--extra-properties", "fetch.min.bytes=1"])
            .gathering_fetches(Duration::from_millis(100));
        assert_eq!(
            fetch_settings(&tuned.consumer_config("c", "g")),
            (Some("100"), Some("1"))
        );
    }
}
