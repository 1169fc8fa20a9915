//! The delivery scheduler: due deliveries are leased from Postgres by any replica (`FOR UPDATE
//! SKIP LOCKED`, then a lease, so no lock is held during the call and a replica that dies
//! mid-delivery only delays it until the lease ends), sent signed, and their outcome recorded.
//! Each host has its own slots and breaker, so a slow or dead receiver holds only its own;
//! deliveries leased for a host whose slots are taken wait in its queue (their lease covers the
//! wait) and take a slot as it frees, rather than going back to the table and being leased again.

use crate::signer::Signer;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A delivery leased for one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Due {
    pub(crate) delivery_id: i64,
    pub(crate) webhook_id: String,
    pub(crate) user_id: String,
    pub(crate) url: String,
    pub(crate) host: String,
    pub(crate) payload: String,
    pub(crate) attempts: i32,
    pub(crate) status_at: DateTime<Utc>,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempted {
    /// 2xx.
    Delivered(u16),
    /// 410: the receiver wants no more of this job.
    Gone,
    /// Anything else: retried on schedule. `retry_after` is the receiver's `Retry-After`.
    Failed {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// The private-network guard refused the address: not retried.
    Refused(String),
}

/// What the scheduler needs.
pub(crate) struct Scheduler {
    pub(crate) pool: PgPool,
    pub(crate) signer: Signer,
    pub(crate) client: reqwest::Client,
    pub(crate) delays: Vec<Duration>,
    pub(crate) timeout: Duration,
    pub(crate) poll: Duration,
    pub(crate) concurrency: Arc<Semaphore>,
    pub(crate) per_host: usize,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cooldown: Duration,
    pub(crate) allow_private_networks: bool,
    hosts: Mutex<HashMap<String, Host>>,
    /// Woken when a delivery ends, so that more are leased at once.
    finished: Notify,
}

/// One receiving host: its deliveries in flight, those leased and waiting for a slot, and its
/// breaker.
#[derive(Debug, Default)]
struct Host {
    in_flight: usize,
    waiting: VecDeque<(Due, OwnedSemaphorePermit)>,
    failures_in_a_row: u32,
    open_until: Option<Instant>,
}

/// What became of a leased delivery offered to its host.
enum Admitted {
    /// A slot is free: send it now.
    Go(Due, OwnedSemaphorePermit),
    /// Queued behind the host's deliveries in flight (its lease covers the wait).
    Waiting,
    /// The host's breaker is open, or its queue is full: give it back, due after this.
    Open(Due, Duration),
}

impl Scheduler {
    #[allow(clippy::too_many_arguments)] // Why: each is one setting; a builder would only rename them.
    pub(crate) fn new(
        pool: PgPool,
        signer: Signer,
        client: reqwest::Client,
        delays: Vec<Duration>,
        timeout: Duration,
        poll: Duration,
        concurrency: usize,
        per_host: usize,
        breaker: (u32, Duration),
        allow_private_networks: bool,
    ) -> Self {
        Self {
            pool,
            signer,
            client,
            delays,
            timeout,
            poll,
            concurrency: Arc::new(Semaphore::new(concurrency)),
            per_host,
            breaker_threshold: breaker.0,
            breaker_cooldown: breaker.1,
            allow_private_networks,
            hosts: Mutex::new(HashMap::new()),
            finished: Notify::new(),
        }
    }

    /// Leases and sends due deliveries until `stop`; deliveries in flight then are awaited.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let mut depth_sampled = Instant::now() - Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.finished.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
            }
            if depth_sampled.elapsed() >= Duration::from_secs(5) {
                depth_sampled = Instant::now();
                self.sample_depth().await;
            }
            // Every slot taken, whether sending or waiting for its host: lease no more.
            let free = self.concurrency.available_permits();
            if free == 0 {
                continue;
            }
            let due = match self.lease(free).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(error = %error, "leasing due webhook deliveries failed");
                    continue;
                }
            };
            for delivery in due {
                let Ok(permit) = self.concurrency.clone().try_acquire_owned() else {
                    self.release(&delivery, Duration::ZERO).await;
                    continue;
                };
                match self.admit(delivery, permit) {
                    Admitted::Go(delivery, permit) => {
                        let scheduler = self.clone();
                        tracker.spawn(async move {
                            scheduler.send_while_waiting(delivery, permit).await
                        });
                    }
                    Admitted::Waiting => {}
                    Admitted::Open(delivery, wait) => self.release(&delivery, wait).await,
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    /// Sends `delivery`, then, on the same slot, the next one waiting for its host, if any.
    async fn send_while_waiting(&self, delivery: Due, permit: OwnedSemaphorePermit) {
        let mut next = Some((delivery, permit));
        while let Some((delivery, permit)) = next.take() {
            let attempted = self.attempt(&delivery).await;
            self.record(&delivery, &attempted).await;
            drop(permit);
            let (following, give_back) = self.leave_host(&delivery.host, &attempted);
            for (waiting, _) in give_back {
                self.release(&waiting, self.breaker_cooldown).await;
            }
            next = following;
            self.finished.notify_one();
        }
    }

    /// Leases up to `limit` due deliveries for one attempt each.
    async fn lease(&self, limit: usize) -> sqlx::Result<Vec<Due>> {
        // The lease outlives the request's timeout (twice over, and 5 s): the row is not taken
        // twice while in flight, and a replica that died holding it delays it this long at most.
        let lease = self.timeout * 2 + Duration::from_secs(5);
        sqlx::query_as(
            "UPDATE webhook_deliveries d SET leased_until = now() + $2 * interval '1 millisecond'
             FROM (SELECT delivery_id FROM webhook_deliveries
                   WHERE state = 'pending' AND next_attempt_at <= now()
                     AND (leased_until IS NULL OR leased_until < now())
                   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
             WHERE d.delivery_id = due.delivery_id
             RETURNING d.delivery_id, d.webhook_id, d.user_id, d.url, d.host, d.payload, d.attempts, d.status_at",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
    }

    /// Gives a leased delivery back without an attempt, due again after `wait`.
    async fn release(&self, delivery: &Due, wait: Duration) {
        let result = sqlx::query(
            "UPDATE webhook_deliveries SET leased_until = NULL,
                 next_attempt_at = now() + $2 * interval '1 millisecond'
             WHERE delivery_id = $1",
        )
        .bind(delivery.delivery_id)
        .bind(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await;
        if let Err(error) = result {
            // The lease runs out by itself; the delivery is only later.
            tracing::warn!(error = %error, "releasing a webhook delivery failed");
        }
    }

    /// Offers a leased delivery to its host: a slot now, a place in its queue, or back.
    fn admit(&self, delivery: Due, permit: OwnedSemaphorePermit) -> Admitted {
        let mut hosts = self.hosts.lock().expect("hosts");
        let state = hosts.entry(delivery.host.clone()).or_default();
        if let Some(until) = state.open_until {
            let now = Instant::now();
            if now < until {
                return Admitted::Open(delivery, until - now);
            }
        }
        if state.in_flight >= self.per_host {
            // At most as many waiting as sending: a slow host holds no more than twice its
            // slots of the scheduler's, and a waiting delivery's lease outlasts its wait.
            if state.waiting.len() >= self.per_host {
                return Admitted::Open(delivery, Duration::from_millis(250));
            }
            state.waiting.push_back((delivery, permit));
            return Admitted::Waiting;
        }
        state.in_flight += 1;
        Admitted::Go(delivery, permit)
    }

    /// An attempt to `host` ended: the breaker learns from it, and the slot goes to the next
    /// delivery waiting for the host (returned first). If the breaker opened, the waiting ones
    /// are handed back (second) to be given back to the table.
    #[allow(clippy::type_complexity)] // Why: two small lists, named where they are used.
    fn leave_host(
        &self,
        host: &str,
        attempted: &Attempted,
    ) -> (
        Option<(Due, OwnedSemaphorePermit)>,
        Vec<(Due, OwnedSemaphorePermit)>,
    ) {
        let mut hosts = self.hosts.lock().expect("hosts");
        let state = hosts.entry(host.to_owned()).or_default();
        match attempted {
            Attempted::Delivered(_) | Attempted::Gone => {
                state.failures_in_a_row = 0;
                state.open_until = None;
            }
            Attempted::Failed { .. } => {
                state.failures_in_a_row += 1;
                if state.failures_in_a_row >= self.breaker_threshold {
                    state.open_until = Some(Instant::now() + self.breaker_cooldown);
                }
            }
            Attempted::Refused(_) => {}
        }
        if state.open_until.is_some_and(|until| Instant::now() < until) {
            state.in_flight = state.in_flight.saturating_sub(1);
            return (None, state.waiting.drain(..).collect());
        }
        match state.waiting.pop_front() {
            // The slot passes on: in flight stays as it is.
            Some(next) => (Some(next), Vec::new()),
            None => {
                state.in_flight = state.in_flight.saturating_sub(1);
                (None, Vec::new())
            }
        }
    }

    /// One signed POST.
    async fn attempt(&self, delivery: &Due) -> Attempted {
        if !self.allow_private_networks
            && let Some(reason) = literal_refusal(&delivery.url)
        {
            return Attempted::Refused(reason);
        }
        let headers = match self
            .signer
            .headers(
                &delivery.user_id,
                &delivery.webhook_id,
                delivery.payload.as_bytes(),
            )
            .await
        {
            Ok(headers) => headers,
            Err(error) => {
                return Attempted::Failed {
                    status: None,
                    error: format!("signing: {error:#}"),
                    retry_after: None,
                };
            }
        };
        let sent = self
            .client
            .post(&delivery.url)
            .timeout(self.timeout)
            .headers(headers)
            .body(delivery.payload.clone())
            .send()
            .await;
        match sent {
            // The body is never read: a receiver's answer is its status.
            Ok(response) => classify(response.status().as_u16(), response.headers()),
            Err(error) => {
                let message = error_chain(&error);
                if message.contains("refused by the private-network guard") {
                    Attempted::Refused(message)
                } else {
                    Attempted::Failed {
                        status: None,
                        error: message,
                        retry_after: None,
                    }
                }
            }
        }
    }

    /// Records an attempt's outcome: delivered, stopped, failed for good, or due again.
    async fn record(&self, delivery: &Due, attempted: &Attempted) {
        let attempts = delivery.attempts + 1;
        let (state, status, error, next) = match attempted {
            Attempted::Delivered(status) => ("delivered", Some(i32::from(*status)), None, None),
            Attempted::Gone => (
                "stopped",
                Some(410),
                Some("the receiver answered 410 Gone: no more deliveries for this job".to_owned()),
                None,
            ),
            Attempted::Refused(reason) => ("failed", None, Some(reason.clone()), None),
            Attempted::Failed {
                status,
                error,
                retry_after,
            } => {
                match self
                    .delays
                    .get(usize::try_from(attempts - 1).unwrap_or(usize::MAX))
                {
                    Some(delay) => {
                        let jittered = delay.mul_f64(0.8 + fastrand::f64() * 0.4);
                        let wait = retry_after.map_or(jittered, |asked| asked.max(jittered));
                        (
                            "pending",
                            status.map(i32::from),
                            Some(error.clone()),
                            Some(wait),
                        )
                    }
                    None => ("failed", status.map(i32::from), Some(error.clone()), None),
                }
            }
        };
        let outcome = match attempted {
            Attempted::Delivered(_) => "delivered",
            Attempted::Gone => "gone",
            Attempted::Refused(_) => "refused",
            Attempted::Failed { .. } => "error",
        };
        metrics::counter!("sluice_webhook_attempts_total", "outcome" => outcome).increment(1);
        if state != "pending" {
            metrics::counter!("sluice_webhook_deliveries_total", "outcome" => state).increment(1);
        }
        if state == "delivered" {
            let delay = (Utc::now() - delivery.status_at)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!("sluice_webhook_delivery_delay_seconds")
                .record(delay.as_secs_f64());
        }
        let wait_ms = next.map(|wait| i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
        let result = sqlx::query(
            "UPDATE webhook_deliveries SET state = $2, attempts = $3, last_status = $4, last_error = $5,
                 leased_until = NULL,
                 next_attempt_at = CASE WHEN $6::bigint IS NULL THEN next_attempt_at
                                        ELSE now() + $6 * interval '1 millisecond' END,
                 delivered_at = CASE WHEN $2 = 'delivered' THEN now() ELSE delivered_at END
             WHERE delivery_id = $1",
        )
        .bind(delivery.delivery_id)
        .bind(state)
        .bind(attempts)
        .bind(status)
        .bind(error)
        .bind(wait_ms)
        .execute(&self.pool)
        .await;
        if let Err(error) = result {
            // The lease runs out and the delivery is attempted again: at least once, not exactly.
            tracing::warn!(error = %error, webhook_id = %delivery.webhook_id, "recording a webhook attempt failed");
        }
        tracing::debug!(webhook_id = %delivery.webhook_id, attempts, state, "webhook attempt");
    }

    async fn sample_depth(&self) {
        let depth: Result<(i64,), _> =
            sqlx::query_as("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
                .fetch_one(&self.pool)
                .await;
        if let Ok((depth,)) = depth {
            metrics::gauge!("sluice_webhook_queue_depth").set(depth as f64);
        }
    }
}

/// A status as the outcome it is.
fn classify(status: u16, headers: &reqwest::header::HeaderMap) -> Attempted {
    match status {
        200..=299 => Attempted::Delivered(status),
        410 => Attempted::Gone,
        _ => Attempted::Failed {
            status: Some(status),
            error: format!("the receiver answered {status}"),
            retry_after: headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|text| text.trim().parse::<u64>().ok())
                .map(|secs| Duration::from_secs(secs.min(86_400))),
        },
    }
}

/// A URL whose host is a literal forbidden address (the resolver sees only names).
fn literal_refusal(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let ip: std::net::IpAddr = match parsed.host()? {
        url::Host::Ipv4(ip) => ip.into(),
        url::Host::Ipv6(ip) => ip.into(),
        url::Host::Domain(_) => return None,
    };
    sluice_common::webhooks::guard::forbidden(ip)
        .map(|reason| format!("refused by the private-network guard: {ip} is {reason}"))
}

/// An error and its causes, on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_become_outcomes() {
        let none = reqwest::header::HeaderMap::new();
        assert_eq!(classify(204, &none), Attempted::Delivered(204));
        assert_eq!(classify(410, &none), Attempted::Gone);
        let mut retry = reqwest::header::HeaderMap::new();
        retry.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(
            classify(429, &retry),
            Attempted::Failed {
                status: Some(429),
                error: "the receiver answered 429".into(),
                retry_after: Some(Duration::from_secs(7)),
            }
        );
    }

    #[test]
    fn literal_internal_addresses_are_refused() {
        for url in [
            "https://127.0.0.1/",
            "https://[::ffff:127.0.0.1]/",
            "https://169.254.169.254/latest",
            "http://10.0.0.1:8080/",
        ] {
            assert!(literal_refusal(url).is_some(), "{url}");
        }
        assert_eq!(literal_refusal("https://hooks.example.com/"), None);
        assert_eq!(literal_refusal("https://93.184.215.14/"), None);
    }
}
