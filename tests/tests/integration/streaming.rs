//! A job asked to be streamed: run by the worker directly, its answer's pieces on the deltas
//! topic, coalesced and in order; through the pipeline, `delta` events on the job's events
//! stream, resumable mid-answer. (Through the OpenAI front door: `openai.rs`.)

use crate::worker::{Harness, request, sim};
use rdkafka::Message;
use serde_json::{Value, json};
use sluice_schemas::{DeltaEvent, JobStatus, Message as ChatMessage, Role, Task};
use sluice_tests::infra::read_topic;
use sluice_tests::{Pipeline, PipelineOptions, SseEvent, read_sse, read_sse_until, wait_until};
use sluice_worker::Outcome;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_job_publishes_its_answer_in_coalesced_ordered_pieces() {
    // Tokens every 30 ms, pieces at most every 100 ms: fewer pieces than tokens, in order.
    let (_, url) = sim(|sim| sim.token_time_ms = 30).await;
    let harness = Harness::new(&url, |config| {
        config.delta_flush = Duration::from_millis(100);
    })
    .await;
    let mut job = request("sim", 30_000);
    job.stream = true;
    job.task = Task::Chat(vec![ChatMessage::text(
        Role::User,
        "one two three four five six seven eight nine ten",
    )]);
    assert_eq!(
        harness.run(job.encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    let statuses = harness.statuses(2);
    let answer = statuses[1].output.as_ref().unwrap().content.clone();
    assert_eq!(
        answer,
        "echo: one two three four five six seven eight nine ten"
    );
    let pieces: Vec<DeltaEvent> = wait_until(
        "the pieces to join into the answer",
        Duration::from_secs(10),
        || async {
            let pieces: Vec<_> = read_topic(&harness.topics.deltas, 1, 100, Duration::from_secs(2))
                .iter()
                .map(|record| DeltaEvent::decode(record.payload().unwrap()).unwrap())
                .collect();
            let joined: String = pieces.iter().map(|piece| piece.text.as_str()).collect();
            (joined == answer).then_some(pieces)
        },
    )
    .await;
    let indexes: Vec<u32> = pieces.iter().map(|piece| piece.index).collect();
    assert_eq!(indexes, (0..pieces.len() as u32).collect::<Vec<_>>());
    assert!(
        pieces.len() >= 2 && pieces.len() < 11,
        "11 tokens in {} pieces: coalesced, yet streamed",
        pieces.len()
    );
    assert!(
        pieces
            .iter()
            .all(|piece| piece.job_id == job.job_id && piece.attempt == 1)
    );
}

/// What a reader of `GET /v1/jobs/{id}/events` got: event names, and the deltas' text joined.
fn names_and_text(events: &[SseEvent]) -> (Vec<String>, String) {
    let names = events
        .iter()
        .map(|event| event.event.clone().unwrap_or_default())
        .collect();
    let text = events
        .iter()
        .filter(|event| event.event.as_deref() == Some("delta"))
        .map(|event| {
            let data: Value = serde_json::from_str(&event.data).unwrap();
            data["text"].as_str().unwrap().to_owned()
        })
        .collect();
    (names, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_job_shows_its_answer_growing_and_resumes_mid_answer_without_a_gap() {
    let mut options = PipelineOptions::default();
    // 41 tokens, 25 ms apart: about one piece per 50 ms (the default flush), so fewer pieces.
    options.sim.token_time_ms = 25;
    let pipeline = Pipeline::start(options).await;
    let words: Vec<String> = (1..=40).map(|word| format!("word{word}")).collect();
    let accepted = pipeline
        .submit_body(&json!({
            "user_id": "reader",
            "model": "sim",
            "stream": true,
            "messages": [{"role": "user", "content": words.join(" ")}],
        }))
        .await;
    let events_url = accepted.events_url.clone();

    // A reader that leaves after three pieces, while the model is still generating.
    let response = pipeline.http.get(&events_url).send().await.unwrap();
    let deltas = |events: &[SseEvent]| {
        events
            .iter()
            .filter(|event| event.event.as_deref() == Some("delta"))
            .count()
    };
    let (first, _) = read_sse_until(response, Duration::from_secs(30), |events| {
        deltas(events) >= 3
    })
    .await;
    let job = pipeline.job(accepted.job_id).await.unwrap();
    assert_eq!(
        job["status"], "running",
        "pieces arrive before the answer is whole"
    );
    let (first_names, first_text) = names_and_text(&first);
    assert_eq!(
        first_names,
        ["queued", "running", "delta", "delta", "delta"]
    );
    assert!(first_text.starts_with("echo: word1"), "{first_text:?}");

    // It comes back with the id of the last event it has, as EventSource does.
    let last_id = first.last().unwrap().id.clone().unwrap();
    assert_eq!(
        last_id,
        format!("2.{}", first_text.len()),
        "seq of running, answer bytes"
    );
    let resumed = pipeline
        .http
        .get(&events_url)
        .header("Last-Event-ID", &last_id)
        .send()
        .await
        .unwrap();
    let (rest, _) = read_sse(resumed, Duration::from_secs(30)).await;
    let (rest_names, rest_text) = names_and_text(&rest);
    assert_eq!(rest_names.last().unwrap(), "succeeded");
    assert!(
        rest_names[..rest_names.len() - 1]
            .iter()
            .all(|name| name == "delta"),
        "{rest_names:?}"
    );
    let terminal: Value = serde_json::from_str(&rest.last().unwrap().data).unwrap();
    let answer = terminal["output"]["content"].as_str().unwrap();
    assert_eq!(answer, format!("echo: {}", words.join(" ")));
    assert_eq!(terminal["output"]["streamed"], true);
    assert_eq!(
        format!("{first_text}{rest_text}"),
        answer,
        "nothing lost, nothing repeated"
    );
    assert!(
        first.len() + rest.len() < 2 + (words.len() + 1) * 3 / 4,
        "pieces are coalesced: {} events for {} tokens",
        first.len() + rest.len(),
        words.len() + 1
    );

    // Read from the start after the end: the whole answer, in the deltas and in the terminal.
    let again = pipeline.http.get(&events_url).send().await.unwrap();
    let (all, _) = read_sse(again, Duration::from_secs(10)).await;
    let (names, text) = names_and_text(&all);
    assert_eq!(names.first().unwrap(), "queued");
    assert_eq!(text, answer);

    // The same question again is a cache hit: its answer streams as one delta.
    let hit = pipeline
        .submit_body(&json!({
            "user_id": "reader",
            "model": "sim",
            "stream": true,
            "messages": [{"role": "user", "content": words.join(" ")}],
        }))
        .await;
    let response = pipeline.http.get(&hit.events_url).send().await.unwrap();
    let (events, _) = read_sse(response, Duration::from_secs(30)).await;
    let (names, text) = names_and_text(&events);
    assert_eq!(names, ["queued", "delta", "succeeded"]);
    assert_eq!(text, answer);
    let job = pipeline.job(hit.job_id).await.unwrap();
    assert_eq!(job["output"]["cached"], true);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_chat_job_streams() {
    let pipeline = Pipeline::start(PipelineOptions::default()).await;
    let response = pipeline
        .http
        .post(format!("{}/v1/jobs", pipeline.ingest_url))
        .json(&json!({"user_id": "u", "model": "sim", "stream": true, "input": ["a text"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_field");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stream"),
        "{body}"
    );
    pipeline.stop().await;
}
