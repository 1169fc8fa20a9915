//! Streams' reads of their jobs' events, gathered: every stream reads its job once when it
//! opens (about one read per job), and one query answers all the reads waiting at that moment.
//! Nothing waits to gather more: one read alone goes at once, and the batches grow with the load
//! as the writer's do, while a read per query would be a Postgres round trip per job.

use crate::store::{JobEvent, Store};
use sluice_schemas::JobId;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The most reads one query answers.
const MAX_GATHERED: usize = 256;

/// A failed read, shared by every read of its query.
pub type ReadError = Arc<sqlx::Error>;

/// Hands reads to the [`Gatherer`].
#[derive(Debug, Clone)]
pub struct EventReads {
    sender: mpsc::Sender<Read>,
}

/// Answers the reads handed over, until stopped.
pub struct Gatherer {
    store: Store,
    receiver: mpsc::Receiver<Read>,
}

/// What [`Store::events_after_each`] is asked for one job.
#[derive(Debug, Clone)]
pub struct ReadOf {
    pub job_id: JobId,
    pub after_seq: i64,
    pub user: Option<String>,
}

#[derive(Debug)]
struct Read {
    of: ReadOf,
    reply: oneshot::Sender<Result<Vec<JobEvent>, ReadError>>,
}

/// The two ends: streams read through the first, the second runs in the service's lifecycle.
pub fn gathered(store: Store) -> (EventReads, Gatherer) {
    let (sender, receiver) = mpsc::channel(4 * MAX_GATHERED);
    (EventReads { sender }, Gatherer { store, receiver })
}

impl EventReads {
    /// The job's events after `after_seq`, as [`Store::events_after`] gives them.
    pub async fn events_after(
        &self,
        job_id: JobId,
        after_seq: i64,
        user: Option<&str>,
    ) -> Result<Vec<JobEvent>, ReadError> {
        let (reply, answer) = oneshot::channel();
        let of = ReadOf {
            job_id,
            after_seq,
            user: user.map(str::to_owned),
        };
        let stopped = || Arc::new(sqlx::Error::PoolClosed);
        self.sender
            .send(Read { of, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Gatherer {
    pub async fn run(mut self, stop: CancellationToken) {
        let mut reads = Vec::with_capacity(MAX_GATHERED);
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                received = self.receiver.recv_many(&mut reads, MAX_GATHERED) => received,
            };
            if received == 0 {
                return;
            }
            let asked: Vec<ReadOf> = reads.iter().map(|read| read.of.clone()).collect();
            match self.store.events_after_each(&asked).await {
                Ok(answers) => {
                    for (read, events) in reads.drain(..).zip(answers) {
                        let _ = read.reply.send(Ok(events));
                    }
                }
                Err(error) => {
                    let error = Arc::new(error);
                    for read in reads.drain(..) {
                        let _ = read.reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}
