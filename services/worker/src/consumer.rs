//! The worker's loop: what is the worker's own around the shared Kafka source. Records wait in
//! the fair queue, start within the in-flight window, and are done (their offsets storable) when
//! their terminal status is acknowledged; the partitions pause while the read-ahead is full.

use crate::fair::Queued;
use crate::job::{self, JobContext, Outcome, Ran, Record};
use crate::lanes::{LaneSettings, Lanes};
use sluice_common::kafka::{KafkaSource, Received};
use sluice_common::tiers::Tiers;
use sluice_schemas::TokenEstimate;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Jobs running at once, all users together.
    pub max_in_flight: usize,
    /// Jobs of one user running at once.
    pub per_user_in_flight: usize,
    /// Tokens a user's turn in the fair queue adds to its deficit, times its tier's weight.
    pub fair_quantum_tokens: u64,
    /// The tiers' weights.
    pub tiers: Tiers,
    /// The answer's tokens a job without `max_tokens` is estimated at.
    pub default_max_tokens: u64,
    /// The batch lane's topic; every other topic read is interactive.
    pub batch_topic: String,
    /// How the lanes share the window.
    pub lanes: LaneSettings,
    /// Records read but not started, at most, per lane; beyond it the lane's partitions are
    /// paused.
    pub read_ahead: usize,
    /// Bytes of records read but not started, at most, per lane.
    pub read_ahead_bytes: usize,
    pub drain_timeout: Duration,
}

/// A job's record, what the fair queue estimated and charged for it, and how it ran.
type Finished = (Record, (TokenEstimate, f64), Ran);

/// Runs until `stop`, then lets running jobs finish until `give_up` (the service's drain
/// deadline) and closes the source: the final commit.
pub(crate) async fn consume(
    mut source: KafkaSource,
    context: JobContext,
    settings: LoopSettings,
    stop: CancellationToken,
    give_up: CancellationToken,
) -> anyhow::Result<()> {
    let mut waiting = Lanes::new(
        settings.max_in_flight,
        settings.per_user_in_flight,
        settings.fair_quantum_tokens,
        settings.batch_topic.clone(),
        settings.lanes,
    );
    let mut running: JoinSet<Finished> = JoinSet::new();
    metrics::gauge!("sluice_worker_window_capacity").set(settings.read_ahead as f64);

    loop {
        // Every job that has finished, before anything else: without it a steady stream of
        // finishing jobs would keep the select below from ever reading a new record (an
        // interactive one among them).
        while let Some(finished) = running.try_join_next() {
            handle_finished(&mut source, &mut waiting, finished?);
        }
        while running.len() < settings.max_in_flight {
            let Some(queued) = waiting.pop() else {
                break;
            };
            spawn_job(&mut running, &context, queued);
        }
        // Paused when the read-ahead buffer is full, not when the window is: reading on while
        // every slot is busy is what lets other users' records behind a burst be seen.
        metrics::gauge!("sluice_worker_in_flight").set(running.len() as f64);
        metrics::gauge!("sluice_worker_window_occupancy")
            .set((waiting.buffered() + running.len()) as f64);
        waiting.record_metrics();
        // Per lane: a full batch lane holds back batch records while interactive ones flow.
        source.pause_where(|topic| {
            waiting.is_full(topic, settings.read_ahead, settings.read_ahead_bytes)
        });

        tokio::select! {
            // Why biased: a stop must win over new records, and finished jobs are handled
            // before new ones are taken so the window frees as early as it can.
            biased;
            _ = stop.cancelled() => break,
            Some(finished) = running.join_next() => {
                handle_finished(&mut source, &mut waiting, finished?);
            }
            // Polled even while paused: it serves rebalances and keeps this member within
            // max.poll.interval.ms. What a paused partition had already fetched is buffered.
            received = source.recv() => match received {
                Received::Record(record) => waiting.push(Queued::new(
                    record,
                    &settings.tiers,
                    settings.default_max_tokens,
                )),
                Received::Revoked(partitions) => {
                    for (topic, partition) in partitions {
                        waiting.retain(|record| !(record.topic == topic && record.partition == partition));
                    }
                }
            },
        }
    }

    drain(&mut source, &mut running, &give_up).await;
    source.close().await;
    Ok(())
}

fn handle_finished(source: &mut KafkaSource, waiting: &mut Lanes, finished: Finished) {
    let (record, (estimate, charged), ran) = &finished;
    waiting.finished(record, *estimate, *charged, ran);
    finish(source, finished);
}

fn spawn_job(running: &mut JoinSet<Finished>, context: &JobContext, queued: Queued) {
    let context = context.clone();
    running.spawn(async move {
        let ran = job::run_decoded(&context, &queued.record, queued.request).await;
        (queued.record, (queued.estimate, queued.charged), ran)
    });
}

fn finish(source: &mut KafkaSource, (record, _, ran): Finished) {
    let outcome = ran.outcome;
    tracing::debug!(
        partition = record.partition,
        offset = record.offset,
        ?outcome,
        "record finished"
    );
    if outcome != Outcome::Abandoned {
        source.done(&record);
    }
}

/// Lets running jobs finish, marking them done, until `give_up`; then aborts the rest, which
/// the next owner of their partitions runs again.
async fn drain(
    source: &mut KafkaSource,
    running: &mut JoinSet<Finished>,
    give_up: &CancellationToken,
) {
    source.set_paused(true);
    tracing::info!(running = running.len(), "draining running jobs");
    loop {
        let joined = tokio::select! {
            biased;
            joined = running.join_next() => joined,
            _ = give_up.cancelled() => {
                tracing::warn!(
                    abandoned = running.len(),
                    "drain deadline passed; unfinished jobs will be redelivered"
                );
                running.abort_all();
                while running.join_next().await.is_some() {}
                return;
            }
        };
        match joined {
            Some(Ok(finished)) => finish(source, finished),
            Some(Err(error)) => tracing::error!(error = %error, "a job task failed"),
            None => return,
        }
    }
}
