//! Secrets never reach a log or an answer. Every service runs as a process logging at `debug`
//! while a job goes through with an API key, a webhook and a stream token, and a wrong key and a
//! forged token are refused; then no service's log and no answer holds any of the secrets: API
//! keys, the database and Redis passwords, the webhook sealing key and a user's signing secret,
//! the stream token secret and a job's stream token.

use crate::webhooks::Receiver;
use base64::Engine;
use sluice_tests::process::{ServiceProcess, free_port};
use sluice_tests::{TestDatabase, TestTopics, exclusive_stage, kafka_args, read_sse_until};
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn random_secret(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

/// A Redis user with a password (an ACL user: the server's default user, which other tests use,
/// is left as it is); its URL.
async fn redis_user_with_password(password: &str) -> String {
    let base = std::env::var("SLUICE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:56379".to_owned());
    let client = redis::Client::open(base.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let user = format!("sluice-test-{}", Uuid::now_v7().simple());
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut connection)
        .await
        .unwrap();
    base.replacen("redis://", &format!("redis://{user}:{password}@"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_reaches_a_log_or_an_answer() {
    // Four services as processes load the machine as the fault tests do.
    let _stage = exclusive_stage().await;
    let kafka = kafka_args(4);
    let topics = TestTopics::unique();
    topics.create(&kafka).await;
    let database = TestDatabase::create_on_exclusive_stage().await;
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();

    // Postgres here trusts local connections, so any password is accepted and must be hidden.
    let database_password = random_secret("db-password");
    let database_url = database.url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{database_password}@"),
        1,
    );
    assert_ne!(database_url, database.url, "a URL to put a password in");
    let redis_password = random_secret("redis-password");
    let redis_url = redis_user_with_password(&redis_password).await;
    let sealing_key =
        base64::engine::general_purpose::STANDARD.encode(Uuid::new_v4().as_bytes().repeat(2));
    let token_secret = random_secret("stream-token-secret-of-at-least-32-bytes");

    let sim = sluice_model_sim::SimModel::new(sluice_model_sim::Config::defaults());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(sim.run(listener, stop.clone()));
    let (receiver, hook_url) = Receiver::start("127.0.0.1:0", Duration::ZERO).await;

    let ports: HashMap<&str, u16> = ["ingest", "results", "worker", "webhooks"]
        .into_iter()
        .map(|service| (service, free_port()))
        .collect();
    let ingest_url = format!("http://127.0.0.1:{}", ports["ingest"]);
    let results_url = format!("http://127.0.0.1:{}", ports["results"]);
    let mut env = topics.process_env();
    env.extend(
        [
            ("RUST_LOG", "debug".to_owned()),
            ("KAFKA_BROKERS", kafka.brokers.clone()),
            ("SLUICE_AUTH", "api-keys".to_owned()),
            ("DATABASE_URL", database_url.clone()),
            ("REDIS_URL", redis_url.clone()),
            ("SLUICE_REDIS_PREFIX", format!("{}:", topics.requests)),
            ("SLUICE_WEBHOOK_SECRET_KEY", sealing_key.clone()),
            ("SLUICE_STREAM_TOKEN_SECRETS", token_secret.clone()),
            ("SLUICE_WEBHOOK_ALLOW_HTTP", "true".to_owned()),
            ("SLUICE_WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true".to_owned()),
            ("SLUICE_RESULTS_URL", results_url.clone()),
            ("SLUICE_INGEST_URL", ingest_url.clone()),
            ("MODEL_BASE_URL", sim_url),
            (
                "SLUICE_INGEST_ADDR",
                format!("127.0.0.1:{}", ports["ingest"]),
            ),
            (
                "SLUICE_RESULTS_ADDR",
                format!("127.0.0.1:{}", ports["results"]),
            ),
            (
                "SLUICE_WORKER_ADDR",
                format!("127.0.0.1:{}", ports["worker"]),
            ),
            (
                "SLUICE_WEBHOOKS_ADDR",
                format!("127.0.0.1:{}", ports["webhooks"]),
            ),
        ]
        .map(|(key, value)| (key.to_owned(), value)),
    );
    let http = reqwest::Client::new();
    let mut processes = Vec::new();
    // Results first: it owns the migrations the others' tables come from.
    for service in ["results", "ingest", "worker", "webhooks"] {
        let process = ServiceProcess::spawn(&format!("sluice-{service}"), service, &env);
        process.wait_ready(&http, ports[service]).await;
        processes.push(process);
    }

    let (_, api_key) = sluice_common::auth::create_key(&database.pool, "keeper", "default", None)
        .await
        .unwrap();
    let mut answers = String::new();
    let signing = http
        .get(format!("{results_url}/v1/webhooks/secret"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap();
    let signing: serde_json::Value = signing.json().await.unwrap();
    let signing_secret = signing["secret"].as_str().unwrap().to_owned();

    let body = serde_json::json!({
        "model": "sim", "messages": [{"role": "user", "content": "keep it secret"}],
        "webhook": {"url": hook_url},
    });
    let accepted = http
        .post(format!("{ingest_url}/v1/jobs"))
        .bearer_auth(&api_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    // The 202 carries the job's stream token by design; only refusals are checked below.
    let accepted: serde_json::Value = accepted.json().await.unwrap();
    let events_url = accepted["events_url"].as_str().unwrap().to_owned();
    let stream_token = events_url.split("token=").nth(1).unwrap().to_owned();
    let stream = http.get(&events_url).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let (events, _) = read_sse_until(stream, Duration::from_secs(30), |events| {
        events
            .iter()
            .any(|event| event.event.as_deref() == Some("succeeded"))
    })
    .await;
    assert!(!events.is_empty(), "the job's stream, read with its token");

    let wrong_key = random_secret("sk-sluice-wrong");
    let refused = http
        .post(format!("{ingest_url}/v1/jobs"))
        .bearer_auth(&wrong_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    answers.push_str(&refused.text().await.unwrap());
    let forged = events_url.replace(&stream_token, &format!("{stream_token}x"));
    let refused = http.get(&forged).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    answers.push_str(&refused.text().await.unwrap());
    sluice_tests::wait_until("the webhook delivery", Duration::from_secs(30), || async {
        (!receiver.got().is_empty()).then_some(())
    })
    .await;

    let mut logs = String::new();
    for process in processes {
        let log = process.log.clone();
        process.terminate(Duration::from_secs(15)).await;
        logs.push_str(&std::fs::read_to_string(log).unwrap());
    }
    assert!(
        logs.len() > 10_000 && logs.contains("DEBUG"),
        "the services logged at debug ({} bytes)",
        logs.len()
    );
    let secrets = [
        ("the API key", api_key.as_str()),
        ("a wrong API key", wrong_key.as_str()),
        ("the database password", database_password.as_str()),
        ("the Redis password", redis_password.as_str()),
        ("the webhook sealing key", sealing_key.as_str()),
        ("a user's webhook signing secret", signing_secret.as_str()),
        (
            "a user's webhook signing secret, unprefixed",
            signing_secret.trim_start_matches("whsec_"),
        ),
        ("the stream token secret", token_secret.as_str()),
        ("a job's stream token", stream_token.as_str()),
    ];
    for (what, secret) in secrets {
        assert!(!logs.contains(secret), "{what} is in a service's log");
        assert!(!answers.contains(secret), "{what} is in an answer");
    }
    println!(
        "secrets: {} bytes of debug logs from 4 services and {} bytes of answers hold none of {} secrets",
        logs.len(),
        answers.len(),
        secrets.len()
    );
}
