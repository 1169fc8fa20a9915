//! Ingest, worker(s), results and the simulated model, running together in this process
//! against the real broker and Postgres, each test on its own topics, groups and database.

use crate::infra::{TestDatabase, TestTopics, kafka_args, wait_until};
use serde_json::{Value, json};
use sluice_common::kafka::KafkaArgs;
use sluice_ingest::Accepted;
use sluice_model_sim::{SimModel, Stats};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub partitions: i32,
    pub workers: usize,
    pub max_in_flight: usize,
    pub per_user_in_flight: usize,
    /// API keys on for ingest and results (`SLUICE_AUTH=api-keys`), against the test database.
    pub api_keys: bool,
    /// Redis (`SLUICE_TEST_REDIS_URL`) for ingest and the workers, under a prefix of this test's.
    pub redis: bool,
    /// Ingest's `SLUICE_TIERS`; `None` puts limits out of the way.
    pub tiers: Option<String>,
    /// The results service's and ingest's `SLUICE_MODEL_PRICES`.
    pub model_prices: Option<String>,
    /// Ingest's `SLUICE_PUBLISH_TIMEOUT_MS`.
    pub publish_timeout_ms: u64,
    pub sim: sluice_model_sim::Config,
    /// Points the workers somewhere other than the simulated model (e.g. a closed port).
    pub model_base_url: Option<String>,
    /// Loads the in-process embedding model from here in every worker.
    pub embedding_model_dir: Option<std::path::PathBuf>,
    /// Ingest's `SLUICE_OPENAI_MODELS`.
    pub openai_models: Vec<String>,
    /// Runs the webhooks service too, with these settings (its database, broker and topics
    /// filled in); ingest then accepts `http://` and private webhook URLs unless `webhook_guard`.
    pub webhooks: Option<sluice_webhooks::Config>,
    /// The private-network guard on, in ingest and the webhooks service.
    pub webhook_guard: bool,
    /// The results service's `SLUICE_SSE_IDLE_SECS`.
    pub sse_idle: Duration,
}

/// The key webhook secrets are sealed with in tests.
pub const TEST_WEBHOOK_KEY: &str = "c2x1aWNlLXRlc3Qtd2ViaG9vay1zZWFsaW5nLWtleSE=";

/// Webhooks settings for tests: short retries, quick polling, no private-network guard.
pub fn test_webhooks() -> sluice_webhooks::Config {
    let mut config = sluice_webhooks::Config::defaults_with_key(TEST_WEBHOOK_KEY);
    config.retry_schedule_ms = vec![100, 200, 400, 800, 1600];
    // The schedule once, no more: a first attempt and five retries over 3.1 s.
    config.retry_horizon = Duration::from_millis(3_100);
    config.poll = Duration::from_millis(20);
    config.timeout = Duration::from_secs(10);
    config.allow_private_networks = true;
    config.breaker_cooldown = Duration::from_millis(500);
    config.drain_timeout = Duration::from_secs(5);
    config
}

impl Default for PipelineOptions {
    fn default() -> Self {
        let mut sim = sluice_model_sim::Config::defaults();
        sim.service_time_ms = 5;
        Self {
            partitions: 4,
            workers: 1,
            max_in_flight: 64,
            per_user_in_flight: 8,
            publish_timeout_ms: 5_000,
            api_keys: false,
            tiers: None,
            model_prices: None,
            redis: false,
            sim,
            model_base_url: None,
            embedding_model_dir: None,
            openai_models: Vec::new(),
            webhooks: None,
            webhook_guard: false,
            sse_idle: Duration::from_secs(600),
        }
    }
}

fn auth_mode(api_keys: bool) -> sluice_common::auth::AuthMode {
    if api_keys {
        sluice_common::auth::AuthMode::ApiKeys
    } else {
        sluice_common::auth::AuthMode::Off
    }
}

