//! Ingest: validates a job, publishes a request event keyed by user id, and answers 202 with the
//! job id as soon as the broker has acknowledged it. It never calls a model. Its OpenAI routes
//! (`openai/`) make the same jobs and wait for their answers.

pub mod admission;
mod admit;
mod config;
mod error;
mod keys;
mod openai;
mod oversized;
mod publisher;
mod submit;

pub use config::Config;
pub use error::ApiError;
pub use keys::KeysCommand;
pub use openai::openai_submission;
pub use publisher::Publisher;
pub use submit::{Accepted, Limits, SubmitBody, to_request_event};

use admission::Tiers;
use admission::idempotency::IdempotencyStore;
use admission::limiter::RateLimiter;
use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::Response;
use axum::routing::{get, post};
use rdkafka::producer::FutureProducer;
use sluice_common::http::{Document, with_operations};
use sluice_common::lifecycle::Lifecycle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub publisher: Publisher,
    pub limiter: Arc<RateLimiter>,
    pub tiers: Arc<Tiers>,
    pub idempotency: Arc<IdempotencyStore>,
    /// One permit per submission being handled; none left means shed load.
    pub submissions: Arc<Semaphore>,
    /// `None` when API keys are off.
    pub keys: Option<Arc<sluice_common::auth::KeyStore>>,
    /// Signs each job's stream token; `None` when API keys are off (anyone reads any job).
    pub tokens: Option<sluice_common::tokens::StreamTokens>,
    /// Token reservations of jobs this replica admitted, until their terminal status settles them.
    pub reservations: Arc<admission::tokens::Reservations>,
    /// Prices and the tiers' spend budgets.
    pub budgets: Arc<admission::budget::Budgets>,
    /// The in-process embedding model's tokenizer, if its files are here.
    pub local_tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    /// The pipeline's estimated wait, which refuses jobs whose deadline it would pass.
    pub capacity: Arc<admission::capacity::Capacity>,
    /// The shared response cache (Redis); off without `REDIS_URL`.
    pub cache: Arc<sluice_common::cache::ResponseCache>,
    /// Where the OpenAI routes wait for their jobs: the results service.
    follower: openai::JobFollower,
    /// Streamed answers' pieces, for the OpenAI streams this replica serves.
    deltas: openai::DeltaRoutes,
}

