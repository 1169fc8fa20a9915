//! Poison on every topic. Each kind (a wrong schema version, truncated JSON, valid JSON of the
//! wrong type, a payload near the producer's size limit, no key and no payload) is dead-lettered
//! with its reason by the topic's owner (requests: the worker; status: results), skipped by the
//! services that follow a topic outside any group (control: every worker; deltas: results and
//! ingest), and the jobs after it complete, a streamed one with its pieces.

use rdkafka::Message;
use rdkafka::message::Headers;
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use sluice_schemas::{CancelEvent, DeltaEvent, JobId, SCHEMA_VERSION, StatusEvent, UserId};
use sluice_tests::infra::read_topic;
use sluice_tests::{Pipeline, PipelineOptions, chat_event};
use std::collections::HashMap;
use std::time::Duration;

const KINDS: usize = 5;

/// The poisons made from one valid event of a topic: (kind, payload); the last has no key.
fn poisons(valid: &[u8]) -> Vec<(&'static str, Option<Vec<u8>>)> {
    let mut wrong_version: Value = serde_json::from_slice(valid).unwrap();
    wrong_version["schema_version"] = json!(99);
    let near_the_limit = format!(
        "{{\"schema_version\": 1, \"junk\": \"{}\"}}",
        "x".repeat(900_000)
    );
    vec![
        (
            "wrong schema version",
            Some(serde_json::to_vec(&wrong_version).unwrap()),
        ),
        ("truncated JSON", Some(valid[..valid.len() / 2].to_vec())),
        ("JSON of the wrong type", Some(b"[1, 2, 3]".to_vec())),
        ("900 KB payload", Some(near_the_limit.into_bytes())),
        ("no key and no payload", None),
    ]
}

async fn publish_poisons(pipeline: &Pipeline, topic: &str, valid: &[u8]) {
    let producer = pipeline.producer();
    for (kind, payload) in poisons(valid) {
        let sent = match &payload {
            Some(payload) => {
                let record = FutureRecord::to(topic).key("poisoner").payload(payload);
                producer.send(record, Duration::from_secs(10)).await
            }
            None => {
                let record = FutureRecord::<str, [u8]>::to(topic);
                producer.send(record, Duration::from_secs(10)).await
            }
        };
        sent.unwrap_or_else(|(error, _)| panic!("publishing {kind} to {topic}: {error}"));
    }
}

