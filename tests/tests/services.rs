//! Each service on its own against the real broker: ingest's published record, and the
//! worker's unit of work called directly.

use chrono::Utc;
use rdkafka::Message;
use rdkafka::message::Headers;
use sluice_schemas::{
    JobId, JobStatus, Message as ChatMessage, ModelName, RequestEvent, Role, SCHEMA_VERSION,
    StatusEvent, UserId,
};
use sluice_tests::infra::read_topic;
use sluice_tests::{TestTopics, kafka_args};
use sluice_worker::{JobContext, ModelClient, Outcome, Record, StatusPublisher, run_job};
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

async fn worker_context(topics: &TestTopics, model_url: &str) -> JobContext {
    let kafka = kafka_args(1);
    topics.create(&kafka).await;
    let producer = kafka.producer_config("test-worker").create().unwrap();
    JobContext {
        model: ModelClient::new(model_url, None, Duration::from_secs(1)).unwrap(),
        publisher: StatusPublisher::new(
            producer,
            topics.status.clone(),
            topics.requests_dlq.clone(),
            CancellationToken::new(),
        ),
        worker_id: "direct".into(),
        model_timeout: Duration::from_secs(5),
    }
}

fn record(topics: &TestTopics, payload: Vec<u8>) -> Record {
    Record {
        topic: topics.requests.clone(),
        partition: 0,
        offset: 7,
        key: Some(b"bob".to_vec()),
        payload: Some(payload),
    }
}

fn request(deadline_in_ms: i64) -> RequestEvent {
    let now = Utc::now();
    RequestEvent {
        schema_version: SCHEMA_VERSION,
        job_id: JobId::new(),
        user_id: UserId::parse("bob").unwrap(),
        model: ModelName::parse("sim").unwrap(),
        messages: vec![ChatMessage {
            role: Role::User,
            content: "direct".into(),
        }],
        params: Default::default(),
        submitted_at: now,
        deadline: now + chrono::Duration::milliseconds(deadline_in_ms),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unit_of_work_runs_expires_and_dead_letters() {
    let sim = sluice_model_sim::SimModel::new(sluice_model_sim::Config {
        service_time_ms: 1,
        ..sluice_model_sim::Config::defaults()
    });
    let stats = sim.stats.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(sim.run(listener, stop.clone()));
    let topics = TestTopics::unique();
    let context = worker_context(&topics, &sim_url).await;

    let fresh = request(10_000);
    assert_eq!(
        run_job(&context, &record(&topics, fresh.encode())).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    let mut stale = request(1_000);
    stale.submitted_at -= chrono::Duration::seconds(5);
    stale.deadline -= chrono::Duration::seconds(5);
    assert_eq!(
        run_job(&context, &record(&topics, stale.encode())).await,
        Outcome::Finished(JobStatus::Expired)
    );
    assert_eq!(
        stats.snapshot().calls,
        1,
        "an expired job never reaches the model"
    );
    assert_eq!(
        run_job(&context, &record(&topics, b"not json".to_vec())).await,
        Outcome::DeadLettered
    );

    let statuses: Vec<StatusEvent> = read_topic(&topics.status, 1, 3, Duration::from_secs(10))
        .iter()
        .map(|record| StatusEvent::decode(record.payload().unwrap()).unwrap())
        .collect();
    let seen: Vec<_> = statuses
        .iter()
        .map(|event| (event.job_id, event.status))
        .collect();
    assert_eq!(
        seen,
        [
            (fresh.job_id, JobStatus::Running),
            (fresh.job_id, JobStatus::Succeeded),
            (stale.job_id, JobStatus::Expired)
        ]
    );
    assert_eq!(
        statuses[2].error.as_ref().unwrap().code,
        sluice_schemas::ErrorCode::DeadlineExceeded
    );
    let dead = read_topic(&topics.requests_dlq, 1, 1, Duration::from_secs(10));
    assert_eq!(dead[0].payload().unwrap(), b"not json");
    stop.cancel();
}
