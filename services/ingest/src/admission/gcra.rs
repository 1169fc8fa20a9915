//! The generic cell rate algorithm (GCRA): a rate with a burst, decided from one stored time
//! (the "theoretical arrival time", TAT) per key. The same arithmetic runs in process and, as a
//! Lua script, in Redis.
//!
//! Why not `governor`, which implements GCRA: the in-process limiter must decide exactly as the
//! Redis script does, from the same stored TAT, so that switching `REDIS_URL` on changes where
//! the state lives and nothing else. Two things governor does not give: a user's quota and the
//! global one decided together (a request refused by the global limit must not spend the
//! user's burst, `limiter.rs`), and the remaining count and reset time for the `RateLimit`
//! headers from the same numbers the script returns. These 40 lines are that shared rule.

use serde::Deserialize;
use std::time::Duration;

/// A rate with a burst: `burst` requests at once, then `rate_per_sec` per second.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub rate_per_sec: f64,
    pub burst: u32,
}

impl Quota {
    /// Time between two requests at the sustained rate.
    pub fn emission_interval_ms(&self) -> f64 {
        1000.0 / self.rate_per_sec
    }

    /// How far ahead of now the TAT may run: the whole burst.
    pub fn burst_window_ms(&self) -> f64 {
        self.emission_interval_ms() * f64::from(self.burst)
    }

    /// The `w` of `RateLimit-Policy`: seconds to earn the whole burst back.
    pub fn window_secs(&self) -> u64 {
        (self.burst_window_ms() / 1000.0).ceil().max(1.0) as u64
    }

    pub fn validate(&self, name: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.rate_per_sec.is_finite() && self.rate_per_sec > 0.0,
            "{name}: rate_per_sec must be above 0"
        );
        anyhow::ensure!(self.burst >= 1, "{name}: burst must be at least 1");
        Ok(())
    }
}

/// The outcome of one GCRA decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests that could still be made right now.
    pub remaining: u32,
    /// Until the next request would be allowed (zero when allowed).
    pub retry_after: Duration,
    /// Until the whole burst is available again.
    pub reset_after: Duration,
}

/// Decides one request at `now_ms` against the stored `tat_ms` (absent: never seen), and
/// returns the decision with the TAT to store (unchanged when refused).
pub fn decide(quota: &Quota, tat_ms: Option<f64>, now_ms: f64) -> (Decision, f64) {
    decide_cost(quota, 1, tat_ms, now_ms)
}

/// Decides a request that costs `cost` units (tokens, for a token limit) at once; `remaining`
/// and `retry_after` are in the same units.
pub fn decide_cost(quota: &Quota, cost: u64, tat_ms: Option<f64>, now_ms: f64) -> (Decision, f64) {
    let interval = quota.emission_interval_ms();
    let window = quota.burst_window_ms();
    let tat = tat_ms.unwrap_or(now_ms).max(now_ms);
    let new_tat = tat + interval * cost as f64;
    let ahead = new_tat - now_ms;
    if ahead > window + 1e-6 {
        let decision = Decision {
            allowed: false,
            remaining: ((window - (tat - now_ms)) / interval + 1e-6)
                .floor()
                .max(0.0) as u32,
            retry_after: millis(ahead - window),
            reset_after: millis(tat - now_ms),
        };
        return (decision, tat);
    }
    let decision = Decision {
        allowed: true,
        remaining: ((window - ahead) / interval + 1e-6).floor() as u32,
        retry_after: Duration::ZERO,
        reset_after: millis(ahead),
    };
    (decision, new_tat)
}

/// The TAT after `delta` units are given back (negative) or charged (positive) once the real
/// cost of an admitted request is known; never before now, so a refund cannot bank capacity.
pub fn settle(quota: &Quota, delta: i64, tat_ms: f64, now_ms: f64) -> f64 {
    (tat_ms + quota.emission_interval_ms() * delta as f64).max(now_ms)
}

fn millis(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_ten_at_one_per_second_admits_ten_then_one_per_second() {
        let quota = Quota {
            rate_per_sec: 1.0,
            burst: 10,
        };
        let mut tat = None;
        let mut admitted = 0;
        let mut first_refusal = None;
        for _ in 0..30 {
            let (decision, next) = decide(&quota, tat, 0.0);
            tat = Some(next);
            if decision.allowed {
                admitted += 1;
            } else if first_refusal.is_none() {
                first_refusal = Some(decision);
            }
        }
        assert_eq!(admitted, 10);
        let refusal = first_refusal.unwrap();
        assert_eq!(refusal.retry_after, Duration::from_secs(1));
        assert_eq!(refusal.reset_after, Duration::from_secs(10));
        let (later, _) = decide(&quota, tat, 1000.0);
        assert!(later.allowed, "one more a second later");
        assert_eq!(later.remaining, 0);
    }

    #[test]
    fn a_token_limit_charges_the_cost_and_settles_to_the_real_count() {
        // 6,000 tokens a minute: 100 a second, a burst of 1,000.
        let quota = Quota {
            rate_per_sec: 100.0,
            burst: 1000,
        };
        let (first, tat) = decide_cost(&quota, 700, None, 0.0);
        assert_eq!((first.allowed, first.remaining), (true, 300));
        let (refused, same) = decide_cost(&quota, 400, Some(tat), 0.0);
        assert!(!refused.allowed);
        assert_eq!(same, tat, "a refusal spends nothing");
        assert_eq!(refused.remaining, 300);
        assert_eq!(
            refused.retry_after,
            Duration::from_secs(1),
            "100 tokens short at 100/s"
        );
        // The job used 200 tokens, not 700: 500 come back, and then 400 fit.
        let settled = settle(&quota, 200 - 700, tat, 0.0);
        let (again, _) = decide_cost(&quota, 400, Some(settled), 0.0);
        assert_eq!((again.allowed, again.remaining), (true, 400));
        assert_eq!(settle(&quota, -5000, settled, 0.0), 0.0, "never before now");
    }

    #[test]
    fn remaining_counts_down_from_the_burst() {
        let quota = Quota {
            rate_per_sec: 5.0,
            burst: 3,
        };
        let (first, tat) = decide(&quota, None, 0.0);
        assert_eq!((first.allowed, first.remaining), (true, 2));
        let (second, _) = decide(&quota, Some(tat), 0.0);
        assert_eq!((second.allowed, second.remaining), (true, 1));
        assert_eq!(quota.window_secs(), 1);
    }
}