impl AppState {
    /// Creates the producer (librdkafka connects in the background, so this needs no broker)
    /// and the admission stores (Redis, if `REDIS_URL` is set, is connected here).
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let tiers = Arc::new(config.tiers.by_name.clone());
        let limiter = Arc::new(admission::build_limiter(&config).await?);
        let idempotency = Arc::new(match &config.redis_url {
            Some(url) => IdempotencyStore::Redis {
                connection: redis::aio::ConnectionManager::new(redis::Client::open(
                    secrecy::ExposeSecret::expose_secret(url),
                )?)
                .await?,
                prefix: config.redis_prefix.clone(),
            },
            None => IdempotencyStore::local(config.idempotency_ttl),
        });
        let submissions = Arc::new(Semaphore::new(config.max_concurrent_submissions));
        // Only a shared cache can answer at submit time: a worker's own cache is not visible here.
        let cache_ttl = if config.redis_url.is_some() {
            config.cache_ttl
        } else {
            Duration::ZERO
        };
        let cache = Arc::new(
            sluice_common::cache::ResponseCache::new(
                cache_ttl,
                0,
                config
                    .redis_url
                    .as_ref()
                    .map(secrecy::ExposeSecret::expose_secret),
                &config.redis_prefix,
            )
            .await?,
        );
        let keys = sluice_common::auth::key_store(
            config.auth,
            secrecy::ExposeSecret::expose_secret(&config.database_url),
            config.key_cache_ttl,
        )
        .await?
        .map(Arc::new);
        let tokens = match &keys {
            Some(keys) => Some(
                sluice_common::tokens::StreamTokens::load(&config.stream_tokens, keys.pool())
                    .await
                    .context("loading the stream token secret")?,
            ),
            None => None,
        };
        // Budgets read the usage the results service records, in the same Postgres as the keys
        // (with keys on, a key may have budgets of its own).
        let budget_pool = match (&keys, config.tiers.by_name.any_budget()) {
            (Some(keys), _) => Some(keys.pool().clone()),
            (None, false) => None,
            (None, true) => Some(
                sluice_common::auth::connect(
                    secrecy::ExposeSecret::expose_secret(&config.database_url),
                    "spend budgets",
                )
                .await?,
            ),
        };
        let budgets = Arc::new(admission::budget::Budgets::new(
            budget_pool,
            config.prices.prices.clone(),
        ));
        let local_tokenizer = match &config.embedding_model_dir {
            Some(dir) => Some(Arc::new(sluice_common::minilm::tokenizer(dir).context(
                "loading the embedding model's tokenizer (SLUICE_EMBEDDING_MODEL_DIR)",
            )?)),
            None => None,
        };
        let mut kafka = config.kafka.clone();
        // Why: a record the broker has not taken within the publish timeout is expired by
        // librdkafka too, so a client told 503 is not surprised by a late publish.
        kafka.message_timeout_ms =
            u32::try_from(config.publish_timeout.as_millis()).unwrap_or(u32::MAX);
        let producer: FutureProducer = kafka
            .producer_config("sluice-ingest")
            .create()
            .context("creating the Kafka producer")?;
        let publisher = Publisher::new(producer, config.topics.clone(), config.publish_timeout);
        Ok(Self {
            capacity: Arc::new(admission::capacity::Capacity::new(config.capacity.clone())),
            reservations: Arc::default(),
            budgets,
            local_tokenizer,
            deltas: openai::DeltaRoutes::default(),
            follower: openai::JobFollower::new(
                config
                    .results_internal_url
                    .as_deref()
                    .unwrap_or(&config.results_url),
            ),
            config: Arc::new(config),
            publisher,
            limiter,
            tiers,
            idempotency,
            submissions,
            keys,
            tokens,
            cache,
        })
    }
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    let cors = sluice_common::http::cors(&state.config.cors_origins);
    // Why axum's body limit rather than tower-http's: its rejection reaches the handler, which
    // answers with the JSON 413 naming the limit.
    let jobs = Router::new().route("/v1/jobs", post(submit::submit));
    let api = sluice_common::http::with_request_timeout(jobs, state.config.request_timeout)
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            state.config.body_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            oversized::refuse_oversized,
        ))
        .route("/v1/models", get(openai::models));
    let auth = state.config.auth;
    let router = with_operations(
        api,
        get(readyz),
        Document::OpenApi(auth, sluice_common::http::Api::Ingest),
    )
    .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    let problems = state
        .publisher
        .check_broker()
        .await
        .err()
        .into_iter()
        .collect();
    sluice_common::http::readiness(problems)
}

/// A built ingest service: bound, connected, topics in place, not yet serving.
pub struct Application {
    listener: TcpListener,
    connections: sluice_common::http::ConnectionArgs,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        config.topics.ensure(&config.kafka).await?;
        let listener = TcpListener::bind(&config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let connections = config.connections;
        let state = AppState::new(config).await?;
        Ok(Self {
            listener,
            connections,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled, then flushes what the producer still holds.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let lifecycle = Lifecycle::new();
        let drain_timeout = self.state.config.drain_timeout;
        let producer = self.state.publisher.producer().clone();
        let stop = lifecycle.stop().clone();
        lifecycle.spawn(
            "deltas follower",
            openai::follow_deltas(
                self.state.config.kafka.clone(),
                self.state.config.topics.deltas.clone(),
                self.state.deltas.clone(),
                stop.clone(),
            ),
        );
        let config = &self.state.config;
        // With API keys on, a key may have a budget of its own, and its jobs hold their cost.
        if config.tiers.by_name.any_reservations() || self.state.keys.is_some() {
            lifecycle.spawn(
                "token settlement",
                admission::tokens::follow(
                    config.kafka.clone(),
                    config.topics.status.clone(),
                    self.state.reservations.clone(),
                    self.state.limiter.clone(),
                    stop.clone(),
                ),
            );
        }
        // The interactive lane's: a batch job is never refused for capacity (admit.rs says why).
        if config.capacity.enabled {
            let lag = sluice_common::kafka::GroupLag::new(
                &config.kafka,
                &config.capacity.worker_group,
                vec![config.topics.requests.clone()],
            )
            .context("creating the reader of the workers' lag")?;
            lifecycle.spawn(
                "capacity estimate",
                self.state.capacity.clone().run(lag, stop.clone()),
            );
        }
        lifecycle.spawn("HTTP server", async move {
            sluice_common::http::serve(self.listener, router(self.state), self.connections, stop)
                .await?;
            sluice_common::kafka::flush(producer).await
        });
        lifecycle.run(shutdown, drain_timeout).await
    }
}
