//! Caps on open event streams, per reader and in total, and the time a stream may stay silent:
//! what keeps many idle or abandoned streams from holding a replica's connections and memory.
//! (A reader that stops reading costs little more: a stream makes its next event only when the
//! connection takes the last one.)

use crate::api::ApiError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct StreamLimitArgs {
    /// Most event streams open at once on this replica; past it `503 streams_full`.
    #[arg(
        long = "sse-max-streams",
        env = "SLUICE_SSE_MAX_STREAMS",
        default_value_t = 20_000
    )]
    pub total: usize,

    /// Most event streams one reader holds open at once (an API key's user, or a stream
    /// token's job); past it `429 too_many_streams`.
    #[arg(
        long = "sse-max-streams-per-reader",
        env = "SLUICE_SSE_MAX_STREAMS_PER_READER",
        default_value_t = 1_000
    )]
    pub per_reader: usize,

    /// A stream with nothing to send for this long ends (keep-alive comments do not count); an
    /// `EventSource` reconnects with `Last-Event-ID` and misses nothing.
    #[arg(long = "sse-idle-secs", env = "SLUICE_SSE_IDLE_SECS", default_value = "600", value_parser = sluice_common::settings::secs)]
    pub idle: Duration,
}

/// Who holds a stream, for the per-reader cap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Reader {
    /// An API key's user.
    User(String),
    /// The bearer of a job's stream token.
    Token(sluice_schemas::JobId),
    /// API keys are off: only the total applies.
    Anyone,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_reader: HashMap<Reader, usize>,
}

/// The streams open on this replica.
#[derive(Debug, Clone)]
pub struct Streams {
    limits: StreamLimitArgs,
    open: Arc<Mutex<Open>>,
}

/// One open stream; dropping it (the stream ended or its reader left) frees its place.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    open: Arc<Mutex<Open>>,
    reader: Reader,
}

impl Streams {
    pub fn new(limits: StreamLimitArgs) -> Self {
        Self {
            limits,
            open: Arc::default(),
        }
    }

    pub(crate) fn idle(&self) -> Duration {
        self.limits.idle
    }

    /// A place for one more stream of `reader`, or the cap that refuses it.
    pub(crate) fn open(&self, reader: Reader) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().expect("open streams");
        if open.total >= self.limits.total {
            return Err(ApiError::StreamsFull(self.limits.total));
        }
        let held = open.by_reader.get(&reader).copied().unwrap_or(0);
        if reader != Reader::Anyone && held >= self.limits.per_reader {
            return Err(ApiError::TooManyStreams(self.limits.per_reader));
        }
        open.total += 1;
        *open.by_reader.entry(reader.clone()).or_default() += 1;
        Ok(StreamSlot {
            open: self.open.clone(),
            reader,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("open streams");
        open.total -= 1;
        if let Some(held) = open.by_reader.get_mut(&self.reader) {
            *held -= 1;
            if *held == 0 {
                open.by_reader.remove(&self.reader);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(total: usize, per_reader: usize) -> Streams {
        Streams::new(StreamLimitArgs {
            total,
            per_reader,
            idle: Duration::from_secs(600),
        })
    }

    #[test]
    fn a_reader_past_its_cap_and_everyone_past_the_total_are_refused_until_a_stream_ends() {
        let streams = streams(3, 2);
        let alice = || Reader::User("alice".into());
        let first = streams.open(alice()).unwrap();
        let _second = streams.open(alice()).unwrap();
        assert!(matches!(
            streams.open(alice()),
            Err(ApiError::TooManyStreams(2))
        ));
        let _bob = streams.open(Reader::User("bob".into())).unwrap();
        assert!(matches!(
            streams.open(Reader::Anyone),
            Err(ApiError::StreamsFull(3))
        ));
        drop(first);
        let _again = streams.open(alice()).unwrap();
    }

    #[test]
    fn without_keys_only_the_total_applies() {
        let streams = streams(3, 1);
        let _held: Vec<StreamSlot> = (0..3)
            .map(|_| streams.open(Reader::Anyone).unwrap())
            .collect();
        assert!(matches!(
            streams.open(Reader::Anyone),
            Err(ApiError::StreamsFull(3))
        ));
    }
}
