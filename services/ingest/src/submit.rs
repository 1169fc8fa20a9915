//! `POST /v1/jobs`: parse the body once into a request event, publish it, answer 202.

use crate::AppState;
use crate::admission::DEFAULT_TIER;
use crate::admission::idempotency::{self, Claim, Pending, Remembered};
use crate::admit::on_store_failure;
use crate::error::ApiError;
use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sluice_common::auth::Caller;
use sluice_common::{propagation, telemetry};
use sluice_schemas::{
    DecodeError, FieldError, JobId, JobStatus, Message, ModelName, Output, Params, Priority,
    RequestEvent, SCHEMA_VERSION, Task, TierName, UserId,
};
use std::time::Duration;
use tracing::Instrument;

/// The body of `POST /v1/jobs`, as sent. Unknown fields are refused so a typo is not ignored,
/// and so is `null`: a field is given or absent, as the document says.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// Required without API keys; with them, absent or equal to the key's user.
    #[serde(default, deserialize_with = "sluice_schemas::not_null")]
    pub user_id: Option<String>,
    pub model: String,
    /// A chat job: the conversation.
    #[serde(default, deserialize_with = "sluice_schemas::not_null")]
    pub messages: Option<Vec<Message>>,
    /// An embedding job: a text or an array of texts, as in OpenAI's embeddings API.
    #[serde(default, deserialize_with = "sluice_schemas::deserialize_given_input")]
    pub input: Option<Vec<String>>,
    #[serde(default, deserialize_with = "sluice_schemas::not_null")]
    pub params: Option<Params>,
    #[serde(default, deserialize_with = "sluice_schemas::not_null")]
    pub timeout_ms: Option<u64>,
    /// `false` (or `Cache-Control: no-cache`) asks for a fresh answer.
    #[serde(default, deserialize_with = "sluice_schemas::not_null")]
    pub cache: Option<bool>,
    /// A chat job's answer streamed as the model generates it: `delta` events on the job's
    /// events stream between `running` and the terminal status.
    #[serde(default)]
    pub stream: bool,
    /// Where the job's status changes are delivered as signed webhooks:
    /// `{"url": "https://...", "events": ["succeeded", ...]}` (default: the terminal statuses).
    #[serde(default, deserialize_with = "sluice_schemas::not_null")]
    pub webhook: Option<WebhookBody>,
    /// `interactive` (default) or `batch`: the lane, which the key's tier may cap to `batch`.
    #[serde(default, deserialize_with = "sluice_schemas::not_null")]
    pub priority: Option<Priority>,
    /// Set by a front door that must know the job's id before it is published (to listen for
    /// its deltas first); otherwise a new one.
    #[serde(skip)]
    pub job_id: Option<JobId>,
}

/// A submission's `webhook`, as sent: unknown fields are refused here, as on the body (the
/// request event's reader ignores them, for producers newer than itself).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    pub url: String,
    #[serde(default, deserialize_with = "sluice_schemas::not_null")]
    pub events: Option<Vec<JobStatus>>,
}

impl From<WebhookBody> for sluice_schemas::Webhook {
    fn from(body: WebhookBody) -> Self {
        let mut webhook = Self::terminal(body.url);
        if let Some(events) = body.events {
            webhook.events = events;
        }
        webhook
    }
}

/// The 202 answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub job_id: JobId,
    /// `queued`; `succeeded` when answered from the shared cache at submit time.
    pub status: JobStatus,
    pub deadline: DateTime<Utc>,
    /// The job's lane: as asked, or `batch` where the key's tier allows no more.
    #[serde(default)]
    pub priority: Priority,
    pub status_url: String,
    pub events_url: String,
    /// The cached answer, on a cache hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
}

/// Limits a submission is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
}

