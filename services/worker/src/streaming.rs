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
use serde_json::{Value, json};
use sluice_schemas::{DeltaEvent, ErrorCode, JobId, Output, SCHEMA_VERSION, Usage, UserId};
use std::time::{Duration, Instant};
use tokio::sync::watch;

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
    /// When the answer's first text came from the backend, watched while the call runs (by the
    /// concurrency limit).
    first_text: watch::Sender<Option<Instant>>,
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
            first_text: watch::Sender::new(None),
        }
    }

    /// When the answer's first text comes, as it comes.
    pub(crate) fn watch_first_text(&self) -> watch::Receiver<Option<Instant>> {
        self.first_text.subscribe()
    }

    /// Whether any piece has gone out: a retry or a fallback would then garble the answer.
    pub(crate) fn sent_any(&self) -> bool {
        self.index > 0
    }

    /// When the answer's first text came from the backend, if any has.
    pub(crate) fn first_text_at(&self) -> Option<Instant> {
        *self.first_text.borrow()
    }

    fn push(&mut self, text: &str) {
        if !text.is_empty() {
            self.first_text.send_if_modified(|first| {
                let unset = first.is_none();
                first.get_or_insert_with(Instant::now);
                unset
            });
        }
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
    #[serde(default)]
    logprobs: Option<Value>,
}

#[derive(Default, Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    refusal: Option<String>,
}

/// More tool calls than this in one answer is a broken stream, not a model's answer.
const MAX_TOOL_CALLS: usize = 128;

/// Adds a chunk's pieces of tool calls to the calls so far: each piece names its call by
/// `index`; the first brings `id`, `type` and the function's `name`, the rest more `arguments`.
fn merge_tool_calls(calls: &mut Vec<Value>, pieces: &[Value]) -> Result<(), CallError> {
    for piece in pieces {
        let index = piece
            .get("index")
            .and_then(Value::as_u64)
            .and_then(|index| usize::try_from(index).ok())
            .filter(|index| *index < MAX_TOOL_CALLS)
            .ok_or_else(|| invalid("model stream has a tool call without a valid index".into()))?;
        while calls.len() <= index {
            calls.push(
                json!({"id": null, "type": "function", "function": {"name": "", "arguments": ""}}),
            );
        }
        let call = &mut calls[index];
        for field in ["id", "type"] {
            if let Some(value) = piece.get(field).filter(|value| !value.is_null()) {
                call[field] = value.clone();
            }
        }
        if let Some(function) = piece.get("function") {
            append_function(&mut call["function"], function);
        }
    }
    Ok(())
}

/// Appends a piece of a function call (`name`, `arguments`) to the call so far.
fn append_function(call: &mut Value, piece: &Value) {
    for field in ["name", "arguments"] {
        if let Some(text) = piece.get(field).and_then(Value::as_str) {
            let so_far = call.get(field).and_then(Value::as_str).unwrap_or("");
            call[field] = Value::String(format!("{so_far}{text}"));
        }
    }
}

/// Appends a chunk's log probabilities (`{"content": [...], "refusal": [...]}`) to those so far.
fn append_logprobs(so_far: &mut Option<Value>, piece: Value) {
    let Value::Object(piece) = piece else {
        return;
    };
    let so_far = so_far.get_or_insert_with(|| json!({}));
    for (key, items) in piece {
        if let Value::Array(items) = items {
            match so_far.get_mut(&key).and_then(Value::as_array_mut) {
                Some(list) => list.extend(items),
                None => so_far[&key] = Value::Array(items),
            }
        }
    }
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
            let delta = choice.delta;
            if let Some(text) = delta.content.filter(|text| !text.is_empty()) {
                output.content.push_str(&text);
                sink.push(&text);
            }
            if let Some(pieces) = delta.tool_calls {
                merge_tool_calls(output.tool_calls.get_or_insert_with(Vec::new), &pieces)?;
            }
            if let Some(piece) = delta.function_call {
                append_function(
                    output.function_call.get_or_insert_with(|| json!({})),
                    &piece,
                );
            }
            if let Some(text) = delta.refusal {
                output
                    .refusal
                    .get_or_insert_with(String::new)
                    .push_str(&text);
            }
            if let Some(logprobs) = choice.logprobs.filter(|logprobs| !logprobs.is_null()) {
                append_logprobs(&mut output.logprobs, logprobs);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_tool_calls_add_up_to_the_calls() {
        let mut calls = Vec::new();
        let chunks = [
            json!([{"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]),
            json!([{"index": 0, "function": {"arguments": "{\"city\":"}}]),
            json!([{"index": 1, "id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}]),
            json!([{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]),
        ];
        for chunk in chunks {
            merge_tool_calls(&mut calls, chunk.as_array().unwrap()).unwrap();
        }
        assert_eq!(
            Value::Array(calls),
            json!([
                {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ])
        );
        let mut calls = Vec::new();
        assert!(merge_tool_calls(&mut calls, &[json!({"index": 100000})]).is_err());
    }

    #[test]
    fn log_probabilities_of_each_chunk_are_kept_in_order() {
        let mut logprobs = None;
        append_logprobs(&mut logprobs, json!({"content": [{"token": "a"}]}));
        append_logprobs(
            &mut logprobs,
            json!({"content": [{"token": "b"}], "refusal": null}),
        );
        assert_eq!(
            logprobs,
            Some(json!({"content": [{"token": "a"}, {"token": "b"}]}))
        );
    }
}
