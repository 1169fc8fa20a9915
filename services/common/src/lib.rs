//! Code that every Sluice service needs and that is not part of the event contract.

pub mod auth;
pub mod cache;
pub mod http;
pub mod kafka;
pub mod lifecycle;
pub mod metrics;
pub mod propagation;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