/// Turns a sent body, for the user it was accepted from (parsed once, by the handler), into
/// the event to publish, or names the field that is wrong.
pub fn to_request_event(
    body: SubmitBody,
    user_id: UserId,
    limits: Limits,
    now: DateTime<Utc>,
) -> Result<RequestEvent, FieldError> {
    let model = ModelName::parse(body.model)?;
    let task = match (body.messages, body.input) {
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                "input",
                "a job is a chat (messages) or an embedding (input), not both",
            ));
        }
        (None, None) => {
            return Err(FieldError::new(
                "messages",
                "is required (or `input`, for an embedding job)",
            ));
        }
        (Some(messages), None) => Task::Chat(messages),
        (None, Some(_)) if body.stream => {
            return Err(FieldError::new(
                "stream",
                "only a chat job's answer is streamed; an embedding arrives whole",
            ));
        }
        (None, Some(input)) => Task::Embedding(input),
    };
    let timeout = match body.timeout_ms {
        Some(0) => return Err(FieldError::new("timeout_ms", "must be above 0")),
        Some(asked) => Duration::from_millis(asked).min(limits.max_timeout),
        None => limits.default_timeout,
    };
    let deadline = now + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    let event = RequestEvent {
        schema_version: SCHEMA_VERSION,
        job_id: body.job_id.unwrap_or_default(),
        user_id,
        model,
        task,
        params: body.params.unwrap_or_default(),
        submitted_at: now,
        deadline,
        cache: body.cache.unwrap_or(true),
        stream: body.stream,
        webhook: body.webhook.map(Into::into),
        tier: None,
        priority: body.priority.unwrap_or_default(),
        key_id: None,
    };
    // The rules every consumer applies (message count, empty content, ...): ingest never
    // publishes what a worker would dead-letter.
    event.validate().map_err(|error| match error {
        DecodeError::Field(field) => field,
        other => FieldError::new("body", other.to_string()),
    })?;
    Ok(event)
}

/// This deployment's rules for a webhook URL, besides the contract's: `https://` unless
/// `SLUICE_WEBHOOK_ALLOW_HTTP`, and no literal internal address unless
/// `SLUICE_WEBHOOK_ALLOW_PRIVATE_NETWORKS` (a name is checked where it is resolved, at delivery).
fn check_webhook(
    webhook: &sluice_schemas::Webhook,
    config: &crate::Config,
) -> Result<(), FieldError> {
    webhook.check(config.webhook_allow_http)?;
    // What the API document says: printable ASCII, the rest percent-encoded (a reader of the
    // request event accepts what `url` parses).
    if !webhook.url.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(FieldError::new(
            "webhook.url",
            "must be printable ASCII without spaces (percent-encode the rest)",
        ));
    }
    if !authority_as_documented(&webhook.url) {
        return Err(FieldError::new(
            "webhook.url",
            "must name its host as a DNS name (letters, digits, hyphens; the last label starting with a letter) or an IPv4 address, with an optional port up to 65535",
        ));
    }
    if config.webhook_allow_private_networks {
        return Ok(());
    }
    let host = url::Url::parse(&webhook.url)
        .ok()
        .and_then(|url| url.host().map(|host| host.to_owned()));
    let ip: Option<std::net::IpAddr> = match host {
        Some(url::Host::Ipv4(ip)) => Some(ip.into()),
        Some(url::Host::Ipv6(ip)) => Some(ip.into()),
        _ => None,
    };
    if let Some(reason) = ip.and_then(sluice_common::webhooks::guard::forbidden) {
        return Err(FieldError::new(
            "webhook.url",
            format!("is {reason}; webhooks go to public addresses only"),
        ));
    }
    Ok(())
}

/// A JSON body of type `T`, with its bytes: the content type, the size limit and the JSON
/// checked, a wrong field named by its path.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    max_body_bytes: usize,
) -> Result<(T, Bytes), ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let is_json = content_type.to_str().is_ok_and(|value| {
            let essence = value.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
                || essence.to_ascii_lowercase().ends_with("+json")
        });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: max_body_bytes,
            }
        } else if sluice_common::http::is_body_timeout(&rejection) {
            ApiError::BodyTimeout
        } else {
            ApiError::BodyRead
        }
    })?;
    let body = match sluice_schemas::decode_json(&bytes) {
        Err(DecodeError::Field(field))
            if field.message.starts_with("invalid type: floating point") =>
        {
            with_integral_floats(&bytes).unwrap_or(Err(DecodeError::Field(field)))
        }
        decoded => decoded,
    };
    let body = body.map_err(|error| match error {
        DecodeError::Field(field) => ApiError::InvalidField(field),
        DecodeError::Json(text) => ApiError::InvalidJson(text),
        other => ApiError::InvalidJson(other.to_string()),
    })?;
    Ok((body, bytes))
}

