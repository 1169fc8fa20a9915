//! Worker settings, read from flags or the environment; every default works on a laptop.

use crate::routing::{ConcurrencySettings, ModelsFile, Routes, RoutingSettings, parse_models};
use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sluice_common::kafka::{KafkaArgs, TopicArgs};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-worker",
    about = "Consumes request events, calls the model, publishes status events"
)]
pub struct Config {
    /// Address of the health endpoints (`/healthz`, `/readyz`).
    #[arg(long, env = "SLUICE_WORKER_ADDR", default_value = "127.0.0.1:8082")]
    pub addr: String,

    #[command(flatten)]
    pub connections: sluice_common::http::ConnectionArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub topics: TopicArgs,

    /// Consumer group shared by all workers.
    #[arg(long, env = "SLUICE_WORKER_GROUP", default_value = "sluice-workers")]
    pub group_id: String,

    /// Most jobs this worker runs at once; when all are busy its partitions are paused.
    #[arg(long, env = "SLUICE_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,

    /// Most jobs of one user running at once, so one user cannot take the whole window.
    #[arg(long, env = "SLUICE_PER_USER_IN_FLIGHT", default_value_t = 8)]
    pub per_user_in_flight: usize,

    /// Tokens a user's turn in the fair queue adds to its deficit (times its tier's weight):
    /// smaller interleaves users more finely, larger lets a user start more jobs in a row.
    #[arg(long, env = "SLUICE_FAIR_QUANTUM_TOKENS", default_value_t = 1024)]
    pub fair_quantum_tokens: u64,

    /// The tiers (`SLUICE_TIERS`: their `weight` is a user's share here) and the default cap on
    /// an answer's tokens in estimates (`SLUICE_DEFAULT_MAX_TOKENS`), as ingest reads them.
    #[command(flatten)]
    pub tiers: sluice_common::tiers::TierArgs,

    /// The batch lane's share of the jobs started while both lanes have work (0 to 0.5).
    #[arg(long, env = "SLUICE_BATCH_SHARE", default_value_t = 0.1)]
    pub batch_share: f64,

    /// Aging: each time this passes for the oldest waiting batch job, the batch lane's share
    /// grows by `SLUICE_BATCH_SHARE` again, up to half.
    #[arg(long = "batch-aging-secs", env = "SLUICE_BATCH_AGING_SECS", default_value = "60", value_parser = sluice_common::settings::secs)]
    pub batch_aging: std::time::Duration,

    /// The share of the in-flight window batch jobs may not fill (0 to 0.5): kept for
    /// interactive jobs, which then start at once behind a batch backlog.
    #[arg(long, env = "SLUICE_INTERACTIVE_RESERVE", default_value_t = 0.1)]
    pub interactive_reserve: f64,

    /// Records read ahead of the window, so users queued behind a burst are seen; past it
    /// (or past `SLUICE_READ_AHEAD_BYTES`) the partitions are paused.
    #[arg(long, env = "SLUICE_READ_AHEAD", default_value_t = 4096)]
    pub read_ahead: usize,

    /// Bytes of records read ahead of the window, at most.
    #[arg(long, env = "SLUICE_READ_AHEAD_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub read_ahead_bytes: usize,

    /// Base URL of the OpenAI-compatible backend; `/v1/chat/completions` is appended.
    #[arg(long, env = "MODEL_BASE_URL", default_value = "http://127.0.0.1:8090")]
    pub model_base_url: String,

    /// Bearer token for the backend, if it wants one.
    #[arg(long, env = "MODEL_API_KEY")]
    pub model_api_key: Option<SecretString>,

    /// Longest one attempt at a model call may take, whatever the job's deadline.
    #[arg(long = "model-timeout-ms", env = "MODEL_TIMEOUT_MS", default_value = "120000", value_parser = sluice_common::settings::millis)]
    pub model_timeout: std::time::Duration,

    /// Attempts per model in the chain for retryable failures (unreachable, timeout, 408, 429, 5xx).
    #[arg(long, env = "MODEL_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,

    /// First retry delay; it doubles per attempt, with jitter, up to `MODEL_RETRY_MAX_MS`.
    #[arg(long = "retry-base-ms", env = "MODEL_RETRY_BASE_MS", default_value = "200", value_parser = sluice_common::settings::millis)]
    pub retry_base: std::time::Duration,

    /// Longest delay between attempts, including one asked for by `Retry-After`.
    #[arg(long = "retry-max-ms", env = "MODEL_RETRY_MAX_MS", default_value = "10000", value_parser = sluice_common::settings::millis)]
    pub retry_max: std::time::Duration,

