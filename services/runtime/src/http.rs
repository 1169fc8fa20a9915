//! HTTP basics every Sluice process shares: the JSON error body, liveness and readiness
//! answers, and serving with Nagle off until a stop.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

/// `{"error": {"code", "message"}}` with the given status.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(ErrorBody {
            error: ErrorDetail { code, message },
        }),
    )
        .into_response()
}

/// `GET /healthz`: the process is alive and serving HTTP.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz` body: ready, or the list of what is not.
pub fn readiness(problems: Vec<String>) -> Response {
    if problems.is_empty() {
        return Json(serde_json::json!({ "status": "ready" })).into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "status": "not_ready", "problems": problems })),
    )
        .into_response()
}

/// A listener whose connections have Nagle's algorithm off. Why: an SSE stream writes one small
/// event at a time, and with Nagle on each event after the first waits for the client's
/// (delayed) acknowledgement of the one before: about 20 ms per status change, measured.
pub fn no_delay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn set_nodelay(stream: &mut tokio::net::TcpStream) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(error = %error, "could not set TCP_NODELAY");
        }
    }
    listener.tap_io(set_nodelay as fn(&mut tokio::net::TcpStream))
}

/// Serves `router` on `listener` (with `no_delay`) until `stop`, then lets open requests end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    axum::serve(no_delay(listener), router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
        .context("serving HTTP")
}
