//! Per-user and global rate limits, and a user's token limit, decided together and atomically:
//! in process, or in Redis (one Lua script per decision) so that limits hold across every
//! ingest replica. A token reservation is settled later against the job's real usage.

use super::gcra::{self, Decision, Quota};
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Every decision for one request.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub user: Decision,
    pub global: Decision,
    /// The user's token limit, if its tier has one.
    pub tokens: Option<Decision>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.user.allowed && self.global.allowed && self.tokens.is_none_or(|tokens| tokens.allowed)
    }

    /// Until a refused request could succeed: the latest of them.
    pub fn retry_after(&self) -> Duration {
        let tokens = self
            .tokens
            .map_or(Duration::ZERO, |tokens| tokens.retry_after);
        self.user
            .retry_after
            .max(self.global.retry_after)
            .max(tokens)
    }
}

/// A request's token reservation: the user's token quota and what the job is estimated at.
#[derive(Debug, Clone, Copy)]
pub struct TokenCharge {
    pub quota: Quota,
    pub tokens: u64,
}

/// What to do when Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Admit the request (and log and count the failure): the limiter never takes ingest down.
    Open,
    /// Refuse the request with 503.
    Closed,
}

pub enum Store {
    Local(Mutex<HashMap<String, f64>>),
    Redis {
        connection: ConnectionManager,
        script: redis::Script,
        settle: redis::Script,
        prefix: String,
    },
}

pub struct RateLimiter {
    store: Store,
    pub global: Quota,
    pub failure_mode: FailureMode,
    /// Admission decisions (limits, idempotency) that could not be made because Redis failed;
    /// counted by the caller, which also applies the failure mode.
    pub store_failures: AtomicU64,
}

/// Checks every key's TAT together (user, global, and the user's tokens if given: ARGV holds
/// interval, window and cost for each); stores them all only if all admit.
const SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local result = {}
local new_tats = {}
local allowed = 1
for i = 1, #KEYS do
  local interval = tonumber(ARGV[(i - 1) * 3 + 1])
  local window = tonumber(ARGV[(i - 1) * 3 + 2])
  local cost = tonumber(ARGV[(i - 1) * 3 + 3])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if not tat or tat < now then tat = now end
  local new_tat = tat + interval * cost
  local ahead = new_tat - now
  if ahead > window + 0.000001 then
    allowed = 0
    local left = math.max(0, math.floor((window - (tat - now)) / interval + 0.000001))
    result[i] = {0, left, tostring(ahead - window), tostring(tat - now)}
  else
    new_tats[i] = {new_tat, ahead}
    result[i] = {1, math.floor((window - ahead) / interval + 0.000001), '0', tostring(ahead)}
  end
end
if allowed == 1 then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], tostring(new_tats[i][1]), 'PX', math.ceil(new_tats[i][2]) + 1000)
  end
end
return result
"#;

/// Moves a token TAT by ARGV[1] ms (a refund is negative), never before now.
const SETTLE: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then tat = now end
local new_tat = math.max(tat + tonumber(ARGV[1]), now)
if new_tat > now then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
else
  redis.call('DEL', KEYS[1])
end
return 1
"#;

type ScriptDecision = (u32, u32, String, String);

fn from_script((allowed, remaining, retry_after_ms, reset_after_ms): ScriptDecision) -> Decision {
    let millis =
        |text: &str| Duration::from_secs_f64(text.parse::<f64>().unwrap_or(0.0).max(0.0) / 1000.0);
    Decision {
        allowed: allowed == 1,
        remaining,
        retry_after: millis(&retry_after_ms),
        reset_after: millis(&reset_after_ms),
    }
}

impl RateLimiter {
    pub fn local(global: Quota) -> Self {
        Self::with_store(
            Store::Local(Mutex::new(HashMap::new())),
            global,
            FailureMode::Open,
        )
    }

