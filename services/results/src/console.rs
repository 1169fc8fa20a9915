//! The console: one page (`console/index.html`, compiled into the binary, no build step) where a
//! person submits a job, watches it queue, run and answer live, cancels it, and browses their
//! recent jobs; and the little it needs to know (`/console/config.json`).

use crate::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

const PAGE: &str = include_str!("../console/index.html");

/// `GET /`.
pub(crate) async fn page() -> Response {
    // Why no-cache: a page from an older release must not outlive it in a browser.
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE)).into_response()
}

/// `GET /console/config.json`: where ingest is, and whether keys are needed.
pub(crate) async fn config(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "ingest_url": state.ingest_url,
        "auth": if state.keys.is_some() { "api-keys" } else { "off" },
    }))
}
