//! The stop signal: SIGTERM or SIGINT cancels one token that every task watches; a second one
//! ends the process at once.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled at the first SIGTERM or SIGINT. A second signal exits the process at once
/// with status 1, without waiting for the drain: what an operator pressing Ctrl-C twice, or an
/// orchestrator that has run out of patience, means.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    // Installed before returning, so a signal sent right after start-up is not missed.
    let mut signals = StopSignals::install();
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!("stop signal received, draining; a second one exits at once");
        cancel.cancel();
        signals.next().await;
        tracing::warn!("second stop signal received, exiting without draining");
        std::process::exit(1);
    });
    token
}

struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    fn install() -> Self {
        Self {
            terminate: signal(SignalKind::terminate()).expect("installing the SIGTERM handler"),
            interrupt: signal(SignalKind::interrupt()).expect("installing the SIGINT handler"),
        }
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Runs `attempt` again a second after it returns (logging a failure) until `shutdown` is
/// cancelled: for long-lived followers (a control topic, a `LISTEN` connection) that must
/// outlive a broker or database restart.
pub async fn retry_until_stopped<F, Fut, E>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    loop {
        if let Err(error) = attempt().await {
            tracing::warn!(error = %error, what, "failed; retrying in a second");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// Runs `tick` every `period` until `shutdown` is cancelled, the first at once; a tick that
/// takes longer than `period` delays the next rather than bunching them up. For the periodic
/// work of a whole replica (one query for every stream that waits on it).
pub async fn every<F, Fut>(period: std::time::Duration, shutdown: &CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        tick().await;
    }
}

/// Runs `attempt` until it succeeds, waiting 50 ms after the first failure and twice as long
/// after each next one (at most 5 s), logging each; `None` if `give_up` comes first. For writes
/// on the at-least-once path, which must not be skipped: a database restart is waited out.
pub async fn retry_until_done<T, F, Fut, E>(
    what: &str,
    give_up: &CancellationToken,
    attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let done = retry_unless(what, give_up, attempt, |_| false).await?;
    done.ok()
}

/// `retry_until_done`, except that an error `final_error` says retrying cannot mend (the
/// database refused the data itself) is handed back at once.
pub async fn retry_unless<T, F, Fut, E>(
    what: &str,
    give_up: &CancellationToken,
    mut attempt: F,
    final_error: impl Fn(&E) -> bool,
) -> Option<Result<T, E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        match attempt().await {
            Ok(done) => return Some(Ok(done)),
            Err(error) if final_error(&error) => return Some(Err(error)),
            Err(error) => {
                tracing::warn!(error = %error, what, retry_in_ms = backoff.as_millis() as u64, "failed; retrying")
            }
        }
        tokio::select! {
            _ = give_up.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}
