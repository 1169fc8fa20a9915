//! The consumer loop: feeds records to jobs within the in-flight window, pauses partitions while
//! the window is full, and stores offsets only as far as every earlier record is done.

use crate::fair::FairQueue;
use crate::job::{self, JobContext, Outcome, Record};
use crate::offsets::OffsetTracker;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use sluice_common::kafka::{RebalanceContext, RebalanceState};
use sluice_common::propagation::TraceHeaders;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub(crate) type WorkerConsumer = StreamConsumer<RebalanceContext>;

/// Settings of the loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopSettings {
    /// Jobs running at once, all users together.
    pub max_in_flight: usize,
    /// Jobs of one user running at once.
    pub per_user_in_flight: usize,
    /// Records read but not started, at most; beyond it the partitions are paused.
    pub read_ahead: usize,
    /// Bytes of records read but not started, at most.
    pub read_ahead_bytes: usize,
    pub drain_timeout: Duration,
}

type Finished = (Record, Outcome);

/// Runs until `shutdown`, then drains running jobs within the drain timeout and commits.
pub(crate) async fn consume(
    consumer: Arc<WorkerConsumer>,
    context: JobContext,
    settings: LoopSettings,
    shutdown: CancellationToken,
    give_up: CancellationToken,
) -> anyhow::Result<()> {
    let state = consumer.context().state.clone();
    let mut tracker = OffsetTracker::default();
    let mut waiting = FairQueue::new(settings.per_user_in_flight);
    let mut running: JoinSet<Finished> = JoinSet::new();
    let mut paused = false;
    metrics::gauge!("sluice_worker_window_capacity").set(settings.read_ahead as f64);

    loop {
        forget_revoked(&state, &mut tracker, &mut waiting);
        while running.len() < settings.max_in_flight {
            let Some(record) = waiting.pop() else {
                break;
            };
            spawn_job(&mut running, &context, record);
        }
        // Paused when the read-ahead buffer is full, not when the window is: reading on while
        // every slot is busy is what lets other users' records behind a burst be seen.
        metrics::gauge!("sluice_worker_in_flight").set(running.len() as f64);
        metrics::gauge!("sluice_worker_window_occupancy")
            .set((waiting.buffered() + running.len()) as f64);
        let full = waiting.buffered() >= settings.read_ahead
            || waiting.buffered_bytes() >= settings.read_ahead_bytes;
        let reassigned = state.take_assigned_again();
        if full != paused || (full && reassigned) {
            set_paused(&consumer, full);
            paused = full;
        }

        tokio::select! {
            // Why biased: a stop must win over new records, and finished jobs are handled
            // before new ones are taken so the window frees as early as it can.
            biased;
            _ = shutdown.cancelled() => break,
            Some(finished) = running.join_next() => {
                let finished = finished?;
                waiting.finished(&finished.0);
                finish(&consumer, &mut tracker, finished);
            }
            // Polled even while paused: it serves rebalances and keeps this member within
            // max.poll.interval.ms. What a paused partition had already fetched is buffered.
            received = consumer.recv() => match received {
                Ok(message) => {
                    // Why here too: a rebalance runs inside `recv`, before it returns the first
                    // record of the new assignment. Forgetting the revoked partitions later
                    // would forget this record as well, and let its offset be skipped.
                    forget_revoked(&state, &mut tracker, &mut waiting);
                    let record = Record {
                        topic: message.topic().to_owned(),
                        partition: message.partition(),
                        offset: message.offset(),
                        key: message.key().map(<[u8]>::to_vec),
                        payload: message.payload().map(<[u8]>::to_vec),
                        trace: TraceHeaders::from_kafka(message.headers()),
                    };
                    tracing::debug!(partition = record.partition, offset = record.offset, "record received");
                    tracker.start(&record.topic, record.partition, record.offset);
                    waiting.push(record);
                }
                Err(error) => {
                    tracing::warn!(error = %error, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    drain(
        &consumer,
        &mut tracker,
        &mut running,
        settings.drain_timeout,
        &give_up,
    )
    .await;
    sluice_common::kafka::commit_stored(consumer.as_ref(), "at shutdown");
    Ok(())
}

fn forget_revoked(state: &RebalanceState, tracker: &mut OffsetTracker, waiting: &mut FairQueue) {
    for (topic, partition) in state.take_revoked() {
        tracker.forget(&topic, partition);
        waiting.retain(|record| !(record.topic == topic && record.partition == partition));
    }
}

fn spawn_job(running: &mut JoinSet<Finished>, context: &JobContext, record: Record) {
    let context = context.clone();
    running.spawn(async move {
        let outcome = job::run(&context, &record).await;
        (record, outcome)
    });
}

fn finish(consumer: &WorkerConsumer, tracker: &mut OffsetTracker, (record, outcome): Finished) {
    tracing::debug!(
        partition = record.partition,
        offset = record.offset,
        ?outcome,
        "record finished"
    );
    if outcome == Outcome::Abandoned {
        return;
    }
    let Some(highest_done) = tracker.complete(&record.topic, record.partition, record.offset)
    else {
        return;
    };
    // Why not +1: rd_kafka_offset_store stores offset + 1, the next record to read.
    tracing::debug!(partition = record.partition, highest_done, "storing offset");
    if let Err(error) = consumer.store_offset(&record.topic, record.partition, highest_done) {
        tracing::debug!(error = %error, partition = record.partition, "offset not stored; partition no longer ours");
    }
}

fn set_paused(consumer: &WorkerConsumer, pause: bool) {
    let result: KafkaResult<()> =
        consumer
            .assignment()
            .and_then(|assignment: TopicPartitionList| {
                if pause {
                    consumer.pause(&assignment)
                } else {
                    consumer.resume(&assignment)
                }
            });
    match result {
        Ok(()) => tracing::debug!(pause, "window changed"),
        Err(error) => {
            tracing::warn!(error = %error, pause, "pausing or resuming partitions failed")
        }
    }
}

/// Lets running jobs finish within `timeout`, storing their offsets; then gives up on the rest.
async fn drain(
    consumer: &WorkerConsumer,
    tracker: &mut OffsetTracker,
    running: &mut JoinSet<Finished>,
    timeout: Duration,
    give_up: &CancellationToken,
) {
    set_paused(consumer, true);
    tracing::info!(
        running = running.len(),
        timeout_ms = timeout.as_millis() as u64,
        "draining running jobs"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, running.join_next()).await {
            Ok(Some(Ok(finished))) => finish(consumer, tracker, finished),
            Ok(Some(Err(error))) => tracing::error!(error = %error, "a job task failed"),
            Ok(None) => break,
            Err(_elapsed) => {
                tracing::warn!(
                    abandoned = running.len(),
                    "drain timeout passed; unfinished jobs will be redelivered"
                );
                give_up.cancel();
                running.abort_all();
                while running.join_next().await.is_some() {}
                break;
            }
        }
    }
}