/// A running pipeline; `stop` shuts it down in order.
pub struct Pipeline {
    pub ingest_url: String,
    pub results_url: String,
    pub sim_url: String,
    /// Health endpoints of the workers.
    pub worker_urls: Vec<String>,
    pub sim_stats: Arc<Stats>,
    pub topics: TestTopics,
    pub kafka: KafkaArgs,
    pub database: TestDatabase,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// The results service on its own stop token, so a test can restart it on its address.
    results: RunningResults,
}

struct RunningResults {
    config: sluice_results::Config,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningResults {
    async fn start(config: sluice_results::Config, shutdown: &CancellationToken) -> (Self, String) {
        let results = sluice_results::Application::build(config.clone())
            .await
            .expect("building results");
        let address = results.local_addr();
        let stop = shutdown.child_token();
        let task = tokio::spawn(results.run_until_stopped(stop.clone()));
        let config = sluice_results::Config {
            addr: address.to_string(),
            ..config
        };
        (Self { config, stop, task }, format!("http://{address}"))
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("results stopped within 30 s")
            .expect("the results task panicked")
            .expect("results failed");
    }
}

impl Pipeline {
    pub async fn start(options: PipelineOptions) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let kafka = kafka_args(options.partitions);
        let topics = TestTopics::unique();
        topics.create(&kafka).await;
        let database = TestDatabase::create().await;
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let sim = SimModel::new(options.sim.clone());
        let sim_stats = sim.stats.clone();
        let sim_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the simulated model");
        let sim_url = format!("http://{}", sim_listener.local_addr().expect("address"));
        tasks.push(tokio::spawn(sim.run(sim_listener, shutdown.clone())));

        let mut results_config = sluice_results::Config::defaults();
        results_config.addr = "127.0.0.1:0".into();
        results_config.database_url = database.url.clone().into();
        results_config.kafka = kafka.clone();
        results_config.topics = topics.args();
        results_config.group_id = format!("{}-results", topics.requests);
        results_config.database_max_connections = 8;
        results_config.auth = auth_mode(options.api_keys);
        results_config.key_cache_ttl = Duration::from_secs(1);
        results_config.streams.idle = options.sse_idle;
        // Ingest's address, chosen now: the console that results serves submits there.
        let ingest_addr = format!("127.0.0.1:{}", crate::process::free_port());
        results_config.ingest_url = format!("http://{ingest_addr}");
        results_config.webhook_secret_key = Some(TEST_WEBHOOK_KEY.to_owned().into());
        if let Some(prices) = &options.model_prices {
            results_config.prices.prices =
                sluice_common::prices::Prices::parse(prices).expect("test prices");
        }
        let (results, results_url) = RunningResults::start(results_config, &shutdown).await;
        if let Some(mut config) = options.webhooks.clone() {
            config.addr = "127.0.0.1:0".into();
            config.database_url = database.url.clone().into();
            config.kafka = kafka.clone();
            config.topics = topics.args();
            config.group_id = format!("{}-webhooks", topics.requests);
            config.allow_private_networks = !options.webhook_guard;
            let webhooks = sluice_webhooks::Application::build(config)
                .await
                .expect("building the webhooks service");
            tasks.push(tokio::spawn(webhooks.run_until_stopped(shutdown.clone())));
        }

        let redis_prefix = format!("{}:", topics.requests);
        let redis_url = options.redis.then(|| {
            std::env::var("SLUICE_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:56379".to_owned())
        });
        let mut worker_urls = Vec::new();
        for index in 0..options.workers {
            let mut config = Self::worker_config(&options, &kafka, &topics, &sim_url, index);
            config.redis_url = redis_url.clone().map(Into::into);
            config.redis_prefix = redis_prefix.clone();
            let worker = sluice_worker::Application::build(config)
                .await
                .expect("building a worker");
            worker_urls.push(format!("http://{}", worker.local_addr()));
            tasks.push(tokio::spawn(worker.run_until_stopped(shutdown.clone())));
        }

