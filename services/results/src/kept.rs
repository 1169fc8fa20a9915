//! A Postgres connection kept by one serial user of the store (the batch writer, the streams'
//! read gatherer) from one batch to the next, rather than taken from the pool for each.
//!
//! Why: sqlx's pool checks a connection with a round trip to Postgres each time it hands one
//! out (`test_before_acquire`) and again each time it takes one back (always, to flush what a
//! dropped query left), so a writer that took a connection per batch paid two round trips on
//! top of its five, and a gathered read two on top of its one. At 797 jobs/s on the bench
//! machine (about 300 write batches and 600 gathered reads a second) results sent Postgres
//! 4,100-4,700 TCP segments a second with the checks and 2,400-2,600 without (BENCHMARKS.md);
//! where Postgres is across a network, each check is a network round trip on the write's path.
//! A kept connection is checked only when it is taken: after an error (it goes back to the
//! pool, which closes it if it is broken), after it has been idle long enough for a firewall or
//! Postgres to have dropped it, and when it is old enough that the pool would have replaced it.

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use std::time::{Duration, Instant};

/// A kept connection unused this long is handed back and a checked one taken instead.
const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// A kept connection is handed back after this long, as the pool retires its own (sqlx's
/// default `max_lifetime`).
const AGE_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The connection of one serial user; its work runs one at a time (a lock, never contended).
#[derive(Debug)]
pub struct KeptConnection {
    pool: PgPool,
    kept: tokio::sync::Mutex<Option<Kept>>,
}

#[derive(Debug)]
struct Kept {
    connection: PoolConnection<Postgres>,
    taken_at: Instant,
    last_used: Instant,
}

impl KeptConnection {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            kept: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `work` on the kept connection, taking one from the pool first if none is kept or
    /// the kept one is past its limits. The connection is kept again only if `work` succeeds:
    /// after an error, or if `work` is dropped before it ends, it goes back to the pool, whose
    /// check clears what a failed or abandoned statement left on it (or closes it, broken).
    pub async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> sqlx::Result<T>,
    ) -> sqlx::Result<T> {
        let mut slot = self.kept.lock().await;
        let now = Instant::now();
        let fresh =
            |kept: &Kept| now - kept.last_used <= IDLE_LIMIT && now - kept.taken_at <= AGE_LIMIT;
        let mut held = match slot.take().filter(fresh) {
            Some(held) => held,
            None => Kept {
                connection: self.pool.acquire().await?,
                taken_at: now,
                last_used: now,
            },
        };
        let result = work(&mut held.connection).await;
        if result.is_ok() {
            held.last_used = Instant::now();
            *slot = Some(held);
        }
        result
    }
}
