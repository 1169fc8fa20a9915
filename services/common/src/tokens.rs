//! Job-scoped stream tokens: a short-lived grant to read one job (its `GET` and its events) and
//! nothing else, so a backend can hand a job's `events_url` to a browser, whose `EventSource`
//! cannot send an API key and whose page must not hold one.
//!
//! A token is `<job id>.<expiry, unix seconds>.<signature>`, the signature an HMAC-SHA256 of the
//! job id and expiry under a server secret, base64url. Nothing is stored per token. Secrets come
//! from `SLUICE_STREAM_TOKEN_SECRETS` (comma separated: the first signs, every one verifies, so a
//! secret is rotated by putting the new one first and dropping the old one after the expiry);
//! unset, one random secret is made once and shared through Postgres.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use sluice_schemas::JobId;
use sqlx::PgPool;
use std::time::Duration;

/// The settings ingest (which issues tokens) and results (which checks them) share.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamTokenArgs {
    /// Secrets job-scoped stream tokens are signed with, comma separated, each at least 32
    /// bytes: the first signs, every one verifies (rotate by putting a new one first). Unset:
    /// one random secret, made once and shared through Postgres.
    #[arg(
        long = "stream-token-secrets",
        env = "SLUICE_STREAM_TOKEN_SECRETS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub secrets: Vec<SecretString>,

    /// How long a job's stream token is good for, in seconds.
    #[arg(long = "stream-token-ttl-secs", env = "SLUICE_STREAM_TOKEN_TTL_SECS", default_value = "3600", value_parser = crate::settings::secs)]
    pub ttl: Duration,
}

/// Why a token does not grant what it was shown for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the stream token has expired; ask the API for the job's events_url again")]
    Expired,
    #[error("the stream token is not valid (malformed, or not signed by this deployment)")]
    Invalid,
    /// A good token, for another job: that job is, to the bearer, unknown.
    #[error("the stream token is for another job")]
    OtherJob,
}

impl TokenError {
    pub fn code(self) -> &'static str {
        match self {
            TokenError::Expired => "token_expired",
            TokenError::Invalid => "invalid_token",
            TokenError::OtherJob => "job_not_found",
        }
    }
}

/// Signs and checks stream tokens.
#[derive(Clone)]
pub struct StreamTokens {
    /// The first signs; all verify.
    secrets: Vec<Vec<u8>>,
    ttl: Duration,
}

