//! A body over the size limit is read to its end (within bounds) before the `413` is sent. A
//! client that writes its whole body before reading the answer (Python's `urllib`, most
//! synchronous clients) would otherwise find the connection reset under it while it writes, and
//! never see the 413 and its JSON.

use crate::error::ApiError;
use crate::openai::OpenAiError;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::time::Duration;

/// Most bytes read and thrown away to answer a too-large body; past it the 413 is sent at once
/// and the connection closed, as before.
const DRAIN_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Longest time spent reading a too-large body.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Answers a request whose `Content-Length` is over `limit` with the route's 413, after reading
/// its body. A body without a length is limited as it is read, by the handler.
pub(crate) async fn refuse_oversized(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let Some(declared) = declared.filter(|length| *length > limit as u64) else {
        return next.run(request).await;
    };
    let is_openai = request.uri().path() != "/v1/jobs";
    // Why not with `Expect: 100-continue`: reading the body would invite the client to send it;
    // answering first lets it skip sending at all.
    let expects_continue = request.headers().contains_key(header::EXPECT);
    let drained = !expects_continue && declared <= DRAIN_MAX_BYTES && {
        let mut body = request.into_body().into_data_stream();
        let read_all = async { while let Some(Ok(_chunk)) = body.next().await {} };
        tokio::time::timeout(DRAIN_TIME, read_all).await.is_ok()
    };
    let error = ApiError::PayloadTooLarge { limit };
    let mut response = match is_openai {
        true => OpenAiError::from(error).into_response(),
        false => error.into_response(),
    };
    if !drained && !expects_continue {
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}
