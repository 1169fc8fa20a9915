//! The events every replica follows outside a group: cancellations (every worker) and pieces of
//! streamed answers (results and ingest). Decoding never panics; what decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_schemas::{CancelEvent, DeltaEvent};

fuzz_target!(|payload: &[u8]| {
    if let Ok(event) = CancelEvent::decode(payload) {
        let again = CancelEvent::decode(&event.encode()).expect("an encoded cancel decodes");
        assert_eq!(again.encode(), event.encode());
    }
    if let Ok(event) = DeltaEvent::decode(payload) {
        let again = DeltaEvent::decode(&event.encode()).expect("an encoded delta decodes");
        assert_eq!(again.encode(), event.encode());
    }
});
