//! OpenAI's API as a front door to the queue: `POST /v1/chat/completions`, `POST
//! /v1/embeddings` and `GET /v1/models`. A client changes only its `base_url` and API key;
//! each request becomes a job exactly as `POST /v1/jobs` makes one (`submit::accept`: the
//! same admission, rate limits, idempotency, cache, deadline), so it is durable, visible at
//! `GET /v1/jobs/{id}` and cancellable; the connection waits for the job's end (`wait.rs`).
//! Every answer carries `X-Sluice-Job-Id`.

mod deltas;
mod error;
mod wait;
mod wire;

pub(crate) use deltas::{DeltaRoutes, follow as follow_deltas};
pub(crate) use error::OpenAiError;
pub(crate) use wait::JobFollower;
pub use wire::openai_submission;

use crate::AppState;
use crate::submit::{Admission, accept, authenticate, parse_body};
use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use deltas::Subscription;
use serde_json::{Value, json};
use sluice_schemas::{DeltaEvent, FieldError, JobId, JobStatus, Output};
use std::convert::Infallible;
use wait::CancelOnDrop;
use wire::{ChatRequest, EmbeddingsRequest, JobView};

const JOB_ID_HEADER: &str = "x-sluice-job-id";
const EVENTS_URL_HEADER: &str = "x-sluice-events-url";

/// `GET /v1/models`: the models `SLUICE_OPENAI_MODELS` names.
pub(crate) async fn models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, OpenAiError> {
    authenticate(&state, &headers).await?;
    let data: Vec<Value> = state
        .config
        .openai_models
        .iter()
        .map(|model| json!({"id": model, "object": "model", "created": 0, "owned_by": "sluice"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// A job accepted for an OpenAI request, and what waiting for it needs.
struct Admitted {
    job_id: JobId,
    /// The job's `events_url` (with its stream token when keys are on).
    events_url: String,
    model: String,
    deadline: DateTime<Utc>,
    /// Answered at submit time from the shared cache.
    output: Option<Output>,
    headers: HeaderMap,
}

/// The steps every OpenAI route shares: shed, authenticate, parse (type `T`), the model
/// check, the job (`to_job`), `accept`.
async fn admit<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    to_job: impl FnOnce(T, Option<u64>) -> Result<crate::submit::SubmitBody, FieldError>,
) -> Result<Admitted, OpenAiError> {
    let _slot = state
        .submissions
        .clone()
        .try_acquire_owned()
        .map_err(|_| crate::error::ApiError::Overloaded)?;
    let caller = authenticate(state, headers).await?;
    let (request, raw): (T, Bytes) = parse_body(headers, body, state.config.max_body_bytes)?;
    let timeout_ms = headers
        .get("x-sluice-timeout-ms")
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    sluice_schemas::FieldError::new(
                        "X-Sluice-Timeout-Ms",
                        "must be a whole number of milliseconds",
                    )
                })
        })
        .transpose()?;
    keeps_going(headers)?;
    let mut job = to_job(request, timeout_ms)?;
    // OpenAI's bodies have no place for it: a header asks for the terminal status as a webhook.
    if let Some(value) = headers.get("x-sluice-webhook") {
        let url = value
            .to_str()
            .map_err(|_| sluice_schemas::FieldError::new("X-Sluice-Webhook", "must be a URL"))?;
        job.webhook = Some(crate::submit::WebhookBody {
            url: url.trim().to_owned(),
            events: None,
        });
    }
    // With a key, the key's user owns the job; OpenAI's `user` is the caller's own end user
    // (it still reaches the backend in the params).
    if caller.is_some() {
        job.user_id = None;
    }
    let known = &state.config.openai_models;
    if !known.is_empty() && !known.contains(&job.model) {
        return Err(OpenAiError::unknown_model(&job.model));
    }
    let model = job.model.clone();
    let (accepted, limit_headers) = match accept(state, headers, caller, job, &raw).await? {
        Admission::Accepted(accepted, limit_headers) => (*accepted, limit_headers),
        Admission::Replayed(original) => {
            let accepted: crate::submit::Accepted =
                serde_json::from_value(original).map_err(|error| {
                    OpenAiError::internal(format!(
                        "a remembered answer does not read back: {error}"
                    ))
                })?;
            (accepted, HeaderMap::new())
        }
    };
    Ok(Admitted {
        job_id: accepted.job_id,
        events_url: accepted.events_url,
        model,
        deadline: accepted.deadline,
        output: accepted.output,
        headers: limit_headers,
    })
}

