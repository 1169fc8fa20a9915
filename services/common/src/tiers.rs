//! Tiers (`SLUICE_TIERS`): what a user's API key entitles it to. Ingest reads a tier's limits
//! (requests and tokens), the worker its weight in the fair queue; both read the same setting
//! through this one parse, and the same default cap on a job's answer for token estimates.

use serde::Deserialize;
use std::collections::HashMap;

/// The tier of users without one of their own.
pub const DEFAULT_TIER: &str = "default";

/// One tier's entitlements.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Submissions per second, sustained, per user.
    pub rate_per_sec: f64,
    /// Submissions a user may make at once before the rate applies.
    pub burst: u32,
    /// Model tokens (prompt and answer together) per minute, per user; none if absent.
    #[serde(default)]
    pub tokens_per_min: Option<f64>,
    /// Tokens a user may reserve at once; a minute's worth if absent. A job estimated at more
    /// can never be admitted and is refused as too large.
    #[serde(default)]
    pub token_burst: Option<u32>,
    /// The tier's share of a worker when users of several tiers are backlogged: a user of a
    /// tier of weight 2 gets twice the model tokens of one of weight 1.
    #[serde(default = "one")]
    pub weight: f64,
    /// Whether the tier's users may submit `interactive` jobs; if not, every job of theirs
    /// goes to the `batch` lane.
    #[serde(default = "yes")]
    pub interactive: bool,
    /// What a user may spend in a UTC day, in the currency of `SLUICE_MODEL_PRICES`.
    #[serde(default)]
    pub budget_per_day: Option<f64>,
    /// What a user may spend in a UTC calendar month.
    #[serde(default)]
    pub budget_per_month: Option<f64>,
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

impl Tier {
    /// The token limit as a rate and a burst, if the tier has one.
    pub fn token_rate(&self) -> Option<(f64, u32)> {
        let per_min = self.tokens_per_min?;
        let burst = self
            .token_burst
            .unwrap_or_else(|| per_min.ceil().min(f64::from(u32::MAX)) as u32);
        Some((per_min / 60.0, burst))
    }

    fn validate(&self, name: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.rate_per_sec.is_finite() && self.rate_per_sec > 0.0,
            "{name}: rate_per_sec must be above 0"
        );
        anyhow::ensure!(self.burst >= 1, "{name}: burst must be at least 1");
        if let Some(per_min) = self.tokens_per_min {
            anyhow::ensure!(
                per_min.is_finite() && per_min > 0.0,
                "{name}: tokens_per_min must be above 0"
            );
        }
        anyhow::ensure!(
            self.token_burst.is_none_or(|burst| burst >= 1),
            "{name}: token_burst must be at least 1"
        );
        anyhow::ensure!(
            self.weight.is_finite() && self.weight > 0.0,
            "{name}: weight must be above 0"
        );
        for (field, budget) in [
            ("budget_per_day", self.budget_per_day),
            ("budget_per_month", self.budget_per_month),
        ] {
            anyhow::ensure!(
                budget.is_none_or(|budget| budget.is_finite() && budget >= 0.0),
                "{name}: {field} must be a number of at least 0"
            );
        }
        Ok(())
    }

    /// Whether the tier limits spending.
    pub fn has_budget(&self) -> bool {
        self.budget_per_day.is_some() || self.budget_per_month.is_some()
    }
}

/// Every tier by name; `default` is always there.
#[derive(Debug, Clone)]
pub struct Tiers(HashMap<String, Tier>);

impl Tiers {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let tiers: HashMap<String, Tier> = serde_json::from_str(text)
            .map_err(|error| anyhow::anyhow!("SLUICE_TIERS is not valid: {error}"))?;
        anyhow::ensure!(
            tiers.contains_key(DEFAULT_TIER),
            "SLUICE_TIERS must define the `default` tier"
        );
        for (name, tier) in &tiers {
            tier.validate(&format!("SLUICE_TIERS.{name}"))?;
        }
        Ok(Self(tiers))
    }

    /// `SLUICE_TIERS` as clap reads it: a bad value stops the process before anything starts.
    pub fn setting(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|error| format!("{error:#}"))
    }

    /// Whether any tier limits tokens or spending (and admitted jobs hold reservations until
    /// they end).
    pub fn any_reservations(&self) -> bool {
        self.0
            .values()
            .any(|tier| tier.tokens_per_min.is_some() || tier.has_budget())
    }

    /// Whether any tier limits spending.
    pub fn any_budget(&self) -> bool {
        self.0.values().any(Tier::has_budget)
    }

    /// `tier` with its name, or the default tier for an unknown (or no) tier.
    pub fn get(&self, tier: Option<&str>) -> (&str, &Tier) {
        match tier.and_then(|tier| self.0.get_key_value(tier)) {
            Some((name, tier)) => (name, tier),
            None => (DEFAULT_TIER, &self.0[DEFAULT_TIER]),
        }
    }
}

/// The settings ingest and the worker share about tiers and token estimates.
#[derive(Debug, Clone, clap::Args)]
pub struct TierArgs {
    /// Tiers, JSON: `{"default": {"rate_per_sec": 10, "burst": 20}, "pro": {"rate_per_sec": 100,
    /// "burst": 200, "tokens_per_min": 200000, "weight": 2}}`. Without API keys every user is in
    /// `default`.
    #[arg(
        long = "tiers",
        env = "SLUICE_TIERS",
        default_value = r#"{"default": {"rate_per_sec": 10, "burst": 20}}"#,
        value_parser = Tiers::setting
    )]
    pub by_name: Tiers,

    /// The answer's tokens a chat job is estimated at when it sets no `max_tokens` (or
    /// `max_completion_tokens`): what a token limit reserves and the fair queue charges until
    /// the model reports its usage.
    #[arg(long, env = "SLUICE_DEFAULT_MAX_TOKENS", default_value_t = 512)]
    pub default_max_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_defaults_its_weight_and_its_token_burst() {
        let tiers = Tiers::parse(
            r#"{"default": {"rate_per_sec": 1, "burst": 1},
                "pro": {"rate_per_sec": 5, "burst": 5, "tokens_per_min": 6000, "weight": 2}}"#,
        )
        .unwrap();
        let (name, default) = tiers.get(Some("nope"));
        assert_eq!(
            (name, default.weight, default.token_rate()),
            ("default", 1.0, None)
        );
        let (name, pro) = tiers.get(Some("pro"));
        assert_eq!(
            (name, pro.weight, pro.token_rate()),
            ("pro", 2.0, Some((100.0, 6000)))
        );
    }

    #[test]
    fn a_bad_tier_is_named() {
        let error = Tiers::parse(r#"{"default": {"rate_per_sec": 1, "burst": 1, "weight": 0}}"#)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "SLUICE_TIERS.default: weight must be above 0"
        );
        assert!(Tiers::parse(r#"{"pro": {"rate_per_sec": 1, "burst": 1}}"#).is_err());
    }
}
