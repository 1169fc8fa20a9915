//! Webhooks end to end: real HTTP receivers in the test, the webhooks service in process with
//! the real broker and Postgres, and every signature checked by the reference implementation of
//! Standard Webhooks (`standardwebhooks` from PyPI, `tests/webhooks/verify.py`).

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use sluice_tests::{Pipeline, PipelineOptions, test_webhooks, wait_until};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request a receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: String,
    pub(crate) at: Instant,
}

/// A receiver on `address`: answers `status` after `delay`, and keeps every request.
#[derive(Clone)]
pub(crate) struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    pub(crate) status: Arc<Mutex<u16>>,
    delay: Duration,
}

impl Receiver {
    pub(crate) async fn start(address: &str, delay: Duration) -> (Self, String) {
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let receiver = Self {
            got: Arc::default(),
            status: Arc::new(Mutex::new(204)),
            delay,
        };
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/hooks", post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    pub(crate) fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    tokio::time::sleep(receiver.delay).await;
    let headers = headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("").to_owned()))
        .collect();
    receiver.got.lock().unwrap().push(Received {
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
    });
    StatusCode::from_u16(*receiver.status.lock().unwrap()).unwrap()
}

pub(crate) fn options() -> PipelineOptions {
    PipelineOptions {
        partitions: 4,
        webhooks: Some(test_webhooks()),
        ..PipelineOptions::default()
    }
}

pub(crate) async fn submit(
    pipeline: &Pipeline,
    user: &str,
    content: &str,
    webhook: Value,
) -> String {
    let accepted = pipeline
        .submit_body(&json!({
            "user_id": user, "model": "sim", "webhook": webhook,
            "messages": [{"role": "user", "content": content}],
        }))
        .await;
    accepted.job_id.to_string()
}

