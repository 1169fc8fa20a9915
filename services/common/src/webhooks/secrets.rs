//! Users' signing secrets. Each user has one, made at random on first use; a rotation keeps the
//! one before signing too for [`ROTATION_OVERLAP`], so receivers can switch without a gap.
//!
//! Stored sealed (XChaCha20-Poly1305 under `SLUICE_WEBHOOK_SECRET_KEY`, a random nonce per
//! secret): a dump of the database alone does not give them away; the key lives in the
//! services' configuration (a Kubernetes Secret), not in the database.

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;

/// How long the secret before a rotation still signs.
pub const ROTATION_OVERLAP: chrono::TimeDelta = chrono::TimeDelta::hours(24);

const NONCE_LEN: usize = 24;

/// The key secrets are sealed with.
#[derive(Clone)]
pub struct SealingKey(XChaCha20Poly1305);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    /// `SLUICE_WEBHOOK_SECRET_KEY`: 32 bytes, base64 (`openssl rand -base64 32`).
    pub fn from_base64(text: &SecretString) -> anyhow::Result<Self> {
        let bytes = STANDARD
            .decode(text.expose_secret().trim())
            .context("SLUICE_WEBHOOK_SECRET_KEY is not base64")?;
        anyhow::ensure!(
            bytes.len() == 32,
            "SLUICE_WEBHOOK_SECRET_KEY must be 32 bytes (base64 of `openssl rand 32`), not {}",
            bytes.len()
        );
        Ok(Self(
            XChaCha20Poly1305::new_from_slice(&bytes).expect("a 32-byte key"),
        ))
    }

    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the system's randomness");
        let mut sealed = nonce.to_vec();
        sealed.extend(
            self.0
                .encrypt(XNonce::from_slice(&nonce), plain)
                .expect("sealing a short secret"),
        );
        sealed
    }

    fn open(&self, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(sealed.len() > NONCE_LEN, "a sealed secret is too short");
        let (nonce, text) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(XNonce::from_slice(nonce), text)
            .map_err(|_| anyhow::anyhow!("a signing secret does not open with SLUICE_WEBHOOK_SECRET_KEY (another key sealed it)"))
    }
}

/// A user's secrets: the current one, and the one before while it still signs.
#[derive(Clone)]
pub struct SigningSecrets {
    pub current: Vec<u8>,
    pub previous: Option<(Vec<u8>, DateTime<Utc>)>,
}

impl std::fmt::Debug for SigningSecrets {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SigningSecrets(..)")
    }
}

impl SigningSecrets {
    /// The secrets that sign at `now`: the current one first.
    pub fn signing(&self, now: DateTime<Utc>) -> Vec<&[u8]> {
        let mut secrets = vec![self.current.as_slice()];
        if let Some((previous, until)) = &self.previous
            && now < *until
        {
            secrets.push(previous.as_slice());
        }
        secrets
    }
}

fn fresh_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    getrandom::fill(&mut secret).expect("the system's randomness");
    secret
}

type SecretRow = (Vec<u8>, Option<Vec<u8>>, Option<DateTime<Utc>>);

fn opened(
    key: &SealingKey,
    (secret, previous, rotated_at): SecretRow,
) -> anyhow::Result<SigningSecrets> {
    let previous = match (previous, rotated_at) {
        (Some(previous), Some(at)) => Some((key.open(&previous)?, at + ROTATION_OVERLAP)),
        _ => None,
    };
    Ok(SigningSecrets {
        current: key.open(&secret)?,
        previous,
    })
}

/// `user`'s secrets, made on first use.
pub async fn secrets_of(
    pool: &PgPool,
    key: &SealingKey,
    user: &str,
) -> anyhow::Result<SigningSecrets> {
    // Why one statement: two replicas making a user's first secret at once agree on one.
    let row: SecretRow = sqlx::query_as(
        "WITH made AS (
             INSERT INTO webhook_secrets (user_id, secret) VALUES ($1, $2)
             ON CONFLICT (user_id) DO NOTHING RETURNING secret, previous, rotated_at
         )
         SELECT secret, previous, rotated_at FROM made
         UNION ALL SELECT secret, previous, rotated_at FROM webhook_secrets WHERE user_id = $1
         LIMIT 1",
    )
    .bind(user)
    .bind(key.seal(&fresh_secret()))
    .fetch_one(pool)
    .await?;
    opened(key, row)
}

/// Replaces `user`'s secret with a new one; the old one signs too for [`ROTATION_OVERLAP`].
pub async fn rotate(pool: &PgPool, key: &SealingKey, user: &str) -> anyhow::Result<SigningSecrets> {
    secrets_of(pool, key, user).await?;
    let row: SecretRow = sqlx::query_as(
        "UPDATE webhook_secrets SET previous = secret, secret = $2, rotated_at = now()
         WHERE user_id = $1 RETURNING secret, previous, rotated_at",
    )
    .bind(user)
    .bind(key.seal(&fresh_secret()))
    .fetch_one(pool)
    .await?;
    opened(key, row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key() {
        let key = SealingKey::from_base64(&STANDARD.encode([7u8; 32]).into()).unwrap();
        let other = SealingKey::from_base64(&STANDARD.encode([8u8; 32]).into()).unwrap();
        let sealed = key.seal(b"the secret");
        assert_ne!(&sealed[NONCE_LEN..], b"the secret");
        assert_eq!(key.open(&sealed).unwrap(), b"the secret");
        assert!(other.open(&sealed).is_err());
        assert_ne!(key.seal(b"the secret"), sealed, "a fresh nonce each time");
        assert!(SealingKey::from_base64(&"c2hvcnQ=".to_owned().into()).is_err());
    }

    #[test]
    fn the_previous_secret_signs_only_during_the_overlap() {
        let now = Utc::now();
        let secrets = SigningSecrets {
            current: b"new".to_vec(),
            previous: Some((b"old".to_vec(), now + chrono::TimeDelta::hours(1))),
        };
        assert_eq!(
            secrets.signing(now),
            vec![b"new".as_slice(), b"old".as_slice()]
        );
        assert_eq!(
            secrets.signing(now + chrono::TimeDelta::hours(2)),
            vec![b"new".as_slice()]
        );
    }
}
