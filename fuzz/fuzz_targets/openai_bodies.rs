//! The bodies of OpenAI's `POST /v1/chat/completions` (first byte even) and `/v1/embeddings`
//! (odd), read as ingest's front door reads them and turned into request events: it never
//! panics, and the front door never publishes what a worker would dead-letter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_ingest::{Limits, openai_submission, to_request_event};
use sluice_schemas::{RequestEvent, UserId};
use std::time::Duration;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    let Some(Ok(submission)) = openai_submission(selector % 2 == 0, body) else {
        return;
    };
    let limits = Limits {
        default_timeout: Duration::from_secs(60),
        max_timeout: Duration::from_secs(600),
    };
    let user = UserId::parse("fuzzer".to_owned()).expect("a valid user id");
    if let Ok(event) = to_request_event(submission, user, limits, chrono::Utc::now()) {
        RequestEvent::decode(&event.encode())
            .expect("a worker decodes what the front door publishes");
    }
});
