//! The delta event: a piece of a chat answer, published while the model is still generating,
//! for the jobs that asked to be streamed. The terminal status still carries the whole answer;
//! deltas are for watching it arrive, and a consumer that missed one waits for that.

use crate::domain::{JobId, UserId};
use crate::events::{DecodeError, check_version, decode_json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Published to the deltas topic, keyed by `job_id`: "the answer goes on with `text`".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaEvent {
    pub schema_version: u32,
    pub job_id: JobId,
    pub user_id: UserId,
    /// The model attempt the text belongs to (as in the `running` status).
    pub attempt: u32,
    /// 0, 1, 2, ... within the attempt: a consumer knows it has every piece before this one.
    pub index: u32,
    pub text: String,
    pub emitted_at: DateTime<Utc>,
}

impl DeltaEvent {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let event: DeltaEvent = decode_json(payload)?;
        check_version(event.schema_version)?;
        Ok(event)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a delta event always serializes")
    }
}
