//! Results: consumes request and status events into Postgres, idempotently, and serves each
//! job's state over HTTP and its changes over Server-Sent Events.

mod api;
mod config;
mod consumer;
pub mod notify;
pub mod state;
pub mod store;

pub use api::ApiError;
pub use config::Config;
pub use state::{Job, Update};
pub use store::Store;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use consumer::{EventLoop, ResultsConsumer};
use rdkafka::consumer::Consumer;
use rdkafka::producer::{FutureProducer, Producer};
use secrecy::ExposeSecret;
use sluice_common::kafka::RebalanceContext;
use sqlx::postgres::PgPoolOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use sluice_common::auth::MIGRATOR;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Job ids announced by Postgres `NOTIFY`.
    pub changes: notify::JobChanges,
    pub keepalive: Duration,
    /// How often an open SSE stream re-reads its job without a notification (a safety net
    /// for notifications lost while the listener reconnects).
    pub sse_recheck: Duration,
    /// `None` in router tests that run without Kafka.
    pub consumer: Option<Arc<ResultsConsumer>>,
    /// Publishes cancellations; `None` in router tests that run without Kafka.
    pub canceller: Option<Canceller>,
    /// `None` when API keys are off.
    pub keys: Option<Arc<sluice_common::auth::KeyStore>>,
    /// Cancelled when the service stops: open SSE streams end then.
    pub stopping: CancellationToken,
}

/// Publishes cancel events to the control topic.
#[derive(Clone)]
pub struct Canceller {
    pub producer: FutureProducer,
    pub topic: String,
}

impl Canceller {
    pub async fn publish(&self, job: &Job) -> Result<(), String> {
        let job_id =
            sluice_schemas::JobId::try_from(job.job_id).map_err(|error| error.to_string())?;
        let user_id = sluice_schemas::UserId::parse(job.user_id.clone())
            .map_err(|error| error.to_string())?;
        let event = sluice_schemas::CancelEvent {
            schema_version: sluice_schemas::SCHEMA_VERSION,
            job_id,
            user_id,
            requested_at: chrono::Utc::now(),
            deadline: job.timings.deadline,
        };
        let payload = event.encode();
        let record = rdkafka::producer::FutureRecord::to(&self.topic)
            .key(job.user_id.as_str())
            .payload(&payload)
            .headers(sluice_common::kafka::event_headers());
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.producer.send(record, Duration::ZERO),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(error.to_string()),
            Err(_) => Err("the broker did not acknowledge within 5 s".to_owned()),
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/jobs/{id}", get(api::get_job).delete(api::cancel_job))
        .route("/v1/jobs/{id}/events", get(api::job_events))
        .route("/healthz", get(sluice_common::http::healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(sluice_common::http::openapi))
        .route("/metrics", get(sluice_common::metrics::render))
        .layer(axum::middleware::from_fn(
            sluice_common::metrics::track_http,
        ))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let mut problems = Vec::new();
    if let Err(error) = sqlx::query("SELECT 1").execute(state.store.pool()).await {
        problems.push(format!("postgres unreachable: {error}"));
    }
    if let Some(consumer) = &state.consumer {
        if !consumer.context().state.is_joined() {
            problems.push("consumer has not joined its group yet".to_owned());
        }
        let consumer = consumer.clone();
        let broker = tokio::task::spawn_blocking(move || {
            consumer.fetch_metadata(None, Duration::from_secs(2))
        })
        .await;
        if !matches!(broker, Ok(Ok(_))) {
            problems.push("broker unreachable".to_owned());
        }
    }
    sluice_common::http::readiness(problems)
}

/// A built results service: migrated, subscribed, bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    event_loop: EventLoop,
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
        let consumer: ResultsConsumer = config
            .kafka
            .consumer_config("sluice-results", &config.group_id)
            .create_with_context(RebalanceContext::default())
            .context("creating the Kafka consumer")?;
        consumer
            .subscribe(&[&config.topics.requests, &config.topics.status])
            .context("subscribing to the requests and status topics")?;
        let producer: FutureProducer = config
            .kafka
            .producer_config("sluice-results")
            .create()
            .context("creating the Kafka producer")?;
        let consumer = Arc::new(consumer);
        let store = Store::new(pool);
        let changes = notify::JobChanges::default();
        let listener = TcpListener::bind(&config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let state = AppState {
            store: store.clone(),
            changes,
            keepalive: Duration::from_secs(config.sse_keepalive_secs),
            sse_recheck: Duration::from_millis(config.sse_recheck_ms),
            consumer: Some(consumer.clone()),
            keys: if config.auth == sluice_common::auth::AuthMode::ApiKeys {
                Some(Arc::new(sluice_common::auth::KeyStore::new(
                    store.pool().clone(),
                    Duration::from_secs(config.key_cache_secs),
                )))
            } else {
                tracing::warn!(
                    "API KEYS ARE OFF: anyone can read and cancel any job. Local development only."
                );
                None
            },
            stopping: CancellationToken::new(),
            canceller: Some(Canceller {
                producer: producer.clone(),
                topic: config.topics.control.clone(),
            }),
        };
        let event_loop = EventLoop {
            consumer,
            producer,
            store,
            changes: state.changes.clone(),
            requests_topic: config.topics.requests,
            dlq_topic: config.topics.status_dlq,
            max_batch: config.max_batch,
        };
        Ok(Self {
            listener,
            state,
            event_loop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves and consumes until `shutdown`; if either stops with an error, both stop.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        let stopping = self.state.stopping.clone();
        let stop_streams = shutdown.clone();
        tasks.spawn(async move {
            stop_streams.cancelled().await;
            stopping.cancel();
        });
        let pool = self.state.store.pool().clone();
        tasks.spawn(notify::listen(
            pool.clone(),
            self.state.changes.clone(),
            shutdown.clone(),
        ));

        let consumer = self.event_loop.consumer.clone();
        let producer = self.event_loop.producer.clone();
        let loop_stop = shutdown.clone();
        let event_loop = tasks.spawn(async move {
            let result = self.event_loop.run(loop_stop.clone()).await;
            loop_stop.cancel();
            result
        });
        let serve = axum::serve(
            sluice_common::http::no_delay(self.listener),
            router(self.state),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
        shutdown.cancel();
        tasks.close();
        let loop_result = event_loop.await?;
        tasks.wait().await;
        tokio::task::spawn_blocking(move || {
            if let Err(error) = producer.flush(Duration::from_secs(5)) {
                tracing::warn!(error = %error, "producer flush failed");
            }
            consumer.unsubscribe();
        })
        .await?;
        pool.close().await;
        serve.context("serving HTTP")?;
        loop_result
    }
}
