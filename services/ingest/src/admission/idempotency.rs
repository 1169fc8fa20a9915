//! `Idempotency-Key`: the same user and key within the retention return the original job and
//! publish nothing; the same key with a different body is refused. Kept in process, or in Redis
//! so that every ingest replica agrees.

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// Keys kept in process, at most; past it the least used go first. Replicas that must agree,
/// or more keys than this, call for Redis (`REDIS_URL`).
const LOCAL_MAX_KEYS: u64 = 100_000;

/// What a key remembers: the body it was first used with, and the job it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub body_hash: String,
    /// The 202 body of the original submission.
    pub accepted: serde_json::Value,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is new (or expired) and now reserved for this submission.
    New,
    /// The key was used with the same body: answer with the original job.
    Replay(serde_json::Value),
    /// The key was used with another body.
    Mismatch,
    /// The key's first submission is still being published.
    InProgress,
}

pub fn body_hash(body: &[u8]) -> String {
    format!("{:x}", Sha256::digest(body))
}

/// A key as kept in process.
#[derive(Debug)]
pub struct LocalEntry {
    /// `None` while the first submission is being published.
    remembered: Option<Remembered>,
    body_hash: String,
}

pub enum IdempotencyStore {
    /// Bounded, expiring after the retention, and concurrent (no one lock for every request).
    Local(moka::sync::Cache<String, Arc<LocalEntry>>),
    Redis {
        connection: ConnectionManager,
        prefix: String,
    },
}

const PENDING: &str = "pending:";

impl IdempotencyStore {
    /// An in-process store whose keys live for `retention`.
    pub fn local(retention: Duration) -> Self {
        Self::Local(
            moka::sync::Cache::builder()
                .max_capacity(LOCAL_MAX_KEYS)
                .time_to_live(retention)
                .build(),
        )
    }

    fn local_key(user: &str, key: &str) -> String {
        format!("{user}\u{0}{key}")
    }

    fn redis_key(prefix: &str, user: &str, key: &str) -> String {
        format!("{prefix}idem:{user}:{key}")
    }

    /// Reserves `key` for this submission, or says what it was used for.
    pub async fn claim(
        &self,
        user: &str,
        key: &str,
        body_hash: &str,
        retention: Duration,
    ) -> Result<Claim, redis::RedisError> {
        match self {
            IdempotencyStore::Local(entries) => {
                // Why `entry`: the check and the reservation are one atomic step.
                let entry = entries
                    .entry(Self::local_key(user, key))
                    .or_insert_with(|| {
                        Arc::new(LocalEntry {
                            remembered: None,
                            body_hash: body_hash.to_owned(),
                        })
                    });
                if entry.is_fresh() {
                    return Ok(Claim::New);
                }
                let stored = entry.into_value();
                Ok(judge(
                    stored.remembered.as_ref(),
                    &stored.body_hash,
                    body_hash,
                ))
            }
            IdempotencyStore::Redis { connection, prefix } => {
                let mut connection = connection.clone();
                let redis_key = Self::redis_key(prefix, user, key);
                let pending = format!("{PENDING}{body_hash}");
                let set: Option<String> = redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(&pending)
                    .arg("NX")
                    .arg("PX")
                    .arg(retention.as_millis() as u64)
                    .query_async(&mut connection)
                    .await?;
                if set.is_some() {
                    return Ok(Claim::New);
                }
                let stored: Option<String> = redis::cmd("GET")
                    .arg(&redis_key)
                    .query_async(&mut connection)
                    .await?;
                let Some(stored) = stored else {
                    return Ok(Claim::InProgress);
                };
                if let Some(hash) = stored.strip_prefix(PENDING) {
                    return Ok(judge(None, hash, body_hash));
                }
                let remembered: Option<Remembered> = serde_json::from_str(&stored).ok();
                Ok(match remembered {
                    Some(remembered) => {
                        judge(Some(&remembered), &remembered.body_hash.clone(), body_hash)
                    }
                    None => Claim::InProgress,
                })
            }
        }
    }

    /// Records the job a claimed key made.
    pub async fn remember(
        &self,
        user: &str,
        key: &str,
        remembered: Remembered,
        retention: Duration,
    ) -> Result<(), redis::RedisError> {
        match self {
            IdempotencyStore::Local(entries) => {
                let entry = LocalEntry {
                    body_hash: remembered.body_hash.clone(),
                    remembered: Some(remembered),
                };
                entries.insert(Self::local_key(user, key), Arc::new(entry));
                Ok(())
            }
            IdempotencyStore::Redis { connection, prefix } => {
                let mut connection = connection.clone();
                let text = serde_json::to_string(&remembered).expect("a remembered job serializes");
                redis::cmd("SET")
                    .arg(Self::redis_key(prefix, user, key))
                    .arg(text)
                    .arg("PX")
                    .arg(retention.as_millis() as u64)
                    .query_async::<()>(&mut connection)
                    .await
            }
        }
    }

    /// Frees a claimed key whose submission failed, so a retry can use it.
    pub async fn release(&self, user: &str, key: &str) {
        match self {
            IdempotencyStore::Local(entries) => {
                entries.invalidate(&Self::local_key(user, key));
            }
            IdempotencyStore::Redis { connection, prefix } => {
                let mut connection = connection.clone();
                let result: Result<(), _> = redis::cmd("DEL")
                    .arg(Self::redis_key(prefix, user, key))
                    .query_async(&mut connection)
                    .await;
                if let Err(error) = result {
                    tracing::warn!(error = %error, "could not release an idempotency key");
                }
            }
        }
    }
}

fn judge(remembered: Option<&Remembered>, stored_hash: &str, body_hash: &str) -> Claim {
    if stored_hash != body_hash {
        return Claim::Mismatch;
    }
    match remembered {
        Some(remembered) => Claim::Replay(remembered.accepted.clone()),
        None => Claim::InProgress,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_same_key_replays_and_a_different_body_is_a_mismatch() {
        let day = Duration::from_secs(86_400);
        let store = IdempotencyStore::local(day);
        assert_eq!(store.claim("u", "k", "h1", day).await.unwrap(), Claim::New);
        assert_eq!(
            store.claim("u", "k", "h1", day).await.unwrap(),
            Claim::InProgress
        );
        let accepted = serde_json::json!({"job_id": "x"});
        store
            .remember(
                "u",
                "k",
                Remembered {
                    body_hash: "h1".into(),
                    accepted: accepted.clone(),
                },
                day,
            )
            .await
            .unwrap();
        assert_eq!(
            store.claim("u", "k", "h1", day).await.unwrap(),
            Claim::Replay(accepted)
        );
        assert_eq!(
            store.claim("u", "k", "h2", day).await.unwrap(),
            Claim::Mismatch
        );
        assert_eq!(
            store.claim("other-user", "k", "h2", day).await.unwrap(),
            Claim::New,
            "keys are per user"
        );
    }

    #[tokio::test]
    async fn a_key_is_new_again_after_its_retention_and_after_a_release() {
        let retention = Duration::from_millis(50);
        let store = IdempotencyStore::local(retention);
        assert_eq!(
            store.claim("u", "k", "h", retention).await.unwrap(),
            Claim::New
        );
        store.release("u", "k").await;
        assert_eq!(
            store.claim("u", "k", "h", retention).await.unwrap(),
            Claim::New,
            "a failed submission's key is free again"
        );
        tokio::time::sleep(retention * 4).await;
        assert_eq!(
            store.claim("u", "k", "h2", retention).await.unwrap(),
            Claim::New,
            "an expired key is forgotten"
        );
    }
}