async fn secret(pipeline: &Pipeline, user: &str, rotate: bool) -> Value {
    let url = format!(
        "{}/v1/webhooks/secret{}?user_id={user}",
        pipeline.results_url,
        if rotate { "/rotate" } else { "" }
    );
    let request = if rotate {
        pipeline.http.post(url)
    } else {
        pipeline.http.get(url)
    };
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The job's deliveries; none while results has not seen the job yet (404).
pub(crate) async fn deliveries(pipeline: &Pipeline, job_id: &str) -> Vec<Value> {
    let url = format!("{}/v1/jobs/{job_id}/webhooks", pipeline.results_url);
    let response = pipeline.http.get(url).send().await.unwrap();
    if response.status() == 404 {
        return Vec::new();
    }
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.unwrap();
    list["data"].as_array().unwrap().clone()
}

/// Waits for one of the job's deliveries to reach `state`; that delivery.
pub(crate) async fn delivery_in_state(pipeline: &Pipeline, job_id: &str, state: &str) -> Value {
    wait_until(
        &format!("a delivery {state}"),
        Duration::from_secs(30),
        || async {
            deliveries(pipeline, job_id)
                .await
                .into_iter()
                .find(|row| row["state"] == state)
        },
    )
    .await
}

/// Runs the reference verifier over `got`, with each user's secrets.
async fn verify_with_reference(got: &[Received], secrets: &HashMap<String, Vec<String>>) -> String {
    let python = std::env::var("SLUICE_TEST_PYTHON")
        .expect("SLUICE_TEST_PYTHON: a python with standardwebhooks (scripts/test sets it)");
    let input = json!({
        "deliveries": got.iter().map(|received| json!({"headers": received.headers, "body": received.body})).collect::<Vec<_>>(),
        "secrets": secrets,
    });
    let mut child = tokio::process::Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/webhooks/verify.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_jobs_each_get_their_terminal_event_signed_and_verified() {
    let pipeline = Pipeline::start(options()).await;
    let (receiver, url) = Receiver::start("127.0.0.1:0", Duration::ZERO).await;
    let mut jobs = Vec::new();
    for index in 0..500 {
        let user = format!("hook-user-{}", index % 20);
        jobs.push(
            submit(
                &pipeline,
                &user,
                &format!("job {index}"),
                json!({"url": url}),
            )
            .await,
        );
    }
    let got = wait_until("500 deliveries", Duration::from_secs(120), || async {
        let got = receiver.got();
        (got.len() >= 500).then_some(got)
    })
    .await;
    let ids: HashSet<&str> = got
        .iter()
        .map(|received| received.headers["webhook-id"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        got.len(),
        "one webhook-id per event, no event twice here"
    );
    let delivered_jobs: HashSet<String> = got
        .iter()
        .map(|received| {
            let body: Value = serde_json::from_str(&received.body).unwrap();
            assert_eq!(body["type"], "job.succeeded");
            assert_eq!(body["data"]["status"], "succeeded");
            body["data"]["job_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(delivered_jobs, jobs.iter().cloned().collect::<HashSet<_>>());
    let mut secrets = HashMap::new();
    for user in 0..20 {
        let user = format!("hook-user-{user}");
        let shown = secret(&pipeline, &user, false).await;
        secrets.insert(user, vec![shown["secret"].as_str().unwrap().to_owned()]);
    }
    let verified = verify_with_reference(&got, &secrets).await;
    println!("{verified}");
    assert!(
        verified.contains("verified 500 signatures on 500 deliveries"),
        "{verified}"
    );

    // A rotation: for the overlap both the new and the old secret sign, and both verify.
    let old = secrets["hook-user-0"][0].clone();
    let rotated = secret(&pipeline, "hook-user-0", true).await;
    assert_eq!(rotated["previous_secret"], old.as_str());
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    // The webhooks service caches a user's secrets for two seconds.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let job = submit(
        &pipeline,
        "hook-user-0",
        "after the rotation",
        json!({"url": url}),
    )
    .await;
    let after = wait_until(
        "the delivery after the rotation",
        Duration::from_secs(30),
        || async {
            receiver
                .got()
                .into_iter()
                .find(|received| received.body.contains(&job))
        },
    )
    .await;
    assert_eq!(
        after.headers["webhook-signature"].split(' ').count(),
        2,
        "{:?}",
        after.headers
    );
    let both = HashMap::from([("hook-user-0".to_owned(), vec![new, old])]);
    verify_with_reference(&[after], &both).await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_retry_through_an_outage_stop_on_410_and_fail_visibly() {
    let pipeline = Pipeline::start(options()).await;
    // A receiver that is not there yet: its port is reserved, nothing listens.
    let port = sluice_tests::process::free_port();
    let address = format!("127.0.0.1:{port}");
    let job = submit(
        &pipeline,
        "patient",
        "outage",
        json!({"url": format!("http://{address}/hooks"), "events": ["running", "succeeded"]}),
    )
    .await;
    wait_until(
        "three refused attempts",
        Duration::from_secs(30),
        || async {
            let rows = deliveries(&pipeline, &job).await;
            (rows.len() == 2
                && rows
                    .iter()
                    .all(|row| row["attempts"].as_i64().unwrap() >= 3))
            .then_some(())
        },
    )
    .await;
    let (receiver, _) = Receiver::start(&address, Duration::ZERO).await;
    let rows = wait_until(
        "both delivered once it is up",
        Duration::from_secs(30),
        || async {
            let rows = deliveries(&pipeline, &job).await;
            rows.iter()
                .all(|row| row["state"] == "delivered")
                .then_some(rows)
        },
    )
    .await;
    let got = receiver.got();
    assert_eq!(got.len(), 2);
    let expected_ids: HashSet<String> = rows
        .iter()
        .map(|row| row["webhook_id"].as_str().unwrap().to_owned())
        .collect();
    let got_ids: HashSet<String> = got
        .iter()
        .map(|received| received.headers["webhook-id"].clone())
        .collect();
    assert_eq!(
        got_ids, expected_ids,
        "the id of every attempt is the event's"
    );
    for row in &rows {
        assert!(row["attempts"].as_i64().unwrap() >= 4, "{row}");
        assert_eq!(row["last_status"], 204);
    }

    // A receiver answering 500 for ever: five retries on the test schedule, then failed.
    *receiver.status.lock().unwrap() = 500;
    let failing = submit(
        &pipeline,
        "patient",
        "always 500",
        json!({"url": format!("http://{address}/hooks")}),
    )
    .await;
    let row = delivery_in_state(&pipeline, &failing, "failed").await;
    assert_eq!(
        row["attempts"], 6,
        "the first attempt and five retries: {row}"
    );
    assert_eq!(row["last_status"], 500);
    assert!(row["last_error"].as_str().unwrap().contains("500"));

    // 410: no more attempts.
    *receiver.status.lock().unwrap() = 410;
    let gone = submit(
        &pipeline,
        "patient",
        "gone",
        json!({"url": format!("http://{address}/hooks")}),
    )
    .await;
    let row = delivery_in_state(&pipeline, &gone, "stopped").await;
    assert_eq!(row["attempts"], 1);

    // Redelivered on request: attempted again now, and delivered once the receiver takes it.
    *receiver.status.lock().unwrap() = 200;
    let delivery_id = row["delivery_id"].as_i64().unwrap();
    let response = pipeline
        .http
        .post(format!(
            "{}/v1/jobs/{gone}/webhooks/{delivery_id}/redeliver",
            pipeline.results_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    delivery_in_state(&pipeline, &gone, "delivered").await;
    pipeline.stop().await;
}
