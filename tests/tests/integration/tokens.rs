//! Token limits through the whole pipeline: a job reserves its estimate (prompt and answer
//! cap) against its user's tokens per minute at admission, is refused with `429
//! token_rate_limited` and a `Retry-After` from the token bucket when the reservation does not
//! fit, and gives back what it did not use when its terminal status arrives, so the next job
//! is admitted long before the bucket would have refilled. In process and in Redis.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::{Pipeline, PipelineOptions};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// 600 tokens a minute (10 a second), 1,000 at once.
const TIERS: &str = r#"{"default": {"rate_per_sec": 1000, "burst": 1000, "tokens_per_min": 600, "token_burst": 1000}}"#;

async fn post(pipeline: &Pipeline, content: &str, max_tokens: u64) -> reqwest::Response {
    let body = json!({
        "user_id": "tokens",
        "model": "sim",
        "messages": [{"role": "user", "content": content}],
        "params": {"max_tokens": max_tokens},
    });
    pipeline.post_job(&body).await
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn accepted(response: reqwest::Response) -> Uuid {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["job_id"].as_str().unwrap().parse().unwrap()
}

async fn reserve_refuse_and_settle(redis: bool) {
    let mut options = PipelineOptions {
        tiers: Some(TIERS.into()),
        redis,
        ..Default::default()
    };
    // Why 2 s a call: the third submission must meet the first two's reservations, not their
    // settlement. With the pipeline's 5 ms model a slow machine let the first job end and give
    // its tokens back before the third was posted (a CI run on 2026-12-02: 202, not 429).
    options.sim.service_time_ms = 2_000;
    let pipeline = Pipeline::start(options).await;

    // Never admissible: named, a 400, not a 429 to retry.
    let too_large = post(&pipeline, "far too much", 2000).await;
    assert_eq!(too_large.status(), StatusCode::BAD_REQUEST);
    let body: Value = too_large.json().await.unwrap();
    assert_eq!(body["error"]["code"], "tokens_exceed_limit", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("2007 tokens") && message.contains("at most 1000"),
        "{message}"
    );

    // "hello one" is 9 bytes (3 tokens) + 4 for the message + a cap of 400: 407 reserved.
    let first = post(&pipeline, "hello one", 400).await;
    let policy = header(&first, "ratelimit-policy");
    let state = header(&first, "ratelimit");
    assert!(
        policy.contains(r#""default-tokens";q=1000;w=100"#),
        "{policy}"
    );
    assert!(state.contains(r#""default-tokens";r=593"#), "{state}");
    let first = accepted(first).await;
    let second = accepted(post(&pipeline, "hello two", 400).await).await;

    // 186 left (plus what a second refills): a third 407 does not fit.
    let refused = post(&pipeline, "hello three", 400).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!(
        (20..=23).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert!(header(&refused, "ratelimit").contains(r#""default-tokens";r=18"#));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "token_rate_limited", "{body}");

    // The two jobs used about 10 tokens each (the simulated model echoes the prompt): their
    // ends give back ~790, and the third is admitted well before its Retry-After.
    let waiting = Instant::now();
    pipeline
        .wait_terminal(&[first, second], Duration::from_secs(30))
        .await;
    let third = loop {
        let response = post(&pipeline, "hello three", 400).await;
        if response.status() == StatusCode::ACCEPTED {
            break response;
        }
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            waiting.elapsed() < Duration::from_secs(12),
            "the reservations were not settled: still refused after {:?}",
            waiting.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let admitted_after = waiting.elapsed();
    let left = header(&third, "ratelimit");
    println!(
        "token limit (redis: {redis}): third job refused with Retry-After {retry_after} s, admitted {} ms later after settlement; {left}",
        admitted_after.as_millis()
    );
    let third = accepted(third).await;
    pipeline
        .wait_terminal(&[third], Duration::from_secs(30))
        .await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_reservation_is_refused_when_it_does_not_fit_and_settled_when_the_job_ends() {
    reserve_refuse_and_settle(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_reservations_and_settlements_hold_in_redis() {
    reserve_refuse_and_settle(true).await;
}

/// The `"<tier>-tokens";r=` of a `RateLimit` field.
fn tokens_left(response: &reqwest::Response) -> u64 {
    let state = header(response, "ratelimit");
    let (_, after) = state
        .split_once("\"default-tokens\";r=")
        .unwrap_or_else(|| panic!("no token state in {state:?}"));
    after.split(';').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_embedding_for_the_local_model_reserves_what_its_tokenizer_counts() {
    let pipeline = Pipeline::start(PipelineOptions {
        tiers: Some(TIERS.into()),
        embedding_model_dir: Some(crate::embedding::model_dir()),
        ..Default::default()
    })
    .await;
    let texts = [
        "Tokenization is not bytes over four.",
        "Sluice counts it exactly.",
    ];
    let response = pipeline
        .http
        .post(format!("{}/v1/jobs", pipeline.ingest_url))
        .json(&json!({"user_id": "embedder", "model": "all-minilm-l6-v2", "input": texts}))
        .send()
        .await
        .unwrap();
    let reserved = 1000 - tokens_left(&response);
    let job_id = accepted(response).await;
    pipeline
        .wait_terminal(&[job_id], Duration::from_secs(60))
        .await;
    let job = pipeline.job(job_id).await.unwrap();
    let reported = job["output"]["usage"]["prompt_tokens"].as_u64().unwrap();
    let bytes: usize = texts.iter().map(|text| text.len()).sum();
    println!(
        "local tokenizer: reserved {reserved} tokens, the model reported {reported}; bytes over four would be {}",
        bytes.div_ceil(4)
    );
    assert_eq!(
        reserved, reported,
        "the reservation is the model's own count"
    );
    pipeline.stop().await;
}
