//! Fans Postgres `NOTIFY` out to this replica's SSE streams, so a change written by any replica
//! reaches a client connected to any other.

use crate::store::NOTIFY_CHANNEL;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Listens until `shutdown`, reconnecting when the connection drops. SSE streams also re-read
/// on a timer, so a notification lost during a reconnect delays a change but never hides it.
pub async fn listen(pool: PgPool, changes: broadcast::Sender<Uuid>, shutdown: CancellationToken) {
    loop {
        if let Err(error) = listen_once(&pool, &changes, &shutdown).await {
            tracing::warn!(error = %error, "job change listener failed; reconnecting");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn listen_once(
    pool: &PgPool,
    changes: &broadcast::Sender<Uuid>,
    shutdown: &CancellationToken,
) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    tracing::info!(channel = NOTIFY_CHANNEL, "listening for job changes");
    loop {
        let notification = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            notification = listener.recv() => notification?,
        };
        if let Ok(job_id) = Uuid::parse_str(notification.payload()) {
            // No receivers is normal: nobody is watching right now.
            let _ = changes.send(job_id);
        }
    }
}
