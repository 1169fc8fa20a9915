//! Streams' reads of their jobs' events, gathered: every stream reads its job once when it
//! opens (about one read per job), and one query answers all the reads waiting at that moment.
//! Nothing waits to gather more: one read alone goes at once, and the batches grow with the load
//! as the writer's do, while a read per query would be a Postgres round trip per job.
//! Reads asking the same (many streams of one job, woken by one change) are read once and
//! share their answer: a long answer is then held once, not once per stream.

use crate::kept::KeptConnection;
use crate::store::{JobEvent, Store};
use sluice_schemas::JobId;
use std::collections::HashMap;
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
    /// One query at a time, so one connection, kept from one to the next.
    connection: KeptConnection,
    receiver: mpsc::Receiver<Read>,
}

/// What [`Store::events_after_each`] is asked for one job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
    let connection = KeptConnection::new(store.pool().clone());
    let gatherer = Gatherer {
        store,
        connection,
        receiver,
    };
    (EventReads { sender }, gatherer)
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
            let (asked, answer_of) = distinct(&reads);
            metrics::counter!("sluice_sse_reads_total").increment(reads.len() as u64);
            metrics::counter!("sluice_sse_read_queries_total").increment(1);
            let store = &self.store;
            let answered = self
                .connection
                .run(async |connection| store.events_after_each_on(connection, &asked).await)
                .await;
            match answered {
                Ok(answers) => {
                    // Why cloning shares: an event's job is behind an `Arc`.
                    for (read, index) in reads.drain(..).zip(answer_of) {
                        let _ = read.reply.send(Ok(answers[index].clone()));
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

/// The distinct reads among `reads`, and for each read the index of its own among them.
fn distinct(reads: &[Read]) -> (Vec<ReadOf>, Vec<usize>) {
    let mut index_of: HashMap<&ReadOf, usize> = HashMap::with_capacity(reads.len());
    let mut asked = Vec::new();
    let answer_of = reads
        .iter()
        .map(|read| {
            *index_of.entry(&read.of).or_insert_with(|| {
                asked.push(read.of.clone());
                asked.len() - 1
            })
        })
        .collect();
    (asked, answer_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(job_id: JobId, after_seq: i64, user: Option<&str>) -> Read {
        let of = ReadOf {
            job_id,
            after_seq,
            user: user.map(str::to_owned),
        };
        Read {
            of,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn reads_asking_the_same_are_asked_once_and_each_read_is_told_which_answer_is_its() {
        let (first, second) = (JobId::new(), JobId::new());
        let reads = [
            read(first, 2, None),
            read(second, 2, None),
            read(first, 2, None),
            read(first, 3, None),
            read(first, 2, Some("u")),
            read(second, 2, None),
        ];
        let (asked, answer_of) = distinct(&reads);
        let keys: Vec<(JobId, i64, Option<&str>)> = asked
            .iter()
            .map(|of| (of.job_id, of.after_seq, of.user.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                (first, 2, None),
                (second, 2, None),
                (first, 3, None),
                (first, 2, Some("u"))
            ]
        );
        assert_eq!(answer_of, [0, 1, 0, 2, 3, 1]);
    }
}
