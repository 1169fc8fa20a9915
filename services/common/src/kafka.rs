//! Kafka client settings shared by every service, and idempotent topic creation.

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, ToBytes};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use sluice_schemas::{SCHEMA_VERSION, headers, topics};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

    /// Create missing topics at start-up with the admin API.
    #[arg(long = "create-topics", env = "SLUICE_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create: bool,
}

impl TopicArgs {
    /// Creates the topics if `create` is set and they are missing.
    pub async fn ensure(&self, kafka: &KafkaArgs) -> anyhow::Result<()> {
        if !self.create {
            return Ok(());
        }
        kafka
            .ensure_topics(&[
                &self.requests,
                &self.status,
                &self.requests_dlq,
                &self.status_dlq,
            ])
            .await?;
        // Every worker reads every partition of the control topic, and cancellations are few:
        // one partition keeps that reading cheap.
        let control = KafkaArgs {
            topic_partitions: 1,
            ..kafka.clone()
        };
        control.ensure_topics(&[&self.control]).await
    }
}

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

/// Copies a rejected record, key and value unchanged, to `dlq_topic` with the reason in headers.
pub async fn dead_letter(
    producer: &FutureProducer,
    dlq_topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
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
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(dlq_topic).headers(rejection.headers());
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        record
    };
    send_until_acked(producer, make_record, give_up).await
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

    /// Creates the topics that do not exist yet; existing ones are left as they are.
    pub async fn ensure_topics(&self, names: &[&str]) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .with_extras(self.base())
            .create()
            .context("creating the Kafka admin client")?;
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    self.topic_partitions,
                    TopicReplication::Fixed(self.topic_replication),
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

/// Commits the stored offsets synchronously: on revoke and at shutdown, the last chance before
/// another member starts from the committed offsets. Only "no offset to commit" is excused, as
/// Vector's Kafka source does; any other failure is reported, because the records after the
/// last committed offset will be processed again.
pub fn commit_stored<C: Consumer<X>, X: ConsumerContext>(consumer: &C, when: &'static str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!(when, "committed offsets"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
            tracing::debug!(when, "no new offsets to commit")
        }
        Err(error) => {
            tracing::warn!(error = %error, when, "committing offsets failed; records after the last commit will be redelivered")
        }
    }
}

/// What the rebalance callbacks tell a consumer loop; they run inside `recv()`, on its task.
#[derive(Debug, Default)]
pub struct RebalanceState {
    /// Set after the first assignment: the worker is in the group.
    joined: AtomicBool,
    /// Set by every assignment, so a paused loop also pauses the new partitions.
    assigned_again: AtomicBool,
    /// Partitions taken away since the loop last looked.
    revoked: Mutex<Vec<(String, i32)>>,
}

impl RebalanceState {
    pub fn is_joined(&self) -> bool {
        self.joined.load(Ordering::SeqCst)
    }

    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.revoked.lock().expect("revoked list lock"))
    }

    /// Whether partitions were assigned since the last call.
    pub fn take_assigned_again(&self) -> bool {
        self.assigned_again.swap(false, Ordering::SeqCst)
    }
}

#[derive(Clone, Default)]
pub struct RebalanceContext {
    pub state: Arc<RebalanceState>,
}

impl ClientContext for RebalanceContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, partition_stats) in &stats.partitions {
                // Partition -1 is librdkafka's internal unassigned-partition bucket; a lag of -1
                // means not known yet (no committed or fetched offset).
                if *partition < 0 || partition_stats.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(
                    "sluice_consumer_lag",
                    "client" => statistics.client_id.clone(),
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(partition_stats.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Why synchronously, here: once this returns the partitions belong to another
            // worker, which starts from the last committed offset.
            tracing::info!(partitions = partitions.count(), "partitions revoked");
            commit_stored(consumer, "before revoke");
            let mut revoked = self.state.revoked.lock().expect("revoked list lock");
            revoked.extend(
                partitions
                    .elements()
                    .iter()
                    .map(|element| (element.topic().to_owned(), element.partition())),
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            let list: Vec<String> = partitions
                .elements()
                .iter()
                .map(|element| format!("{}:{}", element.topic(), element.partition()))
                .collect();
            tracing::info!(partitions = ?list, "partitions assigned");
            self.state.joined.store(true, Ordering::SeqCst);
            self.state.assigned_again.store(true, Ordering::SeqCst);
        }
    }
}
