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

/// Longest a client may take to send a request's head (the slowloris defence): past it the
/// connection is closed.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest request head (the start line and the header fields): `431` past it.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of a response a connection buffers ahead of its socket (hyper's default is about
/// 400 KiB). Past it the response body is not polled again until the socket takes some, so an
/// event stream whose reader has stopped makes no more events. It also bounds the read buffer,
/// so it stays above `MAX_HEADER_BYTES`.
pub const MAX_BUFFERED_BYTES: usize = 2 * MAX_HEADER_BYTES;
/// How the HTTP server treats each connection (`serve`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ConnectionArgs {
    /// A connection whose peer takes none of its response for this long is closed (as nginx's
    /// `send_timeout`): an event stream whose reader stopped reading frees its place and memory.
    #[arg(long = "http-send-timeout-secs", env = "SLUICE_HTTP_SEND_TIMEOUT_SECS", default_value = "60", value_parser = crate::settings::secs)]
    pub send_timeout: std::time::Duration,

    /// The kernel's send buffer for each connection, in bytes (`SO_SNDBUF`, as nginx's `listen
    /// ... sndbuf=`). Unset: the kernel sizes it (up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB by
    /// default, for each connection whose reader is slow). Set it to bound what many slow
    /// readers hold in kernel memory.
    #[arg(long = "http-send-buffer-bytes", env = "SLUICE_HTTP_SEND_BUFFER_BYTES")]
    pub send_buffer_bytes: Option<usize>,
}

/// Serves `router` on `listener` until `stop`, then lets open requests end. Each connection has
/// Nagle off (see `no_delay`), `HEADER_READ_TIMEOUT` to send a request head, at most
/// `MAX_HEADER_BYTES` of it and `MAX_HEADERS` fields, at most `MAX_BUFFERED_BYTES` of its
/// response buffered in the process, the kernel send buffer `connections` asks for, and is
/// closed when the peer takes none of the response for `send_timeout` (as nginx's
/// `send_timeout`): a client that stopped reading (an event stream's
/// reader gone quiet, a dead peer behind a silent network) then holds neither its stream's place
/// nor the buffered bytes for ever. A reader that keeps reading, however slowly, is never cut.
///
/// Why hyper's builder rather than `axum::serve`: axum's sets no timer, and without one hyper
/// waits for a request head forever: one slow client per connection could hold them all.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    connections: ConnectionArgs,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use hyper::server::conn::http1::Builder;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;
    use tokio_io_timeout::TimeoutStream;

    // HTTP/1.1 only, as `axum::serve` without its `http2` feature served it.
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_BUFFERED_BYTES);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Why go on: running out of file descriptors passes; the server must not.
                    tracing::warn!(error = %error, "could not accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(error = %error, "could not set TCP_NODELAY");
        }
        if let Some(bytes) = connections.send_buffer_bytes
            && let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes)
        {
            tracing::debug!(error = %error, "could not set SO_SNDBUF");
        }
        // The timer runs only while a write waits for the socket, and starts again at each
        // write that goes through.
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(connections.send_timeout));
        let service = TowerToHyperService::new(router.clone());
        let connection =
            graceful.watch(builder.serve_connection(TokioIo::new(Box::pin(stream)), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::trace!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
