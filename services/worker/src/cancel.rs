//! Cancellations: every worker reads the whole control topic and remembers which jobs were
//! cancelled (until their deadline); a running job's task is told through its token.

use chrono::{DateTime, Utc};
use sluice_common::kafka::{self, KafkaArgs, Record, Start};
use sluice_schemas::{CancelEvent, JobId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// How long a cancellation without a known deadline is remembered.
const REMEMBER_WITHOUT_DEADLINE: chrono::Duration = chrono::Duration::hours(1);

#[derive(Debug, Default)]
struct Inner {
    /// Cancelled jobs and when they may be forgotten.
    cancelled: HashMap<JobId, DateTime<Utc>>,
    /// Jobs running on this worker, each with the token that aborts it.
    running: HashMap<JobId, CancellationToken>,
}

#[derive(Debug, Clone, Default)]
pub struct Cancellations {
    inner: Arc<Mutex<Inner>>,
}

/// A job registered as running; dropping it unregisters the job.
pub struct Running {
    cancellations: Cancellations,
    job_id: JobId,
    pub token: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancellations
            .inner
            .lock()
            .expect("cancellations lock")
            .running
            .remove(&self.job_id);
    }
}

impl Cancellations {
    /// Registers `job_id` as running, or returns `None` if it was already cancelled.
    pub fn start(&self, job_id: JobId) -> Option<Running> {
        let mut inner = self.inner.lock().expect("cancellations lock");
        if inner.cancelled.contains_key(&job_id) {
            return None;
        }
        let token = CancellationToken::new();
        inner.running.insert(job_id, token.clone());
        Some(Running {
            cancellations: self.clone(),
            job_id,
            token,
        })
    }

    pub fn cancel(&self, job_id: JobId, forget_after: DateTime<Utc>) {
        let mut inner = self.inner.lock().expect("cancellations lock");
        let now = Utc::now();
        inner.cancelled.retain(|_, until| *until > now);
        inner.cancelled.insert(job_id, forget_after);
        if let Some(token) = inner.running.get(&job_id) {
            tracing::info!(job_id = %job_id, "aborting a running job");
            token.cancel();
        }
    }
}

/// Reads every partition of the control topic from the beginning until `stop`, starting again
/// after a broker failure. Its own client and no commits: every worker must see every
/// cancellation.
pub(crate) async fn follow(
    kafka: KafkaArgs,
    topic: String,
    worker_id: String,
    cancellations: Cancellations,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let client_id = format!("{worker_id}-control");
    let remember = |record: &Record| match CancelEvent::decode(record.payload()) {
        Ok(cancel) => {
            let forget_after = cancel
                .deadline
                .unwrap_or(cancel.requested_at + REMEMBER_WITHOUT_DEADLINE);
            if forget_after > Utc::now() {
                cancellations.cancel(cancel.job_id, forget_after);
            }
        }
        Err(error) => {
            tracing::warn!(reason = %error, offset = record.offset, "skipping an undecodable cancel event")
        }
    };
    kafka::follow(
        &kafka,
        &client_id,
        &topic,
        Start::Beginning,
        &stop,
        remember,
    )
    .await;
    Ok(())
}
