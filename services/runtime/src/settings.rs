//! Value parsers shared by the services' settings, so a bad value stops the process before it
//! binds anything or calls the broker.

use std::time::Duration;

/// A whole number of milliseconds (`SLUICE_*_MS`) as a `Duration`.
pub fn millis(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|error| format!("`{text}` is not a whole number of milliseconds: {error}"))
}

/// A whole number of seconds (`SLUICE_*_SECS`) as a `Duration`.
pub fn secs(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|error| format!("`{text}` is not a whole number of seconds: {error}"))
}
