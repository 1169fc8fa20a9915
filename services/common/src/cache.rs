//! The exact-match response cache: a `succeeded` answer, keyed by the user (the tenant scope),
//! the model, the messages and the parameters, kept for a TTL. In process (per worker), or in
//! Redis so that every worker and ingest share it.

use redis::aio::ConnectionManager;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_schemas::{Output, RequestEvent, Task};
use std::time::Duration;

/// The cache key of a request: a SHA-256 over a canonical JSON form (object keys sorted), so
/// the same request always hashes the same however its producer ordered the fields.
pub fn cache_key(request: &RequestEvent) -> String {
    let value = serde_json::json!({
        "scope": request.user_id.as_str(),
        "model": request.model.as_str(),
        "messages": request.messages(),
        "input": match &request.task {
            Task::Embedding(input) => Some(input),
            Task::Chat(_) => None,
        },
        "params": request.params,
    });
    format!(
        "{:x}",
        Sha256::digest(canonical(&value).to_string().as_bytes())
    )
}

fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|key| (key.clone(), canonical(&map[key])))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

pub enum ResponseCache {
    Off,
    /// Bounded by entries, each kept for the TTL; concurrent, no lock across all requests.
    Local(moka::sync::Cache<String, Output>),
    Redis {
        connection: ConnectionManager,
        prefix: String,
        ttl: Duration,
    },
}

impl ResponseCache {
    /// Off when `ttl` is zero; Redis when `redis_url` is set; else in process.
    pub async fn new(
        ttl: Duration,
        capacity: usize,
        redis_url: Option<&str>,
        prefix: &str,
    ) -> anyhow::Result<Self> {
        if ttl.is_zero() {
            return Ok(Self::Off);
        }
        Ok(match redis_url {
            Some(url) => Self::Redis {
                connection: ConnectionManager::new(redis::Client::open(url)?).await?,
                prefix: prefix.to_owned(),
                ttl,
            },
            None => Self::Local(
                moka::sync::Cache::builder()
                    .max_capacity(capacity as u64)
                    .time_to_live(ttl)
                    .build(),
            ),
        })
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Redis { .. })
    }

    /// A cached answer, marked `cached`; a store failure is logged and is a miss.
    pub async fn get(&self, key: &str) -> Option<Output> {
        if matches!(self, Self::Off) {
            return None;
        }
        let found = self.lookup(key).await;
        let result = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("sluice_cache_lookups_total", "result" => result).increment(1);
        found
    }

    async fn lookup(&self, key: &str) -> Option<Output> {
        let mut output = match self {
            Self::Off => return None,
            Self::Local(entries) => entries.get(key)?,
            Self::Redis {
                connection, prefix, ..
            } => {
                let mut connection = connection.clone();
                let text: Option<String> = redis::cmd("GET")
                    .arg(format!("{prefix}cache:{key}"))
                    .query_async(&mut connection)
                    .await
                    .inspect_err(
                        |error| tracing::warn!(error = %error, "response cache unreachable"),
                    )
                    .ok()?;
                serde_json::from_str(&text?).ok()?
            }
        };
        output.cached = true;
        Some(output)
    }

    /// Keeps a model's answer; degraded (static fallback) answers are never kept.
    pub async fn put(&self, key: &str, output: &Output) {
        if output.degraded || output.cached {
            return;
        }
        match self {
            Self::Off => {}
            Self::Local(entries) => entries.insert(key.to_owned(), output.clone()),
            Self::Redis {
                connection,
                prefix,
                ttl,
            } => {
                let mut connection = connection.clone();
                let text = serde_json::to_string(output).expect("an output serializes");
                let result: Result<(), _> = redis::cmd("SET")
                    .arg(format!("{prefix}cache:{key}"))
                    .arg(text)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query_async(&mut connection)
                    .await;
                if let Err(error) = result {
                    tracing::warn!(error = %error, "could not store a cached answer");
                }
            }
        }
    }
}
