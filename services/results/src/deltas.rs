//! Streamed answers as they grow, for the `delta` events of `GET /v1/jobs/{id}/events`.
//!
//! Every replica reads every partition of the deltas topic from the end (outside any group: a
//! browser may follow, or resume, a job on any replica) and keeps each job's answer so far in
//! memory, for `SLUICE_DELTAS_KEEP_SECS` after its last piece, at most `SLUICE_DELTAS_MAX_JOBS`
//! jobs and `MAX_ANSWER_BYTES` each. What a replica does not have (it started after the job
//! began, or a piece was lost) costs a reader nothing but latency: the stream sends the rest of
//! the answer, from the byte its reader has, just before the terminal status.

use sluice_common::kafka::{self, KafkaArgs, Record, Start};
use sluice_schemas::{DeltaEvent, JobId};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Past this much text a job's answer is not kept further; its rest comes with the terminal status.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Most text one `delta` event carries. A reader catching up (it reconnected mid-answer, or
/// reads slower than the model writes) gets the answer in pieces of at most this, so what its
/// connection holds beyond the buffer limit is one piece, not the rest of the answer.
pub const MAX_PIECE_BYTES: usize = 16 * 1024;

/// `text` in pieces of at most `MAX_PIECE_BYTES`, each ending between characters.
pub fn pieces(mut text: &str) -> impl Iterator<Item = &str> {
    std::iter::from_fn(move || {
        if text.is_empty() {
            return None;
        }
        let (piece, rest) = text.split_at(text.floor_char_boundary(MAX_PIECE_BYTES));
        text = rest;
        Some(piece)
    })
}

/// Every job's streamed answer so far, as this replica has seen it.
#[derive(Clone)]
pub struct Answers {
    jobs: moka::sync::Cache<JobId, Arc<Answer>>,
}

/// One job's answer so far; readers wait on `grown`.
#[derive(Debug)]
pub struct Answer {
    text: Mutex<Text>,
    grown: watch::Sender<()>,
}

#[derive(Debug, Default)]
struct Text {
    /// The pieces' text, in order, from the first piece without a gap.
    text: String,
    /// The attempt the pieces belong to, and the index of the next one expected.
    attempt: u32,
    next_index: u32,
    /// A piece was missing, or the answer grew too long: no more is appended.
    stopped: bool,
    /// How many times the answer started over (a worker died mid-answer and the job ran again).
    restarts: u32,
}

/// What a reader gets of the answer beyond the bytes it has.
#[derive(Debug, PartialEq, Eq)]
pub struct Growth {
    /// At most `MAX_PIECE_BYTES` of it.
    pub text: String,
    pub restarts: u32,
    /// There is more after `text`.
    pub more: bool,
}

impl Answers {
    pub fn new(keep: Duration, max_jobs: u64) -> Self {
        Self {
            jobs: moka::sync::Cache::builder()
                .time_to_idle(keep)
                .max_capacity(max_jobs)
                .build(),
        }
    }

    /// The job's answer, empty until its first piece arrives.
    pub fn answer(&self, job_id: JobId) -> Arc<Answer> {
        self.jobs.get_with(job_id, || {
            Arc::new(Answer {
                text: Mutex::new(Text::default()),
                grown: watch::Sender::new(()),
            })
        })
    }

    fn record(&self, piece: DeltaEvent) {
        self.answer(piece.job_id).append(piece);
    }
}

impl Answer {
    fn append(&self, piece: DeltaEvent) {
        let mut text = self.text.lock().expect("answer lock");
        let started = text.next_index > 0;
        if piece.index == 0 && started {
            // The job ran again from the start: what readers have is a different answer.
            let restarts = text.restarts + 1;
            *text = Text {
                restarts,
                ..Text::default()
            };
        } else if text.stopped
            || piece.index != text.next_index
            || (started && piece.attempt != text.attempt)
            || text.text.len() + piece.text.len() > MAX_ANSWER_BYTES
        {
            text.stopped = true;
            return;
        }
        text.attempt = piece.attempt;
        text.next_index = piece.index + 1;
        text.text.push_str(&piece.text);
        drop(text);
        self.grown.send_replace(());
    }

