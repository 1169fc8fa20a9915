//! The three services together against the real broker and Postgres.

use rdkafka::Message;
use rdkafka::message::Headers;
use rdkafka::producer::FutureRecord;
use serde_json::Value;
use sluice_schemas::{JobStatus, StatusEvent};
use sluice_tests::infra::read_topic;
use sluice_tests::{Pipeline, PipelineOptions, read_sse, wait_until};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_jobs_over_twenty_users_each_succeed_exactly_once() {
    let pipeline = Pipeline::start(PipelineOptions {
        partitions: 12,
        ..Default::default()
    })
    .await;
    let started = Instant::now();
    let submissions = (0..500).map(|index| {
        let pipeline = &pipeline;
        async move {
            let user = format!("user-{}", index % 20);
            let content = format!("job number {index}");
            let accepted = pipeline.submit(&user, &content).await;
            (accepted.job_id.as_uuid(), format!("echo: {content}"))
        }
    });
    let expected: HashMap<Uuid, String> = futures::future::join_all(submissions)
        .await
        .into_iter()
        .collect();
    let submitted_in = started.elapsed();
    let ids: Vec<Uuid> = expected.keys().copied().collect();
    pipeline.wait_terminal(&ids, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    println!(
        "500 jobs: submitted in {:.2} s, all terminal after {:.2} s ({:.0} jobs/s end to end)",
        submitted_in.as_secs_f64(),
        elapsed.as_secs_f64(),
        500.0 / elapsed.as_secs_f64()
    );

    let rows: Vec<(Uuid, String, Option<Value>)> =
        sqlx::query_as("SELECT job_id, status, output FROM jobs")
            .fetch_all(&pipeline.database.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 500, "one row per job, no more");
    for (job_id, status, output) in rows {
        assert_eq!(status, "succeeded", "job {job_id}");
        assert_eq!(
            output.unwrap()["content"].as_str().unwrap(),
            expected[&job_id]
        );
    }
    let terminal_events: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT job_id, count(*) FROM job_events WHERE status = 'succeeded' GROUP BY job_id",
    )
    .fetch_all(&pipeline.database.pool)
    .await
    .unwrap();
    assert_eq!(terminal_events.len(), 500);
    assert!(
        terminal_events.iter().all(|(_, count)| *count == 1),
        "each job recorded succeeded exactly once"
    );
    assert_eq!(
        pipeline.sim_stats.snapshot().calls,
        500,
        "one model call per job"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_shows_queued_running_succeeded_in_order_and_resumes_after_last_event_id() {
    let mut options = PipelineOptions::default();
    options.sim.service_time_ms = 300;
    let pipeline = Pipeline::start(options).await;
    let accepted = pipeline.submit("sse-user", "stream me").await;

    // Opened right after the 202, usually before the results service has seen the job.
    let events_url = format!(
        "{}/v1/jobs/{}/events",
        pipeline.results_url, accepted.job_id
    );
    assert_eq!(accepted.events_url, events_url);
    let response = pipeline.http.get(&events_url).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (events, _) = read_sse(response, Duration::from_secs(30)).await;
    let names: Vec<_> = events
        .iter()
        .map(|event| event.event.clone().unwrap())
        .collect();
    assert_eq!(names, ["queued", "running", "succeeded"]);
    let ids: Vec<_> = events
        .iter()
        .map(|event| event.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["1", "2", "3"]);
    let last: Value = serde_json::from_str(&events[2].data).unwrap();
    assert_eq!(last["output"]["content"], "echo: stream me");
    assert_eq!(last["status"], "succeeded");
    assert_eq!(
        pipeline.job(accepted.job_id).await.unwrap(),
        last,
        "GET and the last SSE event agree"
    );

    let resumed = pipeline
        .http
        .get(&events_url)
        .header("Last-Event-ID", "1")
        .send()
        .await
        .unwrap();
    let (events, _) = read_sse(resumed, Duration::from_secs(10)).await;
    let names: Vec<_> = events
        .iter()
        .map(|event| event.event.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        ["running", "succeeded"],
        "resumes after event 1 without repeating it"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_backend_fails_the_job_with_its_message() {
    let mut options = PipelineOptions::default();
    options.sim.failure_rate = 1.0;
    options.sim.failure_status = 503;
    let pipeline = Pipeline::start(options).await;
    let accepted = pipeline.submit("unlucky", "will fail").await;
    pipeline
        .wait_terminal(&[accepted.job_id.as_uuid()], Duration::from_secs(30))
        .await;
    let job = pipeline.job(accepted.job_id).await.unwrap();
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "backend_error");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("503") && message.contains("simulated failure"),
        "{message}"
    );
    assert!(job["output"].is_null());
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_backend_fails_the_job_instead_of_leaving_it_stuck() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let options = PipelineOptions {
        model_base_url: Some(format!("http://{closed_port}")),
        ..Default::default()
    };
    let pipeline = Pipeline::start(options).await;
    let accepted = pipeline.submit("nobody-home", "hello?").await;
    pipeline
        .wait_terminal(&[accepted.job_id.as_uuid()], Duration::from_secs(30))
        .await;
    let job = pipeline.job(accepted.job_id).await.unwrap();
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "backend_unreachable");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_status_event_changes_nothing() {
    let pipeline = Pipeline::start(PipelineOptions::default()).await;
    let first = pipeline.submit("replayer", "original").await;
    pipeline
        .wait_terminal(&[first.job_id.as_uuid()], Duration::from_secs(30))
        .await;
    let before = pipeline.job(first.job_id).await.unwrap();

    // Replay every status event of the job, in reverse order, twice.
    let records = read_topic(&pipeline.topics.status, 4, 2, Duration::from_secs(10));
    let producer = pipeline.producer();
    for _ in 0..2 {
        for record in records.iter().rev() {
            let delivery = FutureRecord::to(&pipeline.topics.status)
                .key(record.key().unwrap())
                .payload(record.payload().unwrap());
            producer
                .send(delivery, Duration::from_secs(5))
                .await
                .expect("replaying");
        }
    }
    // A later job of the same user lands on the same partitions, so once it is recorded the
    // replays before it have been applied.
    let second = pipeline.submit("replayer", "after the replay").await;
    pipeline
        .wait_terminal(&[second.job_id.as_uuid()], Duration::from_secs(30))
        .await;

    assert_eq!(pipeline.job(first.job_id).await.unwrap(), before);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events WHERE job_id = $1")
        .bind(first.job_id.as_uuid())
        .fetch_one(&pipeline.database.pool)
        .await
        .unwrap();
    assert_eq!(events, 3, "queued, running, succeeded and nothing more");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_dead_lettered_and_the_next_job_still_completes() {
    let pipeline = Pipeline::start(PipelineOptions::default()).await;
    let producer = pipeline.producer();
    let poison = FutureRecord::to(&pipeline.topics.requests)
        .key("poisoner")
        .payload("{\"schema_version\": 1, \"oops\": true}");
    producer
        .send(poison, Duration::from_secs(5))
        .await
        .expect("publishing the poison event");
    let accepted = pipeline.submit("poisoner", "still works").await;
    pipeline
        .wait_terminal(&[accepted.job_id.as_uuid()], Duration::from_secs(30))
        .await;
    assert_eq!(
        pipeline.job(accepted.job_id).await.unwrap()["status"],
        "succeeded"
    );

    let dead = read_topic(&pipeline.topics.requests_dlq, 4, 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    let record = &dead[0];
    assert_eq!(
        record.payload().unwrap(),
        b"{\"schema_version\": 1, \"oops\": true}"
    );
    assert_eq!(record.key().unwrap(), b"poisoner");
    let headers: HashMap<String, String> = record
        .headers()
        .unwrap()
        .iter()
        .map(|header| {
            (
                header.key.to_owned(),
                String::from_utf8_lossy(header.value.unwrap()).into_owned(),
            )
        })
        .collect();
    assert!(
        headers["dlq-reason"].starts_with("invalid_field: "),
        "{headers:?}"
    );
    assert!(
        headers["dlq-reason"].contains("job_id"),
        "names the missing field: {headers:?}"
    );
    assert_eq!(headers["dlq-source-topic"], pipeline.topics.requests);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_model_never_sees_more_than_max_in_flight_calls() {
    let mut options = PipelineOptions {
        max_in_flight: 4,
        ..Default::default()
    };
    options.sim.service_time_ms = 150;
    options.sim.capacity = 100;
    let pipeline = Pipeline::start(options).await;
    let submissions = (0..40).map(|index| {
        let pipeline = &pipeline;
        async move {
            pipeline
                .submit(&format!("busy-{}", index % 8), &format!("slow {index}"))
                .await
                .job_id
                .as_uuid()
        }
    });
    let ids: Vec<Uuid> = futures::future::join_all(submissions).await;
    pipeline.wait_terminal(&ids, Duration::from_secs(60)).await;
    let stats = pipeline.sim_stats.snapshot();
    assert_eq!(stats.calls, 40);
    assert!(
        stats.peak_open <= 4,
        "the model saw {} calls at once",
        stats.peak_open
    );
    assert!(
        stats.peak_open >= 2,
        "the window was used ({} at once)",
        stats.peak_open
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_the_services_produce_validates_against_the_schema_files() {
    let pipeline = Pipeline::start(PipelineOptions::default()).await;
    let mut ids = Vec::new();
    for index in 0..5 {
        ids.push(
            pipeline
                .submit(&format!("schema-{index}"), "validate me")
                .await
                .job_id
                .as_uuid(),
        );
    }
    pipeline.wait_terminal(&ids, Duration::from_secs(30)).await;

    let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let load = |name: &str| -> jsonschema::Validator {
        let schema: Value =
            serde_json::from_str(&std::fs::read_to_string(schemas.join(name)).unwrap()).unwrap();
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap()
    };
    let (request_schema, status_schema) = (load("request.schema.json"), load("status.schema.json"));
    let requests = read_topic(&pipeline.topics.requests, 4, 5, Duration::from_secs(10));
    let statuses = read_topic(&pipeline.topics.status, 4, 10, Duration::from_secs(10));
    assert_eq!(
        (requests.len(), statuses.len()),
        (5, 10),
        "one request and two status events per job"
    );
    for (records, schema) in [(&requests, &request_schema), (&statuses, &status_schema)] {
        for record in records {
            let json: Value = serde_json::from_slice(record.payload().unwrap()).unwrap();
            let errors: Vec<String> = schema
                .iter_errors(&json)
                .map(|error| error.to_string())
                .collect();
            assert!(errors.is_empty(), "{json} is invalid: {errors:?}");
            assert_eq!(
                record.key().unwrap(),
                json["user_id"].as_str().unwrap().as_bytes(),
                "keyed by user id"
            );
        }
    }
    let statuses: Vec<JobStatus> = statuses
        .iter()
        .map(|record| {
            StatusEvent::decode(record.payload().unwrap())
                .unwrap()
                .status
        })
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|status| **status == JobStatus::Running)
            .count(),
        5
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_and_health_answer_on_every_service() {
    let pipeline = Pipeline::start(PipelineOptions::default()).await;
    let services = [&pipeline.ingest_url, &pipeline.results_url]
        .into_iter()
        .chain(&pipeline.worker_urls);
    for url in services {
        for path in ["/healthz", "/readyz"] {
            let response = pipeline
                .http
                .get(format!("{url}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{url}{path}");
        }
    }
    for url in [&pipeline.ingest_url, &pipeline.results_url] {
        let openapi: Value = pipeline
            .http
            .get(format!("{url}/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(openapi["paths"]["/v1/jobs"].is_object());
    }
    let unknown = pipeline.job(Uuid::now_v7()).await;
    assert!(unknown.is_none(), "an unknown job is 404");
    let waited = wait_until("sim health", Duration::from_secs(5), || async {
        pipeline
            .http
            .get(format!("{}/healthz", pipeline.sim_url))
            .send()
            .await
            .ok()
            .map(|response| response.status())
    })
    .await;
    assert_eq!(waited, 200);
    pipeline.stop().await;
}
