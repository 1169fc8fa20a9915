//! The rebalance callbacks and the synchronous commit they and every shutdown make.

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Commits the stored offsets synchronously: on revoke and at shutdown, the last chance before
/// another member starts from the committed offsets. Only "no offset to commit" is excused, as
/// Vector's Kafka source does; any other failure is reported, because the records after the
/// last committed offset will be processed again.
pub fn commit_stored<C: Consumer<X>, X: ConsumerContext>(consumer: &C, when: &'static str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!(when, "committed offsets"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
            tracing::debug!(when, "no new offsets to commit")
        }
        Err(error) => {
            tracing::warn!(error = %error, when, "committing offsets failed; records after the last commit will be redelivered")
        }
    }
}

/// What the rebalance callbacks tell a consumer loop; they run inside `recv()`, on its task.
#[derive(Debug, Default)]
pub struct RebalanceState {
    /// Set after the first assignment: the worker is in the group.
    joined: AtomicBool,
    /// Set by every assignment, so a paused loop also pauses the new partitions.
    assigned_again: AtomicBool,
    /// Partitions taken away since the loop last looked.
    revoked: Mutex<Vec<(String, i32)>>,
}

impl RebalanceState {
    pub fn is_joined(&self) -> bool {
        self.joined.load(Ordering::SeqCst)
    }

    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.revoked.lock().expect("revoked list lock"))
    }

    /// Whether partitions were assigned since the last call.
    pub fn take_assigned_again(&self) -> bool {
        self.assigned_again.swap(false, Ordering::SeqCst)
    }
}

#[derive(Clone, Default)]
pub struct RebalanceContext {
    pub state: Arc<RebalanceState>,
}

impl ClientContext for RebalanceContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, partition_stats) in &stats.partitions {
                // Partition -1 is librdkafka's internal unassigned-partition bucket; a lag of -1
                // means not known yet (no committed or fetched offset).
                if *partition < 0 || partition_stats.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(
                    "sluice_consumer_lag",
                    "client" => statistics.client_id.clone(),
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(partition_stats.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Why synchronously, here: once this returns the partitions belong to another
            // worker, which starts from the last committed offset.
            tracing::info!(partitions = partitions.count(), "partitions revoked");
            commit_stored(consumer, "before revoke");
            let mut revoked = self.state.revoked.lock().expect("revoked list lock");
            revoked.extend(
                partitions
                    .elements()
                    .iter()
                    .map(|element| (element.topic().to_owned(), element.partition())),
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            let list: Vec<String> = partitions
                .elements()
                .iter()
                .map(|element| format!("{}:{}", element.topic(), element.partition()))
                .collect();
            tracing::info!(partitions = ?list, "partitions assigned");
            self.state.joined.store(true, Ordering::SeqCst);
            self.state.assigned_again.store(true, Ordering::SeqCst);
        }
    }
}
