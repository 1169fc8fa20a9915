//! Prometheus metrics: one recorder per process, `GET /metrics` in the text exposition format,
//! and the HTTP request metrics every service's router records. The names follow Prometheus
//! conventions (`_total` counters, `_seconds` histograms, base units); the README lists them.

use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Histogram buckets in seconds, from a fast HTTP answer to a slow model call.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// (name, help) of every metric Sluice records, described once so `/metrics` carries `# HELP`.
pub const CATALOGUE: &[(&str, &str)] = &[
    (
        "http_requests_total",
        "HTTP requests answered, by route, method and status",
    ),
    (
        "http_request_duration_seconds",
        "Time to answer an HTTP request (to the response head), by route and method",
    ),
    (
        "sluice_admission_rejections_total",
        "Submissions refused by admission control, by reason (the error code) and gate (user_limit, global_limit, capacity, submissions, broker, limiter_store)",
    ),
    (
        "sluice_admission_estimated_wait_seconds",
        "The time a new job would spend in the pipeline, as ingest estimates it (backlog over throughput)",
    ),
    (
        "sluice_admission_backlog",
        "Jobs in the pipeline (the workers' consumer group lag on the request topic) at the last reading",
    ),
    (
        "sluice_admission_throughput_per_second",
        "Jobs the workers finish per second, measured over SLUICE_CAPACITY_WINDOW_SECS",
    ),
    (
        "sluice_jobs_accepted_total",
        "Jobs accepted by ingest and published",
    ),
    (
        "sluice_cache_lookups_total",
        "Response cache look-ups, by result (hit, miss)",
    ),
    ("sluice_worker_in_flight", "Jobs the worker is running now"),
    (
        "sluice_worker_window_occupancy",
        "Records read ahead and held by the worker (waiting or running)",
    ),
    (
        "sluice_worker_window_capacity",
        "Records the worker may hold at once (SLUICE_READ_AHEAD)",
    ),
    (
        "sluice_consumer_lag",
        "Records behind the end of a partition, by client, topic and partition (librdkafka statistics)",
    ),
    (
        "sluice_model_request_duration_seconds",
        "Model call time per attempt, by model and outcome (ok, retryable, fatal, deadline)",
    ),
    (
        "sluice_model_retries_total",
        "Model attempts retried, by model",
    ),
    (
        "sluice_model_fallbacks_total",
        "Jobs answered by a fallback model or the static fallback, by requested model",
    ),
    (
        "sluice_circuit_state",
        "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open",
    ),
    (
        "sluice_model_concurrency_limit",
        "Adaptive concurrency limit per backend",
    ),
    (
        "sluice_dead_lettered_total",
        "Events moved to a dead-letter topic, by source topic and reason code",
    ),
    (
        "sluice_deltas_published_total",
        "Pieces of streamed answers published to the deltas topic",
    ),
    (
        "sluice_job_queue_wait_seconds",
        "Accepted until a worker started the job",
    ),
    (
        "sluice_job_run_seconds",
        "Started until finished, all attempts",
    ),
    (
        "sluice_job_end_to_end_seconds",
        "Submitted until the terminal status was stored",
    ),
    (
        "sluice_jobs_finished_total",
        "Jobs that reached a terminal status, by status (worker)",
    ),
    (
        "sluice_results_batch_events",
        "Events written per results transaction",
    ),
    (
        "sluice_results_write_duration_seconds",
        "Time of one results transaction",
    ),
    (
        "sluice_sse_connections",
        "Server-Sent Event streams open now",
    ),
    (
        "sluice_sse_reads_total",
        "Reads of a job's events from Postgres by event streams (one when a stream opens, more when a change another replica wrote wakes it)",
    ),
    (
        "sluice_sse_read_queries_total",
        "Queries answering those reads (each answers every read waiting at that moment)",
    ),
    (
        "sluice_webhook_enqueued_total",
        "Webhook deliveries enqueued from status events (webhooks)",
    ),
    (
        "sluice_webhook_attempts_total",
        "Webhook delivery attempts, by outcome (delivered, error, gone, refused)",
    ),
    (
        "sluice_webhook_deliveries_total",
        "Webhook deliveries that ended, by outcome (delivered, failed, stopped)",
    ),
    (
        "sluice_webhook_delivery_delay_seconds",
        "The job reaching a status until its webhook was delivered",
    ),
    (
        "sluice_webhook_queue_depth",
        "Webhook deliveries pending (sampled every 5 s)",
    ),
    (
        "sluice_embedding_batch_texts",
        "Texts per forward pass of the in-process embedding model",
    ),
    (
        "sluice_embedding_forward_seconds",
        "Time of one batch on the in-process embedding model",
    ),
];

/// Installs the process's recorder; later calls (several services in one test process) reuse it.
pub fn install() {
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full("sluice_results_batch_events".into()),
                    &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0],
                )
            })
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full("sluice_embedding_batch_texts".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                )
            })
            .and_then(PrometheusBuilder::install_recorder)
            .expect("the first Prometheus recorder of the process");
        // The exporter keeps one description per name whatever the kind, so one call serves
        // counters, gauges and histograms alike.
        for (name, help) in CATALOGUE {
            metrics::describe_counter!(*name, *help);
        }
        // Why: the exporter drains histogram samples into buckets on upkeep, not on record.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .expect("spawning the metrics upkeep thread");
        handle
    });
}

/// `GET /metrics`: the Prometheus text format.
pub async fn render() -> Response {
    install();
    let body = HANDLE
        .get()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Middleware: counts every answered request and times it, by matched route (never the raw
/// path, which would make one series per job id).
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A gauge that follows a count up and down: one SSE stream, one job in flight.
#[derive(Debug)]
pub struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    pub fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
