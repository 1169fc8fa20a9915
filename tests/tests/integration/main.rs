//! The integration tests, one binary (each module a former test file): the services in-process
//! and as processes, against the real broker, Postgres and Redis. The fault tests, which restart
//! Postgres and kill processes, are a binary of their own (`tests/faults.rs`) so that they never
//! run beside these.

mod admission;
mod auth;
mod bench;
mod cache;
mod cancel;
mod embedding;
mod fairness;
mod ingest;
mod openai;
mod pipeline;
mod results;
mod telemetry;
mod worker;
