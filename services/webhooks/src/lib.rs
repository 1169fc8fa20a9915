//! Webhooks: a consumer group over the status topic enqueues, in Postgres, every status change a
//! job's webhook asked for, before the record is acknowledged; a scheduler that every replica
//! runs delivers them signed (Standard Webhooks), retrying on a schedule for about a day.

mod config;
mod deliver;
pub mod enqueue;
mod signer;

pub use config::Config;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use secrecy::ExposeSecret;
use sluice_common::http::{Document, with_operations};
use sluice_common::kafka::{KafkaSource, SourceHealth};
use sluice_common::lifecycle::Lifecycle;
use sluice_common::webhooks::guard::GuardedResolver;
use sluice_common::webhooks::secrets::SealingKey;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Health {
    pool: PgPool,
    consumer: SourceHealth,
}

async fn readyz(State(health): State<Health>) -> Response {
    sluice_common::http::store_and_source_readiness(&health.pool, &health.consumer).await
}

/// A built webhooks service: connected, subscribed, bound, not yet running.
pub struct Application {
    listener: TcpListener,
    connections: sluice_common::http::ConnectionArgs,
    source: KafkaSource,
    pool: PgPool,
    scheduler: Arc<deliver::Scheduler>,
    lifecycle: Lifecycle,
    drain_timeout: Duration,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        let key = SealingKey::from_base64(&config.secret_key)?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(config.database_url.expose_secret())
            .await
            .context("connecting to Postgres (DATABASE_URL)")?;
        sluice_common::auth::wait_for_tables(
            &pool,
            &["webhook_deliveries", "webhook_secrets"],
            Duration::from_secs(60),
        )
        .await?;
        config.topics.ensure(&config.kafka).await?;
        let source = KafkaSource::subscribe(
            &config.kafka.gathering_fetches(config.fetch_wait),
            "sluice-webhooks",
            &config.group_id,
            &[&config.topics.status],
        )?;
        // Redirects are not followed (a receiver cannot send Sluice elsewhere); names resolve
        // through the private-network guard unless the deployment allows those networks.
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if !config.allow_private_networks {
            client = client.dns_resolver(Arc::new(GuardedResolver));
        } else {
            tracing::warn!(
                "SLUICE_WEBHOOK_ALLOW_PRIVATE_NETWORKS is on: webhooks may call this network's own addresses. Development and tests only."
            );
        }
        let scheduler = deliver::Scheduler::new(
            pool.clone(),
            signer::Signer::new(pool.clone(), key),
            client.build().context("building the webhook HTTP client")?,
            config.retry_delays(),
            config.timeout,
            config.poll,
            config.concurrency,
            config.per_host_concurrency,
            (config.breaker_threshold, config.breaker_cooldown),
            config.allow_private_networks,
        );
        let listener = TcpListener::bind(&config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        Ok(Self {
            listener,
            connections: config.connections,
            source,
            pool,
            scheduler: Arc::new(scheduler),
            lifecycle: Lifecycle::new(),
            drain_timeout: config.drain_timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Enqueues, delivers and serves health until `shutdown`; any part failing stops all.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let lifecycle = self.lifecycle;
        let stop = lifecycle.stop().clone();
        let health = Health {
            pool: self.pool.clone(),
            consumer: self.source.health(),
        };
        lifecycle.spawn(
            "status consumer",
            enqueue::run(
                self.source,
                self.pool.clone(),
                stop.clone(),
                lifecycle.give_up().clone(),
            ),
        );
        lifecycle.spawn(
            "delivery scheduler",
            self.scheduler.clone().run(stop.clone()),
        );
        let router = with_operations(Router::new(), get(readyz), Document::None).with_state(health);
        lifecycle.spawn(
            "HTTP server",
            sluice_common::http::serve(self.listener, router, self.connections, stop),
        );
        let result = lifecycle.run(shutdown, self.drain_timeout).await;
        self.pool.close().await;
        result
    }
}
