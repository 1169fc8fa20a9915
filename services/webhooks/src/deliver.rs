//! The delivery scheduler: due deliveries are leased from Postgres by any replica (`FOR UPDATE
//! SKIP LOCKED`, then a lease, so no lock is held during the call and a replica that dies
//! mid-delivery only delays it until the lease ends), sent signed, and their outcome recorded.
//! Each host has its own slots and breaker, so a slow or dead receiver holds only its own;
//! deliveries leased for a host whose slots are taken wait in its queue (their lease covers the
//! wait) and take a slot as it frees, rather than going back to the table and being leased again.
//!
//! A busy host is leased for only as many deliveries as it has room for (its slots and its queue),
//! and only once half its queue is free: leasing whatever was due and giving back what its host
//! could not take wrote every row given back again, on every delivery's end. An attempt's outcome
//! is written by one task for many attempts at once, and the host's slot passes on as soon as the
//! receiver has answered. On fresh bench stacks at 600 webhooks a second to one host: 3.3 row
//! writes a delivery before, 2.0 after, half the database's commits, the service's CPU 0.14 ->
//! 0.11 cores (BENCHMARKS.md).

use crate::signer::Signer;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
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
    /// A host's last delivery in flight ended: the next lease looks at every host's rows, not
    /// only the busy hosts'.
    went_idle: AtomicBool,
}

/// Outcomes written in one statement at most.
const OUTCOMES_PER_WRITE: usize = 512;

