//! Fans Postgres `NOTIFY` out to this replica's SSE streams, so a change written by any replica
//! reaches a client connected to any other. Each stream waits on its own job only: a change
//! wakes the streams of that job, not every open stream (with thousands of browsers waiting on
//! slow models, a broadcast to all would cost streams x changes wake-ups).

use crate::store::NOTIFY_CHANNEL;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The jobs some stream of this replica is watching, each with a change counter.
#[derive(Debug, Clone, Default)]
pub struct JobChanges {
    watched: Arc<Mutex<HashMap<Uuid, Watched>>>,
}

#[derive(Debug)]
struct Watched {
    counter: watch::Sender<u64>,
    streams: usize,
}

/// One stream's interest in one job; dropping it forgets the job when no stream is left.
#[derive(Debug)]
pub struct Subscription {
    changes: JobChanges,
    job_id: Uuid,
    receiver: watch::Receiver<u64>,
}

impl JobChanges {
    /// Subscribe before reading the job, so a change committed in between is not missed.
    pub fn subscribe(&self, job_id: Uuid) -> Subscription {
        let mut watched = self.watched.lock().expect("job changes");
        let entry = watched.entry(job_id).or_insert_with(|| Watched {
            counter: watch::Sender::new(0),
            streams: 0,
        });
        entry.streams += 1;
        Subscription {
            changes: self.clone(),
            job_id,
            receiver: entry.counter.subscribe(),
        }
    }

    /// Wakes the streams watching `job_id`, if any.
    pub fn announce(&self, job_id: Uuid) {
        if let Some(watched) = self.watched.lock().expect("job changes").get(&job_id) {
            watched.counter.send_modify(|count| *count += 1);
        }
    }

    /// Wakes every stream: after a listener reconnect, notifications may have been missed.
    pub fn announce_all(&self) {
        for watched in self.watched.lock().expect("job changes").values() {
            watched.counter.send_modify(|count| *count += 1);
        }
    }
}

impl Subscription {
    /// Returns when the job changed since the last call (or since subscribing), or after `recheck`.
    pub async fn changed(&mut self, recheck: Duration) {
        let _ = tokio::time::timeout(recheck, self.receiver.changed()).await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watched = self.changes.watched.lock().expect("job changes");
        if let Some(entry) = watched.get_mut(&self.job_id) {
            entry.streams -= 1;
            if entry.streams == 0 {
                watched.remove(&self.job_id);
            }
        }
    }
}

/// Listens until `shutdown`, reconnecting when the connection drops. SSE streams also re-read
/// on a timer, so a notification lost during a reconnect delays a change but never hides it.
pub async fn listen(pool: PgPool, changes: JobChanges, shutdown: CancellationToken) {
    sluice_common::shutdown::retry_until_stopped("listening for job changes", &shutdown, || {
        listen_once(&pool, &changes, &shutdown)
    })
    .await;
}

async fn listen_once(
    pool: &PgPool,
    changes: &JobChanges,
    shutdown: &CancellationToken,
) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    tracing::info!(channel = NOTIFY_CHANNEL, "listening for job changes");
    // Changes made while no listener was connected were not announced.
    changes.announce_all();
    loop {
        let notification = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            notification = listener.recv() => notification?,
        };
        for job_id in crate::store::notified_ids(notification.payload()) {
            changes.announce(job_id);
        }
    }
}
