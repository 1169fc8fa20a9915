//! Fans Postgres `NOTIFY` out to this replica's SSE streams, so a change written by any replica
//! reaches a client connected to any other; changes this replica wrote reach its own streams
//! with their events, which they push without reading Postgres again. Each stream waits on its
//! own job only: a change wakes the streams of that job, not every open stream (with thousands
//! of browsers waiting on slow models, a broadcast to all would cost streams x changes wake-ups).
//! In case a notification is lost, one query per replica looks up every watched job's latest
//! change on a timer and wakes the streams of those that moved: a re-read per stream would be
//! thousands of queries a second under a backlog, and more the further behind it falls.

use crate::store::{JobEvent, NOTIFY_CHANNEL, Recorded, Store};
use sluice_schemas::JobId;
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The jobs some stream of this replica is watching, each with what is known of its changes.
#[derive(Debug, Clone, Default)]
pub struct JobChanges {
    watched: Arc<Mutex<HashMap<JobId, Watched>>>,
}

#[derive(Debug)]
struct Watched {
    known: watch::Sender<Known>,
    streams: usize,
}

/// What this replica knows of a watched job's changes since the first stream subscribed.
#[derive(Debug, Default)]
struct Known {
    /// The highest seq announced, by this replica's writes or by any replica's `NOTIFY`.
    seq: i64,
    /// The events this replica wrote, as it committed them: streams push these without reading
    /// Postgres. Few (a job changes status a handful of times), and dropped with the job's last
    /// stream.
    written: Vec<JobEvent>,
    /// Bumped when notifications may have been missed: every stream reads Postgres again.
    resync: u64,
}

/// One stream's interest in one job; dropping it forgets the job when no stream is left.
#[derive(Debug)]
pub struct Subscription {
    changes: JobChanges,
    job_id: JobId,
    receiver: watch::Receiver<Known>,
    resync_seen: u64,
}

/// Why [`Subscription::changed`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Changed,
    /// Read Postgres: the stream's first read, or a retry after a failed one.
    Recheck,
    /// The job's streamed answer grew (see `deltas`); its status did not change.
    Grown,
    /// Time to look at a queued job's position again.
    QueueTick,
}

impl JobChanges {
    /// Subscribe before reading the job, so a change committed in between is not missed.
    pub fn subscribe(&self, job_id: JobId) -> Subscription {
        let mut watched = self.watched.lock().expect("job changes");
        let entry = watched.entry(job_id).or_insert_with(|| Watched {
            known: watch::Sender::new(Known::default()),
            streams: 0,
        });
        entry.streams += 1;
        let receiver = entry.known.subscribe();
        let resync_seen = receiver.borrow().resync;
        Subscription {
            changes: self.clone(),
            job_id,
            receiver,
            resync_seen,
        }
    }

    /// A `NOTIFY` said the job's latest change is `seq`: wakes its streams, if any.
    pub fn announce(&self, job_id: JobId, seq: i64) {
        if let Some(watched) = self.watched.lock().expect("job changes").get(&job_id) {
            watched
                .known
                .send_modify(|known| known.seq = known.seq.max(seq));
        }
    }

    /// This replica committed `recorded`: hands the events to the job's streams, if any.
    pub fn written(&self, recorded: &Recorded) {
        if let Some(watched) = self
            .watched
            .lock()
            .expect("job changes")
            .get(&recorded.job_id)
        {
            watched.known.send_modify(|known| {
                known.seq = known.seq.max(recorded.latest_seq());
                known.written.extend(recorded.events.iter().cloned());
            });
        }
    }

    /// The jobs some stream watches.
    fn watched_ids(&self) -> Vec<JobId> {
        self.watched
            .lock()
            .expect("job changes")
            .keys()
            .copied()
            .collect()
    }

    /// Postgres holds `latest` (each job's latest seq): wakes the streams of the watched jobs
    /// whose latest change was not announced, and no others.
    fn caught_up(&self, latest: &HashMap<JobId, i64>) {
        for (job_id, watched) in self.watched.lock().expect("job changes").iter() {
            let Some(&seq) = latest.get(job_id) else {
                continue;
            };
            watched.known.send_if_modified(|known| {
                let behind = known.seq < seq;
                known.seq = known.seq.max(seq);
                behind
            });
        }
    }

    /// Wakes every stream to read Postgres: after a listener reconnect, notifications may have
    /// been missed.
    pub fn announce_all(&self) {
        for watched in self.watched.lock().expect("job changes").values() {
            watched.known.send_modify(|known| known.resync += 1);
        }
    }
}

impl Subscription {
    /// Returns when the job changed since the last call (or since subscribing).
    pub async fn changed(&mut self) {
        if self.receiver.changed().await.is_err() {
            // The sender lives while this subscription does.
            std::future::pending::<()>().await;
        }
    }

