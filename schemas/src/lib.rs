//! The event contract shared by every Sluice service and by producers that write to Kafka directly.
//!
//! `request.schema.json` and `status.schema.json` beside this crate are the public form of the
//! same contract; `tests/schemas.rs` proves that the two agree.

mod cost;
mod delta;
mod domain;
mod events;
mod request;
mod webhook;

pub use cost::{BYTES_PER_TOKEN, TOKENS_PER_MESSAGE, TokenEstimate};
pub use delta::DeltaEvent;
pub use domain::{
    FieldError, JobId, MAX_INPUTS, MAX_MESSAGES, MAX_TIER_LEN, MAX_USER_ID_LEN, Message, ModelName,
    Params, Priority, Role, TierName, UserId, deserialize_given_input, deserialize_input, not_null,
};
pub use events::{
    CancelEvent, DecodeError, ErrorCode, JobError, JobStatus, Output, SCHEMA_VERSION, StatusEvent,
    Timings, Usage, decode_json,
};
pub use request::{RequestEvent, Task};
pub use webhook::{MAX_WEBHOOK_URL_LEN, Webhook};

/// Record header names used on every Sluice topic.
pub mod headers {
    /// `application/json` on every record Sluice writes.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The event's `schema_version`, so a consumer can route without parsing the payload.
    pub const SCHEMA_VERSION: &str = "schema-version";
    /// Dead-letter records: why the record was rejected.
    pub const DLQ_REASON: &str = "dlq-reason";
    /// Dead-letter records: the topic the record came from.
    pub const DLQ_SOURCE_TOPIC: &str = "dlq-source-topic";
    /// Dead-letter records: the partition the record came from.
    pub const DLQ_SOURCE_PARTITION: &str = "dlq-source-partition";
    /// Dead-letter records: the offset the record had in its source partition.
    pub const DLQ_SOURCE_OFFSET: &str = "dlq-source-offset";
    /// Dead-letter records: the service that rejected it.
    pub const DLQ_REJECTED_BY: &str = "dlq-rejected-by";
}

/// Default topic names; every service lets them be changed.
pub mod topics {
    pub const REQUESTS: &str = "sluice.requests";
    pub const STATUS: &str = "sluice.status";
    pub const REQUESTS_DLQ: &str = "sluice.requests.dlq";
    /// Request events of the `batch` lane (`priority: "batch"`).
    pub const BATCH_REQUESTS: &str = "sluice.requests.batch";
    pub const STATUS_DLQ: &str = "sluice.status.dlq";
    pub const CONTROL: &str = "sluice.control";
    pub const DELTAS: &str = "sluice.deltas";
}