    /// Backend failures in a row that open its circuit.
    #[arg(long, env = "MODEL_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,

    /// How long an open circuit fails fast before letting one probe through.
    #[arg(long = "breaker-cooldown-ms", env = "MODEL_BREAKER_COOLDOWN_MS", default_value = "10000", value_parser = sluice_common::settings::millis)]
    pub breaker_cooldown: std::time::Duration,

    /// Learn each backend's capacity (a Vegas-style limit on calls in flight toward it); off,
    /// the limit is `MODEL_CONCURRENCY_MAX`.
    #[arg(long, env = "MODEL_ADAPTIVE_CONCURRENCY", default_value_t = true, action = clap::ArgAction::Set)]
    pub adaptive_concurrency: bool,

    /// Starting limit on calls in flight toward each backend.
    #[arg(long, env = "MODEL_CONCURRENCY_INITIAL", default_value_t = 8)]
    pub concurrency_initial: usize,

    /// Lowest limit on calls in flight toward each backend.
    #[arg(long, env = "MODEL_CONCURRENCY_MIN", default_value_t = 1)]
    pub concurrency_min: usize,

    /// Highest limit on calls in flight toward each backend.
    #[arg(long, env = "MODEL_CONCURRENCY_MAX", default_value_t = 256)]
    pub concurrency_max: usize,

    /// Backends, routes, fallback chains and static fallbacks: JSON, or `@path` to a JSON file.
    /// Parsed (and the file read) when the settings are, so a mistake stops the worker first.
    #[arg(long, env = "SLUICE_MODELS", default_value = "", value_parser = parse_models)]
    pub models: ModelsFile,

    /// Longest a connection to the backend may take to open.
    #[arg(long = "model-connect-timeout-ms", env = "MODEL_CONNECT_TIMEOUT_MS", default_value = "2000", value_parser = sluice_common::settings::millis)]
    pub model_connect_timeout: std::time::Duration,

    /// How long a `succeeded` answer is kept in the response cache; 0 turns the cache off.
    #[arg(long = "cache-ttl-secs", env = "SLUICE_CACHE_TTL_SECS", default_value = "300", value_parser = sluice_common::settings::secs)]
    pub cache_ttl: std::time::Duration,

    /// Answers kept in the in-process cache, at most (without Redis).
    #[arg(long, env = "SLUICE_CACHE_MAX_ENTRIES", default_value_t = 10_000)]
    pub cache_max_entries: usize,

    /// Redis for a response cache shared by every worker and ingest; in process if unset.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<SecretString>,

    /// Prefix of every Redis key Sluice writes.
    #[arg(long, env = "SLUICE_REDIS_PREFIX", default_value = "sluice:")]
    pub redis_prefix: String,

    /// How this worker names itself in status events; default host name and process id.
    #[arg(long, env = "SLUICE_WORKER_ID")]
    pub worker_id: Option<String>,

    /// On SIGTERM, how long running jobs get to finish before the worker leaves anyway.
    #[arg(long = "drain-timeout-ms", env = "SLUICE_DRAIN_TIMEOUT_MS", default_value = "30000", value_parser = sluice_common::settings::millis)]
    pub drain_timeout: std::time::Duration,

    /// A streamed answer's pieces are published at most once per this many ms per job (the
    /// first at once), so a fast model does not flood the broker with one event per token.
    #[arg(long = "delta-flush-ms", env = "SLUICE_DELTA_FLUSH_MS", default_value = "50", value_parser = sluice_common::settings::millis)]
    pub delta_flush: std::time::Duration,

    /// How long an attempt runs before its `running` status is published. An attempt answered
    /// sooner goes from `queued` straight to its terminal status, whose record carries
    /// `started_at` all the same: for short jobs (embeddings, a fast model) that is one status
    /// event fewer per job for the broker, the results service and every stream. 0 publishes
    /// `running` as each attempt starts. Streamed jobs publish it at once whatever this says:
    /// their answer's pieces follow it.
    #[arg(long = "running-after-ms", env = "SLUICE_RUNNING_AFTER_MS", default_value = "0", value_parser = sluice_common::settings::millis)]
    pub running_after: std::time::Duration,

    /// The in-process embedding model, `all-minilm-l6-v2`: a directory holding its
    /// `config.json`, `model.safetensors` and `tokenizer.json`. Unset: no in-process model.
    #[arg(long, env = "SLUICE_EMBEDDING_MODEL_DIR")]
    pub embedding_model_dir: Option<std::path::PathBuf>,