/// The job's end: at once for a cache hit, else from the results service. A client that
/// disconnects meanwhile cancels the job unless it said `X-Sluice-On-Disconnect: continue`.
async fn finished(
    state: &AppState,
    headers: &HeaderMap,
    admitted: &Admitted,
) -> Result<(JobView, Output), OpenAiError> {
    let job = match &admitted.output {
        Some(output) => JobView {
            job_id: admitted.job_id,
            model: admitted.model.clone(),
            status: JobStatus::Succeeded,
            output: Some(output.clone()),
            error: None,
        },
        None => {
            let auth = headers.get(axum::http::header::AUTHORIZATION);
            let keep_going = keeps_going(headers)?;
            let guard = CancelOnDrop::new(
                state.follower.clone(),
                admitted.job_id,
                auth.cloned(),
                !keep_going,
            );
            let job = state
                .follower
                .terminal(admitted.job_id, auth, admitted.deadline)
                .await
                .map_err(|why| OpenAiError::lost_track(admitted.job_id, why))?;
            guard.finish();
            job
        }
    };
    match (&job.status, &job.output) {
        (JobStatus::Succeeded, Some(output)) => {
            let output = output.clone();
            Ok((job, output))
        }
        (status, _) => Err(OpenAiError::from_job(
            job.job_id,
            job.error.as_ref(),
            *status == JobStatus::Cancelled,
        )),
    }
}

/// `X-Sluice-On-Disconnect`: `continue` keeps the job running when the client goes away,
/// `cancel` (the default) cancels it; anything else is refused rather than guessed at.
fn keeps_going(headers: &HeaderMap) -> Result<bool, FieldError> {
    let Some(value) = headers.get("x-sluice-on-disconnect") else {
        return Ok(false);
    };
    match value.as_bytes() {
        value if value.eq_ignore_ascii_case(b"continue") => Ok(true),
        value if value.eq_ignore_ascii_case(b"cancel") => Ok(false),
        _ => Err(FieldError::new(
            "X-Sluice-On-Disconnect",
            "must be continue or cancel",
        )),
    }
}

fn with_job_headers(mut response: Response, admitted: &Admitted) -> Response {
    response.headers_mut().extend(admitted.headers.clone());
    job_headers(response.headers_mut(), admitted);
    response
}

/// `X-Sluice-Job-Id`, and `X-Sluice-Events-Url` for following the job from a browser.
fn job_headers(headers: &mut HeaderMap, admitted: &Admitted) {
    if let Ok(value) = HeaderValue::from_str(&admitted.job_id.to_string()) {
        headers.insert(JOB_ID_HEADER, value);
    }
    if let Ok(value) = HeaderValue::from_str(&admitted.events_url) {
        headers.insert(EVENTS_URL_HEADER, value);
    }
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    // A stream's subscription to its job's pieces, and whether it wants the usage chunk.
    let mut stream = None;
    let job_id = JobId::new();
    let to_job = |request: ChatRequest, timeout_ms| {
        if request.stream {
            let include_usage = request
                .stream_options
                .as_ref()
                .is_some_and(|options| options.include_usage);
            // Subscribed before the job is published, so no piece is missed.
            stream = Some((state.deltas.subscribe(job_id), include_usage));
        }
        let mut job = request.into_submission(timeout_ms)?;
        job.job_id = Some(job_id);
        Ok(job)
    };
    let admitted = admit(&state, &headers, body, to_job).await?;
    let created = Utc::now().timestamp();
    if let Some((subscription, include_usage)) = stream {
        let response = stream_chat(
            state,
            headers,
            admitted,
            subscription,
            created,
            include_usage,
        );
        return Ok(response);
    }
    let result = finished(&state, &headers, &admitted).await;
    let response = match result {
        Ok((job, output)) => Json(wire::chat_completion(&job, &output, created)).into_response(),
        Err(error) => error.into_response(),
    };
    Ok(with_job_headers(response, &admitted))
}

