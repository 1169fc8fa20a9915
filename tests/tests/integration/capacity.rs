//! Capacity-aware admission through the whole pipeline: with a backlog the workers cannot clear
//! before a job's deadline, ingest refuses the job at once (`503 deadline_unreachable` with
//! `Retry-After`) and still accepts one whose deadline leaves room; every accepted job ends.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::{Pipeline, PipelineOptions, chat_event};
use std::time::{Duration, Instant};
use uuid::Uuid;

async fn post(pipeline: &Pipeline, content: &str, timeout_ms: u64) -> reqwest::Response {
    let body = json!({
        "user_id": "probe",
        "model": "sim",
        "messages": [{"role": "user", "content": content}],
        "timeout_ms": timeout_ms,
    });
    pipeline.post_job(&body).await
}

fn job_id(body: &Value) -> Uuid {
    body["job_id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_deadline_the_backlog_would_pass_is_refused_at_once() {
    let mut options = PipelineOptions {
        partitions: 2,
        max_in_flight: 4,
        per_user_in_flight: 4,
        ..Default::default()
    };
    // Four calls at once of 200 ms: the pipeline finishes 20 jobs a second.
    options.sim.service_time_ms = 200;
    options.sim.capacity = 4;
    let pipeline = Pipeline::start(options).await;

    // A producer publishes 240 jobs straight to Kafka: twelve seconds of work.
    let backlog: Vec<_> = (0..240)
        .map(|index| chat_event("bulk", &format!("bulk {index}"), 120_000))
        .collect();
    pipeline.publish(&pipeline.topics.requests, &backlog).await;

    // Jobs with 4 s deadlines are admitted until ingest has measured the workers' throughput
    // (a second or two of readings), then refused: the backlog needs far more than 4 s.
    let started = Instant::now();
    let mut accepted = Vec::new();
    let refusal = loop {
        let response = post(&pipeline, &format!("probe {}", accepted.len()), 4_000).await;
        match response.status() {
            StatusCode::ACCEPTED => {
                accepted.push(job_id(&response.json().await.unwrap()));
            }
            StatusCode::SERVICE_UNAVAILABLE => break response,
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no job was refused within 15 s of a 12 s backlog ({} accepted)",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let retry_after: u64 = refusal.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = refusal.json().await.unwrap();
    assert_eq!(body["error"]["code"], "deadline_unreachable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("deadline") && message.contains("jobs"),
        "{message}"
    );
    assert!(retry_after >= 1, "Retry-After {retry_after}");

    // At the same moment a job whose deadline leaves room for the backlog is accepted.
    let roomy = post(&pipeline, "room to wait", 120_000).await;
    assert_eq!(roomy.status(), StatusCode::ACCEPTED);
    let roomy = job_id(&roomy.json().await.unwrap());
    println!(
        "capacity: refused after {:.1} s with {} probes accepted; Retry-After {retry_after} s; {message}",
        started.elapsed().as_secs_f64(),
        accepted.len()
    );

    // Every accepted job ends, and the roomy one with its answer.
    let mut every: Vec<Uuid> = backlog.iter().map(|event| event.job_id.as_uuid()).collect();
    every.extend(&accepted);
    every.push(roomy);
    pipeline
        .wait_terminal(&every, Duration::from_secs(60))
        .await;
    let roomy = pipeline.job(roomy).await.unwrap();
    assert_eq!(roomy["status"], "succeeded", "{roomy}");
    pipeline.stop().await;
}
