//! Code that every Sluice service needs and that is not part of the event contract: Kafka,
//! API keys, the response cache, trace propagation; and, re-exported, the runtime every Sluice
//! process shares (`sluice-runtime`: telemetry, metrics, stop signals, lifecycle, settings).

pub mod auth;
pub mod cache;
pub mod http;
pub mod kafka;
#[cfg(feature = "minilm")]
pub mod minilm;
pub mod prices;
pub mod propagation;
pub mod tiers;
pub mod tokens;
pub mod webhooks;

pub use sluice_runtime::{lifecycle, metrics, settings, shutdown, telemetry};
