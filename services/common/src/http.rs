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
    /// `/openapi.json`: this service's part of the API, as this deployment's auth mode serves it.
    OpenApi(crate::auth::AuthMode, Api),
    None,
}

/// The services with an API: each serves the operations tagged with its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Ingest,
    Results,
}

impl Api {
    fn tag(self) -> &'static str {
        match self {
            Api::Ingest => "ingest",
            Api::Results => "results",
        }
    }
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
    if let Document::OpenApi(auth, api) = document {
        // Made once at start-up; each request shares the bytes (a clone is a reference count).
        let text = axum::body::Bytes::from(openapi_document(auth, api));
        let serve = move || async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                text,
            )
        };
        router = router.route("/openapi.json", get(serve));
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

/// Answers `503 request_timeout` (with `Retry-After: 1`) for a request whose response head is not
/// ready within `timeout`. For routes that answer at once: a stream's head is sent when it opens,
/// so an SSE route may have it; a route that waits for a job's answer may not.
pub fn with_request_timeout<S>(routes: Router<S>, timeout: Duration) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let answer_in_time = move |request: axum::extract::Request, next: axum::middleware::Next| async move {
        match tokio::time::timeout(timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_elapsed) => {
                let message = format!(
                    "the request was not answered within {} ms; retry shortly",
                    timeout.as_millis()
                );
                let mut response = crate::http::error_response(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "request_timeout",
                    &message,
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    };
    routes.layer(axum::middleware::from_fn(answer_in_time))
}

/// Whether a body could not be read because `tower_http`'s body timeout passed.
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// How long `/readyz` waits for Postgres: well inside the chart's 3 s probe timeout. Why a bound
/// of its own: while Postgres is gone, every pooled connection is held by work retrying, and the
/// check would wait out the pool's acquire timeout, so the probe would time out instead of
/// hearing "not ready" and why.
const STORE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `/readyz` of a service that stores in Postgres what it consumes from Kafka: ready when the
/// database answers and the consumer has its assignment.
pub async fn store_and_source_readiness(
    pool: &sqlx::PgPool,
    consumer: &crate::kafka::SourceHealth,
) -> axum::response::Response {
    let mut problems = Vec::new();
    match tokio::time::timeout(STORE_CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(pool)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => problems.push(format!("postgres unreachable: {error}")),
        Err(_) => problems.push(format!(
            "postgres did not answer within {} s",
            STORE_CHECK_TIMEOUT.as_secs()
        )),
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

/// The document a service serves: its own operations (those tagged with its name; the file
/// describes both services) and its own server, so that every path in it is served here with
/// exactly the methods listed; with API keys the file's security as it is; without them, no
/// security requirement and `user_id` required on a submission (the server answers `422 user_id:
/// is required` without it), so that the document says what this server does.
pub fn openapi_document(auth: crate::auth::AuthMode, api: Api) -> String {
    let mut document: serde_json::Value =
        serde_json::from_str(OPENAPI_JSON).expect("schemas/openapi.json is JSON");
    let tag = serde_json::Value::from(api.tag());
    if let Some(paths) = document["paths"].as_object_mut() {
        for item in paths.values_mut() {
            if let Some(operations) = item.as_object_mut() {
                operations.retain(|_, operation| {
                    operation
                        .get("tags")
                        .and_then(serde_json::Value::as_array)
                        .is_none_or(|tags| tags.contains(&tag))
                });
            }
        }
        paths.retain(|_, item| {
            item.as_object()
                .is_some_and(|operations| operations.values().any(|op| op.get("tags").is_some()))
        });
    }
    if let Some(servers) = document["servers"].as_array_mut() {
        servers.retain(|server| {
            server["description"]
                .as_str()
                .is_some_and(|description| description.starts_with(api.tag()))
        });
    }
    if auth == crate::auth::AuthMode::Off {
        document["security"] = serde_json::json!([]);
        if let Some(required) = document
            .pointer_mut("/components/schemas/SubmitJob/required")
            .and_then(serde_json::Value::as_array_mut)
        {
            required.push("user_id".into());
        }
        // The OpenAI routes' `user`, and whose jobs or usage to read, are then a user id, held
        // to its rules; usage needs one.
        let user = document["components"]["schemas"]["SubmitJob"]["properties"]["user_id"].clone();
        for (path, required) in [("/v1/jobs", false), ("/v1/usage", true)] {
            for parameter in user_id_parameters(&mut document, path) {
                parameter["required"] = required.into();
                parameter["schema"] = user.clone();
            }
        }
        let mut user = user;
        user["description"] =
            "Without API keys, the user the job is submitted as (absent: `anonymous`).".into();
        for path in ["/v1/chat/completions", "/v1/embeddings"] {
            let pointer = format!(
                "/paths/{}/post/requestBody/content/application~1json/schema/properties/user",
                path.replace('/', "~1")
            );
            if let Some(slot) = document.pointer_mut(&pointer) {
                *slot = user.clone();
            }
        }
    } else {
        // With keys a caller reads its own jobs and usage: there is no one else's to name.
        for path in ["/v1/jobs", "/v1/usage"] {
            let pointer = format!("/paths/{}/get/parameters", path.replace('/', "~1"));
            if let Some(parameters) = document
                .pointer_mut(&pointer)
                .and_then(serde_json::Value::as_array_mut)
            {
                parameters.retain(|parameter| parameter["name"] != "user_id");
            }
        }
    }
    document.to_string()
}

/// The `user_id` query parameters of `GET path`.
fn user_id_parameters<'a>(
    document: &'a mut serde_json::Value,
    path: &str,
) -> impl Iterator<Item = &'a mut serde_json::Value> {
    let pointer = format!("/paths/{}/get/parameters", path.replace('/', "~1"));
    document
        .pointer_mut(&pointer)
        .and_then(serde_json::Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter(|parameter| parameter["name"] == "user_id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_not_answered_in_time_gets_a_json_503() {
        use tower::ServiceExt;
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        };
        let routes = Router::new()
            .route("/slow", get(slow))
            .route("/fast", get(|| async { "fast" }));
        let router = with_request_timeout(routes, Duration::from_millis(50));
        let request = |path: &str| {
            axum::http::Request::builder()
                .uri(path)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let response = router.clone().oneshot(request("/slow")).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout");
        let response = router.oneshot(request("/fast")).await.unwrap();
        assert_eq!(response.status(), 200);
    }

    #[test]
    fn without_keys_the_document_requires_user_id_and_no_key() {
        let served: serde_json::Value =
            serde_json::from_str(&openapi_document(crate::auth::AuthMode::Off, Api::Ingest))
                .unwrap();
        assert_eq!(served["security"], serde_json::json!([]));
        let required = &served["components"]["schemas"]["SubmitJob"]["required"];
        assert!(
            required.as_array().unwrap().contains(&"user_id".into()),
            "{required}"
        );
        let chat_user = served.pointer(
            "/paths/~1v1~1chat~1completions/post/requestBody/content/application~1json/schema/properties/user/maxLength",
        );
        assert_eq!(chat_user, Some(&serde_json::json!(128)));
        let with_keys: serde_json::Value = serde_json::from_str(&openapi_document(
            crate::auth::AuthMode::ApiKeys,
            Api::Ingest,
        ))
        .unwrap();
        let required = &with_keys["components"]["schemas"]["SubmitJob"]["required"];
        assert!(
            !required.as_array().unwrap().contains(&"user_id".into()),
            "{required}"
        );
    }

    #[test]
    fn each_service_documents_its_own_operations_and_server() {
        let keys = crate::auth::AuthMode::ApiKeys;
        let ingest: serde_json::Value =
            serde_json::from_str(&openapi_document(keys, Api::Ingest)).unwrap();
        let results: serde_json::Value =
            serde_json::from_str(&openapi_document(keys, Api::Results)).unwrap();
        let methods = |document: &serde_json::Value, path: &str| -> Vec<String> {
            document["paths"][path]
                .as_object()
                .map(|item| item.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(methods(&ingest, "/v1/jobs"), ["post"]);
        assert_eq!(methods(&results, "/v1/jobs"), ["get"]);
        assert!(methods(&ingest, "/v1/jobs/{id}").is_empty());
        assert!(methods(&results, "/v1/chat/completions").is_empty());
        assert_eq!(methods(&results, "/readyz"), ["get"]);
        assert_eq!(ingest["servers"].as_array().unwrap().len(), 1);
        assert!(
            ingest["servers"][0]["description"]
                .as_str()
                .unwrap()
                .starts_with("ingest")
        );
    }

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
