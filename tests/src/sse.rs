//! A small Server-Sent Events reader, enough to check what a browser's EventSource would see.

use futures::StreamExt;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Reads events until the server ends the stream or `timeout` passes; keep-alive comments are
/// counted in the second value.
pub async fn read_sse(response: reqwest::Response, timeout: Duration) -> (Vec<SseEvent>, usize) {
    read_sse_until(response, timeout, |_| false).await
}

/// Reads events until the server ends the stream, or until `enough` says so of the events so
/// far (then the connection is dropped, as a browser tab closing drops it).
pub async fn read_sse_until(
    response: reqwest::Response,
    timeout: Duration,
    enough: impl Fn(&[SseEvent]) -> bool,
) -> (Vec<SseEvent>, usize) {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let mut comments = 0;
    let read = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.expect("reading the SSE stream");
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut is_event = false;
                for line in block.lines().filter(|line| !line.is_empty()) {
                    if line.starts_with(':') {
                        comments += 1;
                        continue;
                    }
                    let (field, value) = line
                        .split_once(':')
                        .map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
                    is_event = true;
                    match field {
                        "id" => event.id = Some(value.to_owned()),
                        "event" => event.event = Some(value.to_owned()),
                        "data" => {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                        }
                        _ => {}
                    }
                }
                if is_event {
                    events.push(event);
                    if enough(&events) {
                        return;
                    }
                }
            }
        }
    };
    let ended = tokio::time::timeout(timeout, read).await.is_ok();
    assert!(
        ended,
        "the SSE stream did not end within {timeout:?}; got {events:?}"
    );
    (events, comments)
}

/// Follows a job's event stream as a browser's `EventSource` does until a terminal status: when
/// the server ends the stream before one, reconnects with `Last-Event-ID`. Every answer must be
/// a `200` event stream, as `EventSource` gives up on anything else. Returns every event and how
/// many times it reconnected.
pub async fn follow_to_terminal(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> (Vec<SseEvent>, u32) {
    let started = std::time::Instant::now();
    let mut events: Vec<SseEvent> = Vec::new();
    let mut reconnects = 0;
    loop {
        let mut request = http.get(url);
        if let Some(id) = events.last().and_then(|event| event.id.clone()) {
            request = request.header("Last-Event-ID", id);
        }
        let response = request
            .send()
            .await
            .expect("connecting to the event stream");
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            let body = response.text().await.unwrap_or_default();
            panic!("EventSource would give up on this answer: {status} {body}");
        }
        let (more, _) = read_sse(response, timeout.saturating_sub(started.elapsed())).await;
        events.extend(more);
        let terminal = events
            .last()
            .and_then(|event| event.event.clone())
            .and_then(|name| serde_json::from_value::<sluice_schemas::JobStatus>(name.into()).ok())
            .is_some_and(|status| status.is_terminal());
        if terminal {
            return (events, reconnects);
        }
        reconnects += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
