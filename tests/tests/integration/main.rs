//! The integration tests, one binary (each module a former test file): the services in-process
//! and as processes, against the real broker, Postgres and Redis. The fault tests, which restart
//! Postgres and kill processes, each hold the machine alone (`sluice_tests::exclusive_stage`);
//! every test with a database waits for them.

mod access;
mod admission;
mod auth;
mod backend_faults;
mod bench;
mod browser;
mod cache;
mod cancel;
mod capacity;
mod embedding;
mod fairness;
mod faults;
mod ingest;
mod ingest_faults;
mod lanes;
mod openai;
mod outages;
mod pipeline;
mod poison;
mod queue;
mod results;
mod schema;
mod secrets;
mod slow_readers;
mod streaming;
mod streams;
mod telemetry;
mod tokens;
mod usage;
mod webhook_faults;
mod webhooks;
mod worker;
