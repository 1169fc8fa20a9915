//! Worker: a consumer group member that runs jobs from the requests topic against an
//! OpenAI-compatible backend with a bounded window, and publishes each job's status.

mod breaker;
mod cancel;
mod coalesce;
mod config;
mod consumer;
pub mod embed;
mod fair;
mod job;
mod limit;
mod model;
mod offsets;
mod routing;
mod status;

pub use breaker::{CircuitBreaker, CircuitState};
pub use cancel::Cancellations;
pub use coalesce::Coalescer;
pub use config::Config;
pub use consumer::LoopSettings;
pub use job::{JobContext, Outcome, Record, RetryPolicy, run as run_job};
pub use limit::{AdaptiveLimit, Sample};
pub use model::{CallError, Failure, ModelClient};
pub use offsets::OffsetTracker;
pub use routing::{Backend, Routes};
pub use sluice_common::cache::ResponseCache;
pub use status::StatusPublisher;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use consumer::WorkerConsumer;
use rdkafka::consumer::Consumer;
use rdkafka::producer::{FutureProducer, Producer};
use sluice_common::kafka::RebalanceContext;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A built worker: subscribed, health endpoint bound, not yet consuming.
pub struct Application {
    listener: TcpListener,
    consumer: Arc<WorkerConsumer>,
    context: JobContext,
    settings: LoopSettings,
    give_up: CancellationToken,
    requests_topic: String,
    /// What the control-topic follower needs.
    control: (sluice_common::kafka::KafkaArgs, String),
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        config.topics.ensure(&config.kafka).await?;
        let worker_id = config.worker_id();
        let producer: FutureProducer = config
            .kafka
            .producer_config(&worker_id)
            .create()
            .context("creating the Kafka producer")?;
        let consumer: WorkerConsumer = config
            .kafka
            .consumer_config(&worker_id, &config.group_id)
            .create_with_context(RebalanceContext::default())
            .context("creating the Kafka consumer")?;
        consumer
            .subscribe(&[&config.topics.requests])
            .with_context(|| format!("subscribing to {}", config.topics.requests))?;

        let give_up = CancellationToken::new();
        let context = JobContext {
            routes: config.routes().await?,
            publisher: StatusPublisher::new(
                producer,
                config.topics.status.clone(),
                config.topics.requests_dlq.clone(),
                give_up.clone(),
            ),
            worker_id,
            retry: config.retry_policy(),
            cancellations: Cancellations::default(),
            cache: Arc::new(config.response_cache().await?),
            coalescer: coalesce::Coalescer::default(),
        };
        let listener = TcpListener::bind(&config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let settings = LoopSettings {
            max_in_flight: config.max_in_flight,
            per_user_in_flight: config.per_user_in_flight,
            read_ahead: config.read_ahead,
            read_ahead_bytes: config.read_ahead_bytes,
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
        };
        Ok(Self {
            listener,
            consumer: Arc::new(consumer),
            context,
            settings,
            give_up,
            requests_topic: config.topics.requests.clone(),
            control: (config.kafka.clone(), config.topics.control.clone()),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Consumes until `shutdown`, drains, commits, leaves the group.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let health = HealthState {
            consumer: self.consumer.clone(),
            topic: self.requests_topic.clone(),
        };
        let http_stop = CancellationToken::new();
        let router = Router::new()
            .route("/healthz", get(sluice_common::http::healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(sluice_common::metrics::render))
            .layer(axum::middleware::from_fn(
                sluice_common::metrics::track_http,
            ))
            .with_state(health);
        let server = tokio::spawn(
            axum::serve(sluice_common::http::no_delay(self.listener), router)
                .with_graceful_shutdown(http_stop.clone().cancelled_owned())
                .into_future(),
        );

        let (kafka, control_topic) = self.control;
        let control = tokio::spawn(cancel::follow(
            kafka,
            control_topic,
            self.context.worker_id.clone(),
            self.context.cancellations.clone(),
            http_stop.clone(),
        ));
        let producer = self.context.publisher.producer().clone();
        let result = consumer::consume(
            self.consumer.clone(),
            self.context,
            self.settings,
            shutdown.clone(),
            self.give_up,
        )
        .await;
        if result.is_err() {
            shutdown.cancel();
        }
        http_stop.cancel();
        control.await?;
        let consumer = self.consumer;
        // Why in a blocking task: flushing and closing the consumer (leaving the group) block.
        tokio::task::spawn_blocking(move || {
            if let Err(error) = producer.flush(Duration::from_secs(10)) {
                tracing::warn!(error = %error, "producer flush failed");
            }
            consumer.unsubscribe();
            drop(consumer);
        })
        .await?;
        server.await?.context("serving health endpoints")?;
        result
    }
}

#[derive(Clone)]
struct HealthState {
    consumer: Arc<WorkerConsumer>,
    topic: String,
}

async fn readyz(State(health): State<HealthState>) -> Response {
    let mut problems = Vec::new();
    if !health.consumer.context().state.is_joined() {
        problems.push("consumer has not joined its group yet".to_owned());
    }
    let consumer = health.consumer.clone();
    let topic = health.topic.clone();
    let broker = tokio::task::spawn_blocking(move || {
        consumer.fetch_metadata(Some(&topic), Duration::from_secs(2))
    })
    .await;
    match broker {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => problems.push(format!("broker unreachable: {error}")),
        Err(error) => problems.push(format!("metadata check failed: {error}")),
    }
    sluice_common::http::readiness(problems)
}
