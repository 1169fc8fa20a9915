//! A status event as the results and webhooks services read it: decoding never panics, and
//! what decodes encodes to bytes that decode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_schemas::StatusEvent;

fuzz_target!(|payload: &[u8]| {
    if let Ok(event) = StatusEvent::decode(payload) {
        let again = StatusEvent::decode(&event.encode()).expect("an encoded event decodes");
        assert_eq!(again.encode(), event.encode());
    }
});