/// The host and port of an `http(s)://` URL as the API document's pattern has them: a DNS name
/// whose last label starts with a letter, or a dotted-quad IPv4 address; a port of 1 to 5 digits
/// up to 65535. Why a rule of its own: the URL standard reads much more as a host (`1.2.3`,
/// `0x7f.1`, a name ending in digits as an address), so that what the document says and what
/// this server accepts would otherwise differ.
fn authority_as_documented(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let port_ok = port.is_none_or(|port| {
        (1..=5).contains(&port.len())
            && port.bytes().all(|byte| byte.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|port| port <= 65_535)
    });
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let labels: Vec<&str> = host.split('.').collect();
    let dns_name = labels.iter().all(|label| label_ok(label))
        && labels
            .last()
            .is_some_and(|last| last.starts_with(|c: char| c.is_ascii_alphabetic()));
    let octet_ok = |octet: &str| {
        (1..=3).contains(&octet.len())
            && octet.bytes().all(|byte| byte.is_ascii_digit())
            && (octet == "0" || !octet.starts_with('0'))
            && octet.parse::<u16>().is_ok_and(|value| value <= 255)
    };
    let ipv4 = labels.len() == 4 && labels.iter().all(|octet| octet_ok(octet));
    port_ok && (dns_name || ipv4)
}

/// JSON has one kind of number: `7376.0` is the integer 7376 to JSON Schema, and some encoders
/// write an integer held in a float that way. Serde refuses it where an integer is expected, so
/// a body refused for a float is read again with every integral float as an integer; `None` if
/// that changes nothing. The cost falls on such bodies alone.
fn with_integral_floats<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Option<Result<T, DecodeError>> {
    fn integral(value: &mut serde_json::Value) -> bool {
        match value {
            serde_json::Value::Number(number) => {
                let Some(float) = number.as_f64().filter(|_| number.is_f64()) else {
                    return false;
                };
                // Past 2^53 a float no longer holds every integer exactly.
                if float.fract() != 0.0 || float.abs() > 9_007_199_254_740_992.0 {
                    return false;
                }
                *value = if float >= 0.0 {
                    (float as u64).into()
                } else {
                    (float as i64).into()
                };
                true
            }
            serde_json::Value::Array(items) => items
                .iter_mut()
                .fold(false, |any, item| integral(item) | any),
            serde_json::Value::Object(fields) => fields
                .values_mut()
                .fold(false, |any, field| integral(field) | any),
            _ => false,
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if !integral(&mut value) {
        return None;
    }
    Some(sluice_schemas::decode_json(
        &serde_json::to_vec(&value).ok()?,
    ))
}

/// `Cache-Control: no-cache` (or `no-store`), as HTTP caches read it.
fn wants_fresh_answer(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| {
            value.split(',').map(str::trim).any(|directive| {
                directive.eq_ignore_ascii_case("no-cache")
                    || directive.eq_ignore_ascii_case("no-store")
            })
        })
}

/// `Idempotency-Key`, if sent: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::InvalidIdempotencyKey)?;
    let valid = (1..=255).contains(&key.len()) && key.bytes().all(|byte| byte.is_ascii_graphic());
    if !valid {
        return Err(ApiError::InvalidIdempotencyKey);
    }
    Ok(Some(key.to_owned()))
}

/// `POST /v1/jobs`, in the job's root span: a child of the caller's `traceparent` if it sent
/// one, and the parent of everything the job does in the worker and the results service.
pub(crate) async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let span = tracing::info_span!(
        "POST /v1/jobs",
        otel.kind = "server",
        job_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::adopt(&span, propagation::from_http(&headers));
    submit_in_span(state, headers, body).instrument(span).await
}

