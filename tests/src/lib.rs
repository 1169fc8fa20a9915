//! Test support: a fresh database and fresh topics per test, the services started in-process on
//! port 0, and `wait_until` instead of sleeps. A broker or database that cannot be reached fails
//! the test with a message saying how to start it; nothing is ever skipped.

pub mod broker;
pub mod infra;
pub mod jobs;
pub mod pipeline;
pub mod process;
pub mod sse;

pub use infra::{TestDatabase, TestTopics, exclusive_stage, kafka_args, wait_until};
pub use jobs::{terminal_not_once, wait_terminal};
pub use pipeline::{Pipeline, PipelineOptions, TEST_WEBHOOK_KEY, test_webhooks};
pub use sse::{SseEvent, follow_to_terminal, read_sse, read_sse_until};

/// A chat job for the simulated model, as a producer publishing straight to Kafka makes it.
pub fn chat_event(user: &str, content: &str, deadline_in_ms: i64) -> sluice_schemas::RequestEvent {
    use sluice_schemas::{JobId, Message, ModelName, Role, SCHEMA_VERSION, Task, UserId};
    let now = chrono::Utc::now();
    sluice_schemas::RequestEvent {
        schema_version: SCHEMA_VERSION,
        job_id: JobId::new(),
        user_id: UserId::parse(user).expect("a valid user id"),
        model: ModelName::parse("sim").expect("a valid model name"),
        task: Task::Chat(vec![Message::text(Role::User, content)]),
        params: Default::default(),
        submitted_at: now,
        deadline: now + chrono::Duration::milliseconds(deadline_in_ms),
        cache: true,
        stream: false,
        webhook: None,
        tier: None,
        priority: Default::default(),
        key_id: None,
    }
}
