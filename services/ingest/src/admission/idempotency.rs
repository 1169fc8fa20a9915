//! `Idempotency-Key`: the same user and key within the retention return the original job and
//! publish nothing; the same key with a different body is refused. Kept in process, or in Redis
//! so that every ingest replica agrees.
//!
//! While its first submission is being published a key is *pending*, with the job id it will
//! make. A pending key older than the publish timeout was left by an ingest that died mid-way
//! (its client got no answer): the next retry takes it over and publishes the same job id again,
//! so the client ends with exactly one job whether or not the first publish reached the broker.

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_schemas::JobId;
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
    /// The key's first submission was left unfinished (its ingest died): this one takes it over
    /// and makes the same job.
    Abandoned(JobId),
}

/// A submission's claim on a key while it is published: its body, the job it makes, and when.
#[derive(Debug, Clone)]
pub struct Pending {
    pub body_hash: String,
    pub job_id: JobId,
    pub claimed_at: DateTime<Utc>,
}

impl Pending {
    fn encode(&self) -> String {
        format!(
            "{PENDING}{}:{}:{}",
            self.body_hash,
            self.job_id,
            self.claimed_at.timestamp_millis()
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let mut parts = text.strip_prefix(PENDING)?.splitn(3, ':');
        let body_hash = parts.next()?.to_owned();
        let job_id = JobId::parse(parts.next()?).ok()?;
        let claimed_at = DateTime::from_timestamp_millis(parts.next()?.parse().ok()?)?;
        Some(Self {
            body_hash,
            job_id,
            claimed_at,
        })
    }

    /// Left by a submission that cannot still be publishing.
    fn is_abandoned(&self, now: DateTime<Utc>, takeover_after: Duration) -> bool {
        now.signed_duration_since(self.claimed_at)
            .to_std()
            .unwrap_or_default()
            > takeover_after
    }

    /// The same claim, taken over now.
    fn renewed(&self, now: DateTime<Utc>) -> Self {
        Self {
            claimed_at: now,
            ..self.clone()
        }
    }
}

pub fn body_hash(body: &[u8]) -> String {
    format!("{:x}", Sha256::digest(body))
}

/// A key as kept in process: pending, or the job it made.
#[derive(Debug)]
pub enum LocalEntry {
    Pending(Pending),
    Remembered(Remembered),
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