impl std::fmt::Debug for StreamTokens {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StreamTokens")
            .field("secrets", &self.secrets.len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl StreamTokens {
    /// Tokens signed with `secrets` (at least one, the first signing), valid for `ttl`.
    pub fn new(secrets: Vec<Vec<u8>>, ttl: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(!secrets.is_empty(), "no stream token secret");
        anyhow::ensure!(
            secrets.iter().all(|secret| secret.len() >= 32),
            "SLUICE_STREAM_TOKEN_SECRETS: each secret must be at least 32 bytes"
        );
        Ok(Self { secrets, ttl })
    }

    /// The configured secrets, or the one shared through Postgres (made on first use).
    pub async fn load(args: &StreamTokenArgs, pool: &PgPool) -> anyhow::Result<Self> {
        let ttl = args.ttl;
        if !args.secrets.is_empty() {
            let secrets = args
                .secrets
                .iter()
                .map(|secret| secret.expose_secret().as_bytes().to_vec())
                .collect();
            return Self::new(secrets, ttl);
        }
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh)
            .map_err(|error| anyhow::anyhow!("no randomness for a token secret: {error}"))?;
        // Why one statement: replicas starting together agree on the first row written.
        let (secret,): (Vec<u8>,) = sqlx::query_as(
            "WITH made AS (
                 INSERT INTO stream_token_secret (id, secret) VALUES (1, $1)
                 ON CONFLICT (id) DO NOTHING RETURNING secret
             )
             SELECT secret FROM made UNION ALL SELECT secret FROM stream_token_secret WHERE id = 1
             LIMIT 1",
        )
        .bind(fresh.as_slice())
        .fetch_one(pool)
        .await?;
        Self::new(vec![secret], ttl)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn signature(secret: &[u8], job_id: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"sluice-stream-token-v1|");
        mac.update(job_id.as_bytes());
        mac.update(b"|");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// A token for reading `job_id` until `now + ttl`.
    pub fn issue(&self, job_id: JobId, now: DateTime<Utc>) -> String {
        let expires = now.timestamp() + i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let job = job_id.as_uuid().simple().to_string();
        let signature = Self::signature(&self.secrets[0], &job, expires)
            .finalize()
            .into_bytes();
        format!("{job}.{expires}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Whether `token` grants reading `job_id` at `now`.
    pub fn verify(&self, token: &str, job_id: JobId, now: DateTime<Utc>) -> Result<(), TokenError> {
        let mut parts = token.split('.');
        let (Some(job), Some(expires), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Invalid);
        };
        let expires: i64 = expires.parse().map_err(|_| TokenError::Invalid)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Invalid)?;
        // Why check the signature before anything it signs: an unsigned claim says nothing.
        let signed = self.secrets.iter().any(|secret| {
            Self::signature(secret, job, expires)
                .verify_slice(&signature)
                .is_ok()
        });
        if !signed {
            return Err(TokenError::Invalid);
        }
        if expires <= now.timestamp() {
            return Err(TokenError::Expired);
        }
        if job != job_id.as_uuid().simple().to_string() {
            return Err(TokenError::OtherJob);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(secrets: &[&str]) -> StreamTokens {
        let secrets = secrets
            .iter()
            .map(|secret| secret.as_bytes().to_vec())
            .collect();
        StreamTokens::new(secrets, Duration::from_secs(3600)).unwrap()
    }

    const OLD: &str = "an old secret of at least thirty-two bytes";
    const NEW: &str = "a new secret, also thirty-two bytes or more";

    #[test]
    fn a_token_grants_its_job_until_it_expires_and_nothing_else() {
        let tokens = tokens(&[OLD]);
        let (job, other) = (JobId::new(), JobId::new());
        let now = Utc::now();
        let token = tokens.issue(job, now);
        assert_eq!(tokens.verify(&token, job, now), Ok(()));
        assert_eq!(tokens.verify(&token, other, now), Err(TokenError::OtherJob));
        let later = now + chrono::Duration::seconds(3601);
        assert_eq!(tokens.verify(&token, job, later), Err(TokenError::Expired));

        // Forged: another expiry under the same signature, another signature, garbage.
        let (head, signature) = token.rsplit_once('.').unwrap();
        let (job_part, expires) = head.split_once('.').unwrap();
        let extended = format!(
            "{job_part}.{}.{signature}",
            expires.parse::<i64>().unwrap() + 9999
        );
        assert_eq!(tokens.verify(&extended, job, now), Err(TokenError::Invalid));
        let unsigned = format!("{head}.AAAA");
        assert_eq!(tokens.verify(&unsigned, job, now), Err(TokenError::Invalid));
        for garbage in ["", "x", "a.b.c.d", "a.1.!!!"] {
            assert_eq!(tokens.verify(garbage, job, now), Err(TokenError::Invalid));
        }
        // A signed token for another job claims that job only.
        assert_eq!(
            tokens.verify(&tokens.issue(other, now), job, now),
            Err(TokenError::OtherJob)
        );
    }

    #[test]
    fn during_a_rotation_tokens_of_the_previous_secret_still_verify() {
        let job = JobId::new();
        let now = Utc::now();
        let before = tokens(&[OLD]).issue(job, now);
        let rotating = tokens(&[NEW, OLD]);
        assert_eq!(rotating.verify(&before, job, now), Ok(()));
        let after = rotating.issue(job, now);
        assert_eq!(tokens(&[NEW]).verify(&after, job, now), Ok(()));
        assert_eq!(
            tokens(&[NEW]).verify(&before, job, now),
            Err(TokenError::Invalid),
            "once the old secret is dropped"
        );
        assert!(StreamTokens::new(vec![b"short".to_vec()], Duration::from_secs(1)).is_err());
    }
}
