//! Queue positions for the streams of this replica: once a second, one query ranks every queued
//! job in its lane's partition and times each partition's recent starts, and the streams watching a
//! queued job are handed its position. The cost is one query a second per replica, whatever the
//! number of waiting streams (a query per stream would be thousands a second under a backlog).

use crate::state::QueuePosition;
use crate::store::Store;
use sluice_schemas::JobId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often positions are computed.
pub const QUEUE_CHECK: Duration = Duration::from_secs(1);

/// The queued jobs this replica's streams watch, each with its latest position.
#[derive(Debug, Clone, Default)]
pub struct QueueWatch {
    watched: Arc<Mutex<HashMap<JobId, Watched>>>,
}

#[derive(Debug)]
struct Watched {
    position: watch::Sender<Option<QueuePosition>>,
    streams: usize,
}

/// One stream's interest in one job's position; dropping it forgets the job when no stream is
/// left.
#[derive(Debug)]
pub struct PositionSubscription {
    queue: QueueWatch,
    job_id: JobId,
    pub receiver: watch::Receiver<Option<QueuePosition>>,
}

impl QueueWatch {
    pub fn subscribe(&self, job_id: JobId) -> PositionSubscription {
        let mut watched = self.watched.lock().expect("queue watch");
        let entry = watched.entry(job_id).or_insert_with(|| Watched {
            position: watch::Sender::new(None),
            streams: 0,
        });
        entry.streams += 1;
        PositionSubscription {
            queue: self.clone(),
            job_id,
            receiver: entry.position.subscribe(),
        }
    }

    fn watched_ids(&self) -> Vec<JobId> {
        self.watched
            .lock()
            .expect("queue watch")
            .keys()
            .copied()
            .collect()
    }

    fn publish(&self, positions: &HashMap<JobId, QueuePosition>) {
        for (job_id, watched) in self.watched.lock().expect("queue watch").iter() {
            let position = positions.get(job_id).copied();
            watched.position.send_if_modified(|current| {
                let changed = *current != position;
                *current = position;
                changed
            });
        }
    }
}

impl Drop for PositionSubscription {
    fn drop(&mut self) {
        let mut watched = self.queue.watched.lock().expect("queue watch");
        if let Some(entry) = watched.get_mut(&self.job_id) {
            entry.streams -= 1;
            if entry.streams == 0 {
                watched.remove(&self.job_id);
            }
        }
    }
}

/// Computes the watched jobs' positions every [`QUEUE_CHECK`] until `stop`.
pub async fn run(store: Store, queue: QueueWatch, stop: CancellationToken) {
    sluice_common::shutdown::every(QUEUE_CHECK, &stop, || async {
        let ids = queue.watched_ids();
        if ids.is_empty() {
            return;
        }
        match store.queue_positions(&ids).await {
            Ok(positions) => queue.publish(&positions),
            Err(error) => tracing::warn!(error = %error, "computing queue positions failed"),
        }
    })
    .await;
}
