//! Priority lanes through the whole pipeline: interactive jobs submitted at a steady rate behind
//! a batch backlog wait about as long as on an idle pipeline, while the backlog drains with the
//! capacity left over; `priority` (and OpenAI's `service_tier`) choose the lane, and a tier
//! without the interactive lane puts its jobs in the batch lane.

use rdkafka::Message;
use serde_json::{Value, json};
use sluice_schemas::Priority;
use sluice_tests::infra::read_topic;
use sluice_tests::{Pipeline, PipelineOptions};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Submits `count` interactive jobs at `per_sec`, each for its own user, and returns their ids.
async fn interactive_jobs(
    pipeline: &Pipeline,
    label: &str,
    count: usize,
    per_sec: u64,
) -> Vec<Uuid> {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_sec));
    let mut ids = Vec::new();
    for index in 0..count {
        tick.tick().await;
        let accepted = pipeline
            .submit(
                &format!("{label}-{index}"),
                &format!("{label} question {index}"),
            )
            .await;
        ids.push(accepted.job_id.as_uuid());
    }
    ids
}

/// The jobs' queue waits (ms), sorted.
async fn queue_waits(pipeline: &Pipeline, ids: &[Uuid]) -> Vec<u64> {
    let mut waits = Vec::new();
    for id in ids {
        let job = pipeline.job(id).await.expect("a finished job");
        waits.push(
            job["timings"]["queue_wait_ms"]
                .as_u64()
                .expect("a queue wait"),
        );
    }
    waits.sort_unstable();
    waits
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn finished_batch(pipeline: &Pipeline) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE user_id LIKE 'bulk-%' AND status_rank = 2")
        .fetch_one(&pipeline.database.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interactive_jobs_behind_a_batch_backlog_wait_as_on_an_idle_pipeline() {
    let mut options = PipelineOptions {
        max_in_flight: 8,
        per_user_in_flight: 8,
        ..Default::default()
    };
    // Eight calls of 50 ms at once: 160 jobs a second.
    options.sim.service_time_ms = 50;
    options.sim.capacity = 100;
    let pipeline = Pipeline::start(options).await;

    let idle = interactive_jobs(&pipeline, "idle", 30, 10).await;
    pipeline.wait_terminal(&idle, Duration::from_secs(30)).await;
    let idle_waits = queue_waits(&pipeline, &idle).await;

    // 3,000 batch jobs straight to the batch lane's topic: about 19 s of work.
    let backlog: Vec<_> = (0..3000)
        .map(|index| {
            let mut event = sluice_tests::chat_event(
                &format!("bulk-{}", index % 20),
                &format!("bulk {index}"),
                600_000,
            );
            event.priority = Priority::Batch;
            event
        })
        .collect();
    pipeline
        .publish(&pipeline.topics.batch_requests, &backlog)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = finished_batch(&pipeline).await;
    let started = Instant::now();
    let busy = interactive_jobs(&pipeline, "busy", 60, 10).await;
    let batch_rate =
        (finished_batch(&pipeline).await - before) as f64 / started.elapsed().as_secs_f64();
    pipeline.wait_terminal(&busy, Duration::from_secs(30)).await;
    let busy_waits = queue_waits(&pipeline, &busy).await;
    let batch_left = 3000 - finished_batch(&pipeline).await;
    println!(
        "lanes: interactive queue wait idle p50 {} ms p99 {} ms; behind the batch backlog p50 {} ms p99 {} ms; batch drained at {batch_rate:.0}/s meanwhile ({batch_left} left)",
        percentile(&idle_waits, 0.5),
        percentile(&idle_waits, 0.99),
        percentile(&busy_waits, 0.5),
        percentile(&busy_waits, 0.99),
    );
    let idle_p99 = percentile(&idle_waits, 0.99);
    assert!(
        percentile(&busy_waits, 0.99) <= (idle_p99 * 5).max(250),
        "interactive p99 {busy_waits:?} against idle {idle_waits:?}"
    );
    assert!(
        batch_left > 0,
        "the backlog must still be there for the comparison to mean anything"
    );
    // 160/s of capacity less 10/s of interactive work.
    assert!(
        batch_rate > 100.0,
        "the batch lane drained at {batch_rate:.0}/s"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lane_is_asked_for_capped_by_the_tier_and_taken_from_service_tier() {
    let pipeline = Pipeline::start(PipelineOptions {
        tiers: Some(
            r#"{"default": {"rate_per_sec": 1000, "burst": 1000}, "bulk": {"rate_per_sec": 1000, "burst": 1000, "interactive": false}}"#
                .into(),
        ),
        api_keys: true,
        openai_models: vec!["sim".into()],
        ..Default::default()
    })
    .await;
    let (_, default_key) = pipeline.create_key("ada", "default").await;
    let (_, bulk_key) = pipeline.create_key("bob", "bulk").await;
    let submit = |key: String, body: Value| {
        let http = pipeline.http.clone();
        let url = format!("{}/v1/jobs", pipeline.ingest_url);
        async move {
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            response.json::<Value>().await.unwrap()
        }
    };
    let chat = |priority: Option<&str>| {
        let mut body = json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}]});
        if let Some(priority) = priority {
            body["priority"] = priority.into();
        }
        body
    };
    let asked = submit(default_key.clone(), chat(Some("batch"))).await;
    assert_eq!(asked["priority"], "batch");
    let plain = submit(default_key.clone(), chat(None)).await;
    assert_eq!(plain["priority"], "interactive");
    let capped = submit(bulk_key.clone(), chat(Some("interactive"))).await;
    assert_eq!(
        capped["priority"], "batch",
        "the bulk tier has no interactive lane"
    );

    // Each went to its lane's topic.
    let batch = read_topic(
        &pipeline.topics.batch_requests,
        4,
        2,
        Duration::from_secs(10),
    );
    let interactive = read_topic(&pipeline.topics.requests, 4, 1, Duration::from_secs(10));
    let ids = |records: &[rdkafka::message::OwnedMessage]| -> Vec<String> {
        records
            .iter()
            .map(|record| {
                let event: Value = serde_json::from_slice(record.payload().unwrap()).unwrap();
                event["job_id"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let batch_ids = ids(&batch);
    assert!(batch_ids.contains(&asked["job_id"].as_str().unwrap().to_owned()));
    assert!(batch_ids.contains(&capped["job_id"].as_str().unwrap().to_owned()));
    assert_eq!(
        ids(&interactive),
        [plain["job_id"].as_str().unwrap().to_owned()]
    );

    // OpenAI's flex processing is the batch lane; the job still answers.
    let chat = |service_tier: &str| {
        pipeline
            .http
            .post(format!("{}/v1/chat/completions", pipeline.ingest_url))
            .bearer_auth(&default_key)
            .json(&json!({"model": "sim", "service_tier": service_tier, "messages": [{"role": "user", "content": service_tier}]}))
            .send()
    };
    assert_eq!(chat("flex").await.unwrap().status(), 200);
    let flex = read_topic(
        &pipeline.topics.batch_requests,
        4,
        3,
        Duration::from_secs(10),
    );
    assert_eq!(flex.len(), 3);
    let wrong = chat("fastest").await.unwrap();
    assert_eq!(wrong.status(), 400);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["param"], "service_tier", "{body}");
    pipeline.stop().await;
}
