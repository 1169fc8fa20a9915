//! HTTP for the services: the runtime's basics, the OpenAPI document, and the operations
//! routes (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`) every service serves the same way.

pub use sluice_runtime::http::*;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::{MethodRouter, get};
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Which documents a service serves besides its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    /// `/openapi.json`: the ingest and results APIs.
    OpenApi,
    None,
}

/// What every service serves besides its API, the same way: `/healthz`, `/readyz` (the
/// service's own check), `/metrics`, and `/openapi.json` where there is an API; and on every
/// route, request metrics and an `x-request-id` (the caller's, or a new UUID) on the response.
///
/// Why no `tower_http::trace::TraceLayer`: a job's handler opens its own span as a child of
/// the caller's `traceparent`, so that one job is one trace across the services; a generic
/// layer span around it would start a trace of its own for every request.
pub fn with_operations<S>(api: Router<S>, readyz: MethodRouter<S>, document: Document) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let mut router = api
        .route("/healthz", get(healthz))
        .route("/readyz", readyz)
        .route("/metrics", get(crate::metrics::render));
    if document == Document::OpenApi {
        router = router.route("/openapi.json", get(openapi));
    }
    // Unknown paths and methods answer in the same JSON shape as every other error.
    router = router
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method);
    // Outermost last: the id is set before anything else runs, and copied to the response.
    router
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
        .layer(SetRequestIdLayer::new(X_REQUEST_ID, MakeRequestUuid))
}

/// `/readyz` of a service that stores in Postgres what it consumes from Kafka: ready when the
/// database answers and the consumer has its assignment.
pub async fn store_and_source_readiness(
    pool: &sqlx::PgPool,
    consumer: &crate::kafka::SourceHealth,
) -> axum::response::Response {
    let mut problems = Vec::new();
    if let Err(error) = sqlx::query("SELECT 1").execute(pool).await {
        problems.push(format!("postgres unreachable: {error}"));
    }
    problems.extend(consumer.problems().await);
    crate::http::readiness(problems)
}

async fn no_route(method: Method, uri: axum::http::Uri) -> axum::response::Response {
    // Only the path: a query may hold a stream token.
    let message = format!("no route for {method} {}", uri.path());
    crate::http::error_response(axum::http::StatusCode::NOT_FOUND, "not_found", &message)
}

async fn wrong_method(method: Method, uri: axum::http::Uri) -> axum::response::Response {
    let message = format!("{} does not answer {method}", uri.path());
    crate::http::error_response(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &message,
    )
}

/// Cross-origin access for browsers served from `origins` (`*`: any). `None` when empty: no
/// CORS headers at all, so browsers allow only same-origin pages.
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::CACHE_CONTROL,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("traceparent"),
                HeaderName::from_static("tracestate"),
                X_REQUEST_ID,
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("ratelimit"),
                HeaderName::from_static("ratelimit-policy"),
                HeaderName::from_static("idempotent-replayed"),
                HeaderName::from_static("x-sluice-job-id"),
                HeaderName::from_static("x-sluice-events-url"),
                X_REQUEST_ID,
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

/// `SLUICE_CORS_ORIGINS`: origins allowed to call from a browser, comma separated, each
/// `scheme://host[:port]` or `*`.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let origin = text.trim();
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    let valid = host.is_some_and(|host| {
        !host.is_empty() && !host.contains(|c: char| c == '/' || c.is_whitespace())
    });
    if valid {
        Ok(origin.to_owned())
    } else {
        Err(format!(
            "`{origin}` is not an origin (scheme://host[:port], or *)"
        ))
    }
}

/// The OpenAPI document for the ingest and results APIs.
pub const OPENAPI_JSON: &str = include_str!("../../../schemas/openapi.json");

/// `GET /openapi.json`.
pub async fn openapi() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_and_host_only() {
        for good in ["https://app.example", "http://localhost:3000", "*"] {
            assert_eq!(parse_origin(good).as_deref(), Ok(good));
        }
        for bad in [
            "app.example",
            "https://app.example/path",
            "ftp://x",
            "https://",
            "",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }
}
