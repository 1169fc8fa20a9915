//! The headers that make a delivery a Standard Webhook: `webhook-id`, `webhook-timestamp` (now,
//! at each attempt) and `webhook-signature`, by every secret of the user that signs now.

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};
use sluice_common::webhooks::secrets::{self, SealingKey, SigningSecrets};
use sluice_common::webhooks::sign;
use sqlx::PgPool;
use std::time::Duration;

/// How long a user's secrets are cached: a rotation signs with the new one within this.
const SECRETS_CACHE: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct Signer {
    pool: PgPool,
    key: SealingKey,
    cache: moka::future::Cache<String, SigningSecrets>,
}

impl Signer {
    pub(crate) fn new(pool: PgPool, key: SealingKey) -> Self {
        Self {
            pool,
            key,
            cache: moka::future::Cache::builder()
                .time_to_live(SECRETS_CACHE)
                .max_capacity(100_000)
                .build(),
        }
    }

    pub(crate) async fn headers(
        &self,
        user: &str,
        webhook_id: &str,
        body: &[u8],
    ) -> anyhow::Result<HeaderMap> {
        let secrets = self
            .cache
            .try_get_with(
                user.to_owned(),
                secrets::secrets_of(&self.pool, &self.key, user),
            )
            .await
            .map_err(|error| anyhow::anyhow!("{error:#}"))?;
        let now = chrono::Utc::now();
        let timestamp = now.timestamp();
        let signature = sign::signature_header(secrets.signing(now), webhook_id, timestamp, body);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static("Sluice-Webhooks/1"));
        headers.insert("webhook-id", HeaderValue::from_str(webhook_id)?);
        headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
        headers.insert("webhook-signature", HeaderValue::from_str(&signature)?);
        Ok(headers)
    }
}
