//! Telemetry with the three services as real processes: one job is one trace across ingest,
//! the broker, the worker (with its model attempt), the results write and the SSE push,
//! exported over OTLP/HTTP (JSON) to a receiver in this test; JSON logs carry the trace and job
//! ids; every service serves Prometheus `/metrics` with the metrics the README lists.

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use sluice_tests::process::{ServiceProcess, free_port};
use sluice_tests::sse::read_sse;
use sluice_tests::{TestDatabase, TestTopics, kafka_args, wait_until};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One exported span, flattened from OTLP JSON.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

fn attribute_value(value: &serde_json::Value) -> String {
    value
        .as_object()
        .and_then(|object| object.values().next())
        .map(|inner| {
            inner
                .as_str()
                .map_or_else(|| inner.to_string(), str::to_owned)
        })
        .unwrap_or_default()
}

fn attributes(list: &serde_json::Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| {
            Some((
                pair["key"].as_str()?.to_owned(),
                attribute_value(&pair["value"]),
            ))
        })
        .collect()
}

/// Flattens an OTLP `ExportTraceServiceRequest` in its JSON encoding.
fn spans_of(request: &serde_json::Value) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource_spans in request["resourceSpans"].as_array().into_iter().flatten() {
        let resource = attributes(&resource_spans["resource"]["attributes"]);
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope_spans in resource_spans["scopeSpans"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for span in scope_spans["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                spans.push(Span {
                    service: service.clone(),
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: text("parentSpanId"),
                    attributes: attributes(&span["attributes"]),
                });
            }
        }
    }
    spans
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a JSON body, kept in memory.
async fn otlp_receiver(stop: CancellationToken) -> (String, Arc<Mutex<Vec<Span>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let router = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let request: serde_json::Value =
                    serde_json::from_slice(&body).expect("an OTLP JSON body");
                sink.lock().unwrap().extend(spans_of(&request));
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_is_one_trace_across_the_three_services_and_every_service_has_metrics() {
    let stop = CancellationToken::new();
    let (otlp_url, received) = otlp_receiver(stop.clone()).await;
    let kafka = kafka_args(3);
    let topics = TestTopics::unique();
    topics.create(&kafka).await;
    let database = TestDatabase::create().await;

    let mut sim_config = sluice_model_sim::Config::defaults();
    sim_config.service_time_ms = 20;
    let sim = sluice_model_sim::SimModel::new(sim_config);
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_url = format!("http://{}", sim_listener.local_addr().unwrap());
    tokio::spawn(sim.run(sim_listener, stop.clone()));

    let (ingest_port, worker_port, results_port) = (free_port(), free_port(), free_port());
    let results_url = format!("http://127.0.0.1:{results_port}");
    let mut env = topics.process_env();
    env.extend(
        [
            ("KAFKA_BROKERS", kafka.brokers.as_str()),
            ("SLUICE_AUTH", "off"),
            ("DATABASE_URL", &database.url),
            ("MODEL_BASE_URL", &sim_url),
            ("SLUICE_RESULTS_URL", &results_url),
            ("SLUICE_INGEST_ADDR", &format!("127.0.0.1:{ingest_port}")),
            ("SLUICE_WORKER_ADDR", &format!("127.0.0.1:{worker_port}")),
            ("SLUICE_RESULTS_ADDR", &format!("127.0.0.1:{results_port}")),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp_url),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("SLUICE_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,sluice_ingest=debug,sluice_worker=debug"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned())),
    );
    let http = reqwest::Client::new();
    let results = ServiceProcess::spawn("sluice-results", "telemetry-results", &env);
    results.wait_ready(&http, results_port).await;
    let worker = ServiceProcess::spawn("sluice-worker", "telemetry-worker", &env);
    worker.wait_ready(&http, worker_port).await;
    let ingest = ServiceProcess::spawn("sluice-ingest", "telemetry-ingest", &env);
    ingest.wait_ready(&http, ingest_port).await;

    // The caller's own trace: the job must join it rather than start another.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let accepted: serde_json::Value = http
        .post(format!("http://127.0.0.1:{ingest_port}/v1/jobs"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({
            "user_id": "tracer",
            "model": "sim",
            "messages": [{"role": "user", "content": "trace me"}],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_id = accepted["job_id"].as_str().expect("a job id").to_owned();
    let stream = http
        .get(accepted["events_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let (events, _) = read_sse(stream, Duration::from_secs(30)).await;
    assert_eq!(
        events.last().and_then(|event| event.event.as_deref()),
        Some("succeeded")
    );

    let expected = [
        ("sluice-ingest", "POST /v1/jobs"),
        ("sluice-worker", "worker job"),
        ("sluice-worker", "model attempt"),
        ("sluice-results", "results store"),
        ("sluice-results", "sse push"),
    ];
    let spans = wait_until(
        "the job's spans from all three services",
        Duration::from_secs(20),
        || {
            let received = received.lock().unwrap().clone();
            async move {
                let ours: Vec<Span> = received
                    .into_iter()
                    .filter(|span| span.trace_id == trace_id)
                    .collect();
                let complete = expected.iter().all(|(service, name)| {
                    ours.iter()
                        .any(|span| span.service == *service && span.name == *name)
                }) && ours.iter().filter(|span| span.name == "sse push").count()
                    >= 3;
                complete.then_some(ours)
            }
        },
    )
    .await;
    for span in &spans {
        println!(
            "{} {} {} <- {}",
            span.service, span.name, span.span_id, span.parent_span_id
        );
    }
    let find = |name: &str| spans.iter().find(|span| span.name == name).unwrap();
    let (root, job, attempt) = (
        find("POST /v1/jobs"),
        find("worker job"),
        find("model attempt"),
    );
    assert_eq!(
        root.parent_span_id, "00f067aa0ba902b7",
        "the POST continues the caller's span"
    );
    assert_eq!(
        job.parent_span_id, root.span_id,
        "the worker's job span is the POST's child, across Kafka"
    );
    assert_eq!(attempt.parent_span_id, job.span_id);
    assert_eq!(
        attempt.attributes.get("outcome").map(String::as_str),
        Some("ok")
    );
    for span in [root, job] {
        assert_eq!(
            span.attributes.get("job_id"),
            Some(&job_id),
            "{} names the job",
            span.name
        );
    }
    let worker_span_ids: Vec<&str> = spans
        .iter()
        .filter(|span| span.service == "sluice-worker")
        .map(|span| span.span_id.as_str())
        .collect();
    let stores: Vec<&Span> = spans
        .iter()
        .filter(|span| span.name == "results store")
        .collect();
    assert!(
        stores
            .iter()
            .any(|span| span.parent_span_id == root.span_id),
        "the queued event is stored under the POST's span"
    );
    assert!(
        stores
            .iter()
            .any(|span| worker_span_ids.contains(&span.parent_span_id.as_str())),
        "status events are stored under the worker's spans"
    );

    // JSON logs carry the trace id and the job id.
    for process in [&ingest, &worker] {
        let log = std::fs::read_to_string(&process.log).unwrap();
        let line = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line.to_string().contains(&job_id))
            .unwrap_or_else(|| {
                panic!("no JSON log line of {} names the job:\n{log}", process.name)
            });
        let text = line.to_string();
        assert!(
            text.contains(trace_id),
            "{} logs the trace id: {text}",
            process.name
        );
    }

    // Metrics on every service; consumer lag comes with librdkafka's statistics (every 5 s).
    let metrics = |port: u16| {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let ingest_metrics = metrics(ingest_port).await;
    for name in [
        r#"http_requests_total{route="/v1/jobs",method="POST",status="202"} 1"#,
        "sluice_jobs_accepted_total 1",
        "http_request_duration_seconds_bucket",
    ] {
        assert!(
            ingest_metrics.contains(name),
            "ingest /metrics lacks {name}:\n{ingest_metrics}"
        );
    }
    let results_metrics = metrics(results_port).await;
    for name in [
        "sluice_job_end_to_end_seconds_count 1",
        "sluice_sse_connections",
        "sluice_results_write_duration_seconds_bucket",
        "sluice_results_batch_events_count",
    ] {
        assert!(
            results_metrics.contains(name),
            "results /metrics lacks {name}:\n{results_metrics}"
        );
    }
    let worker_metrics = wait_until("worker consumer lag", Duration::from_secs(20), || async {
        let text = metrics(worker_port).await;
        text.contains("sluice_consumer_lag{").then_some(text)
    })
    .await;
    for name in [
        r#"sluice_model_request_duration_seconds_count{model="sim",outcome="ok"} 1"#,
        r#"sluice_jobs_finished_total{status="succeeded"} 1"#,
        "sluice_job_queue_wait_seconds_count 1",
        "sluice_worker_in_flight",
        "sluice_worker_window_occupancy",
        r#"sluice_circuit_state{backend="default"} 0"#,
        "# HELP sluice_consumer_lag",
    ] {
        assert!(
            worker_metrics.contains(name),
            "worker /metrics lacks {name}:\n{worker_metrics}"
        );
    }

    for process in [ingest, worker, results] {
        let name = process.name.clone();
        assert!(
            process.terminate(Duration::from_secs(30)).await,
            "{name} stops cleanly"
        );
    }
    stop.cancel();
}