        let mut ingest_config = sluice_ingest::Config::defaults();
        ingest_config.addr = ingest_addr;
        // The console's origin.
        ingest_config.cors_origins = vec![results_url.clone()];
        ingest_config.kafka = kafka.clone();
        ingest_config.topics = topics.args();
        // Capacity-aware admission reads the workers' group.
        ingest_config.capacity.worker_group = format!("{}-workers", topics.requests);
        ingest_config.results_url = results_url.clone();
        ingest_config.publish_timeout = Duration::from_millis(options.publish_timeout_ms);
        ingest_config.auth = auth_mode(options.api_keys);
        ingest_config.database_url = database.url.clone().into();
        ingest_config.key_cache_ttl = Duration::from_secs(1);
        ingest_config.openai_models = options.openai_models.clone();
        ingest_config.webhook_allow_http = true;
        ingest_config.webhook_allow_private_networks = !options.webhook_guard;
        ingest_config.redis_url = redis_url.clone().map(Into::into);
        ingest_config.redis_prefix = redis_prefix.clone();
        // Pipeline tests are about the pipeline, not admission control: limits out of the way.
        let tiers = options
            .tiers
            .clone()
            .unwrap_or_else(|| r#"{"default": {"rate_per_sec": 100000, "burst": 100000}}"#.into());
        ingest_config.tiers.by_name =
            sluice_ingest::admission::Tiers::parse(&tiers).expect("test tiers");
        ingest_config.embedding_model_dir = options.embedding_model_dir.clone();
        if let Some(prices) = &options.model_prices {
            ingest_config.prices.prices =
                sluice_common::prices::Prices::parse(prices).expect("test prices");
        }
        ingest_config.global_burst = 100_000;
        ingest_config.global_rate_per_sec = 100_000.0;
        let ingest = sluice_ingest::Application::build(ingest_config)
            .await
            .expect("building ingest");
        let ingest_url = format!("http://{}", ingest.local_addr());
        tasks.push(tokio::spawn(ingest.run_until_stopped(shutdown.clone())));

        let pipeline = Self {
            ingest_url,
            results_url,
            sim_url,
            worker_urls,
            sim_stats,
            topics,
            kafka,
            database,
            http: reqwest::Client::new(),
            shutdown,
            tasks,
            results,
        };
        pipeline.wait_ready().await;
        pipeline
    }

    fn worker_config(
        options: &PipelineOptions,
        kafka: &KafkaArgs,
        topics: &TestTopics,
        sim_url: &str,
        index: usize,
    ) -> sluice_worker::Config {
        let mut config = sluice_worker::Config::defaults();
        config.addr = "127.0.0.1:0".into();
        config.kafka = kafka.clone();
        config.topics = topics.args();
        config.group_id = format!("{}-workers", topics.requests);
        config.max_in_flight = options.max_in_flight;
        config.per_user_in_flight = options.per_user_in_flight;
        config.model_base_url = options
            .model_base_url
            .clone()
            .unwrap_or_else(|| sim_url.to_owned());
        config.worker_id = Some(format!("test-worker-{index}"));
        config.drain_timeout = Duration::from_secs(5);
        config.embedding_model_dir = options.embedding_model_dir.clone();
        // The same tiers as ingest: their weights share the worker.
        if let Some(tiers) = &options.tiers {
            config.tiers.by_name = sluice_common::tiers::Tiers::parse(tiers).expect("test tiers");
        }
        config
    }

    async fn wait_ready(&self) {
        let services = [&self.ingest_url, &self.results_url]
            .into_iter()
            .chain(&self.worker_urls);
        for url in services {
            let ready = format!("{url}/readyz");
            wait_until(&ready, Duration::from_secs(60), || async {
                let response = self.http.get(&ready).send().await.ok()?;
                response.status().is_success().then_some(())
            })
            .await;
        }
    }

    /// `POST /v1/jobs` for one user message; panics unless the answer is 202.
    pub async fn submit(&self, user_id: &str, content: &str) -> Accepted {
        let body = json!({"user_id": user_id, "model": "sim", "messages": [{"role": "user", "content": content}]});
        self.submit_body(&body).await
    }

