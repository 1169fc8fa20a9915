//! W3C trace context across Kafka and HTTP: `traceparent` (and `tracestate`) written into the
//! headers of every record Sluice produces, read back by whoever consumes it, so one job is one
//! trace from the POST to the SSE push. Producers publishing request events themselves may set
//! `traceparent` too; the job then joins their trace.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use rdkafka::message::{BorrowedHeaders, Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace context headers of a consumed record, kept after the record is gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    pub fn from_kafka(headers: Option<&BorrowedHeaders>) -> Self {
        let Some(headers) = headers else {
            return Self::default();
        };
        let value = |name: &str| {
            headers
                .iter()
                .find(|header| header.key == name)
                .and_then(|header| std::str::from_utf8(header.value?).ok())
                .map(str::to_owned)
        };
        Self {
            traceparent: value("traceparent"),
            tracestate: value("tracestate"),
        }
    }

    pub fn from_traceparent(traceparent: Option<String>) -> Self {
        Self {
            traceparent,
            tracestate: None,
        }
    }

    /// The remote parent these headers name (an empty context if none).
    pub fn context(&self) -> Context {
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(self))
    }

    /// The trace context of `span`, as headers.
    pub fn of(span: &tracing::Span) -> Self {
        let mut headers = Self::default();
        let context = span.context();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut headers)
        });
        headers
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Adds the current span's trace context to a record's headers.
pub fn with_current_trace(headers: OwnedHeaders) -> OwnedHeaders {
    let trace = TraceHeaders::of(&tracing::Span::current());
    [
        ("traceparent", trace.traceparent),
        ("tracestate", trace.tracestate),
    ]
    .into_iter()
    .fold(headers, |headers, (key, value)| match value {
        Some(value) => headers.insert(Header {
            key,
            value: Some(value.as_str()),
        }),
        None => headers,
    })
}

/// The trace context a client sent with an HTTP request (`traceparent`, `tracestate`).
pub fn from_http(headers: &axum::http::HeaderMap) -> Context {
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    TraceHeaders {
        traceparent: value("traceparent"),
        tracestate: value("tracestate"),
    }
    .context()
}
