//! Test support: a fresh database and fresh topics per test, the services started in-process on
//! port 0, and `wait_until` instead of sleeps. A broker or database that cannot be reached fails
//! the test with a message saying how to start it; nothing is ever skipped.

pub mod infra;
pub mod pipeline;
pub mod process;
pub mod sse;

pub use infra::{TestDatabase, TestTopics, exclusive_stage, kafka_args, wait_until};
pub use pipeline::{Pipeline, PipelineOptions, TEST_WEBHOOK_KEY, test_webhooks};
pub use sse::{SseEvent, read_sse, read_sse_until};
