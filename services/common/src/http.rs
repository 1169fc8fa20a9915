//! HTTP for the services: the runtime's basics, the OpenAPI document, and the operations
//! routes (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`) every service serves the same way.

pub use sluice_runtime::http::*;

/// The OpenAPI document for the ingest and results APIs.
pub const OPENAPI_JSON: &str = include_str!("../../../schemas/openapi.json");

/// `GET /openapi.json`.
pub async fn openapi() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
    )
}
