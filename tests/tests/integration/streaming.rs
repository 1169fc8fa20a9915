//! A job asked to be streamed, run by the worker directly: its answer's pieces on the deltas
//! topic, coalesced and in order. (Through the OpenAI front door: `openai.rs`.)

use crate::worker::{Harness, request, sim};
use rdkafka::Message;
use sluice_schemas::{DeltaEvent, JobStatus, Message as ChatMessage, Role, Task};
use sluice_tests::infra::read_topic;
use sluice_tests::wait_until;
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
    job.task = Task::Chat(vec![ChatMessage {
        role: Role::User,
        content: "one two three four five six seven eight nine ten".into(),
    }]);
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
