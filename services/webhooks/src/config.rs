//! Webhooks settings, read from flags or the environment; every default works on a laptop.

use secrecy::SecretString;
use sluice_common::kafka::{KafkaArgs, TopicArgs};
use std::time::Duration;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-webhooks",
    about = "Delivers jobs' status changes as signed webhooks, at least once"
)]
pub struct Config {
    /// Address of the health and metrics endpoints.
    #[arg(long, env = "SLUICE_WEBHOOKS_ADDR", default_value = "127.0.0.1:8083")]
    pub addr: String,

    /// Postgres connection URL (deliveries and signing secrets live there).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://sluice:sluice@127.0.0.1:5432/sluice"
    )]
    pub database_url: SecretString,

    /// The key users' signing secrets are sealed with: 32 bytes, base64 (`openssl rand -base64
    /// 32`); the same on results, which shows and rotates the secrets.
    #[arg(long, env = "SLUICE_WEBHOOK_SECRET_KEY", hide_env_values = true)]
    pub secret_key: SecretString,

    #[command(flatten)]
    pub connections: sluice_common::http::ConnectionArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub topics: TopicArgs,

    /// Consumer group shared by all webhooks replicas.
    #[arg(long, env = "SLUICE_WEBHOOKS_GROUP", default_value = "sluice-webhooks")]
    pub group_id: String,

    /// Delays between attempts, in ms, comma separated; after the last, the last again until
    /// the horizon. Default: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, then hourly.
    #[arg(
        long = "retry-schedule-ms",
        env = "SLUICE_WEBHOOK_RETRY_SCHEDULE_MS",
        value_delimiter = ',',
        default_value = "5000,30000,120000,600000,1800000,3600000"
    )]
    pub retry_schedule_ms: Vec<u64>,

    /// How long after the first attempt a delivery is still retried, in seconds (a day).
    #[arg(long = "retry-horizon-secs", env = "SLUICE_WEBHOOK_RETRY_HORIZON_SECS", default_value = "86400", value_parser = sluice_common::settings::secs)]
    pub retry_horizon: Duration,

    /// How long one delivery request may take, in ms.
    #[arg(long = "timeout-ms", env = "SLUICE_WEBHOOK_TIMEOUT_MS", default_value = "10000", value_parser = sluice_common::settings::millis)]
    pub timeout: Duration,

    /// Deliveries in flight at once, over all receivers.
    #[arg(long, env = "SLUICE_WEBHOOK_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,

    /// Deliveries in flight at once to one host: a slow receiver holds no more than these.
    #[arg(long, env = "SLUICE_WEBHOOK_PER_HOST_CONCURRENCY", default_value_t = 4)]
    pub per_host_concurrency: usize,

    /// Failures in a row after which a host's deliveries pause for the cool-down.
    #[arg(long, env = "SLUICE_WEBHOOK_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,

    #[arg(long = "breaker-cooldown-ms", env = "SLUICE_WEBHOOK_BREAKER_COOLDOWN_MS", default_value = "30000", value_parser = sluice_common::settings::millis)]
    pub breaker_cooldown: Duration,

    /// Deliver to loopback, private and link-local addresses too. For development and tests
    /// only (`scripts/run` sets it): it lets a job's URL reach this network's own services.
    #[arg(long, env = "SLUICE_WEBHOOK_ALLOW_PRIVATE_NETWORKS", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_private_networks: bool,

    /// How long the broker may hold the status consumer's fetch to gather events, in ms. A
    /// webhook's first attempt waits for the scheduler's poll anyway; fetching every event as
    /// it arrives cost the broker a fetch per produce request of the workers (about 250 a
    /// second at 400 jobs/s, with no job asking for a webhook).
    #[arg(long = "fetch-wait-ms", env = "SLUICE_WEBHOOK_FETCH_WAIT_MS", default_value = "100", value_parser = sluice_common::settings::millis)]
    pub fetch_wait: Duration,

    /// How often the scheduler looks for due deliveries, in ms.
    #[arg(long = "poll-ms", env = "SLUICE_WEBHOOK_POLL_MS", default_value = "200", value_parser = sluice_common::settings::millis)]
    pub poll: Duration,

    /// After a stop signal, how long deliveries in flight get, in ms.
    #[arg(long = "drain-timeout-ms", env = "SLUICE_DRAIN_TIMEOUT_MS", default_value = "10000", value_parser = sluice_common::settings::millis)]
    pub drain_timeout: Duration,
}

impl Config {
    pub fn defaults_with_key(key: &str) -> Self {
        <Self as clap::Parser>::parse_from(["sluice-webhooks", "--secret-key", key])
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.retry_schedule_ms.is_empty() && self.retry_schedule_ms.iter().all(|ms| *ms > 0),
            "SLUICE_WEBHOOK_RETRY_SCHEDULE_MS must list delays above 0"
        );
        anyhow::ensure!(
            self.concurrency > 0 && self.per_host_concurrency > 0,
            "webhook concurrency must be above 0"
        );
        Ok(())
    }

    /// The delay before each retry: the schedule, then its last delay, until the horizon.
    pub fn retry_delays(&self) -> Vec<Duration> {
        let mut delays = Vec::new();
        let mut total = Duration::ZERO;
        let last = *self.retry_schedule_ms.last().unwrap_or(&3_600_000);
        for ms in self
            .retry_schedule_ms
            .iter()
            .copied()
            .chain(std::iter::repeat(last))
        {
            let delay = Duration::from_millis(ms);
            if total + delay > self.retry_horizon || delays.len() >= 1000 {
                break;
            }
            total += delay;
            delays.push(delay);
        }
        delays
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_retries_for_a_day() {
        let config = Config::defaults_with_key("x");
        let delays = config.retry_delays();
        assert_eq!(
            delays[..3],
            [
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120)
            ]
        );
        let total: Duration = delays.iter().sum();
        assert!(
            total <= Duration::from_secs(86_400) && total > Duration::from_secs(82_000),
            "{total:?}"
        );
        assert_eq!(delays.len(), 6 + 22, "six, then hourly");
    }
}