    /// The events after `last_seen`, if this replica wrote every one of them and has them at
    /// hand (an empty list when nothing newer is known); `None` when Postgres must be read: a
    /// change written by another replica, or notifications possibly missed.
    pub fn written_after(&mut self, last_seen: i64) -> Option<Vec<JobEvent>> {
        let known = self.receiver.borrow_and_update();
        if known.resync != self.resync_seen {
            self.resync_seen = known.resync;
            return None;
        }
        let mut events: Vec<JobEvent> = known
            .written
            .iter()
            .filter(|event| event.seq > last_seen)
            .cloned()
            .collect();
        events.sort_by_key(|event| event.seq);
        events.dedup_by_key(|event| event.seq);
        // Why check: seqs count a job's changes one by one, so the local events cover what is
        // new only if they run from last_seen + 1 to the highest seq announced without a gap.
        let contiguous = events
            .iter()
            .zip(last_seen + 1..)
            .all(|(event, expected)| event.seq == expected);
        let reaches = events.last().map_or(last_seen, |event| event.seq) >= known.seq;
        (contiguous && reaches).then_some(events)
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

/// Listens until `shutdown`, reconnecting when the connection drops; the notifications of
/// `store`'s own writes are passed over. Why: its writer hands those changes to this replica's
/// streams with their events just after it commits, and the notification often arrives first
/// (measured on a fresh `scripts/bench --stack`: 1.5-1.8 reads of Postgres per job followed at
/// 400-600 jobs/s where one, the stream's first, is needed); a stream woken by it would read
/// Postgres for what it is about to be handed. The timer of [`recheck`] covers a notification
/// lost during a reconnect: it delays a change but never hides it.
pub async fn listen(store: Store, changes: JobChanges, shutdown: CancellationToken) {
    sluice_common::shutdown::retry_until_stopped("listening for job changes", &shutdown, || {
        listen_once(&store, &changes, &shutdown)
    })
    .await;
}

/// Every `every` until `stop`, looks up the latest change of every job a stream watches, in one
/// query, and wakes the streams of those whose change was not announced.
pub async fn recheck(store: Store, changes: JobChanges, every: Duration, stop: CancellationToken) {
    sluice_common::shutdown::every(every, &stop, || async {
        let ids = changes.watched_ids();
        if ids.is_empty() {
            return;
        }
        match store.latest_seqs(&ids).await {
            Ok(latest) => changes.caught_up(&latest),
            Err(error) => tracing::warn!(error = %error, "rechecking watched jobs failed"),
        }
    })
    .await;
}

async fn listen_once(
    store: &Store,
    changes: &JobChanges,
    shutdown: &CancellationToken,
) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(store.pool()).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    tracing::info!(channel = NOTIFY_CHANNEL, "listening for job changes");
    // Changes made while no listener was connected were not announced.
    changes.announce_all();
    loop {
        let notification = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            notification = listener.recv() => notification?,
        };
        let payload = notification.payload();
        if crate::write::notified_by(payload) == Some(store.writer_id()) {
            continue;
        }
        for (job_id, seq) in crate::write::notified_changes(payload) {
            changes.announce(job_id, seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::JobStatus;

    fn written(job_id: JobId, seqs: &[i64]) -> Recorded {
        Recorded {
            job_id,
            events: seqs
                .iter()
                .map(|&seq| JobEvent {
                    seq,
                    status: JobStatus::Running,
                    job: Arc::new(serde_json::json!({ "seq": seq })),
                    traceparent: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_stream_uses_what_this_replica_wrote_only_when_it_covers_every_new_change() {
        let changes = JobChanges::default();
        let job_id = JobId::new();
        let mut subscription = changes.subscribe(job_id);
        assert_eq!(
            subscription.written_after(0).map(|events| events.len()),
            Some(0)
        );

        changes.written(&written(job_id, &[1, 2]));
        let seqs = |events: Option<Vec<JobEvent>>| {
            events.map(|events| events.iter().map(|event| event.seq).collect::<Vec<_>>())
        };
        assert_eq!(seqs(subscription.written_after(0)), Some(vec![1, 2]));
        assert_eq!(seqs(subscription.written_after(2)), Some(vec![]));

        // Another replica wrote seq 3: only Postgres has it.
        changes.announce(job_id, 3);
        assert_eq!(seqs(subscription.written_after(2)), None);
        // This replica's own notification for what it already handed over changes nothing.
        changes.announce(job_id, 2);
        changes.written(&written(job_id, &[4]));
        assert_eq!(seqs(subscription.written_after(3)), Some(vec![4]));
        assert_eq!(
            seqs(subscription.written_after(2)),
            None,
            "seq 3 is missing"
        );

        // After a listener reconnect every stream reads Postgres once.
        changes.announce_all();
        assert_eq!(seqs(subscription.written_after(4)), None);
        assert_eq!(seqs(subscription.written_after(4)), Some(vec![]));

        drop(subscription);
        assert!(changes.watched.lock().unwrap().is_empty());
    }
}
