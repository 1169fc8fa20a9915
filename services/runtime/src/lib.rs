//! What every Sluice process needs, the tools (`model-sim`, the bench) included: telemetry,
//! Prometheus metrics, stop signals, one lifecycle, HTTP basics and settings parsers. Nothing
//! here links Kafka, Postgres or Redis; `sluice-common` adds those for the services.

mod allocator;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
