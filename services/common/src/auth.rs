//! API keys: `Authorization: Bearer sk-sluice-...`, each mapped to a user and a tier, stored as
//! a SHA-256 in Postgres, looked up through a short cache so a revoked key stops working within
//! the cache time.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether callers must present an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    ApiKeys,
    Off,
}

/// Connects, migrates and builds the key store, or `None` when keys are off.
pub async fn key_store(
    mode: AuthMode,
    database_url: &str,
    cache: Duration,
) -> anyhow::Result<Option<KeyStore>> {
    if mode == AuthMode::Off {
        tracing::warn!(
            "API KEYS ARE OFF: anyone can submit as any user and read any job. Local development only."
        );
        return Ok(None);
    }
    let pool = connect(database_url, "API keys").await?;
    Ok(Some(KeyStore::new(pool, cache)))
}

/// A small pool to the Postgres the results service keeps its schema in, once that schema is
/// there: for `what` (API keys, spend budgets) in a service that does not own the schema.
pub async fn connect(database_url: &str, what: &str) -> anyhow::Result<PgPool> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(database_url)
        .await
        .map_err(|error| {
            anyhow::anyhow!("connecting to Postgres for {what} (DATABASE_URL): {error}")
        })?;
    wait_for_schema(&pool, SCHEMA_WAIT).await?;
    Ok(pool)
}

/// Who is calling, as their key says.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub key_id: String,
    pub user_id: String,
    pub tier: String,
    /// The key's own spend budgets, besides its tier's.
    pub budget: KeyBudget,
}

/// A key's spend budgets per UTC day and month, in the currency of the model prices.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeyBudget {
    pub per_day: Option<f64>,
    pub per_month: Option<f64>,
}

impl KeyBudget {
    pub fn is_some(&self) -> bool {
        self.per_day.is_some() || self.per_month.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("an API key is required: send `Authorization: Bearer <key>`")]
    Missing,
    #[error("the API key is not valid or was revoked")]
    Invalid,
    #[error("internal error")]
    Store(#[from] sqlx::Error),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        if let AuthError::Store(error) = &self {
            tracing::error!(error = %error, "api key lookup failed");
            return crate::http::error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            );
        }
        let mut response = crate::http::error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            &self.to_string(),
        );
        let challenge = match self {
            AuthError::Invalid => r#"Bearer realm="sluice", error="invalid_token""#,
            _ => r#"Bearer realm="sluice""#,
        };
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        response
    }
}

const KEY_PREFIX: &str = "sk-sluice-";

/// A live key's id, user, tier and budgets per day and month.
type KeyRow = (String, String, String, Option<f64>, Option<f64>);

fn hash(key: &str) -> String {
    format!("{:x}", Sha256::digest(key.as_bytes()))
}

/// Looks keys up in Postgres through a cache of `ttl` (unknown keys are cached too, so a flood
/// of bad keys does not reach the database).
pub struct KeyStore {
    pool: PgPool,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Option<Caller>)>>,
}

impl KeyStore {
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Self {
            pool,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let text = value.to_str().map_err(|_| AuthError::Invalid)?;
        let key = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or(AuthError::Missing)?
            .trim();
        if !key.starts_with(KEY_PREFIX) {
            return Err(AuthError::Invalid);
        }
        let key_hash = hash(key);
        let now = Instant::now();
        if let Some((expires, cached)) = self.cache.lock().expect("key cache lock").get(&key_hash)
            && *expires > now
        {
            return cached.clone().ok_or(AuthError::Invalid);
        }
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT key_id, user_id, tier, budget_per_day, budget_per_month FROM api_keys
             WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&key_hash)
        .fetch_optional(&self.pool)
        .await?;
        let caller = row.map(|(key_id, user_id, tier, per_day, per_month)| Caller {
            key_id,
            user_id,
            tier,
            budget: KeyBudget { per_day, per_month },
        });
        let mut cache = self.cache.lock().expect("key cache lock");
        if cache.len() > 100_000 {
            cache.retain(|_, (expires, _)| *expires > now);
        }
        cache.insert(key_hash, (now + self.ttl, caller.clone()));
        caller.ok_or(AuthError::Invalid)
    }
}

/// A key as `keys list` shows it (never the key itself).
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    pub key_id: String,
    pub user_id: String,
    pub tier: String,
    pub name: Option<String>,
    pub budget_per_day: Option<f64>,
    pub budget_per_month: Option<f64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Creates a key for `user_id`; returns its id and the key, which is not stored and cannot be
/// shown again.
pub async fn create_key(
    pool: &PgPool,
    user_id: &str,
    tier: &str,
    name: Option<&str>,
) -> sqlx::Result<(String, String)> {
    create_key_with_budget(pool, user_id, tier, name, KeyBudget::default()).await
}

/// `create_key`, with spend budgets of the key's own.
pub async fn create_key_with_budget(
    pool: &PgPool,
    user_id: &str,
    tier: &str,
    name: Option<&str>,
    budget: KeyBudget,
) -> sqlx::Result<(String, String)> {
    let random = || uuid::Uuid::new_v4().simple().to_string();
    let key_id = format!("key_{}", &random()[..16]);
    let key = format!("{KEY_PREFIX}{}{}", random(), random());
    sqlx::query(
        "INSERT INTO api_keys (key_id, key_hash, user_id, tier, name, budget_per_day, budget_per_month)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&key_id)
    .bind(hash(&key))
    .bind(user_id)
    .bind(tier)
    .bind(name)
    .bind(budget.per_day)
    .bind(budget.per_month)
    .execute(pool)
    .await?;
    Ok((key_id, key))
}

pub async fn list_keys(pool: &PgPool) -> sqlx::Result<Vec<KeyInfo>> {
    sqlx::query_as(
        "SELECT key_id, user_id, tier, name, budget_per_day, budget_per_month, created_at, revoked_at
         FROM api_keys ORDER BY created_at",
    )
        .fetch_all(pool)
        .await
}

/// Revokes a key; false if there is no such live key.
pub async fn revoke_key(pool: &PgPool, key_id: &str) -> sqlx::Result<bool> {
    let result = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// How long a service waits at start-up for the migrations, which `sluice-results` owns.
const SCHEMA_WAIT: Duration = Duration::from_secs(60);

/// Waits until the tables it reads exist (`api_keys`, `stream_token_secret`). The migrations
/// have one owner, `sluice-results` (at its start-up, or `sluice-results migrate` as the Helm
/// chart's init container); a service that reads keys and starts beside it waits for them
/// rather than racing it.
pub async fn wait_for_schema(pool: &PgPool, wait: Duration) -> anyhow::Result<()> {
    wait_for_tables(pool, &["api_keys", "stream_token_secret"], wait).await
}

/// Waits until every one of `tables` exists, for at most `wait`.
pub async fn wait_for_tables(pool: &PgPool, tables: &[&str], wait: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    let names: Vec<String> = tables.iter().map(|table| (*table).to_owned()).collect();
    loop {
        let (missing,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM unnest($1::text[]) AS t(name) WHERE to_regclass(t.name) IS NULL",
        )
        .bind(&names)
        .fetch_one(pool)
        .await?;
        if missing == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "Postgres lacks some of the tables {tables:?}: apply the migrations first \
             (`sluice-results migrate`, or start sluice-results, which applies them)"
        );
        tracing::info!("waiting for the migrations (sluice-results applies them)");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
