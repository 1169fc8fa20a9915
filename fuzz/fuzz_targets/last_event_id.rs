//! `Last-Event-ID` (and `?last_event_id=`) as the results service reads it: parsing never
//! panics, and a position it accepts is the one its own id says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_results::Position;

fuzz_target!(|text: &str| {
    if let Some(position) = Position::parse(text) {
        assert_eq!(Position::parse(&position.id()), Some(position));
    }
});
