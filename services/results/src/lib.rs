//! Results: consumes request and status events into Postgres, idempotently, and serves each
//! job's state over HTTP and its changes over Server-Sent Events.

mod api;
mod cancel;
mod config;
mod console;
mod consumer;
pub mod deltas;
mod events;
pub mod kept;
pub mod list;
pub mod notify;
pub mod queue;
pub mod reads;
pub mod state;
pub mod store;
pub mod streams;
mod usage;
mod webhooks;
mod write;

pub use api::ApiError;
pub use cancel::Canceller;
pub use config::Config;
pub use events::Position;
pub use state::{Job, Update};
pub use store::Store;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use consumer::EventLoop;
use rdkafka::producer::FutureProducer;
use secrecy::ExposeSecret;
use sluice_common::http::{Document, with_operations};
use sluice_common::kafka::{KafkaSource, SourceHealth};
use sluice_common::lifecycle::Lifecycle;
use sqlx::postgres::PgPoolOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The Postgres schema, `services/results/migrations/`, compiled in. This service owns it: it
/// applies it at start-up (`SLUICE_RUN_MIGRATIONS`) and with `sluice-results migrate`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Job ids announced by Postgres `NOTIFY`.
    pub changes: notify::JobChanges,
    /// Streamed answers so far, from the deltas topic.
    pub answers: deltas::Answers,
    /// Queue positions of the queued jobs this replica's streams watch.
    pub queue: queue::QueueWatch,
    /// Streams' reads of their jobs' events, gathered into shared queries.
    pub reads: reads::EventReads,
    pub keepalive: Duration,
    /// How often the watched jobs are looked up without a notification (a safety net for
    /// notifications lost while the listener reconnects), and how soon a stream whose read
    /// failed reads again.
    pub sse_recheck: Duration,
    /// The Kafka consumer's readiness, for `/readyz`.
    pub consumer: SourceHealth,
    /// Publishes cancellations.
    pub canceller: Canceller,
    /// `None` when API keys are off.
    pub keys: Option<Arc<sluice_common::auth::KeyStore>>,
    /// Checks jobs' stream tokens; `None` when API keys are off (anyone reads any job).
    pub tokens: Option<sluice_common::tokens::StreamTokens>,
    /// Origins allowed to call from a browser (`SLUICE_CORS_ORIGINS`).
    pub cors_origins: Vec<String>,
    /// Ingest as a browser reaches it, for the console.
    pub ingest_url: String,
    /// This service as clients reach it, for the `events_url`s it hands out.
    pub results_url: String,
    /// Seals users' webhook signing secrets; `None` without `SLUICE_WEBHOOK_SECRET_KEY`.
    pub webhook_key: Option<sluice_common::webhooks::secrets::SealingKey>,
    /// Cancelled when the service stops: open SSE streams end then.
    pub stopping: CancellationToken,
    /// Longest a request may take until its answer starts.
    pub request_timeout: std::time::Duration,
    /// The event streams open here, under their caps.
    pub streams: streams::Streams,
}

pub fn router(state: AppState) -> Router {
    let cors = sluice_common::http::cors(&state.cors_origins);
    let api = Router::new()
        .route("/", get(console::page))
        .route("/console/config.json", get(console::config))
        .route("/v1/jobs", get(list::list_jobs))
        .route("/v1/usage", get(usage::usage))
        .route("/v1/jobs/{id}", get(api::get_job).delete(api::cancel_job))
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/v1/jobs/{id}/webhooks", get(webhooks::deliveries))
        .route(
            "/v1/jobs/{id}/webhooks/{delivery}/redeliver",
            axum::routing::post(webhooks::redeliver),
        )
        .route("/v1/webhooks/secret", get(webhooks::secret))
        .route(
            "/v1/webhooks/secret/rotate",
            axum::routing::post(webhooks::rotate),
        );
    let api = sluice_common::http::with_request_timeout(api, state.request_timeout);
    let auth = match state.keys {
        Some(_) => sluice_common::auth::AuthMode::ApiKeys,
        None => sluice_common::auth::AuthMode::Off,
    };
    let router = with_operations(
        api,
        get(readyz),
        Document::OpenApi(auth, sluice_common::http::Api::Results),
    )
    .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    sluice_common::http::store_and_source_readiness(state.store.pool(), &state.consumer).await
}

