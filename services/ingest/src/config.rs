//! Ingest settings, read from flags or the environment; every default works on a laptop.

use sluice_common::kafka::{KafkaArgs, TopicArgs};

/// Largest body accepted; Kafka's default `message.max.bytes` is 1,000,012, and the event adds
/// its own fields around the body, so the limit stays well below it.
const MAX_BODY_LIMIT: usize = 900_000;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-ingest",
    about = "Accepts jobs over HTTP and publishes them to Kafka"
)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "SLUICE_INGEST_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,

    /// Origins whose pages may call this API from a browser, comma separated, each
    /// `scheme://host[:port]` (`*`: any). Unset: no CORS headers, same-origin pages only.
    #[arg(long = "cors-origins", env = "SLUICE_CORS_ORIGINS", value_delimiter = ',', value_parser = sluice_common::http::parse_origin)]
    pub cors_origins: Vec<String>,

    /// The models the OpenAI routes accept and `GET /v1/models` lists, comma separated.
    /// Unset: any model name is accepted (the workers' routes decide) and the list is empty.
    #[arg(
        long = "openai-models",
        env = "SLUICE_OPENAI_MODELS",
        value_delimiter = ','
    )]
    pub openai_models: Vec<String>,

    #[command(flatten)]
    pub connections: sluice_common::http::ConnectionArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub topics: TopicArgs,

    #[command(flatten)]
    pub stream_tokens: sluice_common::tokens::StreamTokenArgs,

    #[command(flatten)]
    pub capacity: crate::admission::capacity::CapacityArgs,

    /// Accept `http://` webhook URLs, not only `https://`.
    #[arg(long, env = "SLUICE_WEBHOOK_ALLOW_HTTP", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_http: bool,

    /// Accept webhook URLs whose host is a loopback, private or link-local address. For
    /// development and tests only (`scripts/run` sets it); the webhooks service has its own.
    #[arg(long, env = "SLUICE_WEBHOOK_ALLOW_PRIVATE_NETWORKS", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_private_networks: bool,

    /// Longest a client may take to send a request body once its head has arrived; slower ones
    /// get `408 request_body_timeout`.
    #[arg(long = "body-timeout-ms", env = "SLUICE_BODY_TIMEOUT_MS", default_value = "30000", value_parser = sluice_common::settings::millis)]
    pub body_timeout: std::time::Duration,

    /// Longest `POST /v1/jobs` may take to answer (admission and the broker's acknowledgement);
    /// past it `503 request_timeout`. The OpenAI routes wait for their job's deadline instead.
    #[arg(long = "request-timeout-ms", env = "SLUICE_REQUEST_TIMEOUT_MS", default_value = "30000", value_parser = sluice_common::settings::millis)]
    pub request_timeout: std::time::Duration,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Deadline given to a job that names no `timeout_ms`.
    #[arg(long = "default-timeout-ms", env = "SLUICE_DEFAULT_TIMEOUT_MS", default_value = "60000", value_parser = sluice_common::settings::millis)]
    pub default_timeout: std::time::Duration,

    /// Longest deadline a job may ask for; larger `timeout_ms` values are capped to it.
    #[arg(long = "max-timeout-ms", env = "SLUICE_MAX_TIMEOUT_MS", default_value = "600000", value_parser = sluice_common::settings::millis)]
    pub max_timeout: std::time::Duration,

    /// Longest a submission waits for the broker's acknowledgement before answering 503.
    #[arg(long = "publish-timeout-ms", env = "SLUICE_PUBLISH_TIMEOUT_MS", default_value = "5000", value_parser = sluice_common::settings::millis)]
    pub publish_timeout: std::time::Duration,

    /// After a stop signal, how long open requests get to finish, in ms.
    #[arg(long = "drain-timeout-ms", env = "SLUICE_DRAIN_TIMEOUT_MS", default_value = "10000", value_parser = sluice_common::settings::millis)]
    pub drain_timeout: std::time::Duration,

    /// `api-keys`: every request needs `Authorization: Bearer <key>`, and the key says who the
    /// user is and its tier. `off`: the body's `user_id` is trusted (local development only).
    #[arg(long, env = "SLUICE_AUTH", value_enum, default_value = "api-keys")]
    pub auth: sluice_common::auth::AuthMode,

    /// Postgres holding the API keys (with `SLUICE_AUTH=api-keys`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://sluice:sluice@127.0.0.1:5432/sluice"
    )]
    pub database_url: secrecy::SecretString,

    /// How long a key look-up is cached; a revoked key stops working within this time.
    #[arg(long = "key-cache-secs", env = "SLUICE_KEY_CACHE_SECS", default_value = "30", value_parser = sluice_common::settings::secs)]
    pub key_cache_ttl: std::time::Duration,

    /// Tiers (`SLUICE_TIERS`: per-user limits on requests and tokens) and the default cap on
    /// an answer's tokens in estimates (`SLUICE_DEFAULT_MAX_TOKENS`).
    #[command(flatten)]
    pub tiers: sluice_common::tiers::TierArgs,

    /// The in-process embedding model's directory, as the workers have it: with it, an
    /// embedding job for `all-minilm-l6-v2` is counted with the model's own tokenizer (what it
    /// will report) rather than estimated.
    #[arg(long, env = "SLUICE_EMBEDDING_MODEL_DIR")]
    pub embedding_model_dir: Option<std::path::PathBuf>,

    /// Model prices (`SLUICE_MODEL_PRICES`), which price a job's estimate against its tier's
    /// budgets.
    #[command(flatten)]
    pub prices: sluice_common::prices::PriceArgs,

    /// Sustained submissions per second over all users together.
    #[arg(long, env = "SLUICE_GLOBAL_RATE_PER_SEC", default_value_t = 1000.0)]
    pub global_rate_per_sec: f64,

    /// Submissions all users together may make at once before the global rate applies.
    #[arg(long, env = "SLUICE_GLOBAL_BURST", default_value_t = 2000)]
    pub global_burst: u32,

    /// Redis for limits and idempotency keys shared by every ingest replica; in process if unset.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<secrecy::SecretString>,

    /// Prefix of every Redis key Sluice writes.
    #[arg(long, env = "SLUICE_REDIS_PREFIX", default_value = "sluice:")]
    pub redis_prefix: String,

    /// When Redis cannot be reached: `open` admits (logged and counted), `closed` answers 503.
    #[arg(
        long,
        env = "SLUICE_REDIS_FAILURE_MODE",
        value_enum,
        default_value = "open"
    )]
    pub redis_failure_mode: crate::admission::limiter::FailureMode,

    /// With `REDIS_URL`, answer a request found in the shared response cache at submit time;
    /// 0 turns that off. (The workers keep the answers; this only reads them.)
    #[arg(long = "cache-ttl-secs", env = "SLUICE_CACHE_TTL_SECS", default_value = "300", value_parser = sluice_common::settings::secs)]
    pub cache_ttl: std::time::Duration,

    /// Submissions being handled at once, at most; beyond it ingest answers 503 `overloaded`.
    #[arg(
        long,
        env = "SLUICE_MAX_CONCURRENT_SUBMISSIONS",
        default_value_t = 1024
    )]
    pub max_concurrent_submissions: usize,

    /// How long an `Idempotency-Key` is remembered.
    #[arg(long = "idempotency-ttl-secs", env = "SLUICE_IDEMPOTENCY_TTL_SECS", default_value = "86400", value_parser = sluice_common::settings::secs)]
    pub idempotency_ttl: std::time::Duration,

    /// Public base URL of the results service, for the `Location` header and the links in a 202.
    #[arg(
        long,
        env = "SLUICE_RESULTS_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub results_url: String,

    /// Where the OpenAI routes reach the results service to wait for a job (and cancel it);
    /// unset: `SLUICE_RESULTS_URL`. Set it when that is a public URL and the services have a
    /// shorter way between them.
    #[arg(long, env = "SLUICE_RESULTS_INTERNAL_URL")]
    pub results_internal_url: Option<String>,
}

