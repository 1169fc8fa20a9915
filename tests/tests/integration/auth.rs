//! API keys through the whole pipeline: who may submit, who sees which job, revocation within
//! the cache time, tiers, and the `keys` command.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_common::auth;
use sluice_tests::process::binary;
use sluice_tests::{Pipeline, PipelineOptions, wait_until};
use std::time::Duration;

const TIERS: &str = r#"{"default": {"rate_per_sec": 1000, "burst": 1000}, "tiny": {"rate_per_sec": 0.1, "burst": 1}}"#;

async fn start() -> Pipeline {
    Pipeline::start(PipelineOptions {
        api_keys: true,
        tiers: Some(TIERS.into()),
        ..Default::default()
    })
    .await
}

async fn submit(
    pipeline: &Pipeline,
    key: Option<&str>,
    body: Value,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = pipeline
        .http
        .post(format!("{}/v1/jobs", pipeline.ingest_url))
        .json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (
        response.status(),
        response.headers().clone(),
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn get(pipeline: &Pipeline, key: Option<&str>, path: &str) -> (StatusCode, Value) {
    let mut request = pipeline.http.get(format!("{}{path}", pipeline.results_url));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(Value::Null),
    )
}

fn chat() -> Value {
    json!({"model": "sim", "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_decide_who_submits_and_who_sees_which_job() {
    let pipeline = start().await;
    let pool = &pipeline.database.pool;
    let (_, alice) = auth::create_key(pool, "alice", "default", Some("laptop"))
        .await
        .unwrap();
    let (_, bob) = auth::create_key(pool, "bob", "default", None)
        .await
        .unwrap();

    let (status, headers, body) = submit(&pipeline, None, chat()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    assert_eq!(headers["www-authenticate"], r#"Bearer realm="sluice""#);
    let (status, headers, _) = submit(&pipeline, Some("sk-sluice-not-a-key"), chat()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );

    let (status, _, accepted) = submit(&pipeline, Some(&alice), chat()).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the key says who the user is: {accepted}"
    );
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    let mut impostor = chat();
    impostor["user_id"] = json!("bob");
    let (status, _, body) = submit(&pipeline, Some(&alice), impostor).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );

    let path = format!("/v1/jobs/{job_id}");
    let job = wait_until("alice's job to finish", Duration::from_secs(30), || async {
        let (status, job) = get(&pipeline, Some(&alice), &path).await;
        (status == StatusCode::OK && job["status"] == "succeeded").then_some(job)
    })
    .await;
    assert_eq!(job["user_id"], "alice");
    let (status, body) = get(&pipeline, Some(&bob), &path).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("job_not_found")),
        "bob cannot tell it exists"
    );
    let (status, _) = get(&pipeline, None, &path).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let cancel = pipeline
        .http
        .delete(format!("{}{path}", pipeline.results_url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::NOT_FOUND);

    // Bob's stream on alice's job behaves as for an unknown job: open, silent.
    let mut stream = pipeline
        .http
        .get(format!("{}{path}/events", pipeline.results_url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut seen = String::new();
    let _ = tokio::time::timeout(Duration::from_millis(1500), async {
        while let Ok(Some(chunk)) = stream.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(!seen.contains("event:"), "bob saw {seen:?}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_key_stops_working_within_the_cache_time_and_tiers_set_limits() {
    let pipeline = start().await;
    let pool = &pipeline.database.pool;
    let (key_id, key) = auth::create_key(pool, "carol", "default", None)
        .await
        .unwrap();
    assert_eq!(
        submit(&pipeline, Some(&key), chat()).await.0,
        StatusCode::ACCEPTED
    );
    assert!(auth::revoke_key(pool, &key_id).await.unwrap());
    wait_until(
        "the revoked key to be refused",
        Duration::from_secs(5),
        || async {
            (submit(&pipeline, Some(&key), chat()).await.0 == StatusCode::UNAUTHORIZED)
                .then_some(())
        },
    )
    .await;

    let (_, tiny) = auth::create_key(pool, "dave", "tiny", None).await.unwrap();
    let (first, headers, _) = submit(&pipeline, Some(&tiny), chat()).await;
    assert_eq!(first, StatusCode::ACCEPTED);
    assert!(
        headers["ratelimit-policy"]
            .to_str()
            .unwrap()
            .starts_with("\"tiny\";q=1;w=10")
    );
    assert_eq!(
        submit(&pipeline, Some(&tiny), chat()).await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "the tiny tier allows a burst of 1"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_command_creates_lists_and_revokes() {
    // The migrations belong to sluice-results: before they are applied, the command says so.
    let bare = sluice_tests::TestDatabase::create().await;
    let output = keys_command(&bare.url, &["list"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("sluice-results migrate"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let database = sluice_tests::TestDatabase::migrated().await;
    let run = |args: &[&str]| {
        let output = keys_command(&database.url, args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let created: Value = serde_json::from_str(
        run(&[
            "create",
            "--user-id",
            "erin",
            "--tier",
            "pro",
            "--name",
            "ci",
        ])
        .trim(),
    )
    .unwrap();
    let key_id = created["key_id"].as_str().unwrap();
    assert!(
        created["api_key"]
            .as_str()
            .unwrap()
            .starts_with("sk-sluice-")
    );
    let listed = run(&["list"]);
    assert!(
        listed.contains(key_id) && listed.contains("\"tier\":\"pro\""),
        "{listed}"
    );
    assert!(
        !listed.contains(created["api_key"].as_str().unwrap()),
        "the key itself is never listed"
    );
    let revoked: Value = serde_json::from_str(run(&["revoke", key_id]).trim()).unwrap();
    assert_eq!(revoked["revoked"], true);
}

fn keys_command(database_url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary("sluice-ingest"))
        .arg("keys")
        .args(args)
        .env("DATABASE_URL", database_url)
        .output()
        .expect("running sluice-ingest keys")
}
