//! OpenAI's request and response shapes, and how they map to a Sluice job and back. What
//! Sluice reads of a request is named here; every other field (`temperature`, `tools`,
//! `response_format`, `seed`, `stop`, `max_tokens`, ...) reaches the backend unchanged in the
//! job's `params`.

use crate::submit::SubmitBody;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_schemas::{
    FieldError, JobError, JobId, JobStatus, Message, Output, Params, Priority, Role,
};

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<Value>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(flatten)]
    pub rest: Params,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingsRequest {
    pub model: String,
    pub input: Value,
    /// `float` (the default) or `base64` (little-endian f32s; what the Python SDK asks for).
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u64>,
    #[serde(default)]
    pub user: Option<String>,
}

/// An OpenAI body (`/v1/chat/completions` if `chat`, else `/v1/embeddings`) as the front door
/// reads it, turned into the submission it makes: `None` when the JSON is not that request's
/// shape, else the submission or the field it refuses. For fuzzing the front door's decoders.
pub fn openai_submission(chat: bool, body: &[u8]) -> Option<Result<SubmitBody, FieldError>> {
    if chat {
        let request: ChatRequest = sluice_schemas::decode_json(body).ok()?;
        Some(request.into_submission(None))
    } else {
        let request: EmbeddingsRequest = sluice_schemas::decode_json(body).ok()?;
        Some(request.into_submission(None))
    }
}

/// Who a job is for when API keys are off: OpenAI's `user` field, or this.
const ANONYMOUS: &str = "anonymous";

impl ChatRequest {
    /// The job this request asks for. Refused here, each naming its field: more than one
    /// choice (`n`), and message shapes a job cannot carry yet (images, audio, the legacy
    /// `function_call`).
    pub(crate) fn into_submission(self, timeout_ms: Option<u64>) -> Result<SubmitBody, FieldError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(FieldError::new(
                "n",
                "only one choice per request is supported (n = 1)",
            ));
        }
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(index, message)| chat_message(index, message))
            .collect::<Result<Vec<_>, _>>()?;
        let mut params = self.rest;
        // Sluice sends `stream` itself; the rest is the backend's business.
        params.remove("stream_options");
        let user = params
            .get("user")
            .and_then(Value::as_str)
            .map(str::to_owned);
        // Sluice's lane, not the backend's business: `flex` (OpenAI's slower, cheaper
        // processing) is the batch lane; `auto`, `default`, `scale` and `priority` interactive.
        let priority = match params.remove("service_tier") {
            None | Some(Value::Null) => None,
            Some(Value::String(tier)) => Some(match tier.as_str() {
                "flex" => Priority::Batch,
                "auto" | "default" | "scale" | "priority" => Priority::Interactive,
                _ => return Err(service_tier_error()),
            }),
            Some(_) => return Err(service_tier_error()),
        };
        Ok(SubmitBody {
            user_id: Some(user.unwrap_or_else(|| ANONYMOUS.to_owned())),
            model: self.model,
            messages: Some(messages),
            input: None,
            params: Some(params),
            timeout_ms,
            cache: None,
            stream: self.stream,
            webhook: None,
            priority,
            job_id: None,
        })
    }
}

fn service_tier_error() -> FieldError {
    FieldError::new(
        "service_tier",
        "must be auto, default, flex (the batch lane), scale or priority",
    )
}

