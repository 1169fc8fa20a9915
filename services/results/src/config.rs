//! Results settings, read from flags or the environment; every default works on a laptop.

use secrecy::SecretString;
use sluice_common::kafka::{KafkaArgs, TopicArgs};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-results",
    about = "Stores job state in Postgres and serves it over HTTP and SSE"
)]
pub struct Config {
    /// Model prices (`SLUICE_MODEL_PRICES`), for the cost of the usage recorded.
    #[command(flatten)]
    pub prices: sluice_common::prices::PriceArgs,

    /// Address the HTTP API listens on.
    #[arg(long, env = "SLUICE_RESULTS_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: String,

    /// Origins whose pages may call this API from a browser, comma separated, each
    /// `scheme://host[:port]` (`*`: any). Unset: no CORS headers, same-origin pages only.
    #[arg(long = "cors-origins", env = "SLUICE_CORS_ORIGINS", value_delimiter = ',', value_parser = sluice_common::http::parse_origin)]
    pub cors_origins: Vec<String>,

    /// Ingest's URL as a browser reaches it, for the console page (which submits there; ingest
    /// must allow this service's origin in its `SLUICE_CORS_ORIGINS`).
    #[arg(
        long,
        env = "SLUICE_INGEST_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub ingest_url: String,

    /// This service's URL as clients reach it: the base of the `events_url` a job's owner gets
    /// from `GET /v1/jobs/{id}`.
    #[arg(
        long,
        env = "SLUICE_RESULTS_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub results_url: String,

    /// The key users' webhook signing secrets are sealed with (32 bytes, base64), as the
    /// webhooks service has it. Unset: the secret routes answer `501 webhooks_off`.
    #[arg(long, env = "SLUICE_WEBHOOK_SECRET_KEY", hide_env_values = true)]
    pub webhook_secret_key: Option<SecretString>,

    /// Postgres connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://sluice:sluice@127.0.0.1:5432/sluice"
    )]
    pub database_url: SecretString,

    /// `api-keys`: reading or cancelling a job needs `Authorization: Bearer <key>`, and a user
    /// sees only their own jobs. `off`: anyone reads any job (local development only).
    #[arg(long, env = "SLUICE_AUTH", value_enum, default_value = "api-keys")]
    pub auth: sluice_common::auth::AuthMode,

    /// How long a key look-up is cached; a revoked key stops working within this time.
    #[arg(long = "key-cache-secs", env = "SLUICE_KEY_CACHE_SECS", default_value = "30", value_parser = sluice_common::settings::secs)]
    pub key_cache_ttl: std::time::Duration,

    /// Most Postgres connections this service opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// Apply the migrations in `migrations/` at start-up.
    #[arg(long, env = "SLUICE_RUN_MIGRATIONS", default_value_t = true, action = clap::ArgAction::Set)]
    pub run_migrations: bool,

    #[command(flatten)]
    pub connections: sluice_common::http::ConnectionArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub topics: TopicArgs,

    #[command(flatten)]
    pub stream_tokens: sluice_common::tokens::StreamTokenArgs,

    /// Consumer group shared by all results replicas.
    #[arg(long, env = "SLUICE_RESULTS_GROUP", default_value = "sluice-results")]
    pub group_id: String,

    /// Most events written to Postgres in one transaction.
    #[arg(long, env = "SLUICE_RESULTS_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,

    /// Interval of SSE keep-alive comments, in seconds.
    #[arg(long = "sse-keepalive-secs", env = "SLUICE_SSE_KEEPALIVE_SECS", default_value = "15", value_parser = sluice_common::settings::secs)]
    pub sse_keepalive: std::time::Duration,

    /// How often the jobs that open SSE streams watch are looked up even without a notification
    /// (one query for all of them), in ms; also how soon a stream whose read failed reads again.
    #[arg(long = "sse-recheck-ms", env = "SLUICE_SSE_RECHECK_MS", default_value = "2000", value_parser = sluice_common::settings::millis)]
    pub sse_recheck: std::time::Duration,

    /// How long a streamed answer's pieces are kept in memory after the last one, for readers
    /// that resume mid-answer, in seconds. Past it, a resumed reader gets the rest of the answer
    /// with the terminal status.
    #[arg(long = "deltas-keep-secs", env = "SLUICE_DELTAS_KEEP_SECS", default_value = "600", value_parser = sluice_common::settings::secs)]
    pub deltas_keep: std::time::Duration,

    /// Most streamed answers kept in memory at once (each at most 1 MiB); the least recently
    /// grown go first.
    #[arg(
        long = "deltas-max-jobs",
        env = "SLUICE_DELTAS_MAX_JOBS",
        default_value_t = 10_000
    )]
    pub deltas_max_jobs: u64,

    #[command(flatten)]
    pub streams: crate::streams::StreamLimitArgs,

    /// Longest a request may take until its answer starts (an SSE stream's head included); past
    /// it `503 request_timeout`.
    #[arg(long = "request-timeout-ms", env = "SLUICE_REQUEST_TIMEOUT_MS", default_value = "30000", value_parser = sluice_common::settings::millis)]
    pub request_timeout: std::time::Duration,

    /// After a stop signal, how long the batch being written and open requests get before the
    /// service leaves anyway (what is not stored by then is redelivered), in ms.
    #[arg(long = "drain-timeout-ms", env = "SLUICE_DRAIN_TIMEOUT_MS", default_value = "10000", value_parser = sluice_common::settings::millis)]
    pub drain_timeout: std::time::Duration,
}

impl Config {
    /// The defaults, as the binary would read them with nothing set.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["sluice-results"])
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_batch > 0,
            "SLUICE_RESULTS_MAX_BATCH must be above 0"
        );
        anyhow::ensure!(
            self.database_max_connections >= 4,
            "DATABASE_MAX_CONNECTIONS must be at least 4 (the writer, the streams' reads and \
             the change listener each keep one; requests need the rest)"
        );
        anyhow::ensure!(
            !self.sse_keepalive.is_zero(),
            "SLUICE_SSE_KEEPALIVE_SECS must be above 0"
        );
        Ok(())
    }
}
