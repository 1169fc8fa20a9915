//! Admission control at ingest against the real broker and, where shared, a real Redis: rate
//! limits with burst, their headers, limits shared by two ingest instances, idempotency keys,
//! load shedding, and what happens when Redis goes away.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_ingest::admission::limiter::FailureMode;
use sluice_tests::infra::read_topic;
use sluice_tests::process::free_port;
use sluice_tests::{TestTopics, kafka_args};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:56379".to_owned())
}

struct Ingest {
    url: String,
    topics: TestTopics,
    _stop: tokio_util::sync::DropGuard,
}

async fn ingest(topics: &TestTopics, configure: impl FnOnce(&mut sluice_ingest::Config)) -> Ingest {
    let mut config = sluice_ingest::Config::defaults();
    config.addr = "127.0.0.1:0".into();
    config.kafka = kafka_args(3);
    config.topics = topics.args();
    config.auth = sluice_common::auth::AuthMode::Off;
    configure(&mut config);
    let app = sluice_ingest::Application::build(config)
        .await
        .expect("ingest builds");
    let url = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    Ingest {
        url,
        topics: topics.clone(),
        _stop: stop.drop_guard(),
    }
}

fn tiers(rate: f64, burst: u32) -> sluice_ingest::admission::Tiers {
    let text = json!({"default": {"rate_per_sec": rate, "burst": burst}}).to_string();
    sluice_ingest::admission::Tiers::parse(&text).unwrap()
}

fn unique_prefix() -> String {
    format!("test:{}:", Uuid::now_v7().simple())
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    user: impl AsRef<str>,
    key: Option<&str>,
    content: impl AsRef<str>,
) -> reqwest::Response {
    let (user, content) = (user.as_ref(), content.as_ref());
    let body = json!({"user_id": user, "model": "sim", "messages": [{"role": "user", "content": content}]});
    let mut request = client.post(format!("{url}/v1/jobs")).json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("POST /v1/jobs")
}