fn chat_message(index: usize, message: &Value) -> Result<Message, FieldError> {
    let field = |name: &str| format!("messages[{index}].{name}");
    let object = message
        .as_object()
        .ok_or_else(|| FieldError::new(format!("messages[{index}]"), "must be an object"))?;
    let role: Role = object
        .get("role")
        .cloned()
        .ok_or_else(|| FieldError::new(field("role"), "is required"))
        .and_then(|role| {
            serde_json::from_value(role).map_err(|_| {
                FieldError::new(
                    field("role"),
                    "must be system, developer, user, assistant or tool",
                )
            })
        })?;
    for unsupported in ["function_call", "audio"] {
        if object.contains_key(unsupported) {
            return Err(FieldError::new(
                field(unsupported),
                "is not supported in messages (for tool use send `tool_calls`)",
            ));
        }
    }
    let tool_calls = match object.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(Value::Array(calls)) if calls.iter().all(Value::is_object) => Some(calls.clone()),
        Some(_) => {
            return Err(FieldError::new(
                field("tool_calls"),
                "must be an array of tool calls",
            ));
        }
    };
    let text_field = |name: &str| match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(FieldError::new(field(name), "must be a string")),
    };
    let content = match object.get("content") {
        Some(Value::String(text)) => text.clone(),
        // An assistant message that only calls tools has no content.
        None | Some(Value::Null) if tool_calls.is_some() => String::new(),
        // Content parts: text parts are joined; an image or audio part cannot be carried yet.
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (part_index, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(part_text))) if !part_text.is_empty() => {
                        text.push_str(part_text)
                    }
                    (Some("text"), Some(Value::String(_))) => {
                        return Err(FieldError::new(
                            format!("messages[{index}].content[{part_index}].text"),
                            "must not be empty",
                        ));
                    }
                    _ => {
                        return Err(FieldError::new(
                            format!("messages[{index}].content[{part_index}]"),
                            "only text parts are supported",
                        ));
                    }
                }
            }
            text
        }
        _ => {
            return Err(FieldError::new(
                field("content"),
                "must be a string or text parts",
            ));
        }
    };
    Ok(Message {
        role,
        content,
        tool_calls,
        tool_call_id: text_field("tool_call_id")?,
        name: text_field("name")?,
    })
}

impl EmbeddingsRequest {
    pub(crate) fn into_submission(self, timeout_ms: Option<u64>) -> Result<SubmitBody, FieldError> {
        if self.dimensions.is_some() {
            return Err(FieldError::new(
                "dimensions",
                "is not supported: the model's vectors have the length it gives",
            ));
        }
        if !matches!(
            self.encoding_format.as_deref(),
            None | Some("float" | "base64")
        ) {
            return Err(FieldError::new(
                "encoding_format",
                "must be float or base64",
            ));
        }
        let input = match self.input {
            Value::String(text) => vec![text],
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(index, item)| match item {
                    Value::String(text) => Ok(text),
                    _ => Err(FieldError::new(
                        format!("input[{index}]"),
                        "must be text; token arrays are not supported",
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(FieldError::new(
                    "input",
                    "must be a string or an array of strings",
                ));
            }
        };
        Ok(SubmitBody {
            user_id: Some(self.user.unwrap_or_else(|| ANONYMOUS.to_owned())),
            model: self.model,
            messages: None,
            input: Some(input),
            params: None,
            timeout_ms,
            cache: None,
            stream: false,
            webhook: None,
            priority: None,
            job_id: None,
        })
    }
}

/// A job as the results service shows it, as far as an answer needs it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct JobView {
    pub job_id: JobId,
    pub model: String,
    pub status: JobStatus,
    #[serde(default)]
    pub output: Option<Output>,
    #[serde(default)]
    pub error: Option<JobError>,
}

fn usage(output: &Output) -> Value {
    let usage = output.usage.unwrap_or_default();
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    })
}

pub(crate) fn answered_by<'a>(job: &'a JobView, output: &'a Output) -> &'a str {
    output.model.as_deref().unwrap_or(&job.model)
}

/// A `chat.completion` from a succeeded job.
pub(crate) fn chat_completion(job: &JobView, output: &Output, created: i64) -> Value {
    json!({
        "id": format!("chatcmpl-{}", job.job_id),
        "object": "chat.completion",
        "created": created,
        "model": answered_by(job, output),
        "choices": [{
            "index": 0,
            "message": message(output),
            "logprobs": output.logprobs,
            "finish_reason": output.finish_reason.as_deref().unwrap_or("stop"),
        }],
        "usage": usage(output),
    })
}

/// The answer's whole message: the text (`null` when the model only called tools), the tool
/// calls, the legacy function call, the refusal.
fn message(output: &Output) -> Value {
    let calls_tools = output.tool_calls.is_some() || output.function_call.is_some();
    let mut message = json!({
        "role": "assistant",
        "content": if output.content.is_empty() && calls_tools { Value::Null } else { json!(output.content) },
        "refusal": output.refusal,
    });
    if let Some(calls) = &output.tool_calls {
        message["tool_calls"] = json!(calls);
    }
    if let Some(call) = &output.function_call {
        message["function_call"] = call.clone();
    }
    message
}

