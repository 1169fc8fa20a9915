//! Per-user and global rate limits, decided together and atomically: in process, or in Redis
//! (one Lua script per decision) so that limits hold across every ingest replica.

use super::gcra::{self, Decision, Quota};
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Both decisions for one request.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub user: Decision,
    pub global: Decision,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.user.allowed && self.global.allowed
    }

    /// Until a refused request could succeed: the later of the two.
    pub fn retry_after(&self) -> Duration {
        self.user.retry_after.max(self.global.retry_after)
    }
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

/// Checks the user's and the global TAT together; stores both only if both admit.
const SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local result = {}
local new_tats = {}
local allowed = 1
for i = 1, 2 do
  local interval = tonumber(ARGV[(i - 1) * 2 + 1])
  local window = tonumber(ARGV[(i - 1) * 2 + 2])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if not tat or tat < now then tat = now end
  local new_tat = tat + interval
  local ahead = new_tat - now
  if ahead > window + 0.000001 then
    allowed = 0
    result[i] = {0, 0, tostring(ahead - window), tostring(tat - now)}
  else
    new_tats[i] = {new_tat, ahead}
    result[i] = {1, math.floor((window - ahead) / interval + 0.000001), '0', tostring(ahead)}
  end
end
if allowed == 1 then
  for i = 1, 2 do
    redis.call('SET', KEYS[i], tostring(new_tats[i][1]), 'PX', math.ceil(new_tats[i][2]) + 1000)
  end
end
return {result[1], result[2]}
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

    /// Decides a request of `user` under `quota`; `Err` only when Redis failed.
    pub async fn check(&self, user: &str, quota: &Quota) -> Result<Verdict, redis::RedisError> {
        match &self.store {
            Store::Local(tats) => {
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1000.0;
                let mut tats = tats.lock().expect("limiter lock");
                if tats.len() > 100_000 {
                    tats.retain(|_, tat| *tat > now_ms);
                }
                let user_key = format!("user:{user}");
                let (user_decision, user_tat) =
                    gcra::decide(quota, tats.get(&user_key).copied(), now_ms);
                let (global_decision, global_tat) =
                    gcra::decide(&self.global, tats.get("global").copied(), now_ms);
                if user_decision.allowed && global_decision.allowed {
                    tats.insert(user_key, user_tat);
                    tats.insert("global".to_owned(), global_tat);
                }
                Ok(Verdict {
                    user: user_decision,
                    global: global_decision,
                })
            }
            Store::Redis {
                connection,
                script,
                prefix,
            } => {
                let mut connection = connection.clone();
                let (user, global): (ScriptDecision, ScriptDecision) = script
                    .key(format!("{prefix}rate:user:{user}"))
                    .key(format!("{prefix}rate:global"))
                    .arg(quota.emission_interval_ms())
                    .arg(quota.burst_window_ms())
                    .arg(self.global.emission_interval_ms())
                    .arg(self.global.burst_window_ms())
                    .invoke_async(&mut connection)
                    .await?;
                Ok(Verdict {
                    user: from_script(user),
                    global: from_script(global),
                })
            }
        }
    }
}