    /// Threads of the embedding model's own pool (never the async runtime's).
    #[arg(long, env = "SLUICE_EMBEDDING_THREADS", default_value_t = 2)]
    pub embedding_threads: usize,

    /// Most texts in one forward pass; 1 turns batching across jobs off.
    #[arg(long, env = "SLUICE_EMBEDDING_MAX_BATCH", default_value_t = 8)]
    pub embedding_max_batch: usize,

    /// Longest the first job of a batch waits for others to join it.
    #[arg(long = "embedding-max-wait-ms", env = "SLUICE_EMBEDDING_MAX_WAIT_MS", default_value = "5", value_parser = sluice_common::settings::millis)]
    pub embedding_max_wait: std::time::Duration,
}

impl Config {
    /// The defaults, as the binary would read them with nothing set.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["sluice-worker"])
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_in_flight > 0,
            "SLUICE_MAX_IN_FLIGHT must be above 0"
        );
        anyhow::ensure!(
            !self.model_timeout.is_zero(),
            "MODEL_TIMEOUT_MS must be above 0"
        );
        anyhow::ensure!(
            self.batch_share > 0.0 && self.batch_share <= 0.5,
            "SLUICE_BATCH_SHARE must be above 0 and at most 0.5 (batch work must not starve, nor \
             take more than half while interactive work waits)"
        );
        anyhow::ensure!(
            !self.batch_aging.is_zero(),
            "SLUICE_BATCH_AGING_SECS must be above 0"
        );
        reqwest::Url::parse(&self.model_base_url).map_err(|error| {
            anyhow::anyhow!(
                "MODEL_BASE_URL {:?} is not a URL: {error}",
                self.model_base_url
            )
        })?;
        Ok(())
    }

    pub fn retry_policy(&self) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy {
            max_attempts: self.max_attempts,
            base_delay: self.retry_base,
            max_delay: self.retry_max,
            attempt_timeout: self.model_timeout,
        }
    }

    /// What the routes are built from.
    pub fn routing(&self) -> RoutingSettings {
        RoutingSettings {
            models: self.models.clone(),
            default_base_url: self.model_base_url.clone(),
            default_api_key: self.model_api_key.clone(),
            connect_timeout: self.model_connect_timeout,
            breaker_threshold: self.breaker_threshold,
            breaker_cooldown: self.breaker_cooldown,
            concurrency: ConcurrencySettings {
                initial: self.concurrency_initial,
                min: self.concurrency_min,
                max: self.concurrency_max,
                adaptive: self.adaptive_concurrency,
            },
        }
    }

    /// The routes, with the in-process embedding model loaded if one is configured: a missing
    /// or corrupt model file is an error naming it, before the worker joins its group.
    pub async fn routes(&self) -> anyhow::Result<Routes> {
        let routes = Routes::from_settings(&self.routing())?;
        let Some(dir) = &self.embedding_model_dir else {
            anyhow::ensure!(
                !routes.uses_local(),
                "SLUICE_MODELS routes a model to `local`, but SLUICE_EMBEDDING_MODEL_DIR is not set"
            );
            return Ok(routes);
        };
        let embedder = crate::embed::Embedder::load(crate::embed::EmbedderSettings {
            model_dir: dir.clone(),
            threads: self.embedding_threads,
            max_batch: self.embedding_max_batch,
            max_wait: self.embedding_max_wait,
        })
        .await
        .context("loading the in-process embedding model (SLUICE_EMBEDDING_MODEL_DIR)")?;
        Ok(routes.with_local_embedder(embedder))
    }

    /// The response cache these settings describe (connects to Redis if `REDIS_URL` is set).
    pub async fn response_cache(&self) -> anyhow::Result<sluice_common::cache::ResponseCache> {
        sluice_common::cache::ResponseCache::new(
            self.cache_ttl,
            self.cache_max_entries,
            self.redis_url.as_ref().map(ExposeSecret::expose_secret),
            &self.redis_prefix,
        )
        .await
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "worker".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn bad_values_stop_the_parse_naming_the_setting() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("sluice-worker").chain(args.iter().copied()))
        };
        let error = parse(&["--models", "{not json"]).unwrap_err().to_string();
        assert!(error.contains("--models"), "{error}");
        let error = parse(&["--models", "@/nowhere/models.json"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nowhere/models.json"), "{error}");
        let error = parse(&["--drain-timeout-ms", "soon"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--drain-timeout-ms"), "{error}");
        let parsed = parse(&["--model-timeout-ms", "1500"]).unwrap();
        assert_eq!(parsed.model_timeout, std::time::Duration::from_millis(1500));
    }
}
