//! The request event: "run this job". What a job asks of its model is a `Task`, a chat or an
//! embedding and never both, so an invalid combination cannot be held; the JSON on the wire
//! keeps the schema file's shape (`messages` or `input` at the top level).

use crate::domain::{
    FieldError, JobId, Message, ModelName, Params, Priority, TierName, UserId, check_input,
    check_messages, deserialize_input,
};
use crate::events::{DecodeError, check_version, decode_json};
use crate::webhook::Webhook;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Published to the requests topic, keyed by `user_id`: "run this job".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "WireRequest")]
pub struct RequestEvent {
    pub schema_version: u32,
    pub job_id: JobId,
    pub user_id: UserId,
    pub model: ModelName,
    pub task: Task,
    pub params: Params,
    pub submitted_at: DateTime<Utc>,
    /// Absolute time after which the job is worthless to its caller.
    pub deadline: DateTime<Utc>,
    /// `false` asks for a fresh answer: no cached one, no sharing of an identical call in
    /// flight. Absent on the wire means `true`.
    pub cache: bool,
    /// Stream a chat answer: the worker publishes its pieces as delta events while the model
    /// generates. Absent on the wire means `false`.
    pub stream: bool,
    /// Where the job's status changes are delivered as signed webhooks, if anywhere.
    pub webhook: Option<Webhook>,
    /// The submitter's tier (`SLUICE_TIERS`), which weighs its share of the workers; absent
    /// means `default`. Ingest sets it from the API key; a direct producer sets it itself.
    pub tier: Option<TierName>,
    /// The job's lane, which is also the topic it is published to. Absent means interactive.
    pub priority: Priority,
    /// The id of the API key that submitted it (never the key itself), for usage per key.
    pub key_id: Option<String>,
}

/// What a job asks of its model.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// A conversation in (`messages`), a chat completion out (`output.content`).
    Chat(Vec<Message>),
    /// Texts in (`input`: OpenAI's string or array), one vector per text out
    /// (`output.embeddings`).
    Embedding(Vec<String>),
}

impl Task {
    pub fn is_embedding(&self) -> bool {
        matches!(self, Task::Embedding(_))
    }

    fn check(&self) -> Result<(), FieldError> {
        match self {
            Task::Chat(messages) => check_messages(messages),
            Task::Embedding(input) => check_input(input),
        }
    }
}

impl RequestEvent {
    /// Parses and checks a record payload; any error is a reason to dead-letter it. Decoding
    /// the wire form first keeps the failing field's path (`messages[1].role`) in the error.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let wire: WireRequest = decode_json(payload)?;
        Self::try_from(wire)
    }

    /// The rules beyond the JSON's shape that every consumer applies: ingest checks a new
    /// event with them before publishing it, so it never publishes what a worker would
    /// dead-letter.
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_version(self.schema_version)?;
        self.task.check()?;
        if self
            .key_id
            .as_ref()
            .is_some_and(|key| key.is_empty() || key.len() > 64)
        {
            return Err(FieldError::new("key_id", "must be 1 to 64 bytes long").into());
        }
        if self.deadline < self.submitted_at {
            return Err(FieldError::new("deadline", "must not be before submitted_at").into());
        }
        // http:// is a deployment's choice (ingest's setting); the contract accepts both.
        if let Some(webhook) = &self.webhook {
            webhook.check(true)?;
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request event always serializes")
    }

    /// A chat job's conversation; empty for an embedding job.
    pub fn messages(&self) -> &[Message] {
        match &self.task {
            Task::Chat(messages) => messages,
            Task::Embedding(_) => &[],
        }
    }
}

/// The request event as the schema file has it: `messages` or `input`, side by side.
#[derive(Deserialize)]
struct WireRequest {
    schema_version: u32,
    job_id: JobId,
    user_id: UserId,
    model: ModelName,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default, deserialize_with = "deserialize_input")]
    input: Option<Vec<String>>,
    #[serde(default)]
    params: Params,
    submitted_at: DateTime<Utc>,
    deadline: DateTime<Utc>,
    #[serde(default)]
    cache: Option<bool>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    webhook: Option<Webhook>,
    #[serde(default)]
    tier: Option<TierName>,
    #[serde(default)]
    priority: Priority,
    #[serde(default)]
    key_id: Option<String>,
}

impl TryFrom<WireRequest> for RequestEvent {
    type Error = DecodeError;

    fn try_from(wire: WireRequest) -> Result<Self, DecodeError> {
        let task = match (wire.messages, wire.input) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "input",
                    "a job is a chat (messages) or an embedding (input), not both",
                )
                .into());
            }
            (None, Some(input)) => Task::Embedding(input),
            (messages, None) => Task::Chat(messages.unwrap_or_default()),
        };
        let event = RequestEvent {
            schema_version: wire.schema_version,
            job_id: wire.job_id,
            user_id: wire.user_id,
            model: wire.model,
            task,
            params: wire.params,
            submitted_at: wire.submitted_at,
            deadline: wire.deadline,
            cache: wire.cache.unwrap_or(true),
            stream: wire.stream,
            webhook: wire.webhook,
            tier: wire.tier,
            priority: wire.priority,
            key_id: wire.key_id,
        };
        event.validate()?;
        Ok(event)
    }
}

/// The wire form, borrowed: encoding copies nothing.
#[derive(Serialize)]
struct WireRequestRef<'a> {
    schema_version: u32,
    job_id: &'a JobId,
    user_id: &'a UserId,
    model: &'a ModelName,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<&'a [Message]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a [String]>,
    params: &'a Params,
    submitted_at: &'a DateTime<Utc>,
    deadline: &'a DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<bool>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<&'a Webhook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tier: Option<&'a TierName>,
    #[serde(skip_serializing_if = "Priority::is_interactive")]
    priority: Priority,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
}

impl Serialize for RequestEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (messages, input) = match &self.task {
            Task::Chat(messages) => (Some(messages.as_slice()), None),
            Task::Embedding(input) => (None, Some(input.as_slice())),
        };
        WireRequestRef {
            schema_version: self.schema_version,
            job_id: &self.job_id,
            user_id: &self.user_id,
            model: &self.model,
            messages,
            input,
            params: &self.params,
            submitted_at: &self.submitted_at,
            deadline: &self.deadline,
            // Only the exception is written; absent means "use the cache".
            cache: (!self.cache).then_some(false),
            stream: self.stream,
            webhook: self.webhook.as_ref(),
            tier: self.tier.as_ref(),
            priority: self.priority,
            key_id: self.key_id.as_deref(),
        }
        .serialize(serializer)
    }
}
