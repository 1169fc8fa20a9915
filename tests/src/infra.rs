//! The real broker and the real Postgres, isolated per test.

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use sluice_common::kafka::{KafkaArgs, TopicArgs};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use uuid::Uuid;

const HOW_TO_START: &str = "run the tests with scripts/test, which starts Postgres and the broker";

/// Brokers for tests: `SLUICE_TEST_KAFKA_BROKERS`, else `KAFKA_BROKERS`, else the broker
/// `scripts/test` starts, 127.0.0.1:19092.
pub fn brokers() -> String {
    std::env::var("SLUICE_TEST_KAFKA_BROKERS")
        .or_else(|_| std::env::var("KAFKA_BROKERS"))
        .unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

/// Kafka settings for a test: the test broker and few partitions; everything else as the
/// services' defaults.
pub fn kafka_args(partitions: i32) -> KafkaArgs {
    let mut args = sluice_worker::Config::defaults().kafka;
    args.brokers = brokers();
    args.topic_partitions = partitions;
    args
}

/// Topic names no other test uses.
#[derive(Debug, Clone)]
pub struct TestTopics {
    pub requests: String,
    pub batch_requests: String,
    pub status: String,
    pub requests_dlq: String,
    pub status_dlq: String,
    pub control: String,
    pub deltas: String,
}

impl TestTopics {
    pub fn unique() -> Self {
        let prefix = format!("test-{}", Uuid::now_v7().simple());
        Self {
            requests: format!("{prefix}.requests"),
            batch_requests: format!("{prefix}.requests.batch"),
            status: format!("{prefix}.status"),
            requests_dlq: format!("{prefix}.requests.dlq"),
            status_dlq: format!("{prefix}.status.dlq"),
            control: format!("{prefix}.control"),
            deltas: format!("{prefix}.deltas"),
        }
    }

    /// The services' topic settings for these topics.
    pub fn args(&self) -> TopicArgs {
        TopicArgs {
            requests: self.requests.clone(),
            batch_requests: self.batch_requests.clone(),
            status: self.status.clone(),
            requests_dlq: self.requests_dlq.clone(),
            status_dlq: self.status_dlq.clone(),
            control: self.control.clone(),
            deltas: self.deltas.clone(),
            deltas_retention_ms: 3_600_000,
            create: true,
        }
    }

    /// These topics, and consumer groups named after them, as the services' environment: for
    /// tests that run the services as processes.
    pub fn process_env(&self) -> std::collections::HashMap<String, String> {
        [
            ("SLUICE_REQUESTS_TOPIC", self.requests.clone()),
            ("SLUICE_BATCH_REQUESTS_TOPIC", self.batch_requests.clone()),
            ("SLUICE_STATUS_TOPIC", self.status.clone()),
            ("SLUICE_REQUESTS_DLQ_TOPIC", self.requests_dlq.clone()),
            ("SLUICE_STATUS_DLQ_TOPIC", self.status_dlq.clone()),
            ("SLUICE_CONTROL_TOPIC", self.control.clone()),
            ("SLUICE_DELTAS_TOPIC", self.deltas.clone()),
            ("SLUICE_WORKER_GROUP", format!("{}-workers", self.requests)),
            ("SLUICE_RESULTS_GROUP", format!("{}-results", self.requests)),
            (
                "SLUICE_WEBHOOKS_GROUP",
                format!("{}-webhooks", self.requests),
            ),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    pub async fn create(&self, kafka: &KafkaArgs) {
        let mut args = self.args();
        args.create = true;
        args.ensure(kafka).await.unwrap_or_else(|error| {
            panic!(
                "cannot create topics at {} ({HOW_TO_START}): {error:#}",
                kafka.brokers
            )
        });
    }
}

/// The machine the tests share. The fault tests restart Postgres and load the machine with
/// services as processes: each holds the stage alone (`exclusive_stage`), while every test with
/// a database holds it shared for as long as its database lives. The tests are one binary and
/// run side by side; this keeps a Postgres restart away from everyone else's queries.
static STAGE: RwLock<()> = RwLock::const_new(());

/// The stage to oneself, until the guard is dropped: for a test that restarts shared servers.
pub async fn exclusive_stage() -> RwLockWriteGuard<'static, ()> {
    STAGE.write().await
}

/// A database made for one test, on the server at `SLUICE_TEST_DATABASE_URL`.
pub struct TestDatabase {
    pub url: String,
    pub pool: PgPool,
    /// The shared hold on the stage; `None` for a test that holds it exclusively.
    _stage: Option<RwLockReadGuard<'static, ()>>,
}

impl TestDatabase {
    /// A new database, holding the stage shared: it waits while a fault test runs.
    pub async fn create() -> Self {
        let stage = STAGE.read().await;
        let mut database = Self::create_on_exclusive_stage().await;
        database._stage = Some(stage);
        database
    }

    /// A new database for a test that already holds the stage (`exclusive_stage`).
    pub async fn create_on_exclusive_stage() -> Self {
        let admin_url = std::env::var("SLUICE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".to_owned());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|error| {
                panic!("cannot reach Postgres at {admin_url} ({HOW_TO_START}): {error}")
            });
        let name = format!("sluice_test_{}", Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("creating the test database");
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("the admin URL names a database");
        let url = format!("{base}/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("connecting to the test database");
        Self {
            url,
            pool,
            _stage: None,
        }
    }

    pub async fn migrated() -> Self {
        let database = Self::create().await;
        sluice_results::MIGRATOR
            .run(&database.pool)
            .await
            .expect("applying migrations");
        database
    }
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads every record of `topic` from the start until `expected` are read or `timeout` passes.
pub fn read_topic(
    topic: &str,
    partitions: i32,
    expected: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("reader-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("creating a reader");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("assignment");
    }
    consumer.assign(&assignment).expect("assigning partitions");
    let started = Instant::now();
    let mut records = Vec::new();
    while records.len() < expected && started.elapsed() < timeout {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            records.push(message.detach());
        }
    }
    records.sort_by_key(|record| (record.partition(), record.offset()));
    records
}
