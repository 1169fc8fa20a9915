//! The shared response cache through the whole pipeline: a repeated request is answered at
//! submit time without a worker or a model, is still recorded, and a client can opt out.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::{Pipeline, PipelineOptions};
use std::time::Duration;

async fn post(pipeline: &Pipeline, no_cache: bool) -> (StatusCode, Value) {
    let body = json!({"user_id": "cachy", "model": "sim", "messages": [{"role": "user", "content": "what is 2+2"}]});
    let mut request = pipeline
        .http
        .post(format!("{}/v1/jobs", pipeline.ingest_url))
        .json(&body);
    if no_cache {
        request = request.header("Cache-Control", "no-cache");
    }
    let response = request.send().await.unwrap();
    (response.status(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_request_is_answered_from_the_shared_cache_at_submit_time() {
    let pipeline = Pipeline::start(PipelineOptions {
        redis: true,
        ..Default::default()
    })
    .await;
    let (status, first) = post(&pipeline, false).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let first_id = uuid::Uuid::parse_str(first["job_id"].as_str().unwrap()).unwrap();
    pipeline
        .wait_terminal(&[first_id], Duration::from_secs(30))
        .await;

    let (status, hit) = post(&pipeline, false).await;
    assert_eq!(status, StatusCode::OK, "a hit is answered at once: {hit}");
    assert_eq!(
        (hit["status"].as_str(), hit["output"]["cached"].as_bool()),
        (Some("succeeded"), Some(true))
    );
    assert_eq!(hit["output"]["content"], "echo: what is 2+2");
    let hit_id = uuid::Uuid::parse_str(hit["job_id"].as_str().unwrap()).unwrap();
    assert_ne!(
        hit_id, first_id,
        "a cached answer is still a job of its own"
    );
    pipeline
        .wait_terminal(&[hit_id], Duration::from_secs(30))
        .await;
    let recorded = pipeline.job(hit_id).await.unwrap();
    assert_eq!(
        (
            recorded["status"].as_str(),
            recorded["output"]["cached"].as_bool()
        ),
        (Some("succeeded"), Some(true))
    );
    let names = pipeline.event_names(hit_id).await;
    assert_eq!(names, ["queued", "succeeded"]);
    assert_eq!(
        pipeline.sim_stats.snapshot().calls,
        1,
        "the model answered once"
    );

    let (status, fresh) = post(&pipeline, true).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "Cache-Control: no-cache goes to the model"
    );
    let fresh_id = uuid::Uuid::parse_str(fresh["job_id"].as_str().unwrap()).unwrap();
    pipeline
        .wait_terminal(&[fresh_id], Duration::from_secs(30))
        .await;
    assert_eq!(
        pipeline.job(fresh_id).await.unwrap()["output"]["cached"],
        false
    );
    assert_eq!(pipeline.sim_stats.snapshot().calls, 2);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_identical_concurrent_submissions_cause_one_model_call() {
    let mut options = PipelineOptions::default();
    options.sim.service_time_ms = 500;
    let pipeline = Pipeline::start(options).await;
    let submissions =
        (0..50).map(|_| pipeline.submit("same-question", "what is the capital of France?"));
    let ids: Vec<uuid::Uuid> = futures::future::join_all(submissions)
        .await
        .into_iter()
        .map(|accepted| accepted.job_id.as_uuid())
        .collect();
    pipeline.wait_terminal(&ids, Duration::from_secs(60)).await;
    let succeeded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND job_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&pipeline.database.pool)
    .await
    .unwrap();
    assert_eq!(succeeded, 50);
    assert_eq!(
        pipeline.sim_stats.snapshot().calls,
        1,
        "one model call answered all fifty"
    );
    pipeline.stop().await;
}
