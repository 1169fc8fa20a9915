//! A request event as a producer publishes it to Kafka: decoding never panics, and what decodes
//! encodes to bytes that decode again to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_schemas::RequestEvent;

fuzz_target!(|payload: &[u8]| {
    if let Ok(event) = RequestEvent::decode(payload) {
        let again = RequestEvent::decode(&event.encode()).expect("an encoded event decodes");
        assert_eq!(again.encode(), event.encode());
    }
});