impl Config {
    /// The defaults, as the binary would read them with nothing set.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["sluice-ingest"])
    }

    /// Rejects settings that cannot work, before anything is bound or connected.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=MAX_BODY_LIMIT).contains(&self.max_body_bytes),
            "SLUICE_MAX_BODY_BYTES must be 1 to {MAX_BODY_LIMIT} (below the broker's message size limit)"
        );
        anyhow::ensure!(
            !self.default_timeout.is_zero(),
            "SLUICE_DEFAULT_TIMEOUT_MS must be above 0"
        );
        anyhow::ensure!(
            self.default_timeout <= self.max_timeout,
            "SLUICE_DEFAULT_TIMEOUT_MS must not exceed SLUICE_MAX_TIMEOUT_MS"
        );
        anyhow::ensure!(
            !self.publish_timeout.is_zero(),
            "SLUICE_PUBLISH_TIMEOUT_MS must be above 0"
        );
        self.capacity.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_bad_tiers_setting_stops_the_parse_naming_it() {
        let error = Config::try_parse_from([
            "sluice-ingest",
            "--tiers",
            r#"{"gold": {"rate_per_sec": 1, "burst": 1}}"#,
        ])
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("--tiers") && error.contains("default"),
            "{error}"
        );
        let error = Config::try_parse_from(["sluice-ingest", "--cors-origins", "app.example"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("not an origin"), "{error}");
    }
}
