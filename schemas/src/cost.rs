//! What a job will cost in model tokens, estimated before it runs: what ingest reserves against
//! a token limit and what the worker's fair queue charges a user for starting it. Both settle
//! against the model's reported `usage` when the job ends, so the estimate only has to be close.
//!
//! Sluice has no tokenizer for most models (they are the user's), so a prompt is estimated as
//! OpenAI's rule of thumb has it: a token per 4 bytes of UTF-8 text, plus 4 tokens per chat
//! message for its role and framing. The answer is estimated at its cap: the request's
//! `max_completion_tokens` or `max_tokens`, else the deployment's default cap.

use crate::events::Output;
use crate::request::{RequestEvent, Task};

/// Bytes of text per token, OpenAI's rule of thumb for English.
pub const BYTES_PER_TOKEN: u64 = 4;
/// Tokens of framing per chat message (role, separators).
pub const TOKENS_PER_MESSAGE: u64 = 4;

/// A job's token estimate, split as a model reports usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenEstimate {
    pub prompt: u64,
    /// The most the answer may take: its cap. Zero for embeddings, which answer no tokens.
    pub completion: u64,
}

impl TokenEstimate {
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }

    /// What the job really cost, once it ended with `output` (none if it failed, expired or
    /// was cancelled): the backend's usage; nothing for an answer from the cache, a shared
    /// call or the static fallback, or for no answer at all; for an answer whose backend
    /// reported no usage, the prompt's estimate and the answer's text counted as a prompt is.
    pub fn settle(&self, output: Option<&Output>) -> u64 {
        let Some(output) = output else {
            return 0;
        };
        if output.cached || output.degraded {
            return 0;
        }
        match output.usage {
            Some(usage) => usage
                .total_tokens
                .max(usage.prompt_tokens + usage.completion_tokens),
            None => self.prompt + text_tokens(&output.content),
        }
    }
}

fn text_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(BYTES_PER_TOKEN)
}

impl RequestEvent {
    /// The answer's cap the request sets (`max_completion_tokens`, else `max_tokens`), if any.
    pub fn max_output_tokens(&self) -> Option<u64> {
        ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|name| self.params.get(*name).and_then(serde_json::Value::as_u64))
    }

    /// The estimate of this job's tokens, an answer without a cap of its own counted at
    /// `default_max_output`.
    pub fn estimate_tokens(&self, default_max_output: u64) -> TokenEstimate {
        match &self.task {
            Task::Embedding(input) => TokenEstimate {
                prompt: input.iter().map(|text| text_tokens(text)).sum(),
                completion: 0,
            },
            Task::Chat(messages) => TokenEstimate {
                prompt: messages
                    .iter()
                    .map(|message| {
                        let calls = message.tool_calls.as_ref().map_or(0, |calls| {
                            text_tokens(&serde_json::Value::from(calls.clone()).to_string())
                        });
                        TOKENS_PER_MESSAGE + text_tokens(&message.content) + calls
                    })
                    .sum(),
                completion: self.max_output_tokens().unwrap_or(default_max_output),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{RequestEvent, TokenEstimate};

    fn event(json: serde_json::Value) -> RequestEvent {
        let mut base = serde_json::json!({
            "schema_version": 1,
            "job_id": "01890a5d-ac96-774b-bcce-b302099a8057",
            "user_id": "u",
            "model": "m",
            "submitted_at": "2026-01-01T00:00:00Z",
            "deadline": "2026-01-01T00:01:00Z",
        });
        base.as_object_mut()
            .unwrap()
            .extend(json.as_object().unwrap().clone());
        RequestEvent::decode(base.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_chat_counts_its_text_its_messages_and_its_cap() {
        let chat = event(serde_json::json!({
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, model"}],
            "params": {"max_tokens": 100},
        }));
        // 8 bytes -> 2, 18 bytes -> 5, 4 per message.
        assert_eq!(
            chat.estimate_tokens(512),
            TokenEstimate {
                prompt: 2 + 5 + 2 * 4,
                completion: 100
            }
        );
        let uncapped = event(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}));
        assert_eq!(uncapped.estimate_tokens(512).completion, 512);
        let newer = event(serde_json::json!({
            "messages": [{"role": "user", "content": "hi"}],
            "params": {"max_completion_tokens": 7, "max_tokens": 100},
        }));
        assert_eq!(newer.estimate_tokens(512).completion, 7);
    }

    #[test]
    fn settling_takes_the_reported_usage_and_nothing_for_no_model_call() {
        let estimate = TokenEstimate {
            prompt: 10,
            completion: 500,
        };
        let usage = crate::Usage {
            prompt_tokens: 12,
            completion_tokens: 30,
            total_tokens: 42,
        };
        let answered = crate::Output {
            content: "x".repeat(40),
            usage: Some(usage),
            ..Default::default()
        };
        assert_eq!(estimate.settle(Some(&answered)), 42);
        let unreported = crate::Output {
            usage: None,
            ..answered.clone()
        };
        assert_eq!(estimate.settle(Some(&unreported)), 10 + 10);
        let cached = crate::Output {
            cached: true,
            ..answered
        };
        assert_eq!(estimate.settle(Some(&cached)), 0);
        assert_eq!(estimate.settle(None), 0);
    }

    #[test]
    fn an_embedding_has_no_answer_tokens() {
        let embedding = event(serde_json::json!({"input": ["abcd", "abcde"]}));
        assert_eq!(
            embedding.estimate_tokens(512),
            TokenEstimate {
                prompt: 1 + 2,
                completion: 0
            }
        );
    }
}