async fn burst_of_thirty(shared: bool) {
    let topics = TestTopics::unique();
    let prefix = unique_prefix();
    let app = ingest(&topics, |config| {
        config.tiers.by_name = tiers(1.0, 10);
        if shared {
            config.redis_url = Some(redis_url().into());
            config.redis_prefix = prefix;
        }
    })
    .await;
    let client = reqwest::Client::new();
    let responses = futures::future::join_all(
        (0..30).map(|index| post(&client, &app.url, "bursty", None, format!("{index}"))),
    )
    .await;
    let mut accepted = 0;
    let mut refused = Vec::new();
    for response in responses {
        let policy = response
            .headers()
            .get("ratelimit-policy")
            .expect("RateLimit-Policy on every answer")
            .to_str()
            .unwrap()
            .to_owned();
        assert!(policy.starts_with("\"default\";q=10;w=10"), "{policy}");
        assert!(response.headers().contains_key("ratelimit"));
        match response.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "user_rate_limited");
                refused.push(retry_after);
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        (accepted, refused.len()),
        (10, 20),
        "burst 10 admits exactly 10 of 30"
    );
    assert!(
        refused.iter().all(|retry_after| retry_after == "1"),
        "one more is allowed a second later: {refused:?}"
    );
    let records = read_topic(&app.topics.requests, 3, 10, Duration::from_secs(10));
    assert_eq!(records.len(), 10, "only admitted jobs are published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_thirty_admits_exactly_ten_in_process() {
    burst_of_thirty(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_thirty_admits_exactly_ten_with_redis() {
    burst_of_thirty(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_global_limit_holds_across_two_ingest_instances_sharing_redis() {
    let topics = TestTopics::unique();
    let prefix = unique_prefix();
    let configure = |config: &mut sluice_ingest::Config| {
        config.tiers.by_name = tiers(100.0, 100);
        config.global_rate_per_sec = 0.1;
        config.global_burst = 10;
        config.redis_url = Some(redis_url().into());
        config.redis_prefix = prefix.clone();
    };
    let (first, second) = (
        ingest(&topics, configure).await,
        ingest(&topics, configure).await,
    );
    let client = reqwest::Client::new();
    let responses = futures::future::join_all((0..30).map(|index| {
        let url = if index % 2 == 0 {
            &first.url
        } else {
            &second.url
        };
        post(&client, url, format!("user-{index}"), None, "global")
    }))
    .await;
    let accepted = responses
        .iter()
        .filter(|response| response.status() == StatusCode::ACCEPTED)
        .count();
    assert_eq!(
        accepted, 10,
        "the global burst of 10 is shared by both instances"
    );
    for response in responses {
        if response.status() != StatusCode::ACCEPTED {
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                body["error"]["code"], "global_rate_limited",
                "the refusal names the global gate: {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_at_its_limit_does_not_reduce_another_users_allowance() {
    let topics = TestTopics::unique();
    let app = ingest(&topics, |config| config.tiers.by_name = tiers(0.5, 5)).await;
    let client = reqwest::Client::new();
    let heavy =
        futures::future::join_all((0..15).map(|_| post(&client, &app.url, "heavy", None, "x")))
            .await;
    assert_eq!(
        heavy
            .iter()
            .filter(|response| response.status() == StatusCode::ACCEPTED)
            .count(),
        5
    );
    let light =
        futures::future::join_all((0..5).map(|_| post(&client, &app.url, "light", None, "y")))
            .await;
    assert!(
        light
            .iter()
            .all(|response| response.status() == StatusCode::ACCEPTED),
        "light keeps its whole burst"
    );
}

async fn idempotency(shared: bool) {
    let topics = TestTopics::unique();
    let prefix = unique_prefix();
    let app = ingest(&topics, |config| {
        if shared {
            config.redis_url = Some(redis_url().into());
            config.redis_prefix = prefix;
        }
    })
    .await;
    let client = reqwest::Client::new();
    let first = post(&client, &app.url, "careful", Some("order-17"), "pay once").await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let again = post(&client, &app.url, "careful", Some("order-17"), "pay once").await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        again["job_id"], first["job_id"],
        "the original job, not a new one"
    );

    let changed = post(&client, &app.url, "careful", Some("order-17"), "pay twice").await;
    assert_eq!(changed.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let changed: Value = changed.json().await.unwrap();
    assert_eq!(changed["error"]["code"], "idempotency_key_reused");

    let other_user = post(
        &client,
        &app.url,
        "someone-else",
        Some("order-17"),
        "pay once",
    )
    .await;
    let other_user: Value = other_user.json().await.unwrap();
    assert_ne!(
        other_user["job_id"], first["job_id"],
        "keys belong to their user"
    );

    let records = read_topic(&app.topics.requests, 3, 3, Duration::from_secs(5));
    assert_eq!(records.len(), 2, "the replay published nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_returns_the_original_job_in_process() {
    idempotency(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_returns_the_original_job_with_redis() {
    idempotency(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_its_concurrency_ingest_sheds_load_fast() {
    // A broker that never answers keeps the one slot busy for the whole publish timeout.
    let topics = TestTopics::unique();
    let mut config = sluice_ingest::Config::defaults();
    config.addr = "127.0.0.1:0".into();
    config.kafka.brokers = format!("127.0.0.1:{}", free_port());
    config.topics = topics.args();
    config.topics.create = false;
    config.publish_timeout = Duration::from_secs(2);
    config.max_concurrent_submissions = 1;
    config.auth = sluice_common::auth::AuthMode::Off;
    let app = sluice_ingest::Application::build(config).await.unwrap();
    let url = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    let client = reqwest::Client::new();
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, "a", None, "slow").await.status() }
    });
    // Why a sleep: the slot is taken inside ingest, where nothing can be asked; 200 ms is ample
    // for a local request to reach the publish, which then waits its full 2 s.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let shed = post(&client, &url, "b", None, "fast").await;
    let took = started.elapsed();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: Value = shed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(
        took < Duration::from_millis(1_000),
        "shed in {took:?}, without waiting for the slot"
    );
    assert_eq!(
        slow.await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the held submission times out at the broker"
    );
    stop.cancel();
}

async fn with_redis_gone(mode: FailureMode) -> StatusCode {
    let port = free_port();
    let mut redis = tokio::process::Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server (scripts/test installs it)");
    let redis_url = format!("redis://127.0.0.1:{port}");
    sluice_tests::wait_until("redis to listen", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let topics = TestTopics::unique();
    let app = ingest(&topics, |config| {
        config.redis_url = Some(redis_url.into());
        config.redis_failure_mode = mode;
    })
    .await;
    redis.kill().await.unwrap();
    let response = post(
        &reqwest::Client::new(),
        &app.url,
        "unlucky",
        None,
        "redis is gone",
    )
    .await;
    let status = response.status();
    if status != StatusCode::ACCEPTED {
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_fail_open_admits_and_fail_closed_refuses() {
    assert_eq!(
        with_redis_gone(FailureMode::Open).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        with_redis_gone(FailureMode::Closed).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}
