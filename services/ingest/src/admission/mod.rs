//! Admission control: what decides, before anything is published, whether a submission may in.
//! Overload shedding, per-user and global rate limits, the pipeline's capacity, idempotency keys.

pub mod budget;
pub mod capacity;
pub mod gcra;
pub mod idempotency;
pub mod limiter;
pub mod tokens;

use crate::config::Config;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use gcra::Quota;
use limiter::{RateLimiter, Verdict};

pub use sluice_common::tiers::{DEFAULT_TIER, Tier, Tiers};

/// A tier's limit on a user's submissions.
pub fn user_quota(tier: &Tier) -> Quota {
    Quota {
        rate_per_sec: tier.rate_per_sec,
        burst: tier.burst,
    }
}

/// A tier's limit on a user's tokens, if it has one.
pub fn token_quota(tier: &Tier) -> Option<Quota> {
    let (rate_per_sec, burst) = tier.token_rate()?;
    Some(Quota {
        rate_per_sec,
        burst,
    })
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
/// A tier's token limit is the policy `"<tier>-tokens"`, counted in tokens.
pub fn rate_limit_headers(
    tier: &str,
    user_quota: &Quota,
    global_quota: &Quota,
    token_quota: Option<&Quota>,
    verdict: &Verdict,
) -> HeaderMap {
    let reset = |decision: &gcra::Decision| decision.reset_after.as_secs_f64().ceil() as u64;
    let mut policy = format!(
        "\"{tier}\";q={};w={}, \"global\";q={};w={}",
        user_quota.burst,
        user_quota.window_secs(),
        global_quota.burst,
        global_quota.window_secs()
    );
    let mut state = format!(
        "\"{tier}\";r={};t={}, \"global\";r={};t={}",
        verdict.user.remaining,
        reset(&verdict.user),
        verdict.global.remaining,
        reset(&verdict.global)
    );
    if let (Some(quota), Some(tokens)) = (token_quota, &verdict.tokens) {
        policy.push_str(&format!(
            ", \"{tier}-tokens\";q={};w={}",
            quota.burst,
            quota.window_secs()
        ));
        state.push_str(&format!(
            ", \"{tier}-tokens\";r={};t={}",
            tokens.remaining,
            reset(tokens)
        ));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    headers
}