    /// `POST /v1/jobs` with any body; panics unless the answer is 202.
    pub async fn submit_body(&self, body: &Value) -> Accepted {
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.ingest_url))
            .json(body)
            .send()
            .await
            .expect("POST /v1/jobs");
        let status = response.status();
        let text = response.text().await.expect("reading the answer");
        assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{text}");
        serde_json::from_str(&text).expect("a 202 body")
    }

    /// `GET /v1/jobs/{id}`: the job, or `None` while it is 404.
    pub async fn job(&self, job_id: impl std::fmt::Display) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}/v1/jobs/{job_id}", self.results_url))
            .send()
            .await
            .expect("GET /v1/jobs/{id}");
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        assert!(
            response.status().is_success(),
            "GET answered {}",
            response.status()
        );
        Some(response.json().await.expect("a job body"))
    }

    /// A producer to the test broker, for publishing straight to the topics.
    pub fn producer(&self) -> rdkafka::producer::FutureProducer {
        self.kafka
            .producer_config("test-producer")
            .create()
            .expect("creating a producer")
    }

    /// Publishes `events` straight to `topic`, each keyed by its user as the contract says, all
    /// sent at once (in order) and each acknowledged: as a high-volume producer does.
    pub async fn publish(&self, topic: &str, events: &[sluice_schemas::RequestEvent]) {
        let producer = self.producer();
        let sends = events.iter().map(|event| {
            let payload = event.encode();
            let producer = &producer;
            async move {
                let record = rdkafka::producer::FutureRecord::to(topic)
                    .key(event.user_id.as_str())
                    .payload(&payload);
                producer
                    .send(record, Duration::from_secs(10))
                    .await
                    .expect("publishing a request event");
            }
        });
        futures::future::join_all(sends).await;
    }

    /// A new API key for `user_id` in `tier`, in the test database: (its id, the key).
    pub async fn create_key(&self, user_id: &str, tier: &str) -> (String, String) {
        sluice_common::auth::create_key(&self.database.pool, user_id, tier, None)
            .await
            .expect("creating an API key")
    }

    /// `POST /v1/jobs` with any body, the answer as it is.
    pub async fn post_job(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/jobs", self.ingest_url))
            .json(body)
            .send()
            .await
            .expect("POST /v1/jobs")
    }

    /// Reads a job's whole SSE stream (it ends after the terminal status); the event names.
    pub async fn event_names(&self, job_id: impl std::fmt::Display) -> Vec<String> {
        let url = format!("{}/v1/jobs/{job_id}/events", self.results_url);
        let response = self
            .http
            .get(url)
            .send()
            .await
            .expect("GET /v1/jobs/{id}/events");
        let (events, _) = crate::sse::read_sse(response, Duration::from_secs(10)).await;
        events
            .into_iter()
            .map(|event| event.event.unwrap_or_default())
            .collect()
    }

    /// Waits until every job in `ids` has a terminal status in Postgres.
    pub async fn wait_terminal(&self, ids: &[Uuid], timeout: Duration) {
        crate::jobs::wait_terminal(&self.database.pool, ids, timeout).await;
    }

    /// Stops the results service, leaves it down for `down_for`, and starts it again on the
    /// same address and database (as a pod restarted in place).
    pub async fn restart_results(&mut self, down_for: Duration) {
        let config = self.results.config.clone();
        let placeholder = RunningResults {
            config: config.clone(),
            stop: CancellationToken::new(),
            task: tokio::spawn(async { Ok(()) }),
        };
        std::mem::replace(&mut self.results, placeholder)
            .stop()
            .await;
        tokio::time::sleep(down_for).await;
        let (results, _) = RunningResults::start(config, &self.shutdown).await;
        self.results = results;
    }

    /// Stops every service and checks that none of them failed.
    pub async fn stop(self) {
        self.results.stop().await;
        self.shutdown.cancel();
        for task in self.tasks {
            let result = tokio::time::timeout(Duration::from_secs(30), task).await;
            result
                .expect("a service stopped within 30 s")
                .expect("a service task panicked")
                .expect("a service failed");
        }
    }
}
