//! Worker: a consumer group member that runs jobs from the requests topic against an
//! OpenAI-compatible backend with a bounded window, and publishes each job's status.

mod attempt;
mod breaker;
mod cancel;
mod coalesce;
mod config;
mod consumer;
mod context;
pub mod embed;
mod fair;
mod job;
mod lanes;
mod limit;
mod model;
mod retry;
mod routing;
mod status;
mod streaming;

pub use breaker::{CircuitBreaker, CircuitState};
pub use cancel::Cancellations;
pub use coalesce::Coalescer;
pub use config::Config;
pub use consumer::LoopSettings;
pub use job::{JobContext, Outcome, Record, run as run_job};
pub use limit::{AdaptiveLimit, Sample};
pub use model::{CallError, Failure, ModelClient};
pub use retry::RetryPolicy;
pub use routing::{Backend, ConcurrencySettings, ModelsFile, Routes, RoutingSettings};
pub use sluice_common::cache::ResponseCache;
pub use status::StatusPublisher;
pub use streaming::DeltaTopic;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use rdkafka::producer::FutureProducer;
use sluice_common::http::Document;
use sluice_common::kafka::{KafkaArgs, KafkaSource, SourceHealth};
use sluice_common::lifecycle::Lifecycle;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A built worker: subscribed, health endpoint bound, not yet consuming.
pub struct Application {
    listener: TcpListener,
    connections: sluice_common::http::ConnectionArgs,
    source: KafkaSource,
    context: JobContext,
    settings: LoopSettings,
    lifecycle: Lifecycle,
    kafka: KafkaArgs,
    control_topic: String,
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
        let source = KafkaSource::subscribe(
            &config.kafka,
            &worker_id,
            &config.group_id,
            &[&config.topics.requests, &config.topics.batch_requests],
        )?;
        let lifecycle = Lifecycle::new();
        let context =
            JobContext::from_config(&config, producer, lifecycle.give_up().clone()).await?;
        let listener = TcpListener::bind(&config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let settings = LoopSettings {
            max_in_flight: config.max_in_flight,
            per_user_in_flight: config.per_user_in_flight,
            fair_quantum_tokens: config.fair_quantum_tokens,
            tiers: config.tiers.by_name.clone(),
            default_max_tokens: config.tiers.default_max_tokens,
            batch_topic: config.topics.batch_requests.clone(),
            lanes: lanes::LaneSettings {
                batch_share: config.batch_share,
                aging: config.batch_aging,
                interactive_reserve: config.interactive_reserve,
            },
            read_ahead: config.read_ahead,
            read_ahead_bytes: config.read_ahead_bytes,
            drain_timeout: config.drain_timeout,
        };
        Ok(Self {
            listener,
            connections: config.connections,
            source,
            context,
            settings,
            lifecycle,
            kafka: config.kafka,
            control_topic: config.topics.control,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Consumes until `shutdown`, drains within the drain timeout, commits, leaves the group.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let lifecycle = self.lifecycle;
        let stop = lifecycle.stop().clone();
        let router =
            sluice_common::http::with_operations(Router::new(), get(readyz), Document::None)
                .with_state(self.source.health());
        lifecycle.spawn(
            "health endpoints",
            sluice_common::http::serve(self.listener, router, self.connections, stop.clone()),
        );
        lifecycle.spawn(
            "control topic follower",
            cancel::follow(
                self.kafka,
                self.control_topic,
                self.context.worker_id.clone(),
                self.context.cancellations.clone(),
                stop.clone(),
            ),
        );
        let producer = self.context.publisher.producer().clone();
        let give_up = lifecycle.give_up().clone();
        let drain_timeout = self.settings.drain_timeout;
        lifecycle.spawn("consumer", async move {
            consumer::consume(self.source, self.context, self.settings, stop, give_up).await?;
            sluice_common::kafka::flush(producer).await
        });
        lifecycle.run(shutdown, drain_timeout).await
    }
}

async fn readyz(State(health): State<SourceHealth>) -> Response {
    sluice_common::http::readiness(health.problems().await)
}
