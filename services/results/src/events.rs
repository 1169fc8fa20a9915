//! `GET /v1/jobs/{id}/events`: the job's status changes, its place in the queue while it waits,
//! and the pieces of a streamed answer between `running` and the terminal status, as
//! Server-Sent Events a browser's `EventSource` follows and resumes with `Last-Event-ID`.

use crate::AppState;
use crate::api::ApiQuery;
use crate::api::{ApiError, JobPath, TokenQuery, job_reader};
use crate::deltas::{self, Answer};
use crate::notify::Wake;
use crate::state::QueuePosition;
use crate::store::JobEvent;
use crate::streams::Reader;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde_json::json;
use sluice_common::metrics::GaugeGuard;
use sluice_common::propagation::TraceHeaders;
use sluice_common::telemetry;
use sluice_schemas::{JobId, JobStatus};
use std::convert::Infallible;
use std::sync::Arc;

/// Where a reader stands: the last status change it has, how many bytes (UTF-8) of the
/// streamed answer, and, while the job is queued, the last position it was told. It is every
/// event's `id`: `<seq>`, `<seq>q<position>` while queued, or `<seq>.<bytes>` once part of the
/// answer went out, so `Last-Event-ID` resumes on any replica without a repeated or lost event
/// or character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    seq: i64,
    answer_bytes: usize,
    queue: Option<i64>,
}

impl Position {
    const START: Self = Self {
        seq: 0,
        answer_bytes: 0,
        queue: None,
    };

    /// A `Last-Event-ID` (or `?last_event_id=`), or `None` if this stream never sent it.
    pub fn parse(text: &str) -> Option<Self> {
        // Digits only, at most 18 of them (what fits an i64), as the API document's pattern says.
        let number = |text: &str| {
            let digits =
                !text.is_empty() && text.len() <= 18 && text.bytes().all(|b| b.is_ascii_digit());
            digits.then(|| text.parse::<i64>().ok()).flatten()
        };
        let position = if let Some((seq, bytes)) = text.split_once('.') {
            Self {
                seq: number(seq)?,
                answer_bytes: usize::try_from(number(bytes)?).ok()?,
                queue: None,
            }
        } else if let Some((seq, queue)) = text.split_once('q') {
            Self {
                seq: number(seq)?,
                answer_bytes: 0,
                queue: Some(number(queue)?),
            }
        } else {
            Self {
                seq: number(text)?,
                ..Self::START
            }
        };
        Some(position)
    }

    /// The event id a stream sends for this position.
    pub fn id(self) -> String {
        match (self.answer_bytes, self.queue) {
            (0, None) => self.seq.to_string(),
            (0, Some(queue)) => format!("{}q{queue}", self.seq),
            (bytes, _) => format!("{}.{bytes}", self.seq),
        }
    }
}

/// What to push next.
enum Push {
    Status(JobEvent),
    Delta(String),
    Queue(QueuePosition),
}