    pub async fn redis(
        url: &str,
        prefix: String,
        global: Quota,
        failure_mode: FailureMode,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_millis(500))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_with_config(client, config).await?;
        let store = Store::Redis {
            connection,
            script: redis::Script::new(SCRIPT),
            settle: redis::Script::new(SETTLE),
            prefix,
        };
        Ok(Self::with_store(store, global, failure_mode))
    }

    fn with_store(store: Store, global: Quota, failure_mode: FailureMode) -> Self {
        Self {
            store,
            global,
            failure_mode,
            store_failures: AtomicU64::new(0),
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.store, Store::Redis { .. })
    }

    /// Decides a request of `user` under `quota` (and `tokens`, its reservation against the
    /// user's token limit); `Err` only when Redis failed.
    pub async fn check(
        &self,
        user: &str,
        quota: &Quota,
        tokens: Option<TokenCharge>,
    ) -> Result<Verdict, redis::RedisError> {
        match &self.store {
            Store::Local(tats) => {
                let now_ms = now_ms();
                let mut tats = tats.lock().expect("limiter lock");
                if tats.len() > 100_000 {
                    tats.retain(|_, tat| *tat > now_ms);
                }
                let mut checks = vec![
                    (format!("user:{user}"), *quota, 1),
                    ("global".to_owned(), self.global, 1),
                ];
                if let Some(charge) = tokens {
                    checks.push((format!("tokens:{user}"), charge.quota, charge.tokens));
                }
                let decided: Vec<(String, Decision, f64)> = checks
                    .into_iter()
                    .map(|(key, quota, cost)| {
                        let (decision, tat) =
                            gcra::decide_cost(&quota, cost, tats.get(&key).copied(), now_ms);
                        (key, decision, tat)
                    })
                    .collect();
                if decided.iter().all(|(_, decision, _)| decision.allowed) {
                    for (key, _, tat) in &decided {
                        tats.insert(key.clone(), *tat);
                    }
                }
                Ok(verdict(
                    decided.into_iter().map(|(_, decision, _)| decision),
                ))
            }
            Store::Redis {
                connection,
                script,
                prefix,
                ..
            } => {
                let mut connection = connection.clone();
                let mut invocation = script.key(format!("{prefix}rate:user:{user}"));
                invocation
                    .key(format!("{prefix}rate:global"))
                    .arg(quota.emission_interval_ms())
                    .arg(quota.burst_window_ms())
                    .arg(1)
                    .arg(self.global.emission_interval_ms())
                    .arg(self.global.burst_window_ms())
                    .arg(1);
                if let Some(charge) = tokens {
                    invocation
                        .key(format!("{prefix}tokens:user:{user}"))
                        .arg(charge.quota.emission_interval_ms())
                        .arg(charge.quota.burst_window_ms())
                        .arg(charge.tokens);
                }
                let decided: Vec<ScriptDecision> = invocation.invoke_async(&mut connection).await?;
                Ok(verdict(decided.into_iter().map(from_script)))
            }
        }
    }

    /// Settles a token reservation of `user`: `delta` tokens charged (positive) or given back
    /// (negative) now that the job's real usage is known.
    pub async fn settle(
        &self,
        user: &str,
        quota: &Quota,
        delta: i64,
    ) -> Result<(), redis::RedisError> {
        if delta == 0 {
            return Ok(());
        }
        match &self.store {
            Store::Local(tats) => {
                let now_ms = now_ms();
                let mut tats = tats.lock().expect("limiter lock");
                let key = format!("tokens:{user}");
                let tat = tats.get(&key).copied().unwrap_or(now_ms);
                tats.insert(key, gcra::settle(quota, delta, tat, now_ms));
                Ok(())
            }
            Store::Redis {
                connection,
                settle,
                prefix,
                ..
            } => {
                let mut connection = connection.clone();
                let _: i64 = settle
                    .key(format!("{prefix}tokens:user:{user}"))
                    .arg(quota.emission_interval_ms() * delta as f64)
                    .invoke_async(&mut connection)
                    .await?;
                Ok(())
            }
        }
    }
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// The decisions in the order they were asked: user, global, then tokens if asked.
fn verdict(mut decisions: impl Iterator<Item = Decision>) -> Verdict {
    let mut next = || {
        decisions.next().unwrap_or(Decision {
            allowed: false,
            remaining: 0,
            retry_after: Duration::ZERO,
            reset_after: Duration::ZERO,
        })
    };
    let user = next();
    let global = next();
    Verdict {
        user,
        global,
        tokens: decisions.next(),
    }
}
