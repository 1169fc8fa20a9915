//! One lifecycle for every service: one stop token, one task tracker, one drain deadline.
//! Any task that fails stops the rest; the drain after the stop runs under one deadline, after
//! which `give_up` tells long retries (publishing a status, writing a batch) to abandon their
//! work to redelivery.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long tasks have to end once `give_up` is cancelled, before the service reports them.
const AFTER_GIVE_UP: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Cancelled by the stop signal or by the first task that fails: every task begins its drain.
    stop: CancellationToken,
    /// Cancelled when the drain deadline passes: unfinished work is left to be redelivered.
    give_up: CancellationToken,
    tracker: TaskTracker,
    first_failure: Arc<Mutex<Option<anyhow::Error>>>,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    pub fn give_up(&self) -> &CancellationToken {
        &self.give_up
    }

    /// Runs `task` until it ends; if it fails, the service stops and `run` returns the error.
    pub fn spawn<F>(&self, what: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, first_failure) = (self.stop.clone(), self.first_failure.clone());
        self.tracker.spawn(async move {
            let Err(error) = task.await else {
                return;
            };
            tracing::error!(
                error = format!("{error:#}"),
                task = what,
                "task failed; stopping the service"
            );
            first_failure
                .lock()
                .expect("failure lock")
                .get_or_insert(error.context(format!("{what} failed")));
            stop.cancel();
        });
    }

    /// Waits for `shutdown` (or a failed task), then for every task to drain within `drain`.
    /// Returns the first task's failure, if any.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) -> anyhow::Result<()> {
        self.tracker.close();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = self.stop.cancelled() => {}
        }
        self.stop.cancel();
        tracing::info!(deadline_ms = drain.as_millis() as u64, "draining");
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tracker.len(),
                "drain deadline passed; giving up on unfinished work, which will be redelivered"
            );
            self.give_up.cancel();
            if tokio::time::timeout(AFTER_GIVE_UP, self.tracker.wait())
                .await
                .is_err()
            {
                anyhow::bail!("{} tasks did not stop after giving up", self.tracker.len());
            }
        }
        let failure = self.first_failure.lock().expect("failure lock").take();
        failure.map_or(Ok(()), Err)
    }
}
