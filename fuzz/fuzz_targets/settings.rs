//! The settings read as JSON from the environment: tiers (`SLUICE_TIERS`) and model routing
//! (`SLUICE_MODELS`). A bad value is an error naming it, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = sluice_ingest::admission::Tiers::parse(text);
    // Why not `@...`: that names a file to read, which is not this input.
    if !text.starts_with('@') {
        let _ = sluice_worker::ModelsFile::parse(text);
    }
});