/// What a stream's last content chunk cannot carry as text: the tool calls (each with its
/// `index`, whole), the function call, the refusal. Sent as one delta just before the finish.
pub(crate) fn final_delta(output: &Output) -> Option<Value> {
    let mut delta = serde_json::Map::new();
    if let Some(calls) = &output.tool_calls {
        let indexed: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(index, call)| {
                let mut call = call.clone();
                call["index"] = json!(index);
                call
            })
            .collect();
        delta.insert("tool_calls".into(), Value::Array(indexed));
    }
    if let Some(call) = &output.function_call {
        delta.insert("function_call".into(), call.clone());
    }
    if let Some(refusal) = &output.refusal {
        delta.insert("refusal".into(), json!(refusal));
    }
    (!delta.is_empty()).then_some(Value::Object(delta))
}

/// One `chat.completion.chunk` of job `job_id`'s answer: `delta` and, on the last, the finish
/// reason. With `include_usage` every chunk says `"usage": null`, as OpenAI's do.
pub(crate) fn chunk(
    job_id: JobId,
    model: &str,
    created: i64,
    delta: Value,
    finish_reason: Option<&str>,
    include_usage: bool,
) -> Value {
    let mut chunk = json!({
        "id": format!("chatcmpl-{job_id}"),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
    });
    if include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk
}

/// The last chunk when `stream_options.include_usage` asks: no choices, the usage.
pub(crate) fn usage_chunk(job_id: JobId, model: &str, created: i64, output: &Output) -> Value {
    let mut last = chunk(job_id, model, created, json!({}), None, true);
    last["choices"] = json!([]);
    last["usage"] = usage(output);
    last
}

/// The embeddings `list` from a succeeded embedding job.
pub(crate) fn embedding_list(job: &JobView, output: &Output, base64: bool) -> Value {
    let vectors = output.embeddings.as_deref().unwrap_or_default();
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector
                    .iter()
                    .flat_map(|value| value.to_le_bytes())
                    .collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens = output.usage.as_ref().map_or(0, |usage| usage.prompt_tokens);
    json!({
        "object": "list",
        "data": data,
        "model": answered_by(job, output),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<SubmitBody, FieldError> {
        serde_json::from_value::<ChatRequest>(body)
            .unwrap()
            .into_submission(None)
    }

    #[test]
    fn unknown_fields_reach_the_backend_and_unsupported_ones_are_named() {
        let submission = chat(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "temperature": 0.2, "tools": [], "seed": 7, "user": "carol",
        }))
        .unwrap();
        let params = submission.params.unwrap();
        assert_eq!(params["temperature"], 0.2);
        assert_eq!(params["seed"], 7);
        assert!(params.contains_key("tools"));
        assert_eq!(submission.messages.unwrap()[0].content, "ab");
        assert_eq!(submission.user_id.as_deref(), Some("carol"));

        let refused = chat(json!({"model": "m", "messages": [], "n": 2})).unwrap_err();
        assert_eq!(refused.field, "n");
        let refused = chat(json!({"model": "m", "messages": [{"role": "assistant", "content": null, "function_call": {}}]}))
            .unwrap_err();
        assert_eq!(refused.field, "messages[0].function_call");
        let refused =
            chat(json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": "x"}]}))
                .unwrap_err();
        assert_eq!(refused.field, "messages[0].tool_calls");
        let refused = chat(json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}))
            .unwrap_err();
        assert_eq!(refused.field, "messages[0].role");
    }

    #[test]
    fn base64_embeddings_are_little_endian_f32s() {
        let job = JobView {
            job_id: JobId::new(),
            model: "e".into(),
            status: JobStatus::Succeeded,
            output: None,
            error: None,
        };
        let output = Output {
            embeddings: Some(vec![vec![1.0, -2.5]]),
            ..Output::default()
        };
        let list = embedding_list(&job, &output, true);
        let text = list["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
            .collect();
        assert_eq!(values, [1.0, -2.5]);
        assert_eq!(
            embedding_list(&job, &output, false)["data"][0]["embedding"],
            json!([1.0, -2.5])
        );
    }
}
