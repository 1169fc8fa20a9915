//! Validated newtypes: input is parsed into these once, at the edge, and trusted behind it.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Longest accepted user id, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;
/// Most messages one request may carry.
pub const MAX_MESSAGES: usize = 256;
/// Most texts one embedding job may carry.
pub const MAX_INPUTS: usize = 256;
const MAX_MODEL_LEN: usize = 256;

/// A validation failure that names the offending field, e.g. `messages[2].role`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A job's identity: a UUIDv7, so ids sort by submission time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Uuid", into = "Uuid")]
pub struct JobId(Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// A job id as the API writes it: a UUIDv7 in its hyphenated form (the braced, URN and
    /// hyphen-less forms the `uuid` crate also reads are refused, as the API document says).
    pub fn parse(text: &str) -> Result<Self, FieldError> {
        // Of the forms `parse_str` reads, only the hyphenated one is 36 characters long.
        if text.len() != 36 {
            return Err(FieldError::new(
                "job_id",
                "must be a UUID, hyphenated (8-4-4-4-12 hex digits)",
            ));
        }
        let uuid =
            Uuid::parse_str(text).map_err(|_| FieldError::new("job_id", "must be a UUID"))?;
        Self::try_from(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl TryFrom<Uuid> for JobId {
    type Error = FieldError;

    fn try_from(uuid: Uuid) -> Result<Self, FieldError> {
        if uuid.get_version_num() != 7 {
            return Err(FieldError::new("job_id", "must be a UUIDv7"));
        }
        Ok(Self(uuid))
    }
}

impl From<JobId> for Uuid {
    fn from(id: JobId) -> Uuid {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The user a job belongs to; also the Kafka record key, so one user's jobs keep their order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    pub fn parse(text: impl Into<String>) -> Result<Self, FieldError> {
        let text = text.into();
        if text.is_empty() || text.len() > MAX_USER_ID_LEN {
            return Err(FieldError::new(
                "user_id",
                format!("must be 1 to {MAX_USER_ID_LEN} bytes long"),
            ));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.:@".contains(c);
        if !text.chars().all(allowed) {
            return Err(FieldError::new(
                "user_id",
                "may hold only ASCII letters, digits and - _ . : @",
            ));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = FieldError;

    fn try_from(text: String) -> Result<Self, FieldError> {
        Self::parse(text)
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> String {
        id.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The model a job asks for, as the backend names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

impl ModelName {
    pub fn parse(text: impl Into<String>) -> Result<Self, FieldError> {
        let text = text.into();
        // Characters, as the API document's `maxLength` counts them.
        if text.trim().is_empty() || text.chars().count() > MAX_MODEL_LEN {
            return Err(FieldError::new(
                "model",
                format!("must be 1 to {MAX_MODEL_LEN} characters, not all blank"),
            ));
        }
        if text.chars().any(char::is_control) {
            return Err(FieldError::new(
                "model",
                "must not contain control characters",
            ));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelName {
    type Error = FieldError;

    fn try_from(text: String) -> Result<Self, FieldError> {
        Self::parse(text)
    }
}

impl From<ModelName> for String {
    fn from(name: ModelName) -> String {
        name.0
    }
}

/// The longest tier name.
pub const MAX_TIER_LEN: usize = 64;

/// A tier of `SLUICE_TIERS`: 1 to 64 ASCII letters, digits, `.`, `_` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TierName(String);

impl TierName {
    pub fn parse(text: impl Into<String>) -> Result<Self, FieldError> {
        let text = text.into();
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if text.is_empty() || text.len() > MAX_TIER_LEN || !text.chars().all(allowed) {
            return Err(FieldError::new(
                "tier",
                format!("must be 1 to {MAX_TIER_LEN} ASCII letters, digits, '.', '_' or '-'"),
            ));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TierName {
    type Error = FieldError;

    fn try_from(text: String) -> Result<Self, FieldError> {
        Self::parse(text)
    }
}

impl From<TierName> for String {
    fn from(name: TierName) -> String {
        name.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job's lane: `interactive` (the default: someone is waiting) or `batch` (throughput over
/// latency). Each lane is its own request topic, so batch work never sits ahead of interactive
/// work in a partition; workers read both and give batch the share left over.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }

    pub fn is_interactive(&self) -> bool {
        *self == Priority::Interactive
    }
}

/// The author of a chat message, as in OpenAI's chat completions API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

/// One chat message, as OpenAI's chat completions API has it: text, and for tool use the
/// assistant's `tool_calls` and a `tool` message's `tool_call_id`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Message {
    pub role: Role,
    /// The text; empty (sent as `null`) for an assistant message that only calls tools.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    /// An assistant message's tool calls, as the model made them (`id`, `type`, `function`).
    #[serde(default)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The participant's name, passed to the model.
    #[serde(default)]
    pub name: Option<String>,
}

impl Message {
    /// A message of text only.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }

    fn calls_tools(&self) -> bool {
        self.tool_calls
            .as_ref()
            .is_some_and(|calls| !calls.is_empty())
    }
}

/// As OpenAI's API has it: `content` is `null` when an assistant message only calls tools, and
/// fields that are not set are left out.
impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("role", &self.role)?;
        if self.content.is_empty() && self.calls_tools() {
            map.serialize_entry("content", &())?;
        } else {
            map.serialize_entry("content", &self.content)?;
        }
        if let Some(calls) = &self.tool_calls {
            map.serialize_entry("tool_calls", calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            map.serialize_entry("tool_call_id", id)?;
        }
        if let Some(name) = &self.name {
            map.serialize_entry("name", name)?;
        }
        map.end()
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_default())
}

/// Sampling parameters passed through to the model backend (`temperature`, `max_tokens`, ...).
/// Sluice does not interpret them; the backend validates them.
pub type Params = serde_json::Map<String, serde_json::Value>;

/// Checks a message list: not empty, not too long, no empty content.
pub(crate) fn check_messages(messages: &[Message]) -> Result<(), FieldError> {
    if messages.is_empty() {
        return Err(FieldError::new(
            "messages",
            "must hold at least one message",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(FieldError::new(
            "messages",
            format!("must hold at most {MAX_MESSAGES} messages"),
        ));
    }
    for (index, message) in messages.iter().enumerate() {
        if let Some(call) = message
            .tool_calls
            .iter()
            .flatten()
            .position(|call| !call.is_object())
        {
            return Err(FieldError::new(
                format!("messages[{index}].tool_calls[{call}]"),
                "must be an object (id, type, function)",
            ));
        }
    }
    if let Some(index) = messages
        .iter()
        .position(|message| message.content.is_empty() && !message.calls_tools())
    {
        return Err(FieldError::new(
            format!("messages[{index}].content"),
            "must not be empty (unless the message calls tools)",
        ));
    }
    Ok(())
}

/// One text or an array of texts, as OpenAI's embeddings API takes `input`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(text) => vec![text],
            OneOrMany::Many(texts) => texts,
        }
    }
}

/// `input` as one text or an array of texts; absent or `null`, `None`.
pub fn deserialize_input<'de, D>(deserializer: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<OneOrMany>::deserialize(deserializer)?.map(OneOrMany::into_vec))
}

/// `input` as one text or an array of texts, for a body where a field is given or absent (with
/// `#[serde(default)]`): `null` is refused.
pub fn deserialize_given_input<'de, D>(deserializer: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    OneOrMany::deserialize(deserializer).map(|input| Some(input.into_vec()))
}

/// An optional field that is given or absent (with `#[serde(default)]`): `null` is refused, as
/// the API's document says (a JSON Schema without `null` in the field's type).
pub fn not_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

pub(crate) fn check_input(input: &[String]) -> Result<(), FieldError> {
    if input.is_empty() {
        return Err(FieldError::new("input", "must hold at least one text"));
    }
    if input.len() > MAX_INPUTS {
        return Err(FieldError::new(
            "input",
            format!("must hold at most {MAX_INPUTS} texts"),
        ));
    }
    if let Some(index) = input.iter().position(|text| text.trim().is_empty()) {
        return Err(FieldError::new(
            format!("input[{index}]"),
            "must not be empty",
        ));
    }
    Ok(())
}
