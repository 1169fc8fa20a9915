//! The property every front door's target checks, written once: a submission ingest turns into
//! a request event is one a worker decodes, so ingest never publishes what would be
//! dead-lettered.

use sluice_ingest::{Limits, SubmitBody, to_request_event};
use sluice_schemas::{RequestEvent, UserId};
use std::time::Duration;

pub fn a_worker_decodes_what_ingest_makes_of(submission: SubmitBody) {
    let limits = Limits {
        default_timeout: Duration::from_secs(60),
        max_timeout: Duration::from_secs(600),
    };
    let user = UserId::parse("fuzzer".to_owned()).expect("a valid user id");
    if let Ok(event) = to_request_event(submission, user, limits, chrono::Utc::now()) {
        RequestEvent::decode(&event.encode()).expect("a worker decodes what ingest publishes");
    }
}