/// One SSE event per recorded status change (`id` as [`Position`], `event` the status, `data`
/// the job); while the job is queued, a `queue` event (`data`: `{"job_id", "position",
/// "eta_ms"}`) whenever its position changed (computed once a second: `queue.rs`); for a streamed
/// job `delta` events (`data`: `{"job_id", "text"}`) with the answer's new text, after
/// `running`; just before the terminal status, whatever of its output
/// the deltas did not carry yet, so the deltas joined are the whole answer. Opened before the
/// job exists, it waits for it; it ends after a terminal status.
#[tracing::instrument(skip_all, fields(job_id = %job_id))]
pub(crate) async fn job_events(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
    ApiQuery(query): ApiQuery<TokenQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let user = job_reader(&state, &headers, &query, job_id).await?;
    let reader = match (&user, &query.token, &state.tokens) {
        (Some(user), _, _) => Reader::User(user.clone()),
        (None, Some(_), Some(_)) => Reader::Token(job_id),
        _ => Reader::Anyone,
    };
    let slot = state.streams.open(reader)?;
    let idle = state.streams.idle();
    // Both are checked; the header wins (a reconnecting EventSource sends it, and keeps the
    // first URL's query).
    let from_query = query
        .last_event_id
        .as_deref()
        .map(|text| Position::parse(text).ok_or(ApiError::InvalidLastEventId))
        .transpose()?;
    let from_header = headers
        .get("last-event-id")
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(Position::parse)
                .ok_or(ApiError::InvalidLastEventId)
        })
        .transpose()?;
    let resume_from = from_header.or(from_query).unwrap_or(Position::START);
    // Subscribed before the first read, so a change committed in between is not missed.
    let mut changes = state.changes.subscribe(job_id);
    let answers = state.answers.clone();
    let reads = state.reads.clone();
    let recheck = state.sse_recheck;
    let stopping = state.stopping.clone();
    let queue_watch = state.queue.clone();
    let status_only = query.status_only;
    let stream = async_stream::stream! {
        let _open = GaugeGuard::new(metrics::gauge!("sluice_sse_connections"));
        let _slot = slot;
        // Silent for `idle` (keep-alives aside): the stream ends, and the reader reconnects.
        let mut quiet_until = tokio::time::Instant::now() + idle;
        let mut position = resume_from;
        let mut answer: Arc<Answer> = answers.answer(job_id);
        let mut grown = answer.watch();
        // Pieces go out once the reader has seen `running` (a resumed reader with part of the
        // answer has), and stop if the answer starts over under them.
        let mut relaying = position.answer_bytes > 0 && !status_only;
        let mut restarts_seen: Option<u32> = None;
        let mut diverged = false;
        // While the last status pushed is `queued`, the job's position as this replica's
        // queue watch computes it.
        let mut queued = false;
        let mut positions = queue_watch.subscribe(job_id);
        // The job's trace, read once there is something to push.
        let mut trace: Option<TraceHeaders> = None;
        // The first read is always from Postgres: it holds what happened before subscribing.
        let mut wake = Wake::Recheck;
        // The terminal status, held while the rest of the answer goes out before it one piece
        // at a time (each made when the connection has taken the one before).
        let mut ending: Option<JobEvent> = None;
        loop {
            let written = match wake {
                Wake::Changed => changes.written_after(position.seq),
                Wake::Recheck => None,
                Wake::Grown | Wake::QueueTick => Some(Vec::new()),
            };
            let read = match (ending.take(), written) {
                (Some(terminal), _) => Ok(vec![terminal]),
                (None, Some(events)) => Ok(visible_to(events, user.as_deref())),
                (None, None) => reads.events_after(job_id, position.seq, user.as_deref()).await,
            };
            let mut pushes = Vec::new();
            let failed = read.is_err();
            match read {
                Ok(events) => {
                    for event in events {
                        if event.status.is_terminal()
                            && !diverged
                            && !status_only
                            && let Some(rest) = rest_of_answer(&event, &answer, position.answer_bytes)
                        {
                            let piece = deltas::pieces(rest).next().unwrap_or_default();
                            let whole = piece.len() == rest.len();
                            pushes.push(Push::Delta(piece.to_owned()));
                            if !whole {
                                ending = Some(event);
                                break;
                            }
                        }
                        relaying |= event.status == JobStatus::Running && !status_only;
                        queued = event.status == JobStatus::Queued && !status_only;
                        pushes.push(Push::Status(event));
                    }
                }
                Err(error) => tracing::warn!(error = %error, "reading job events failed; retrying"),
            }
            let ends = pushes.iter().any(|push| matches!(push, Push::Status(event) if event.status.is_terminal()));
            // More of the answer than one piece: the next goes out as soon as the connection
            // takes this one.
            let mut more = ending.is_some();
            if relaying && !ends && !more && let Some(growth) = answer.after(position.answer_bytes) {
                if *restarts_seen.get_or_insert(growth.restarts) == growth.restarts {
                    more = growth.more;
                    pushes.push(Push::Delta(growth.text));
                } else {
                    // The job ran again from the start: its terminal status has the answer.
                    relaying = false;
                    diverged = true;
                }
            }
            if queued && let Some(queue) = *positions.receiver.borrow_and_update()
                && Some(queue.position) != position.queue
            {
                pushes.push(Push::Queue(queue));
            }
            if !pushes.is_empty() {
                quiet_until = tokio::time::Instant::now() + idle;
            }
            for push in pushes {
                match push {
                    Push::Delta(text) => {
                        position.answer_bytes += text.len();
                        let data = json!({"job_id": job_id, "text": text});
                        yield Ok(Event::default().id(position.id()).event("delta").data(data.to_string()));
                    }
                    Push::Queue(queue) => {
                        position.queue = Some(queue.position);
                        let data = json!({"job_id": job_id, "position": queue.position, "eta_ms": queue.eta_ms});
                        yield Ok(Event::default().id(position.id()).event("queue").data(data.to_string()));
                    }
                    Push::Status(event) => {
                        position.seq = event.seq;
                        position.queue = None;
                        if trace.is_none() {
                            trace = Some(TraceHeaders::from_traceparent(event.traceparent.as_deref().map(str::to_owned)));
                        }
                        let terminal = event.status.is_terminal();
                        yield Ok(status_event(job_id, position, event, trace.as_ref()));
                        if terminal {
                            return;
                        }
                    }
                }
            }
            // An answer evicted and kept anew (a job idle for longer than pieces are kept).
            let current = answers.answer(job_id);
            if !Arc::ptr_eq(&current, &answer) {
                answer = current;
                grown = answer.watch();
            }
            if more {
                wake = Wake::Grown;
                continue;
            }
            // Why: graceful shutdown waits for open responses, and a stream may wait for ever.
            wake = tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tokio::time::sleep_until(quiet_until) => return,
                Ok(()) = grown.changed(), if relaying => Wake::Grown,
                Ok(()) = positions.receiver.changed(), if queued => Wake::QueueTick,
                () = changes.changed() => Wake::Changed,
                _ = tokio::time::sleep(recheck), if failed => Wake::Recheck,
            };
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(state.keepalive)))
}

