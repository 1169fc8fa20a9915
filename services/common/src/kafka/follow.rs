//! Following a topic: every partition, outside any group, without commits, for events every
//! member must see (cancellations, from the beginning) or only wants while it is up (streamed
//! answers' pieces, from the end). Written once; a follower is the function it plugs in.

use super::KafkaArgs;
use super::consume::{KafkaSource, Received, Record};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where a follower starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Beginning,
    End,
}

/// Hands every record of every partition of `topic` to `handle` until `stop`; after a broker
/// failure it starts again a second later (from `start` again: what it must see, it sees).
pub async fn follow(
    kafka: &KafkaArgs,
    client_id: &str,
    topic: &str,
    start: Start,
    stop: &CancellationToken,
    mut handle: impl FnMut(&Record),
) {
    loop {
        match follow_once(kafka, client_id, topic, start, stop, &mut handle).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    topic,
                    "following the topic failed; retrying in a second"
                )
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Returns `Ok` once stopped.
async fn follow_once(
    kafka: &KafkaArgs,
    client_id: &str,
    topic: &str,
    start: Start,
    stop: &CancellationToken,
    handle: &mut impl FnMut(&Record),
) -> anyhow::Result<()> {
    let mut source = match start {
        Start::Beginning => KafkaSource::follow_from_beginning(kafka, client_id, topic).await?,
        Start::End => KafkaSource::follow_from_end(kafka, client_id, topic).await?,
    };
    loop {
        let record = tokio::select! {
            _ = stop.cancelled() => break,
            received = source.recv() => match received {
                Received::Record(record) => record,
                Received::Revoked(_) => continue,
            },
        };
        handle(&record);
        source.done(&record);
    }
    source.close().await;
    Ok(())
}