    /// The next piece of the answer past its first `bytes` bytes, if there is more (and `bytes` falls between
    /// characters, as it does for any position this service handed out).
    pub fn after(&self, bytes: usize) -> Option<Growth> {
        let text = self.text.lock().expect("answer lock");
        let rest = text.text.get(bytes..).filter(|rest| !rest.is_empty())?;
        let piece = pieces(rest).next()?;
        Some(Growth {
            text: piece.to_owned(),
            restarts: text.restarts,
            more: piece.len() < rest.len(),
        })
    }

    /// Whether `final_text`'s first `bytes` bytes begin with the answer kept here (as far as
    /// it goes): false when the job ran again and answered differently.
    pub fn agrees_with(&self, final_text: &str, bytes: usize) -> bool {
        let text = self.text.lock().expect("answer lock");
        let compared = bytes.min(text.text.len());
        text.text.as_bytes()[..compared] == final_text.as_bytes()[..compared.min(final_text.len())]
    }

    /// Wakes when the answer grows.
    pub fn watch(&self) -> watch::Receiver<()> {
        self.grown.subscribe()
    }
}

/// Reads the deltas topic until `stop`, starting again after a broker failure.
pub async fn follow(
    kafka: KafkaArgs,
    topic: String,
    answers: Answers,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let client_id = format!("sluice-results-deltas-{}", uuid::Uuid::new_v4().simple());
    let keep = |record: &Record| match DeltaEvent::decode(record.payload()) {
        Ok(piece) => answers.record(piece),
        Err(error) => {
            tracing::debug!(reason = %error, offset = record.offset, "skipping an undecodable delta")
        }
    };
    kafka::follow(&kafka, &client_id, &topic, Start::End, &stop, keep).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use sluice_schemas::{SCHEMA_VERSION, UserId};

    fn piece(job_id: JobId, attempt: u32, index: u32, text: &str) -> DeltaEvent {
        DeltaEvent {
            schema_version: SCHEMA_VERSION,
            job_id,
            user_id: UserId::parse("u").unwrap(),
            attempt,
            index,
            text: text.to_owned(),
            emitted_at: Utc::now(),
        }
    }

    fn answers() -> Answers {
        Answers::new(Duration::from_secs(60), 100)
    }

    #[test]
    fn pieces_in_order_make_the_answer_and_a_reader_gets_what_it_lacks() {
        let answers = answers();
        let job = JobId::new();
        answers.record(piece(job, 1, 0, "Hel"));
        answers.record(piece(job, 1, 1, "lo, wörld"));
        let answer = answers.answer(job);
        assert_eq!(answer.after(0).unwrap().text, "Hello, wörld");
        assert_eq!(answer.after(3).unwrap().text, "lo, wörld");
        assert_eq!(answer.after(13), None, "nothing past the end");
        assert_eq!(answer.after(9), None, "not between characters");
        assert!(answer.agrees_with("Hello, wörld!", 5));
        assert!(!answer.agrees_with("Help", 4));
    }

    #[test]
    fn a_gap_stops_the_answer_and_a_new_start_replaces_it() {
        let answers = answers();
        let job = JobId::new();
        answers.record(piece(job, 1, 0, "a"));
        answers.record(piece(job, 1, 2, "c"));
        answers.record(piece(job, 1, 3, "d"));
        assert_eq!(answers.answer(job).after(0).unwrap().text, "a");

        answers.record(piece(job, 1, 0, "x"));
        answers.record(piece(job, 1, 1, "y"));
        let growth = answers.answer(job).after(0).unwrap();
        assert_eq!(
            growth,
            Growth {
                text: "xy".to_owned(),
                restarts: 1,
                more: false,
            }
        );
    }

    #[test]
    fn a_long_answer_goes_out_in_pieces_that_end_between_characters() {
        let answers = answers();
        let job = JobId::new();
        // 'é' is two bytes: the limit falls inside one.
        let text = format!("a{}", "é".repeat(MAX_PIECE_BYTES));
        answers.record(piece(job, 1, 0, &text));
        let answer = answers.answer(job);
        let first = answer.after(0).unwrap();
        assert_eq!(first.text.len(), MAX_PIECE_BYTES - 1);
        assert!(first.more);
        let mut read = first.text;
        while let Some(growth) = answer.after(read.len()) {
            assert!(growth.text.len() <= MAX_PIECE_BYTES);
            assert_eq!(growth.more, read.len() + growth.text.len() < text.len());
            read.push_str(&growth.text);
        }
        assert_eq!(read, text);
        let split: Vec<&str> = pieces(&text).collect();
        assert_eq!((split.len(), split.concat()), (3, text.clone()));
    }
}
