//! Admission control: what decides, before anything is published, whether a submission may in.
//! Overload shedding, per-user and global rate limits, the pipeline's capacity, idempotency keys.

pub mod capacity;
pub mod gcra;
pub mod idempotency;
pub mod limiter;

use crate::config::Config;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use gcra::Quota;
use limiter::{RateLimiter, Verdict};
use std::collections::HashMap;

/// The tier of users without one of their own.
pub const DEFAULT_TIER: &str = "default";

/// Tiers and their per-user quotas, from `SLUICE_TIERS`.
#[derive(Debug, Clone)]
pub struct Tiers(HashMap<String, Quota>);

impl Tiers {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let tiers: HashMap<String, Quota> = serde_json::from_str(text)
            .map_err(|error| anyhow::anyhow!("SLUICE_TIERS is not valid: {error}"))?;
        anyhow::ensure!(
            tiers.contains_key(DEFAULT_TIER),
            "SLUICE_TIERS must define the `default` tier"
        );
        for (name, quota) in &tiers {
            quota.validate(&format!("SLUICE_TIERS.{name}"))?;
        }
        Ok(Self(tiers))
    }

    /// `SLUICE_TIERS` as clap reads it: a bad value stops the process before anything starts.
    pub fn setting(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|error| format!("{error:#}"))
    }

    /// The quota of `tier`, or the default tier's for an unknown one.
    pub fn quota(&self, tier: &str) -> (&str, Quota) {
        match self.0.get_key_value(tier) {
            Some((name, quota)) => (name, *quota),
            None => (DEFAULT_TIER, self.0[DEFAULT_TIER]),
        }
    }
}

/// Builds the limiter the configuration asks for: Redis if `REDIS_URL` is set, else local.
pub async fn build_limiter(config: &Config) -> anyhow::Result<RateLimiter> {
    let global = Quota {
        rate_per_sec: config.global_rate_per_sec,
        burst: config.global_burst,
    };
    global.validate("SLUICE_GLOBAL_RATE_PER_SEC / SLUICE_GLOBAL_BURST")?;
    match &config.redis_url {
        Some(url) => {
            RateLimiter::redis(
                secrecy::ExposeSecret::expose_secret(url),
                config.redis_prefix.clone(),
                global,
                config.redis_failure_mode,
            )
            .await
        }
        None => Ok(RateLimiter::local(global)),
    }
}

/// The IETF `RateLimit-Policy` and `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers):
/// `q` the burst, `w` the seconds to earn it back, `r` what is left, `t` the seconds until full.
pub fn rate_limit_headers(
    tier: &str,
    user_quota: &Quota,
    global_quota: &Quota,
    verdict: &Verdict,
) -> HeaderMap {
    let reset = |decision: &gcra::Decision| decision.reset_after.as_secs_f64().ceil() as u64;
    let policy = format!(
        "\"{tier}\";q={};w={}, \"global\";q={};w={}",
        user_quota.burst,
        user_quota.window_secs(),
        global_quota.burst,
        global_quota.window_secs()
    );
    let state = format!(
        "\"{tier}\";r={};t={}, \"global\";r={};t={}",
        verdict.user.remaining,
        reset(&verdict.user),
        verdict.global.remaining,
        reset(&verdict.global)
    );
    let mut headers = HeaderMap::new();
    for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    headers
}
