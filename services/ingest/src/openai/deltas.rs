//! Streamed answers' pieces, for the OpenAI streams this replica is serving. Every replica
//! reads every partition of the deltas topic from the end (outside any group: the piece of a
//! job may be on any partition, and only the replica holding the client wants it) and hands
//! each piece to the stream waiting for its job, if one is here.

use sluice_common::kafka::{self, KafkaArgs, Record, Start};
use sluice_schemas::{DeltaEvent, JobId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Pieces held for one stream, at most; past it the stream stops relaying pieces and sends the
/// rest of the answer from the terminal status.
const PER_STREAM: usize = 1024;

/// Which job's pieces go to which waiting stream.
#[derive(Clone, Default)]
pub(crate) struct DeltaRoutes {
    waiting: Arc<Mutex<HashMap<JobId, mpsc::Sender<DeltaEvent>>>>,
}

/// A stream's subscription to its job's pieces; dropping it ends the subscription.
pub(crate) struct Subscription {
    routes: DeltaRoutes,
    job_id: JobId,
    pub(crate) pieces: mpsc::Receiver<DeltaEvent>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.routes
            .waiting
            .lock()
            .expect("delta routes lock")
            .remove(&self.job_id);
    }
}

impl DeltaRoutes {
    /// Subscribes to `job_id`'s pieces: before the job is published, so none is missed.
    pub(crate) fn subscribe(&self, job_id: JobId) -> Subscription {
        let (sender, pieces) = mpsc::channel(PER_STREAM);
        self.waiting
            .lock()
            .expect("delta routes lock")
            .insert(job_id, sender);
        Subscription {
            routes: self.clone(),
            job_id,
            pieces,
        }
    }

    fn deliver(&self, piece: DeltaEvent) {
        let waiting = self.waiting.lock().expect("delta routes lock");
        if let Some(sender) = waiting.get(&piece.job_id) {
            // Full or gone: the stream then finishes from the terminal status.
            let _ = sender.try_send(piece);
        }
    }
}

/// Reads the deltas topic until `stop`, starting again after a broker failure.
pub(crate) async fn follow(
    kafka: KafkaArgs,
    topic: String,
    routes: DeltaRoutes,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let client_id = format!("sluice-ingest-deltas-{}", uuid::Uuid::new_v4().simple());
    let relay = |record: &Record| match DeltaEvent::decode(record.payload()) {
        Ok(piece) => routes.deliver(piece),
        Err(error) => {
            tracing::debug!(reason = %error, offset = record.offset, "skipping an undecodable delta")
        }
    };
    kafka::follow(&kafka, &client_id, &topic, Start::End, &stop, relay).await;
    Ok(())
}
