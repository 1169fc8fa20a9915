//! The bodies of OpenAI's `POST /v1/chat/completions` (first byte even) and `/v1/embeddings`
//! (odd), read as ingest's front door reads them and turned into request events: it never
//! panics, and the front door never publishes what a worker would dead-letter.
#![no_main]

#[path = "shared/accepted.rs"]
mod accepted;

use libfuzzer_sys::fuzz_target;
use sluice_ingest::openai_submission;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    let Some(Ok(submission)) = openai_submission(selector % 2 == 0, body) else {
        return;
    };
    accepted::a_worker_decodes_what_ingest_makes_of(submission);
});
