//! `Idempotency-Key`: the same user and key within the retention return the original job and
//! publish nothing; the same key with a different body is refused. Kept in process, or in Redis
//! so that every ingest replica agrees.

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    expires: Instant,
    /// `None` while the first submission is being published.
    remembered: Option<Remembered>,
    body_hash: String,
}

pub enum IdempotencyStore {
    Local(Mutex<HashMap<String, LocalEntry>>),
    Redis {
        connection: ConnectionManager,
        prefix: String,
    },
}

const PENDING: &str = "pending:";

impl IdempotencyStore {
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
                let mut entries = entries.lock().expect("idempotency lock");
                let now = Instant::now();
                if entries.len() > 100_000 {
                    entries.retain(|_, entry| entry.expires > now);
                }
                let map_key = format!("{user}\u{0}{key}");
                match entries.get(&map_key) {
                    Some(entry) if entry.expires > now => Ok(judge(
                        entry.remembered.as_ref(),
                        &entry.body_hash,
                        body_hash,
                    )),
                    _ => {
                        let entry = LocalEntry {
                            expires: now + retention,
                            remembered: None,
                            body_hash: body_hash.to_owned(),
                        };
                        entries.insert(map_key, entry);
                        Ok(Claim::New)
                    }
                }
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
                let mut entries = entries.lock().expect("idempotency lock");
                let entry = LocalEntry {
                    expires: Instant::now() + retention,
                    body_hash: remembered.body_hash.clone(),
                    remembered: Some(remembered),
                };
                entries.insert(format!("{user}\u{0}{key}"), entry);
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
                entries
                    .lock()
                    .expect("idempotency lock")
                    .remove(&format!("{user}\u{0}{key}"));
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
        let store = IdempotencyStore::Local(Mutex::new(HashMap::new()));
        let day = Duration::from_secs(86_400);
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
}
