//! `"stream": true`, as OpenAI streams: a role chunk, the content a token (a word and the space
//! before it) at a time, paced by `SIM_TOKEN_TIME_MS`, a finish chunk, a usage chunk when
//! `stream_options.include_usage` asks, then `data: [DONE]`. A tool call streams as OpenAI's
//! does: the call's id and name first, then its arguments. A client that goes away mid-stream
//! counts as a disconnect.

use super::{Answer, AppState, ChatRequest, OpenCall};
use axum::response::sse::{Event, Sse};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::time::Duration;

/// The content split into tokens: each word with the whitespace before it.
fn tokens(content: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    for character in content.chars() {
        if character.is_whitespace() && !current.trim().is_empty() {
            tokens.push(std::mem::take(&mut current));
        }
        current.push(character);
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

pub(super) fn chat(
    state: &AppState,
    request: &ChatRequest,
    mut open: OpenCall,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>> + use<>> {
    // Answered only once the last chunk is out.
    open.answered = false;
    let token_time = Duration::from_millis(state.config.token_time_ms);
    let id = format!("chatcmpl-sim-{}", fastrand::u64(..));
    let model = request.model.clone();
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|options| options.include_usage);
    let prompt_tokens = request.prompt_tokens();
    let answer = request.answer();
    let chunk = move |delta: Value, finish_reason: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    };
    let events = async_stream::stream! {
        let data = |value: Value| Ok::<_, Infallible>(Event::default().data(value.to_string()));
        yield data(chunk(json!({"role": "assistant", "content": ""}), None));
        let (finish_reason, completion_tokens) = match answer {
            Answer::Text(content) => {
                let tokens = tokens(&content);
                let count = tokens.len();
                for (index, token) in tokens.into_iter().enumerate() {
                    if index > 0 && !token_time.is_zero() {
                        tokio::time::sleep(token_time).await;
                    }
                    yield data(chunk(json!({"content": token}), None));
                }
                ("stop", count)
            }
            Answer::ToolCall { name, arguments } => {
                yield data(chunk(json!({"tool_calls": [{"index": 0, "id": "call_sim_0", "type": "function", "function": {"name": name, "arguments": ""}}]}), None));
                yield data(chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}), None));
                ("tool_calls", 1)
            }
        };
        let mut last = chunk(json!({}), Some(finish_reason));
        if include_usage {
            yield data(last);
            last = chunk(json!({}), None);
            last["choices"] = json!([]);
            last["usage"] = json!({
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            });
        }
        yield data(last);
        open.answered = true;
        drop(open);
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(events)
}

#[cfg(test)]
mod tests {
    use super::tokens;

    #[test]
    fn tokens_are_words_with_the_space_before_them() {
        assert_eq!(tokens("echo: hello  world"), ["echo:", " hello", "  world"]);
        assert_eq!(tokens(""), Vec::<String>::new());
        assert_eq!(tokens("one").concat(), "one");
    }
}
