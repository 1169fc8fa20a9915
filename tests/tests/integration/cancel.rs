//! `DELETE /v1/jobs/{id}` through the whole pipeline: a running job's model call is aborted, a
//! queued job is skipped, a finished job is left alone.

use serde_json::Value;
use sluice_tests::{Pipeline, PipelineOptions, wait_until};
use std::time::Duration;

async fn delete(pipeline: &Pipeline, job_id: impl std::fmt::Display) -> (u16, Value) {
    let response = pipeline
        .http
        .delete(format!("{}/v1/jobs/{job_id}", pipeline.results_url))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn wait_status(
    pipeline: &Pipeline,
    job_id: impl std::fmt::Display + Copy,
    status: &str,
) -> Value {
    wait_until(
        &format!("job {job_id} to be {status}"),
        Duration::from_secs(30),
        || async {
            pipeline
                .job(job_id)
                .await
                .filter(|job| job["status"] == status)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_running_job_aborts_the_model_call() {
    let mut options = PipelineOptions::default();
    options.sim.service_time_ms = 20_000;
    let pipeline = Pipeline::start(options).await;
    let job_id = pipeline.submit("canceller", "take your time").await.job_id;
    wait_status(&pipeline, job_id, "running").await;
    wait_until(
        "the model call to be open",
        Duration::from_secs(10),
        || async { (pipeline.sim_stats.snapshot().open == 1).then_some(()) },
    )
    .await;

    let (status, body) = delete(&pipeline, job_id).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("cancelling")));
    let job = wait_status(&pipeline, job_id, "cancelled").await;
    assert_eq!(job["error"]["code"], "cancelled");
    assert_eq!(job["attempt"], 1);
    let disconnected = wait_until(
        "the model to see the disconnect",
        Duration::from_secs(10),
        || async {
            let stats = pipeline.sim_stats.snapshot();
            (stats.disconnected == 1 && stats.open == 0).then_some(stats.disconnected)
        },
    )
    .await;
    assert_eq!(disconnected, 1);

    let names = pipeline.event_names(job_id).await;
    assert_eq!(names, ["queued", "running", "cancelled"]);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_queued_job_skips_it_without_a_model_call() {
    let mut options = PipelineOptions {
        max_in_flight: 1,
        per_user_in_flight: 1,
        ..Default::default()
    };
    options.sim.service_time_ms = 3_000;
    let pipeline = Pipeline::start(options).await;
    let first = pipeline.submit("patient", "first").await.job_id;
    let second = pipeline.submit("patient", "second").await.job_id;
    wait_status(&pipeline, first, "running").await;
    wait_status(&pipeline, second, "queued").await;

    let (status, _) = delete(&pipeline, second).await;
    assert_eq!(status, 202);
    let job = wait_status(&pipeline, second, "cancelled").await;
    assert_eq!(job["attempt"], 0, "never called");
    wait_status(&pipeline, first, "succeeded").await;
    assert_eq!(
        pipeline.sim_stats.snapshot().calls,
        1,
        "only the first job reached the model"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_finished_or_unknown_job_changes_nothing_and_says_so() {
    let pipeline = Pipeline::start(PipelineOptions::default()).await;
    let job_id = pipeline.submit("done-already", "quick").await.job_id;
    let before = wait_status(&pipeline, job_id, "succeeded").await;
    let (status, body) = delete(&pipeline, job_id).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("job_finished"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already succeeded")
    );
    assert_eq!(pipeline.job(job_id).await.unwrap(), before);

    let (status, body) = delete(&pipeline, uuid::Uuid::now_v7()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("job_not_found"))
    );
    pipeline.stop().await;
}
