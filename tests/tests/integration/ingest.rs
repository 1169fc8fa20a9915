//! Ingest on its own against the real broker: what it publishes, and how.

use rdkafka::Message;
use rdkafka::message::Headers;
use sluice_schemas::RequestEvent;
use sluice_tests::infra::read_topic;
use sluice_tests::{TestTopics, kafka_args};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Ingest alone on fresh topics, keys off, as `configure` sets it; its URL, topics and stop.
async fn ingest(
    configure: impl FnOnce(&mut sluice_ingest::Config),
) -> (
    String,
    TestTopics,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let topics = TestTopics::unique();
    let mut config = sluice_ingest::Config::defaults();
    config.addr = "127.0.0.1:0".into();
    config.kafka = kafka_args(3);
    config.topics = topics.args();
    config.auth = sluice_common::auth::AuthMode::Off;
    configure(&mut config);
    let app = sluice_ingest::Application::build(config)
        .await
        .expect("ingest builds (creates its topics)");
    let url = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(stop.clone()));
    (url, topics, stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_publishes_a_keyed_record_with_headers_and_answers_202_with_location() {
    let (url, topics, stop, server) =
        ingest(|config| config.results_url = "http://results.example".into()).await;

    let body = serde_json::json!({
        "user_id": "alice", "model": "sim", "timeout_ms": 5000,
        "messages": [{"role": "user", "content": "hello"}], "params": {"temperature": 0.1}
    });
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/jobs"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted: serde_json::Value = response.json().await.unwrap();
    let job_id = accepted["job_id"].as_str().unwrap();
    assert_eq!(accepted["status"], "queued");
    assert_eq!(location, format!("http://results.example/v1/jobs/{job_id}"));

    let records = read_topic(&topics.requests, 3, 1, Duration::from_secs(10));
    assert_eq!(
        records.len(),
        1,
        "the record was on the topic when 202 was answered"
    );
    let record = &records[0];
    assert_eq!(record.key().unwrap(), b"alice");
    let headers = record.headers().unwrap();
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    assert_eq!(header("schema-version").as_deref(), Some("1"));
    let event = RequestEvent::decode(record.payload().unwrap()).unwrap();
    assert_eq!(event.job_id.to_string(), job_id);
    assert_eq!(event.params["temperature"], 0.1);
    assert_eq!(
        (event.deadline - event.submitted_at).num_milliseconds(),
        5000
    );

    stop.cancel();
    server.await.unwrap().unwrap();
}

/// A client that writes its whole body before reading (Python's `urllib`) reads the 413 and its
/// JSON on both front doors, instead of a connection reset while it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_a_4_mb_body_before_reading_gets_the_413() {
    let python = std::env::var("SLUICE_TEST_PYTHON")
        .expect("SLUICE_TEST_PYTHON: a python 3 (scripts/test sets it)");
    let (url, _topics, stop, server) = ingest(|_| {}).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/oversized_body.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .arg(&url)
        .output()
        .await
        .expect("running python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{stdout}");
    for answer in &answers {
        assert_eq!(answer["status"], 413, "{answer}");
        assert_eq!(
            answer["body"]["error"]["code"], "payload_too_large",
            "{answer}"
        );
    }
    assert_eq!(
        answers[1]["body"]["error"]["type"], "invalid_request_error",
        "OpenAI's shape on its route: {}",
        answers[1]
    );
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// Clients that hold connections are cut: a request head that never ends (slowloris) after the
/// header read timeout, a head too large with `431`, a body that stalls with `408` and JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_oversized_request_heads_and_stalled_bodies_are_cut() {
    use sluice_common::http::HEADER_READ_TIMEOUT;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let (url, _topics, stop, server) =
        ingest(|config| config.body_timeout = Duration::from_secs(1)).await;
    let address = url.trim_start_matches("http://").to_owned();

    async fn answer(stream: &mut TcpStream, within: Duration) -> String {
        let mut text = Vec::new();
        tokio::time::timeout(within, stream.read_to_end(&mut text))
            .await
            .expect("the server ends the exchange in time")
            .ok();
        String::from_utf8_lossy(&text).into_owned()
    }

    // A head that never ends: the connection is closed (hyper may say 408 first).
    let mut slow = TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: ingest\r\nX-Slow: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let slow_answer = answer(&mut slow, HEADER_READ_TIMEOUT + Duration::from_secs(10)).await;
    assert!(
        slow_answer.is_empty() || slow_answer.starts_with("HTTP/1.1 408"),
        "{slow_answer}"
    );
    println!(
        "slowloris: connection closed after {:.1} s (header read timeout {} s), answer {:?}",
        started.elapsed().as_secs_f64(),
        HEADER_READ_TIMEOUT.as_secs(),
        slow_answer.lines().next()
    );

    // A head of 80 KiB: 431.
    let mut big = TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: ingest\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(80 * 1024)
    );
    big.write_all(head.as_bytes()).await.unwrap();
    let big_answer = answer(&mut big, Duration::from_secs(10)).await;
    assert!(big_answer.starts_with("HTTP/1.1 431"), "{big_answer}");

    // A body that stops after 10 of its 100 bytes: 408 with the JSON error.
    let mut stalled = TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/jobs HTTP/1.1\r\nHost: ingest\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user_id\"",
        )
        .await
        .unwrap();
    let stalled_answer = answer(&mut stalled, Duration::from_secs(10)).await;
    assert!(
        stalled_answer.starts_with("HTTP/1.1 408")
            && stalled_answer.contains("\"request_body_timeout\""),
        "{stalled_answer}"
    );

    stop.cancel();
    server.await.unwrap().unwrap();
}