async fn submit_in_span(
    state: AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // Shed load before doing any work: a burst far past capacity still gets fast answers.
    let _slot = state
        .submissions
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
    let caller = authenticate(&state, &headers).await?;
    let (body, raw) = parse_body(&headers, body, state.config.max_body_bytes)?;
    let (accepted, limit_headers) = match accept(&state, &headers, caller, body, &raw).await? {
        Admission::Replayed(accepted) => return Ok(replayed(accepted)),
        Admission::Accepted(accepted, limit_headers) => (*accepted, limit_headers),
    };
    let location = HeaderValue::from_str(&accepted.status_url)
        .expect("a URL made of a URL and a UUID is a header value");
    // A cache hit is finished: 200 with the answer, rather than 202.
    let status = if accepted.output.is_some() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut response = (status, [(header::LOCATION, location)], Json(accepted)).into_response();
    response.headers_mut().extend(limit_headers);
    Ok(response)
}

/// The caller, as their API key says; `None` when keys are off.
pub(crate) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Caller>, ApiError> {
    match &state.keys {
        Some(keys) => Ok(Some(keys.authenticate(headers).await?)),
        None => Ok(None),
    }
}

/// What `accept` made of a submission.
pub(crate) enum Admission {
    /// A new job (or a cache hit answered now): the 202 body and the rate-limit headers.
    Accepted(Box<Accepted>, HeaderMap),
    /// An `Idempotency-Key` already used with the same body: the original 202 body.
    Replayed(serde_json::Value),
}

/// Everything between a parsed body and a published job, the same for every front door
/// (`/v1/jobs`, the OpenAI routes): the caller's user, the one conversion into a request
/// event, the idempotency key, admission, the shared cache, publishing.
pub(crate) async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    caller: Option<Caller>,
    mut body: SubmitBody,
    raw: &[u8],
) -> Result<Admission, ApiError> {
    if wants_fresh_answer(headers) {
        body.cache = Some(false);
    }
    if let Some(caller) = &caller {
        if body
            .user_id
            .as_ref()
            .is_some_and(|given| *given != caller.user_id)
        {
            return Err(ApiError::Forbidden);
        }
        body.user_id = Some(caller.user_id.clone());
    }
    let given = body
        .user_id
        .clone()
        .ok_or_else(|| FieldError::new("user_id", "is required"))?;
    let limits = Limits {
        default_timeout: state.config.default_timeout,
        max_timeout: state.config.max_timeout,
    };
    // The one conversion: from here on the job is a validated event, nothing is re-checked.
    let mut event = to_request_event(body, UserId::parse(given)?, limits, Utc::now())?;
    if let Some(webhook) = &event.webhook {
        check_webhook(webhook, &state.config)?;
    }
    tracing::Span::current().record("job_id", tracing::field::display(event.job_id));
    let user_id = event.user_id.clone();
    // Usage is recorded per key too.
    event.key_id = caller.as_ref().map(|caller| caller.key_id.clone());
    let key_budget = caller
        .as_ref()
        .map(|caller| caller.budget)
        .unwrap_or_default();
    let tier = caller.map_or_else(|| DEFAULT_TIER.to_owned(), |caller| caller.tier);
    // A tier without the interactive lane has its jobs in the batch lane, whatever they ask.
    if !state.tiers.get(Some(&tier)).1.interactive {
        event.priority = Priority::Batch;
    }
    // The worker weighs the user's share by it; absent is the default tier.
    event.tier = Some(tier.as_str())
        .filter(|tier| *tier != DEFAULT_TIER)
        .and_then(|tier| TierName::parse(tier).ok());
    let key = idempotency_key(headers)?;
    let retention = state.config.idempotency_ttl;
    let body_hash = idempotency::body_hash(raw);
    let mut claimed = None;
    if let Some(key) = &key {
        let mut pending = Pending {
            body_hash: body_hash.clone(),
            job_id: event.job_id,
            claimed_at: Utc::now(),
        };
        // Why the publish timeout and more: by then a submission that is still alive has had
        // its answer from the broker, so a pending key that old was left by a dead ingest.
        let takeover_after = state.config.publish_timeout * 2 + std::time::Duration::from_secs(1);
        match state
            .idempotency
            .claim(user_id.as_str(), key, &pending, retention, takeover_after)
            .await
        {
            Ok(Claim::New) => claimed = Some(pending),
            Ok(Claim::Abandoned(job_id)) => {
                tracing::info!(job_id = %job_id, "taking over an idempotency key left pending");
                event.job_id = job_id;
                tracing::Span::current().record("job_id", tracing::field::display(job_id));
                pending.job_id = job_id;
                claimed = Some(pending);
            }
            Ok(Claim::Replay(accepted)) => return Ok(Admission::Replayed(accepted)),
            Ok(Claim::Mismatch) => return Err(ApiError::IdempotencyKeyReused),
            Ok(Claim::InProgress) => return Err(ApiError::IdempotencyKeyInProgress),
            Err(error) => on_store_failure(state, "idempotency", &error)?,
        }
    }
    let result = crate::admit::admit_and_publish(state, &event, &tier, key_budget).await;
    if let (Some(key), Some(pending)) = (&key, claimed) {
        match &result {
            Ok((accepted, _)) => {
                let accepted = serde_json::to_value(accepted).expect("a 202 body serializes");
                let remembered = Remembered {
                    body_hash,
                    accepted,
                };
                if let Err(error) = state
                    .idempotency
                    .remember(user_id.as_str(), key, remembered, retention)
                    .await
                {
                    tracing::warn!(error = %error, "could not remember an idempotency key");
                }
            }
            Err(_) => {
                state
                    .idempotency
                    .abandon(user_id.as_str(), key, &pending, retention)
                    .await
            }
        }
    }
    let (accepted, limit_headers) = result?;
    Ok(Admission::Accepted(Box::new(accepted), limit_headers))
}