/// An attempt's outcome, to be written.
#[derive(Debug)]
pub(crate) struct Outcome {
    delivery_id: i64,
    state: &'static str,
    attempts: i32,
    status: Option<i32>,
    error: Option<String>,
    /// Due again after this, if it is to be tried again.
    wait_ms: Option<i64>,
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
            went_idle: AtomicBool::new(false),
        }
    }

    /// Leases and sends due deliveries until `stop`; deliveries in flight then are awaited.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        // Bounded: when the writes fall behind, the slots wait for them.
        let (outcomes, written) = mpsc::channel(OUTCOMES_PER_WRITE * 2);
        let writer = tokio::spawn(write_outcomes(self.pool.clone(), written));
        let mut depth_sampled = Instant::now() - Duration::from_secs(60);
        loop {
            let polled = tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.finished.notified() => false,
                _ = tokio::time::sleep(self.poll) => true,
            };
            if depth_sampled.elapsed() >= Duration::from_secs(5) {
                depth_sampled = Instant::now();
                self.sample_depth().await;
            }
            // Every slot taken, whether sending or waiting for its host: lease no more.
            let free = self.concurrency.available_permits();
            if free == 0 {
                continue;
            }
            let busy = self.busy_hosts(free);
            // A delivery ending looks again only at its busy hosts, unless a host went idle:
            // other hosts' due rows wait for the poll, as a first attempt does.
            let others = match polled || self.went_idle.swap(false, Ordering::Relaxed) {
                true => free,
                false => 0,
            };
            if others == 0 && busy.rooms.iter().all(|room| *room == 0) {
                continue;
            }
            let due = match self.lease(&busy, others).await {
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
                        let outcomes = outcomes.clone();
                        tracker.spawn(async move {
                            scheduler
                                .send_while_waiting(delivery, permit, &outcomes)
                                .await
                        });
                    }
                    Admitted::Waiting => {}
                    Admitted::Open(delivery, wait) => self.release(&delivery, wait).await,
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        // Every sender gone: the writer writes what is left and ends.
        drop(outcomes);
        writer.await?;
        Ok(())
    }

    /// Sends `delivery`, then, on the same slot, the next one waiting for its host, if any. The
    /// slot passes on when the receiver has answered; the outcome goes to the writer.
    async fn send_while_waiting(
        &self,
        delivery: Due,
        permit: OwnedSemaphorePermit,
        outcomes: &mpsc::Sender<Outcome>,
    ) {
        let mut next = Some((delivery, permit));
        while let Some((delivery, permit)) = next.take() {
            let attempted = self.attempt(&delivery).await;
            let (following, give_back) = self.leave_host(&delivery.host, &attempted);
            // The row stays leased until its outcome is written, so no replica takes it again
            // meanwhile; a crash before the write only lets the lease run out (at least once).
            let _ = outcomes.send(self.outcome(&delivery, &attempted)).await;
            drop(permit);
            for (waiting, _) in give_back {
                self.release(&waiting, self.breaker_cooldown).await;
            }
            next = following;
            self.finished.notify_one();
        }
    }

    /// The hosts with deliveries in flight or waiting (and a closed breaker), each with the
    /// deliveries it can take now: its slots and its queue, less what they hold, at most `free`,
    /// and none until half its queue is free (one lease then takes several, and the queue does
    /// not run dry while the lease is out).
    fn busy_hosts(&self, free: usize) -> BusyHosts {
        let hosts = self.hosts.lock().expect("hosts");
        let now = Instant::now();
        let mut busy = BusyHosts::default();
        for (name, host) in hosts.iter() {
            let sending_or_waiting = host.in_flight + host.waiting.len();
            if sending_or_waiting == 0 || host.open_until.is_some_and(|until| now < until) {
                continue;
            }
            let room = (self.per_host * 2).saturating_sub(sending_or_waiting);
            let room = if room >= self.per_host.div_ceil(2) {
                room.min(free)
            } else {
                0
            };
            busy.hosts.push(name.clone());
            busy.rooms.push(i64::try_from(room).unwrap_or(i64::MAX));
        }
        busy
    }

    /// Leases due deliveries for one attempt each: up to each busy host's room for its own, and up
    /// to `others` for every other host (whose breaker may be open: those go back with its wait).
    async fn lease(&self, busy: &BusyHosts, others: usize) -> sqlx::Result<Vec<Due>> {
        // The lease outlives the request's timeout (twice over, and 5 s): the row is not taken
        // twice while in flight, and a replica that died holding it delays it this long at most.
        let lease = self.timeout * 2 + Duration::from_secs(5);
        sqlx::query_as(
            "WITH busy AS (
                 SELECT host, room FROM UNNEST($3::text[], $4::bigint[]) AS b(host, room)
             ), of_busy AS (
                 SELECT picked.delivery_id FROM busy CROSS JOIN LATERAL (
                     SELECT delivery_id FROM webhook_deliveries
                     WHERE host = busy.host AND state = 'pending' AND next_attempt_at <= now()
                       AND (leased_until IS NULL OR leased_until < now())
                     ORDER BY next_attempt_at LIMIT busy.room FOR UPDATE SKIP LOCKED
                 ) picked
             ), of_others AS (
                 SELECT delivery_id FROM webhook_deliveries
                 WHERE state = 'pending' AND next_attempt_at <= now()
                   AND (leased_until IS NULL OR leased_until < now())
                   AND host <> ALL($3::text[])
                 ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED
             )
             UPDATE webhook_deliveries d SET leased_until = now() + $2 * interval '1 millisecond'
             FROM (SELECT delivery_id FROM of_busy UNION ALL SELECT delivery_id FROM of_others) due
             WHERE d.delivery_id = due.delivery_id
             RETURNING d.delivery_id, d.webhook_id, d.user_id, d.url, d.host, d.payload, d.attempts, d.status_at",
        )
        .bind(i64::try_from(others).unwrap_or(i64::MAX))
        .bind(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
        .bind(&busy.hosts)
        .bind(&busy.rooms)
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
                if state.in_flight == 0 {
                    self.went_idle.store(true, Ordering::Relaxed);
                }
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

    /// An attempt's outcome: delivered, stopped, failed for good, or due again; counted in the
    /// metrics here, written by `write_outcomes`.
    fn outcome(&self, delivery: &Due, attempted: &Attempted) -> Outcome {
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
        tracing::debug!(webhook_id = %delivery.webhook_id, attempts, state, "webhook attempt");
        Outcome {
            delivery_id: delivery.delivery_id,
            state,
            attempts,
            status,
            error,
            wait_ms: next.map(|wait| i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
        }
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

/// The busy hosts and the room of each, as the lease binds them.
#[derive(Debug, Default)]
struct BusyHosts {
    hosts: Vec<String>,
    rooms: Vec<i64>,
}

/// Writes outcomes as they come, all that have come in one statement, until every sender is gone.
async fn write_outcomes(pool: PgPool, mut outcomes: mpsc::Receiver<Outcome>) {
    let mut batch = Vec::with_capacity(OUTCOMES_PER_WRITE);
    while outcomes.recv_many(&mut batch, OUTCOMES_PER_WRITE).await > 0 {
        let result = sqlx::query(
            "UPDATE webhook_deliveries d SET state = o.state, attempts = o.attempts,
                 last_status = o.last_status, last_error = o.last_error, leased_until = NULL,
                 next_attempt_at = CASE WHEN o.wait_ms IS NULL THEN d.next_attempt_at
                                        ELSE now() + o.wait_ms * interval '1 millisecond' END,
                 delivered_at = CASE WHEN o.state = 'delivered' THEN now() ELSE d.delivered_at END
             FROM UNNEST($1::bigint[], $2::text[], $3::int[], $4::int[], $5::text[], $6::bigint[])
                 AS o(delivery_id, state, attempts, last_status, last_error, wait_ms)
             WHERE d.delivery_id = o.delivery_id",
        )
        .bind(column(&batch, |outcome| outcome.delivery_id))
        .bind(column(&batch, |outcome| outcome.state))
        .bind(column(&batch, |outcome| outcome.attempts))
        .bind(column(&batch, |outcome| outcome.status))
        .bind(column(&batch, |outcome| outcome.error.clone()))
        .bind(column(&batch, |outcome| outcome.wait_ms))
        .execute(&pool)
        .await;
        if let Err(error) = result {
            // The leases run out and the deliveries are attempted again: at least once.
            tracing::warn!(error = %error, outcomes = batch.len(), "recording webhook attempts failed");
        }
        batch.clear();
    }
}

/// One field of every outcome, as a statement's array parameter.
fn column<T>(outcomes: &[Outcome], field: impl Fn(&Outcome) -> T) -> Vec<T> {
    outcomes.iter().map(field).collect()
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