/// The dead letters of a topic, each as (key, reason, source topic).
fn dead_letters(
    topic: &str,
    partitions: i32,
    count: usize,
) -> Vec<(Option<Vec<u8>>, String, String)> {
    read_topic(topic, partitions, count, Duration::from_secs(30))
        .iter()
        .map(|record| {
            let headers: HashMap<String, String> = record
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|header| {
                            (
                                header.key.to_owned(),
                                String::from_utf8_lossy(header.value.unwrap_or_default())
                                    .into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (
                record.key().map(<[u8]>::to_vec),
                headers.get("dlq-reason").cloned().unwrap_or_default(),
                headers.get("dlq-source-topic").cloned().unwrap_or_default(),
            )
        })
        .collect()
}

fn check_dead_letters(topic: &str, dlq: &str, partitions: i32) {
    let dead = dead_letters(dlq, partitions, KINDS);
    for (key, reason, _) in &dead {
        println!(
            "poison on {topic}: key {:?}, dlq-reason {reason}",
            key.as_deref().map(String::from_utf8_lossy)
        );
    }
    assert_eq!(
        dead.len(),
        KINDS,
        "every poison on {topic} is dead-lettered"
    );
    assert!(
        dead.iter()
            .all(|(_, reason, source)| !reason.is_empty() && source == topic),
        "each with its reason and source: {dead:?}"
    );
    assert!(
        dead.iter()
            .any(|(_, reason, _)| reason.contains("schema_version") || reason.contains("99")),
        "the wrong version is named: {dead:?}"
    );
    assert!(
        dead.iter().any(|(key, _, _)| key.is_none()),
        "the keyless poison keeps no key: {dead:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_of_every_kind_on_every_topic_is_set_aside_and_jobs_after_it_complete() {
    let mut options = PipelineOptions::default();
    options.sim.token_time_ms = 20;
    let pipeline = Pipeline::start(options).await;
    let topics = pipeline.topics.clone();

    let request = chat_event("poisoner", "a valid request", 60_000);
    let status = StatusEvent::queued(&request);
    let cancel = CancelEvent {
        schema_version: SCHEMA_VERSION,
        job_id: JobId::new(),
        user_id: UserId::parse("poisoner").unwrap(),
        requested_at: chrono::Utc::now(),
        deadline: None,
    };
    let delta = DeltaEvent {
        schema_version: SCHEMA_VERSION,
        job_id: JobId::new(),
        user_id: UserId::parse("poisoner").unwrap(),
        attempt: 1,
        index: 0,
        text: "a piece".into(),
        emitted_at: chrono::Utc::now(),
    };
    publish_poisons(&pipeline, &topics.requests, &request.encode()).await;
    publish_poisons(&pipeline, &topics.status, &status.encode()).await;
    publish_poisons(
        &pipeline,
        &topics.control,
        &serde_json::to_vec(&cancel).unwrap(),
    )
    .await;
    publish_poisons(
        &pipeline,
        &topics.deltas,
        &serde_json::to_vec(&delta).unwrap(),
    )
    .await;

    // The jobs after the poison complete: every consumer and follower is still running.
    let plain = pipeline.submit("after", "after the poison").await;
    let streamed = pipeline
        .submit_body(&json!({
            "user_id": "after", "model": "sim", "stream": true,
            "messages": [{"role": "user", "content": "stream after the poison"}],
        }))
        .await;
    let ids = [plain.job_id.as_uuid(), streamed.job_id.as_uuid()];
    pipeline.wait_terminal(&ids, Duration::from_secs(30)).await;
    for id in ids {
        assert_eq!(pipeline.job(id).await.unwrap()["status"], "succeeded");
    }
    let events = pipeline.event_names(streamed.job_id).await;
    assert!(
        events.iter().any(|event| event == "delta"),
        "the streamed job's pieces still flow: {events:?}"
    );

    check_dead_letters(&topics.requests, &topics.requests_dlq, 4);
    check_dead_letters(&topics.status, &topics.status_dlq, 4);
    pipeline.stop().await;
}

/// A NUL character (U+0000) in a prompt comes back in the simulated model's echo: Postgres'
/// `jsonb` refuses `\u0000`, and before results stored it as U+FFFD the batch holding it was
/// retried for ever, stopping its partition (found by schemathesis). The job and the one after
/// it complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_with_a_nul_character_is_stored_and_its_partition_keeps_moving() {
    let pipeline = Pipeline::start(PipelineOptions {
        partitions: 1,
        ..PipelineOptions::default()
    })
    .await;
    let nul = pipeline.submit("nul", "before\u{0}after").await;
    let next = pipeline.submit("nul", "the next job").await;
    let ids = [nul.job_id.as_uuid(), next.job_id.as_uuid()];
    pipeline.wait_terminal(&ids, Duration::from_secs(30)).await;
    let job = pipeline.job(nul.job_id).await.unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    let text = job["output"].to_string();
    assert!(text.contains("before\u{FFFD}after"), "{text}");
    assert_eq!(
        pipeline.job(next.job_id).await.unwrap()["status"],
        "succeeded"
    );
    pipeline.stop().await;
}

/// An event that decodes but that Postgres refuses for what it holds (here: a `CHECK` added to
/// the test's database refusing one user's jobs, as Postgres refuses a value it cannot hold)
/// was retried for ever, stopping its partition. It goes to the status dead-letter topic with
/// Postgres's reason; the jobs before and after it, on the same partition, are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_postgres_refuses_is_dead_lettered_and_its_partition_keeps_moving() {
    let pipeline = Pipeline::start(PipelineOptions {
        partitions: 1,
        ..PipelineOptions::default()
    })
    .await;
    sqlx::query("ALTER TABLE jobs ADD CONSTRAINT refuse_one_user CHECK (user_id <> 'refused')")
        .execute(&pipeline.database.pool)
        .await
        .unwrap();
    let before = pipeline.submit("others", "before").await;
    let refused = pipeline.submit("refused", "refused").await;
    let after = pipeline.submit("others", "after").await;
    let ids = [before.job_id.as_uuid(), after.job_id.as_uuid()];
    pipeline.wait_terminal(&ids, Duration::from_secs(30)).await;
    for accepted in [&before, &after] {
        let job = pipeline.job(accepted.job_id).await.unwrap();
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // Its request (queued), running and succeeded events, each refused (keyed by its user).
    let dead = dead_letters(&pipeline.topics.status_dlq, 1, 3);
    let reasons: Vec<&String> = dead.iter().map(|(_, reason, _)| reason).collect();
    println!(
        "refused by Postgres: {} events dead-lettered: {reasons:?}",
        reasons.len()
    );
    assert!(
        dead.iter()
            .all(|(key, _, _)| key.as_deref() == Some(b"refused".as_slice())),
        "only the refused user's events"
    );
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .all(|reason| reason.starts_with("rejected_by_store: Postgres 23514")),
        "{reasons:?}"
    );
    assert!(pipeline.job(refused.job_id).await.is_none());
    pipeline.stop().await;
}