/// The original 202 of an `Idempotency-Key`, marked as a replay; nothing is published.
fn replayed(accepted: serde_json::Value) -> Response {
    let location = accepted["status_url"]
        .as_str()
        .and_then(|url| HeaderValue::from_str(url).ok());
    let mut response = (StatusCode::ACCEPTED, Json(accepted)).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_host_is_a_dns_name_or_an_ipv4_address_as_the_document_says() {
        for good in [
            "https://hooks.example.com/in",
            "http://localhost:8080",
            "https://a-b.c9.example?x=1",
            "https://10.0.0.1:65535/p",
            "http://0.0.0.0",
        ] {
            assert!(authority_as_documented(good), "{good}");
        }
        for bad in [
            "https://1.2.3",
            "https://0x7f.0.0.1",
            "https://01.2.3.4",
            "https://256.1.1.1",
            "https://example.123",
            "https://-a.example",
            "https://a_b.example",
            "https://[::1]/",
            "https://example.com:65536",
            "https://example.com:",
            "https://user@example.com",
            "ftp://example.com",
            "https://",
        ] {
            assert!(!authority_as_documented(bad), "{bad}");
        }
    }

    #[test]
    fn an_integral_float_reads_as_an_integer_and_null_is_refused() {
        let body: SubmitBody =
            with_integral_floats(br#"{"model": "m", "input": "a", "timeout_ms": 7376.0}"#)
                .expect("a float was made an integer")
                .expect("it decodes");
        assert_eq!(body.timeout_ms, Some(7376));
        assert!(
            with_integral_floats::<SubmitBody>(br#"{"model": "m", "timeout_ms": 1.5}"#).is_none()
        );
        let error = sluice_schemas::decode_json::<SubmitBody>(
            br#"{"model": "m", "input": "a", "cache": null}"#,
        )
        .expect_err("null is refused");
        assert!(error.to_string().contains("cache"), "{error}");
    }
}