/// What moves a stream on: a piece of the answer, or the job's end.
enum Step {
    Piece(Option<DeltaEvent>),
    Ended(Box<Result<(JobView, Output), OpenAiError>>),
}

/// `"stream": true`: keep-alive comments while the job waits, then the answer's pieces as the
/// model generates them (the worker's delta events, relayed in order from the first for as long
/// as none is missing), then whatever the terminal status adds to them, the finish reason, the
/// usage when asked, and `[DONE]`. A cache hit or a shared answer arrives as one piece. An error
/// after the stream has started is a final `{"error": ...}` chunk, never a silently cut stream.
fn stream_chat(
    state: AppState,
    headers: HeaderMap,
    admitted: Admitted,
    mut subscription: Subscription,
    created: i64,
    include_usage: bool,
) -> Response {
    let job_id = admitted.job_id;
    let model = admitted.model.clone();
    let mut answer_headers = HeaderMap::new();
    job_headers(&mut answer_headers, &admitted);
    let events = async_stream::stream! {
        let data = |value: &Value| Ok::<_, Infallible>(Event::default().data(value.to_string()));
        let chunk = |delta: Value, finish_reason: Option<&str>| {
            wire::chunk(job_id, &model, created, delta, finish_reason, include_usage)
        };
        yield data(&chunk(json!({"role": "assistant", "content": ""}), None));
        let ended = finished(&state, &headers, &admitted);
        tokio::pin!(ended);
        let mut relayed = String::new();
        // The attempt and index of the next piece to relay; `None` before the first.
        let mut next: Option<(u32, u32)> = None;
        let mut relaying = true;
        loop {
            let step = tokio::select! {
                // Why biased: pieces already here go out before the end is looked at.
                biased;
                piece = subscription.pieces.recv(), if relaying => Step::Piece(piece),
                result = &mut ended => Step::Ended(Box::new(result)),
            };
            match step {
                Step::Piece(Some(piece)) => {
                    let in_order = match next {
                        None => piece.index == 0,
                        Some((attempt, index)) => piece.attempt == attempt && piece.index == index,
                    };
                    if !in_order {
                        // A piece went missing: the rest comes from the terminal status.
                        relaying = false;
                        continue;
                    }
                    next = Some((piece.attempt, piece.index + 1));
                    relayed.push_str(&piece.text);
                    yield data(&chunk(json!({"content": piece.text}), None));
                }
                Step::Piece(None) => relaying = false,
                Step::Ended(ended_with) => match *ended_with {
                    Ok((job, output)) => {
                        match output.content.strip_prefix(relayed.as_str()) {
                            Some(rest) => {
                                if !rest.is_empty() {
                                    yield data(&chunk(json!({"content": rest}), None));
                                }
                                if let Some(delta) = wire::final_delta(&output) {
                                    yield data(&chunk(delta, None));
                                }
                                let finish = output.finish_reason.as_deref().unwrap_or("stop");
                                let mut last = chunk(json!({}), Some(finish));
                                if let Some(logprobs) = &output.logprobs {
                                    last["choices"][0]["logprobs"] = logprobs.clone();
                                }
                                yield data(&last);
                                if include_usage {
                                    let answered_by = wire::answered_by(&job, &output);
                                    yield data(&wire::usage_chunk(job_id, answered_by, created, &output));
                                }
                            }
                            None => yield data(&OpenAiError::diverged(job_id).body()),
                        }
                        break;
                    }
                    Err(error) => {
                        yield data(&error.body());
                        break;
                    }
                },
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.headers_mut().extend(answer_headers);
    response
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let mut base64 = false;
    let admitted = admit(
        &state,
        &headers,
        body,
        |request: EmbeddingsRequest, timeout_ms| {
            base64 = request.encoding_format.as_deref() == Some("base64");
            request.into_submission(timeout_ms)
        },
    )
    .await?;
    let response = match finished(&state, &headers, &admitted).await {
        Ok((job, output)) => Json(wire::embedding_list(&job, &output, base64)).into_response(),
        Err(error) => error.into_response(),
    };
    Ok(with_job_headers(response, &admitted))
}
