//! The body of `POST /v1/jobs`, parsed as ingest parses it and turned into a request event: it
//! never panics, and ingest never publishes what a worker would dead-letter (the event it makes
//! decodes at the worker).
#![no_main]

#[path = "shared/accepted.rs"]
mod accepted;

use libfuzzer_sys::fuzz_target;
use sluice_ingest::SubmitBody;

fuzz_target!(|body: &[u8]| {
    let Ok(body) = sluice_schemas::decode_json::<SubmitBody>(body) else {
        return;
    };
    accepted::a_worker_decodes_what_ingest_makes_of(body);
});
