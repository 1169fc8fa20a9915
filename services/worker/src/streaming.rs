//! Streamed chat answers: the backend called with `stream: true`, its chunks read as they come,
//! and the answer's pieces published as delta events while the model is still generating.
//!
//! Pieces are coalesced per job so they do not flood the broker: the first at once, then at
//! most one event per `SLUICE_DELTA_FLUSH_MS`, and whatever is left when the answer ends.
//! Publishing does not wait for the broker (the producer keeps their order); a lost piece
//! costs a reader only the wait for the terminal status, which carries the whole answer.

use crate::model::{CallError, Failure};
use chrono::Utc;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use sluice_schemas::{DeltaEvent, ErrorCode, JobId, Output, SCHEMA_VERSION, Usage, UserId};
use std::time::{Duration, Instant};

/// Where a worker's deltas go.
#[derive(Clone)]
pub struct DeltaTopic {
    pub producer: FutureProducer,
    pub topic: String,
    /// At most one event per this much time per job, after the first.
    pub flush: Duration,
}

/// The pieces of one attempt's answer, on their way to the deltas topic.
pub(crate) struct DeltaSink {
    topic: DeltaTopic,
    job_id: JobId,
    user_id: UserId,
    attempt: u32,
    index: u32,
    pending: String,
    last_sent: Option<Instant>,
}

impl DeltaSink {
    pub(crate) fn new(topic: DeltaTopic, job_id: JobId, user_id: UserId, attempt: u32) -> Self {
        Self {
            topic,
            job_id,
            user_id,
            attempt,
            index: 0,
            pending: String::new(),
            last_sent: None,
        }
    }

    /// Whether any piece has gone out: a retry or a fallback would then garble the answer.
    pub(crate) fn sent_any(&self) -> bool {
        self.index > 0
    }

    fn push(&mut self, text: &str) {
        self.pending.push_str(text);
        let due = self
            .last_sent
            .is_none_or(|sent| sent.elapsed() >= self.topic.flush);
        if due {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let event = DeltaEvent {
            schema_version: SCHEMA_VERSION,
            job_id: self.job_id,
            user_id: self.user_id.clone(),
            attempt: self.attempt,
            index: self.index,
            text: std::mem::take(&mut self.pending),
            emitted_at: Utc::now(),
        };
        let payload = event.encode();
        let key = self.job_id.to_string();
        let record = FutureRecord::to(&self.topic.topic)
            .key(&key)
            .payload(&payload)
            .headers(sluice_common::kafka::event_headers());
        // Why not await the acknowledgement: the next token must not wait for the broker. The
        // idempotent producer keeps the pieces in order on the job's partition.
        if let Err((error, _)) = self.topic.producer.send_result(record) {
            tracing::warn!(error = %error, "a delta was not published");
        }
        metrics::counter!("sluice_deltas_published_total").increment(1);
        self.index += 1;
        self.last_sent = Some(Instant::now());
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: ChunkDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
}

/// Reads an OpenAI chat stream to its end (`[DONE]`), handing each piece of content to `sink`,
/// and returns the whole answer as a non-streamed call would.
pub(crate) async fn read_chat_stream(
    response: reqwest::Response,
    model: &str,
    sink: &mut DeltaSink,
    broken: impl Fn(reqwest::Error) -> CallError,
) -> Result<Output, CallError> {
    let mut output = Output {
        model: Some(model.to_owned()),
        ..Output::default()
    };
    let mut events = response.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event.map_err(|error| match error {
            eventsource_stream::EventStreamError::Transport(error) => broken(error),
            other => invalid(format!("model stream is not server-sent events: {other}")),
        })?;
        if event.data.trim() == "[DONE]" {
            sink.flush();
            return Ok(output);
        }
        let chunk: Chunk = serde_json::from_str(&event.data)
            .map_err(|error| invalid(format!("model stream chunk is not a chat chunk: {error}")))?;
        if let Some(answered_by) = chunk.model {
            output.model = Some(answered_by);
        }
        if chunk.usage.is_some() {
            output.usage = chunk.usage;
        }
        for choice in chunk.choices {
            if let Some(text) = choice.delta.content.filter(|text| !text.is_empty()) {
                output.content.push_str(&text);
                sink.push(&text);
            }
            if choice.finish_reason.is_some() {
                output.finish_reason = choice.finish_reason;
            }
        }
    }
    Err(CallError {
        error: sluice_schemas::JobError {
            code: ErrorCode::BackendError,
            message: "model stream ended without [DONE]".to_owned(),
        },
        failure: Failure::Retryable,
        retry_after: None,
    })
}

fn invalid(message: String) -> CallError {
    CallError {
        error: sluice_schemas::JobError {
            code: ErrorCode::InvalidBackendResponse,
            message,
        },
        failure: Failure::Fatal,
        retry_after: None,
    }
}