/// A status change as an SSE event, in a span of the job's trace covering its hand-over (when
/// traces are exported: only a trace shows it).
fn status_event(
    job_id: JobId,
    position: Position,
    event: JobEvent,
    trace: Option<&TraceHeaders>,
) -> Event {
    let JobEvent {
        seq, status, job, ..
    } = event;
    let event = || {
        Event::default()
            .id(position.id())
            .event(status.as_str())
            .data(job.to_string())
    };
    if !telemetry::exporting() {
        return event();
    }
    let span = tracing::info_span!(
        "sse push",
        otel.kind = "producer",
        job_id = %job_id,
        status = status.as_str(),
        seq,
        trace_id = tracing::field::Empty,
    );
    telemetry::adopt(&span, trace.map(TraceHeaders::context).unwrap_or_default());
    span.in_scope(event)
}

/// The terminal output's text past what the reader has, for a streamed job: what pieces were
/// lost or not yet relayed, or a cache hit's whole answer. Nothing if
/// the reader's part is not the beginning of this output (the job ran again from the start).
fn rest_of_answer<'a>(
    terminal: &'a JobEvent,
    answer: &Answer,
    reader_bytes: usize,
) -> Option<&'a str> {
    let streamed = terminal.job.pointer("/output/streamed") == Some(&serde_json::Value::Bool(true));
    if !streamed && reader_bytes == 0 {
        return None;
    }
    let content = terminal.job.pointer("/output/content")?.as_str()?;
    if !answer.agrees_with(content, reader_bytes) {
        return None;
    }
    content.get(reader_bytes..).filter(|rest| !rest.is_empty())
}

/// Events this replica wrote, as `Store::events_after` would show them to `user`: another user's
/// job shows nothing.
fn visible_to(events: Vec<JobEvent>, user: Option<&str>) -> Vec<JobEvent> {
    match user {
        Some(user) => events
            .into_iter()
            .filter(|event| event.job.get("user_id").and_then(|id| id.as_str()) == Some(user))
            .collect(),
        None => events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_the_event_id_and_reads_back() {
        let at = |seq, answer_bytes, queue| Position {
            seq,
            answer_bytes,
            queue,
        };
        for (text, expected) in [
            ("0", at(0, 0, None)),
            ("3", at(3, 0, None)),
            ("2.17", at(2, 17, None)),
            ("4.0", at(4, 0, None)),
            ("1q12", at(1, 0, Some(12))),
            ("1q0", at(1, 0, Some(0))),
        ] {
            let position = Position::parse(text).unwrap();
            assert_eq!(position, expected, "{text:?}");
            assert_eq!(Position::parse(&position.id()), Some(position));
        }
        assert_eq!(Position::parse("2.17").unwrap().id(), "2.17");
        let too_long = "1".repeat(19);
        for bad in [
            "", "-1", "x", "2.", "2.-3", "2.1.1", "1q", "1q-1", "q3", " 4", "+4", "2.+1", &too_long,
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }
}
