//! Fairness between users through the whole pipeline: a light user is not stuck behind a heavy
//! user's burst on the same partition.

use rdkafka::producer::FutureRecord;
use sluice_schemas::RequestEvent;
use sluice_tests::{Pipeline, PipelineOptions};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_light_user_behind_a_heavy_burst_on_the_same_partition_finishes_long_before_it() {
    let mut options = PipelineOptions {
        partitions: 1,
        max_in_flight: 16,
        per_user_in_flight: 4,
        ..Default::default()
    };
    options.sim.service_time_ms = 20;
    options.sim.capacity = 200;
    let pipeline = Pipeline::start(options).await;

    // The heavy user publishes straight to Kafka, as high-volume producers do.
    let producer = pipeline.producer();
    let heavy: Vec<RequestEvent> = (0..2000)
        .map(|index| sluice_tests::chat_event("heavy", &format!("burst {index}"), 300_000))
        .collect();
    let sends = heavy.iter().map(|event| {
        let payload = event.encode();
        let producer = &producer;
        let topic = &pipeline.topics.requests;
        async move {
            let record = FutureRecord::to(topic).key("heavy").payload(&payload);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .expect("publishing the burst");
        }
    });
    futures::future::join_all(sends).await;

    let submitted = Instant::now();
    let light = pipeline.submit("light", "just one").await.job_id.as_uuid();
    pipeline
        .wait_terminal(&[light], Duration::from_secs(60))
        .await;
    let light_latency = submitted.elapsed();
    let heavy_ids: Vec<Uuid> = heavy.iter().map(|event| event.job_id.as_uuid()).collect();
    let heavy_done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND status_rank = 2")
            .bind(&heavy_ids)
            .fetch_one(&pipeline.database.pool)
            .await
            .unwrap();
    let light_job = pipeline.job(light).await.unwrap();
    println!(
        "fairness: light job terminal in Postgres {} ms after submission (queue wait {} ms, run {} ms at the worker); {heavy_done} of 2000 heavy jobs were done then",
        light_latency.as_millis(),
        light_job["timings"]["queue_wait_ms"],
        light_job["timings"]["run_ms"]
    );
    assert!(
        heavy_done < 1000,
        "the light job waited for {heavy_done} heavy jobs"
    );

    pipeline
        .wait_terminal(&heavy_ids, Duration::from_secs(120))
        .await;
    let stats = pipeline.sim_stats.snapshot();
    assert_eq!(stats.calls, 2001);
    assert!(stats.peak_open <= 16);
    pipeline.stop().await;
}
