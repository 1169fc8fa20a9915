//! The OpenAI routes with real clients: the official OpenAI Python SDK (`tests/openai/
//! sdk_check.py`, from the virtualenv `scripts/test` fills) against a whole pipeline; and a
//! client that goes away mid-call cancelling the model call.

use crate::embedding::model_dir;
use serde_json::json;
use sluice_tests::{Pipeline, PipelineOptions, wait_until};
use std::time::Duration;

fn options() -> PipelineOptions {
    PipelineOptions {
        openai_models: vec!["sim".into(), "all-minilm-l6-v2".into()],
        ..PipelineOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_sdk_works_against_the_front_door() {
    // In CI a missing SDK is a failure like a missing broker: scripts/test provides it.
    let python = std::env::var("SLUICE_TEST_PYTHON")
        .expect("SLUICE_TEST_PYTHON: a python with the openai package (scripts/test sets it)");
    let mut sim = options().sim;
    // A token every 100 ms when streaming: the SDK checks see tokens arrive one by one.
    sim.token_time_ms = 100;
    let pipeline = Pipeline::start(PipelineOptions {
        sim,
        api_keys: true,
        embedding_model_dir: Some(model_dir()),
        tiers: Some(
            r#"{"default": {"rate_per_sec": 100000, "burst": 100000},
                "tiny": {"rate_per_sec": 1, "burst": 1}}"#
                .into(),
        ),
        ..options()
    })
    .await;
    let (_, key) = pipeline.create_key("sdk-user", "default").await;
    let (_, tiny_key) = pipeline.create_key("sdk-tiny", "tiny").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/openai/sdk_check.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .env("SLUICE_BASE_URL", format!("{}/v1", pipeline.ingest_url))
        .env("SLUICE_API_KEY", &key)
        .env("SLUICE_TINY_KEY", &tiny_key)
        .env("SLUICE_SIM_URL", &pipeline.sim_url)
        .output()
        .await
        .expect("running the OpenAI SDK checks");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("all OpenAI SDK checks passed"));
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_goes_away_cancels_its_job_unless_it_says_continue() {
    let mut options = options();
    options.sim.service_time_ms = 3_000;
    let pipeline = Pipeline::start(options).await;
    let url = format!("{}/v1/chat/completions", pipeline.ingest_url);
    let body = |content: &str| json!({"model": "sim", "user": "leaver", "messages": [{"role": "user", "content": content}]});
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1_000))
        .build()
        .unwrap();

    let gone = impatient.post(&url).json(&body("cancel me")).send().await;
    assert!(gone.is_err(), "the client gave up before the answer");
    wait_until(
        "the model call to be aborted",
        Duration::from_secs(30),
        || async { (pipeline.sim_stats.snapshot().disconnected >= 1).then_some(()) },
    )
    .await;

    let gone = impatient
        .post(&url)
        .header("x-sluice-on-disconnect", "continue")
        .json(&body("keep going"))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    wait_until(
        "the second call to be answered",
        Duration::from_secs(30),
        || async {
            let seen = pipeline.sim_stats.snapshot();
            (seen.calls >= 2 && seen.open == 0).then_some(seen)
        },
    )
    .await;
    assert_eq!(
        pipeline.sim_stats.snapshot().disconnected,
        1,
        "`continue` let the model call finish"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_streams_over_twenty_users_each_get_their_exact_answer() {
    let mut options = options();
    // A few tokens each, 5 ms apart: every stream is relayed in pieces, all at once.
    options.sim.token_time_ms = 5;
    let pipeline = Pipeline::start(options).await;
    let url = format!("{}/v1/chat/completions", pipeline.ingest_url);
    let streams: Vec<_> = (0..200)
        .map(|index| {
            let (http, url) = (pipeline.http.clone(), url.clone());
            tokio::spawn(async move {
                let prompt = format!("stream number {index} for user {}", index % 20);
                let body = json!({
                    "model": "sim",
                    "user": format!("user-{}", index % 20),
                    "stream": true,
                    "messages": [{"role": "user", "content": prompt}],
                });
                let response = http.post(&url).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 200);
                let (events, _) = sluice_tests::read_sse(response, Duration::from_secs(60)).await;
                let mut text = String::new();
                let mut done = false;
                for event in &events {
                    if event.data == "[DONE]" {
                        done = true;
                        continue;
                    }
                    let chunk: serde_json::Value = serde_json::from_str(&event.data).unwrap();
                    assert!(chunk.get("error").is_none(), "{chunk}");
                    if let Some(piece) = chunk
                        .pointer("/choices/0/delta/content")
                        .and_then(|c| c.as_str())
                    {
                        text.push_str(piece);
                    }
                }
                assert!(done, "stream {index} ended with [DONE]");
                assert_eq!(text, format!("echo: {prompt}"), "stream {index}");
            })
        })
        .collect();
    for stream in streams {
        stream.await.unwrap();
    }
    pipeline.stop().await;
}