    /// Reserves `key` for this submission (`pending`), or says what it was used for. A pending
    /// claim older than `takeover_after` is taken over.
    pub async fn claim(
        &self,
        user: &str,
        key: &str,
        pending: &Pending,
        retention: Duration,
        takeover_after: Duration,
    ) -> Result<Claim, redis::RedisError> {
        match self {
            IdempotencyStore::Local(entries) => {
                // Why `entry`: the check and the reservation are one atomic step.
                let entry = entries
                    .entry(Self::local_key(user, key))
                    .or_insert_with(|| Arc::new(LocalEntry::Pending(pending.clone())));
                if entry.is_fresh() {
                    return Ok(Claim::New);
                }
                match entry.into_value().as_ref() {
                    LocalEntry::Remembered(remembered) => Ok(judge(
                        Some(remembered),
                        &remembered.body_hash,
                        &pending.body_hash,
                    )),
                    LocalEntry::Pending(stored) => {
                        let claim = judge_pending(stored, pending, takeover_after);
                        if matches!(claim, Claim::Abandoned(_)) {
                            let renewed = stored.renewed(pending.claimed_at);
                            entries.insert(
                                Self::local_key(user, key),
                                Arc::new(LocalEntry::Pending(renewed)),
                            );
                        }
                        Ok(claim)
                    }
                }
            }
            IdempotencyStore::Redis { connection, prefix } => {
                let mut connection = connection.clone();
                let redis_key = Self::redis_key(prefix, user, key);
                let set: Option<String> = redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(pending.encode())
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
                if stored.starts_with(PENDING) {
                    let Some(stored) = Pending::decode(&stored) else {
                        return Ok(Claim::InProgress);
                    };
                    let claim = judge_pending(&stored, pending, takeover_after);
                    if matches!(claim, Claim::Abandoned(_)) {
                        // Why no compare-and-set: two retries taking over at once publish the
                        // same job id, which is still one job.
                        redis::cmd("SET")
                            .arg(&redis_key)
                            .arg(stored.renewed(pending.claimed_at).encode())
                            .arg("XX")
                            .arg("PX")
                            .arg(retention.as_millis() as u64)
                            .query_async::<()>(&mut connection)
                            .await?;
                    }
                    return Ok(claim);
                }
                let remembered: Option<Remembered> = serde_json::from_str(&stored).ok();
                Ok(match remembered {
                    Some(remembered) => judge(
                        Some(&remembered),
                        &remembered.body_hash.clone(),
                        &pending.body_hash,
                    ),
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
                entries.insert(
                    Self::local_key(user, key),
                    Arc::new(LocalEntry::Remembered(remembered)),
                );
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

    /// Hands a claimed key whose submission failed to the next retry, which makes the same job
    /// id. Why not free it: a publish that timed out may still have reached the broker, and
    /// with the same id the retry's job and that one are one job.
    pub async fn abandon(&self, user: &str, key: &str, pending: &Pending, retention: Duration) {
        let given_up = Pending {
            claimed_at: DateTime::UNIX_EPOCH,
            ..pending.clone()
        };
        match self {
            IdempotencyStore::Local(entries) => {
                entries.insert(
                    Self::local_key(user, key),
                    Arc::new(LocalEntry::Pending(given_up)),
                );
            }
            IdempotencyStore::Redis { connection, prefix } => {
                let mut connection = connection.clone();
                let result: Result<(), _> = redis::cmd("SET")
                    .arg(Self::redis_key(prefix, user, key))
                    .arg(given_up.encode())
                    .arg("XX")
                    .arg("PX")
                    .arg(retention.as_millis() as u64)
                    .query_async(&mut connection)
                    .await;
                if let Err(error) = result {
                    tracing::warn!(error = %error, "could not hand an idempotency key to a retry");
                }
            }
        }
    }
}

/// What a pending claim means to another submission with the same key.
fn judge_pending(stored: &Pending, this: &Pending, takeover_after: Duration) -> Claim {
    if stored.body_hash != this.body_hash {
        return Claim::Mismatch;
    }
    if stored.is_abandoned(this.claimed_at, takeover_after) {
        return Claim::Abandoned(stored.job_id);
    }
    Claim::InProgress
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

    const DAY: Duration = Duration::from_secs(86_400);
    const TAKEOVER: Duration = Duration::from_secs(10);

    fn pending(body_hash: &str, at: DateTime<Utc>) -> Pending {
        Pending {
            body_hash: body_hash.into(),
            job_id: JobId::new(),
            claimed_at: at,
        }
    }

    #[tokio::test]
    async fn the_same_key_replays_and_a_different_body_is_a_mismatch() {
        let store = IdempotencyStore::local(DAY);
        let now = Utc::now();
        let claim = |user: &'static str, hash: &'static str| {
            let store = &store;
            async move {
                store
                    .claim(user, "k", &pending(hash, now), DAY, TAKEOVER)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(claim("u", "h1").await, Claim::New);
        assert_eq!(claim("u", "h1").await, Claim::InProgress);
        let accepted = serde_json::json!({"job_id": "x"});
        let remembered = Remembered {
            body_hash: "h1".into(),
            accepted: accepted.clone(),
        };
        store.remember("u", "k", remembered, DAY).await.unwrap();
        assert_eq!(claim("u", "h1").await, Claim::Replay(accepted));
        assert_eq!(claim("u", "h2").await, Claim::Mismatch);
        assert_eq!(
            claim("other-user", "h2").await,
            Claim::New,
            "keys are per user"
        );
    }

    #[tokio::test]
    async fn a_key_left_pending_by_a_dead_ingest_is_taken_over_with_its_job_id() {
        let store = IdempotencyStore::local(DAY);
        let first = pending("h", Utc::now() - chrono::Duration::seconds(30));
        let claim = |pending: Pending| {
            let store = &store;
            async move {
                store
                    .claim("u", "k", &pending, DAY, TAKEOVER)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(claim(first.clone()).await, Claim::New);
        // Thirty seconds later, past the takeover time: the retry makes the same job.
        assert_eq!(
            claim(pending("h", Utc::now())).await,
            Claim::Abandoned(first.job_id)
        );
        // ... and holds the key afresh: a second retry now waits for it.
        assert_eq!(claim(pending("h", Utc::now())).await, Claim::InProgress);
        assert_eq!(claim(pending("other", Utc::now())).await, Claim::Mismatch);
    }

    #[test]
    fn a_pending_claim_reads_back_as_written() {
        let written = pending("abc", Utc::now());
        let read = Pending::decode(&written.encode()).unwrap();
        assert_eq!(
            (
                read.body_hash,
                read.job_id,
                read.claimed_at.timestamp_millis()
            ),
            (
                written.body_hash,
                written.job_id,
                written.claimed_at.timestamp_millis()
            )
        );
    }

    #[tokio::test]
    async fn a_failed_submission_hands_its_job_id_to_the_retry_and_keys_expire() {
        let retention = Duration::from_millis(50);
        let store = IdempotencyStore::local(retention);
        let claim = |hash: &'static str| {
            let store = &store;
            async move {
                store
                    .claim("u", "k", &pending(hash, Utc::now()), retention, TAKEOVER)
                    .await
                    .unwrap()
            }
        };
        let first = pending("h", Utc::now());
        assert_eq!(
            store
                .claim("u", "k", &first, retention, TAKEOVER)
                .await
                .unwrap(),
            Claim::New
        );
        store.abandon("u", "k", &first, retention).await;
        assert_eq!(
            claim("h").await,
            Claim::Abandoned(first.job_id),
            "the retry of a failed submission makes the same job, at once"
        );
        tokio::time::sleep(retention * 4).await;
        assert_eq!(claim("h2").await, Claim::New, "an expired key is forgotten");
    }
}
