//! Webhooks under faults: a slow receiver beside a fast one, the private-network guard, and the
//! webhooks service SIGKILLed in the middle of its deliveries.

use crate::webhooks::{Received, Receiver, delivery_in_state, options, submit};
use serde_json::{Value, json};
use sluice_tests::{Pipeline, PipelineOptions, wait_until};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_receiver_does_not_delay_deliveries_to_another_host() {
    let pipeline = Pipeline::start(options()).await;
    // Two hosts: 127.0.0.1 answers after 5 s, 127.0.0.2 at once.
    let (slow, slow_url) = Receiver::start("127.0.0.1:0", Duration::from_secs(5)).await;
    let (fast, fast_url) = Receiver::start("127.0.0.2:0", Duration::ZERO).await;
    for index in 0..20 {
        submit(
            &pipeline,
            "busy",
            &format!("slow {index}"),
            json!({"url": slow_url}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for index in 0..5 {
        submit(
            &pipeline,
            "quick",
            &format!("fast {index}"),
            json!({"url": fast_url}),
        )
        .await;
    }
    let got = wait_until("the fast host's five", Duration::from_secs(30), || async {
        let got = fast.got();
        (got.len() >= 5).then_some(got)
    })
    .await;
    let took = got
        .iter()
        .map(|received| received.at.duration_since(started))
        .max()
        .unwrap();
    println!(
        "fast host: 5 deliveries within {took:?}; slow host so far: {}",
        slow.got().len()
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        slow.got().len() < 20,
        "the slow host is still being worked through"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guard_refuses_internal_addresses_at_submit_and_at_delivery() {
    let pipeline = Pipeline::start(PipelineOptions {
        webhook_guard: true,
        ..options()
    })
    .await;
    for url in [
        "https://127.0.0.1/",
        "https://[::ffff:127.0.0.1]/",
        "https://169.254.169.254/latest/meta-data",
    ] {
        let response = pipeline
            .http
            .post(format!("{}/v1/jobs", pipeline.ingest_url))
            .json(&json!({"user_id": "u", "model": "sim", "webhook": {"url": url}, "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{url}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_field");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("webhook.url"),
            "{body}"
        );
    }
    // A name that resolves to loopback passes the submit check and is refused where it resolves.
    let job = submit(
        &pipeline,
        "u",
        "by name",
        json!({"url": "http://localhost:9/hooks"}),
    )
    .await;
    let row = delivery_in_state(&pipeline, &job, "failed").await;
    let error = row["last_error"].as_str().unwrap();
    assert!(
        error.contains("private-network guard") && error.contains("loopback"),
        "{error}"
    );
    assert_eq!(row["attempts"], 1, "a refusal is not retried");

    // A producer publishing straight to Kafka skips ingest's check: a literal address is refused
    // at delivery too.
    let job_id = sluice_schemas::JobId::new();
    let now = chrono::Utc::now();
    let event = json!({
        "schema_version": 1, "job_id": job_id, "user_id": "producer", "model": "sim",
        "messages": [{"role": "user", "content": "straight to Kafka"}],
        "submitted_at": now, "deadline": now + chrono::Duration::seconds(60),
        "webhook": {"url": "https://[::ffff:127.0.0.1]/hooks"},
    });
    let payload = event.to_string();
    pipeline
        .producer()
        .send(
            rdkafka::producer::FutureRecord::to(&pipeline.topics.requests)
                .key("producer")
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .expect("publishing a request event");
    let job = job_id.to_string();
    let row = delivery_in_state(&pipeline, &job, "failed").await;
    let error = row["last_error"].as_str().unwrap();
    assert!(
        error.contains("private-network guard") && error.contains("127.0.0.1"),
        "{error}"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhooks_service_killed_mid_delivery_loses_nothing() {
    // The pipeline in process; the webhooks service as a process, to be SIGKILLed.
    let pipeline = Pipeline::start(PipelineOptions::default()).await;
    // 100 ms a request, four at a time: about 40 deliveries a second, so the kill lands mid-way.
    let (receiver, url) = Receiver::start("127.0.0.1:0", Duration::from_millis(100)).await;
    let topics = &pipeline.topics;
    let process_env = || -> HashMap<String, String> {
        let port = sluice_tests::process::free_port();
        let mut env = topics.process_env();
        env.extend(
            [
                ("SLUICE_WEBHOOKS_ADDR", format!("127.0.0.1:{port}")),
                ("DATABASE_URL", pipeline.database.url.clone()),
                ("KAFKA_BROKERS", pipeline.kafka.brokers.clone()),
                (
                    "SLUICE_WEBHOOK_SECRET_KEY",
                    sluice_tests::TEST_WEBHOOK_KEY.to_owned(),
                ),
                ("SLUICE_WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true".to_owned()),
                ("SLUICE_WEBHOOK_RETRY_SCHEDULE_MS", "100,200,400".to_owned()),
                ("SLUICE_WEBHOOK_POLL_MS", "20".to_owned()),
                // Leases of 2 x 2 s + 5 s: what the killed one held is free again within 9 s.
                ("SLUICE_WEBHOOK_TIMEOUT_MS", "2000".to_owned()),
            ]
            .map(|(key, value)| (key.to_owned(), value)),
        );
        env
    };
    let first = sluice_tests::process::ServiceProcess::spawn(
        "sluice-webhooks",
        "webhooks-first",
        &process_env(),
    );
    let mut jobs = HashSet::new();
    for index in 0..300 {
        jobs.insert(
            submit(
                &pipeline,
                &format!("kill-user-{}", index % 10),
                &format!("job {index}"),
                json!({"url": url}),
            )
            .await,
        );
    }
    wait_until("a third delivered", Duration::from_secs(60), || async {
        (receiver.got().len() >= 100).then_some(())
    })
    .await;
    let at_kill = receiver.got().len();
    first.kill().await;
    let second = sluice_tests::process::ServiceProcess::spawn(
        "sluice-webhooks",
        "webhooks-second",
        &process_env(),
    );
    let delivered_jobs = |got: &[Received]| -> HashSet<String> {
        got.iter()
            .map(|received| {
                let body: Value = serde_json::from_str(&received.body).unwrap();
                body["data"]["job_id"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let got = wait_until(
        "every job's event delivered after the kill",
        Duration::from_secs(120),
        || async {
            let got = receiver.got();
            (delivered_jobs(&got) == jobs).then_some(got)
        },
    )
    .await;
    let duplicates = got.len() - jobs.len();
    println!(
        "killed after {at_kill} deliveries; 300 events delivered, {duplicates} of them twice (at least once)"
    );
    let (delivered,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
            .fetch_one(&pipeline.database.pool)
            .await
            .unwrap();
    assert_eq!(delivered, 300);
    assert!(
        second.terminate(Duration::from_secs(20)).await,
        "a clean stop after the restart"
    );
    pipeline.stop().await;
}

/// One host with every slot taken is leased only what its slots and its queue can take, and each
/// attempt's outcome is written once: a delivery's row is written twice (leased, then its
/// outcome). Leasing whatever was due and giving back what the host could not take wrote each
/// row given back once more, on every delivery's end (3.3 writes a delivery at 600/s in the
/// bench; here 2,024 writes for the 120 deliveries, against 240 now).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_host_is_leased_only_what_it_can_take() {
    const JOBS: i64 = 120;
    let pipeline = Pipeline::start(options()).await;
    // 4 slots of 200 ms: 20 deliveries a second, so the host stays busy with a queue behind it.
    let (receiver, url) = Receiver::start("127.0.0.1:0", Duration::from_millis(200)).await;
    for index in 0..JOBS {
        submit(
            &pipeline,
            &format!("user-{}", index % 10),
            &format!("busy {index}"),
            json!({"url": url}),
        )
        .await;
    }
    wait_until("every delivery", Duration::from_secs(60), || async {
        (receiver.got().len() >= JOBS as usize).then_some(())
    })
    .await;
    // Postgres publishes each backend's row counts about once a second while it is busy: wait
    // until the two writes of every delivery are counted, then for what was still pending.
    let pool = &pipeline.database.pool;
    let updates = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'webhook_deliveries'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    wait_until("the writes counted", Duration::from_secs(30), || async {
        (updates().await >= 2 * JOBS).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = updates().await;
    println!("{JOBS} deliveries to one busy host: {written} row writes");
    // The first lease, before the host was busy, may give back up to one poll's worth.
    assert!(
        written <= 2 * JOBS + 64,
        "{written} writes for {JOBS} deliveries"
    );
    let got = receiver.got();
    let distinct: HashSet<&str> = got
        .iter()
        .map(|received| received.headers["webhook-id"].as_str())
        .collect();
    assert_eq!(distinct.len(), JOBS as usize, "each delivered once");
    pipeline.stop().await;
}
