//! One tracing set-up per process: human-readable locally, JSON lines in production.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` filters (default `info`); `SLUICE_LOG_FORMAT=json`
/// writes one JSON object per line.
pub fn init(service: &'static str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|format| format == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.init();
    }
    tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
}
