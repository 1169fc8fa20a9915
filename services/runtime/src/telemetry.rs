//! One telemetry set-up per process: logs (human-readable locally, JSON lines with
//! `SLUICE_LOG_FORMAT=json`), OpenTelemetry traces (exported over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set), and the
//! Prometheus recorder behind `/metrics`.
//!
//! Spans are built even when nothing exports them, so trace ids reach the logs and the W3C
//! `traceparent` reaches every Kafka record either way. The exception: a span only a trace
//! would show (never entered around a log line, never propagated) is skipped when
//! [`exporting`] says nobody will see it, where one is made per event.

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the tracer provider alive; `shutdown` exports what is still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Flushes and stops the span exporter. Call once, as the process ends.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(error = %error, "flushing spans failed");
        }
    }
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`init`] set up an exporter for spans. Why ask: a span costs its maker even unseen
/// (measured in the results service at 528 jobs/s, `perf`: its two spans per event were 12% of
/// its CPU with nothing exporting them).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.is_empty()))
}

/// The OTLP/HTTP span exporter, `http/protobuf` unless `OTEL_EXPORTER_OTLP_PROTOCOL` says
/// `http/json`. (gRPC is not built in; collectors take both HTTP encodings on port 4318.)
fn span_exporter() -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
        Ok(other) => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported; use http/protobuf or http/json"
        ),
    };
    Ok(opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()?)
}

/// Installs logging, tracing and metrics for `service`. Exits with a message if the OTLP
/// settings are unusable: a service asked to export traces should not run silently without.
pub fn init(service: &'static str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(format!("sluice-{service}"));
    }
    let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
    let exporting = otlp_configured();
    EXPORTING.store(exporting, std::sync::atomic::Ordering::Relaxed);
    if exporting {
        match span_exporter() {
            Ok(exporter) => provider = provider.with_batch_exporter(exporter),
            Err(error) => {
                eprintln!("error: cannot export traces: {error:#}");
                std::process::exit(2);
            }
        }
    }
    let provider = provider.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|format| format == "json");
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if json {
        // The span list carries `job_id` and `trace_id` from the spans around every event.
        let logs = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_target(false);
        registry.with(logs).init();
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_target(false))
            .init();
    }
    crate::metrics::install();
    tracing::info!(
        service,
        version = env!("CARGO_PKG_VERSION"),
        exporting_traces = exporting,
        "starting"
    );
    Telemetry { provider }
}

/// Gives `span` the remote parent `parent` (if it carries one) and records the span's trace id
/// in its `trace_id` field, for the logs. Call before the span is first entered.
pub fn adopt(span: &tracing::Span, parent: opentelemetry::Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}
