//! Ingest on its own against the real broker: what it publishes, and how.

use rdkafka::Message;
use rdkafka::message::Headers;
use sluice_schemas::RequestEvent;
use sluice_tests::infra::read_topic;
use sluice_tests::{TestTopics, kafka_args};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_publishes_a_keyed_record_with_headers_and_answers_202_with_location() {
    let kafka = kafka_args(3);
    let topics = TestTopics::unique();
    let mut config = sluice_ingest::Config::defaults();
    config.addr = "127.0.0.1:0".into();
    config.kafka = kafka;
    config.topics = topics.args();
    config.auth = sluice_common::auth::AuthMode::Off;
    config.results_url = "http://results.example".into();
    let app = sluice_ingest::Application::build(config)
        .await
        .expect("ingest builds (creates its topic)");
    let url = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(stop.clone()));

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
