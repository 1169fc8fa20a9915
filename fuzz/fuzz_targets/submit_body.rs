//! The body of `POST /v1/jobs`, parsed as ingest parses it and turned into a request event: it
//! never panics, and ingest never publishes what a worker would dead-letter (the event it makes
//! decodes at the worker).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_ingest::{Limits, SubmitBody, to_request_event};
use sluice_schemas::{RequestEvent, UserId};
use std::time::Duration;

fuzz_target!(|body: &[u8]| {
    let Ok(body) = sluice_schemas::decode_json::<SubmitBody>(body) else {
        return;
    };
    let limits = Limits {
        default_timeout: Duration::from_secs(60),
        max_timeout: Duration::from_secs(600),
    };
    let user = UserId::parse("fuzzer".to_owned()).expect("a valid user id");
    if let Ok(event) = to_request_event(body, user, limits, chrono::Utc::now()) {
        RequestEvent::decode(&event.encode()).expect("a worker decodes what ingest publishes");
    }
});
