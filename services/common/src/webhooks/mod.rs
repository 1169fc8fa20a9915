//! What ingest, results and the webhooks service share about webhooks: the signing (Standard
//! Webhooks), the users' signing secrets (sealed in Postgres), and the guard against requests to
//! private networks.

pub mod guard;
pub mod secrets;
pub mod sign;
