//! Reservations. An admitted job holds its estimate against its user's token limit, and its
//! estimated cost against the user's spend budget, until its terminal status says what it
//! really used; then the token difference is settled (given back or charged), so sustained use
//! tracks real tokens, and the cost is no longer held (the results service has recorded it in
//! the usage the budget reads). The replica that admitted a job settles it: it
//! follows the status topic (every partition, from the end, outside any group) and reads the
//! terminal events of users it holds reservations for. A reservation whose end this replica
//! never sees (it restarted) expires after the job's deadline with its estimate standing.

use super::gcra::Quota;
use super::limiter::RateLimiter;
use chrono::{DateTime, Utc};
use sluice_common::kafka::{self, KafkaArgs, Record, Start};
use sluice_schemas::{JobId, StatusEvent, TokenEstimate};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long past its deadline a reservation waits for its job's terminal status.
const GRACE: chrono::Duration = chrono::Duration::seconds(60);
/// Settlements waiting to be written, at most; past it one is dropped (its estimate stands).
const PENDING: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Held {
    /// The user's token limit, if its tier has one.
    quota: Option<Quota>,
    estimate: TokenEstimate,
    /// The estimate's cost, held against the user's budget.
    cost: f64,
    expires_at: DateTime<Utc>,
}

/// What an admitted job holds until it ends.
#[derive(Debug, Clone, Copy)]
pub struct Hold {
    pub quota: Option<Quota>,
    pub estimate: TokenEstimate,
    pub cost: f64,
}

/// A job's reservation, settled: `delta` tokens to charge (positive) or give back (negative).
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    pub user: String,
    pub quota: Quota,
    pub delta: i64,
}

/// The reservations this replica holds, by user, then job.
#[derive(Debug, Default)]
pub struct Reservations {
    held: Mutex<HashMap<String, HashMap<JobId, Held>>>,
}

impl Reservations {
    /// Records what `job_id` of `user` holds until its terminal status (or its deadline and a
    /// grace period, if this replica never sees it).
    pub fn hold(&self, user: &str, job_id: JobId, hold: Hold, deadline: DateTime<Utc>) {
        let mut held = self.held.lock().expect("reservations lock");
        if held.len() > 100_000 {
            let now = Utc::now();
            held.retain(|_, jobs| {
                jobs.retain(|_, job| job.expires_at > now);
                !jobs.is_empty()
            });
        }
        let expires_at = deadline + GRACE;
        held.entry(user.to_owned()).or_default().insert(
            job_id,
            Held {
                quota: hold.quota,
                estimate: hold.estimate,
                cost: hold.cost,
                expires_at,
            },
        );
        metrics::gauge!("sluice_token_reservations").increment(1.0);
    }

    /// The cost `user`'s jobs admitted here hold and have not yet ended with.
    pub fn held_cost(&self, user: &str) -> f64 {
        let held = self.held.lock().expect("reservations lock");
        let now = Utc::now();
        held.get(user).map_or(0.0, |jobs| {
            jobs.values()
                .filter(|job| job.expires_at > now)
                .map(|job| job.cost)
                .sum()
        })
    }

    /// Whether `user` holds anything here: the cheap test before a status event is decoded.
    fn holds_for(&self, user: &[u8]) -> bool {
        let held = self.held.lock().expect("reservations lock");
        std::str::from_utf8(user).is_ok_and(|user| held.contains_key(user))
    }

    /// The settlement of a terminal status, if this replica holds its job's reservation under a
    /// token limit; the job's hold ends either way.
    pub fn settle(&self, status: &StatusEvent) -> Option<Settlement> {
        if !status.status.is_terminal() {
            return None;
        }
        let user = status.user_id.as_str();
        let mut held = self.held.lock().expect("reservations lock");
        let jobs = held.get_mut(user)?;
        let job = jobs.remove(&status.job_id)?;
        if jobs.is_empty() {
            held.remove(user);
        }
        metrics::gauge!("sluice_token_reservations").decrement(1.0);
        let quota = job.quota?;
        let used = job.estimate.settle(status.output.as_ref());
        let delta = used as i64 - job.estimate.total() as i64;
        metrics::counter!("sluice_tokens_settled_total").increment(used);
        Some(Settlement {
            user: user.to_owned(),
            quota,
            delta,
        })
    }
}

/// Follows the status topic until `stop`, settling this replica's reservations as their jobs
/// end.
pub async fn follow(
    kafka: KafkaArgs,
    topic: String,
    reservations: Arc<Reservations>,
    limiter: Arc<RateLimiter>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // Why a channel: the follower's handler is synchronous and a settlement may go to Redis.
    let (sender, mut receiver) = mpsc::channel::<Settlement>(PENDING);
    let writer = tokio::spawn(async move {
        while let Some(settlement) = receiver.recv().await {
            if let Err(error) = limiter
                .settle(&settlement.user, &settlement.quota, settlement.delta)
                .await
            {
                tracing::warn!(error = %error, user = %settlement.user, "could not settle a token reservation");
            }
        }
    });
    let client_id = format!("sluice-ingest-settle-{}", uuid::Uuid::new_v4().simple());
    let settle = |record: &Record| {
        let Some(user) = record.key.as_deref() else {
            return;
        };
        if !reservations.holds_for(user) {
            return;
        }
        let Ok(status) = StatusEvent::decode(record.payload()) else {
            return;
        };
        if let Some(settlement) = reservations.settle(&status)
            && sender.try_send(settlement).is_err()
        {
            tracing::warn!("token settlements are backed up; one estimate stands");
        }
    };
    kafka::follow(&kafka, &client_id, &topic, Start::End, &stop, settle).await;
    drop(sender);
    let _ = writer.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::{JobStatus, Output, Usage};

    #[test]
    fn a_terminal_status_settles_its_reservation_once_and_others_are_ignored() {
        let reservations = Reservations::default();
        let quota = Quota {
            rate_per_sec: 100.0,
            burst: 6000,
        };
        let request = request_event();
        let estimate = TokenEstimate {
            prompt: 20,
            completion: 512,
        };
        let hold = Hold {
            quota: Some(quota),
            estimate,
            cost: 0.25,
        };
        reservations.hold("alice", request.job_id, hold, request.deadline);
        assert_eq!(reservations.held_cost("alice"), 0.25);
        let mut status = StatusEvent::queued(&request);
        status.status = JobStatus::Running;
        assert_eq!(reservations.settle(&status), None, "not terminal");
        status.status = JobStatus::Succeeded;
        status.output = Some(Output {
            usage: Some(Usage {
                prompt_tokens: 18,
                completion_tokens: 40,
                total_tokens: 58,
            }),
            ..Output::default()
        });
        assert!(reservations.holds_for(b"alice"));
        assert_eq!(
            reservations.settle(&status),
            Some(Settlement {
                user: "alice".into(),
                quota,
                delta: 58 - 532
            })
        );
        assert_eq!(reservations.settle(&status), None, "settled once");
        assert!(!reservations.holds_for(b"alice"));
        assert_eq!(reservations.held_cost("alice"), 0.0);
    }

    fn request_event() -> sluice_schemas::RequestEvent {
        let json = serde_json::json!({
            "schema_version": 1,
            "job_id": "01890a5d-ac96-774b-bcce-b302099a8057",
            "user_id": "alice",
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "submitted_at": "2026-01-01T00:00:00Z",
            "deadline": "2099-01-01T00:01:00Z",
        });
        sluice_schemas::RequestEvent::decode(json.to_string().as_bytes()).unwrap()
    }
}