/// A built results service: migrated, subscribed, bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    connections: sluice_common::http::ConnectionArgs,
    state: AppState,
    event_loop: EventLoop,
    lifecycle: Lifecycle,
    drain_timeout: Duration,
    kafka: sluice_common::kafka::KafkaArgs,
    deltas_topic: String,
    gatherer: reads::Gatherer,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        let pool = PgPoolOptions::new()
            .max_connections(config.database_max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect(config.database_url.expose_secret())
            .await
            .context("connecting to Postgres (DATABASE_URL)")?;
        if config.run_migrations {
            MIGRATOR.run(&pool).await.context("applying migrations")?;
        }
        config.topics.ensure(&config.kafka).await?;
        let source = KafkaSource::subscribe(
            &config.kafka,
            "sluice-results",
            &config.group_id,
            &[
                &config.topics.requests,
                &config.topics.batch_requests,
                &config.topics.status,
            ],
        )?;
        let producer: FutureProducer = config
            .kafka
            .producer_config("sluice-results")
            .create()
            .context("creating the Kafka producer")?;
        let store = Store::new(pool).with_prices(config.prices.prices.clone());
        let lifecycle = Lifecycle::new();
        let changes = notify::JobChanges::default();
        let (reads, gatherer) = reads::gathered(store.clone());
        let listener = TcpListener::bind(&config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let tokens = match config.auth {
            sluice_common::auth::AuthMode::ApiKeys => Some(
                sluice_common::tokens::StreamTokens::load(&config.stream_tokens, store.pool())
                    .await
                    .context("loading the stream token secret")?,
            ),
            sluice_common::auth::AuthMode::Off => None,
        };
        let state = AppState {
            tokens,
            store: store.clone(),
            changes,
            answers: deltas::Answers::new(config.deltas_keep, config.deltas_max_jobs),
            queue: queue::QueueWatch::default(),
            reads,
            keepalive: config.sse_keepalive,
            sse_recheck: config.sse_recheck,
            consumer: source.health(),
            keys: if config.auth == sluice_common::auth::AuthMode::ApiKeys {
                Some(Arc::new(sluice_common::auth::KeyStore::new(
                    store.pool().clone(),
                    config.key_cache_ttl,
                )))
            } else {
                tracing::warn!(
                    "API KEYS ARE OFF: anyone can read and cancel any job. Local development only."
                );
                None
            },
            stopping: lifecycle.stop().clone(),
            request_timeout: config.request_timeout,
            streams: streams::Streams::new(config.streams),
            cors_origins: config.cors_origins.clone(),
            ingest_url: config.ingest_url.trim_end_matches('/').to_owned(),
            results_url: config.results_url.trim_end_matches('/').to_owned(),
            webhook_key: config
                .webhook_secret_key
                .as_ref()
                .map(sluice_common::webhooks::secrets::SealingKey::from_base64)
                .transpose()?,
            canceller: Canceller {
                producer: producer.clone(),
                topic: config.topics.control.clone(),
            },
        };
        let event_loop = EventLoop {
            source,
            producer,
            connection: kept::KeptConnection::new(store.pool().clone()),
            store,
            changes: state.changes.clone(),
            requests_topic: config.topics.requests,
            batch_requests_topic: config.topics.batch_requests,
            dlq_topic: config.topics.status_dlq,
            max_batch: config.max_batch,
        };
        Ok(Self {
            listener,
            connections: config.connections,
            state,
            event_loop,
            lifecycle,
            drain_timeout: config.drain_timeout,
            kafka: config.kafka,
            deltas_topic: config.topics.deltas,
            gatherer,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves and consumes until `shutdown`; if either stops with an error, both stop.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let lifecycle = self.lifecycle;
        let stop = lifecycle.stop().clone();
        lifecycle.spawn("notification listener", {
            let (store, changes) = (self.state.store.clone(), self.state.changes.clone());
            let stop = stop.clone();
            async move {
                notify::listen(store, changes, stop).await;
                Ok(())
            }
        });
        lifecycle.spawn("recheck of watched jobs", {
            let (store, changes, every, stop) = (
                self.state.store.clone(),
                self.state.changes.clone(),
                self.state.sse_recheck,
                stop.clone(),
            );
            async move {
                notify::recheck(store, changes, every, stop).await;
                Ok(())
            }
        });
        lifecycle.spawn("event reads", {
            let (gatherer, stop) = (self.gatherer, stop.clone());
            async move {
                gatherer.run(stop).await;
                Ok(())
            }
        });
        lifecycle.spawn("queue positions", {
            let (store, queue, stop) = (
                self.state.store.clone(),
                self.state.queue.clone(),
                stop.clone(),
            );
            async move {
                queue::run(store, queue, stop).await;
                Ok(())
            }
        });
        lifecycle.spawn(
            "deltas follower",
            deltas::follow(
                self.kafka,
                self.deltas_topic,
                self.state.answers.clone(),
                stop.clone(),
            ),
        );
        let producer = self.event_loop.producer.clone();
        let give_up = lifecycle.give_up().clone();
        lifecycle.spawn("consumer", {
            let stop = stop.clone();
            async move {
                self.event_loop.run(stop, give_up).await?;
                sluice_common::kafka::flush(producer).await
            }
        });
        let pool = self.state.store.pool().clone();
        lifecycle.spawn(
            "HTTP server",
            sluice_common::http::serve(self.listener, router(self.state), self.connections, stop),
        );
        let result = lifecycle.run(shutdown, self.drain_timeout).await;
        pool.close().await;
        result
    }
}
