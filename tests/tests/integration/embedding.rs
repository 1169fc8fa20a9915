//! The in-process embedding model (all-MiniLM-L6-v2 on candle): known similarities, batching
//! that changes no vector, and a runtime that stays responsive while the model is saturated.

use sluice_worker::embed::{Embedder, EmbedderSettings};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The model `scripts/test` fetched; in CI a missing model fails, it never skips.
pub(crate) fn model_dir() -> PathBuf {
    let dir = std::env::var("SLUICE_TEST_EMBEDDING_MODEL_DIR")
        .or_else(|_| std::env::var("SLUICE_EMBEDDING_MODEL_DIR"))
        .expect("SLUICE_TEST_EMBEDDING_MODEL_DIR names the model (scripts/test fetches it)");
    PathBuf::from(dir)
}

async fn embedder(max_batch: usize, max_wait_ms: u64) -> Embedder {
    Embedder::load(EmbedderSettings {
        model_dir: model_dir(),
        threads: 2,
        max_batch,
        max_wait: Duration::from_millis(max_wait_ms),
    })
    .await
    .expect("the model loads")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn texts(list: &[&str]) -> Vec<String> {
    list.iter().map(|text| (*text).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_pairs_have_the_similarities_sentence_transformers_gives() {
    let model = embedder(8, 2).await;
    println!("model loaded in {} ms", model.load_time.as_millis());
    let started = Instant::now();
    let one = model
        .embed(texts(&["A man is eating food."]))
        .await
        .unwrap();
    println!("one sentence: {} ms", started.elapsed().as_millis());
    assert_eq!(model.dimensions, 384);
    assert_eq!(one.vectors[0].len(), 384);
    let norm: f32 = one.vectors[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "L2-normalised, norm {norm}");

    let embedded = model
        .embed(texts(&[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ]))
        .await
        .unwrap();
    let v = &embedded.vectors;
    let (related, unrelated) = (cosine(&v[0], &v[1]), cosine(&v[0], &v[2]));
    println!("cosine related {related:.4}, unrelated {unrelated:.4}");
    // sentence-transformers/all-MiniLM-L6-v2 in PyTorch: 0.7553 and -0.1050.
    assert!((related - 0.7553).abs() < 1e-3, "related pair: {related}");
    assert!(
        (unrelated - (-0.1050)).abs() < 1e-3,
        "unrelated pair: {unrelated}"
    );
    assert!(embedded.tokens > 20, "tokens counted: {}", embedded.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_gives_the_vectors_single_runs_give() {
    let sentences = [
        "A man is eating food.",
        "Kafka partitions keep one user's jobs in order, while the broker spreads users across consumers.",
        "Hi",
        "The girl is carrying a baby.",
        "Backpressure is a property to test, not to hope for.",
    ];
    let single = embedder(1, 0).await;
    let mut alone = Vec::new();
    for sentence in sentences {
        alone.push(
            single
                .embed(texts(&[sentence]))
                .await
                .unwrap()
                .vectors
                .remove(0),
        );
    }
    // Concurrent jobs, grouped into one padded forward pass by the batcher.
    let batched = embedder(32, 50).await;
    let jobs = sentences.map(|sentence| {
        let model = batched.clone();
        tokio::spawn(async move { model.embed(texts(&[sentence])).await.unwrap() })
    });
    for (index, job) in jobs.into_iter().enumerate() {
        let vector = job.await.unwrap().vectors.remove(0);
        let most = vector
            .iter()
            .zip(&alone[index])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            most < 1e-5,
            "sentence {index} differs by {most} when batched"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_stays_prompt_while_the_model_is_saturated() {
    let model = embedder(16, 5).await;
    let long = "Sluice keeps the API apart from the workers, so a burst of requests is queued \
                rather than answered by a blocked server; the model sees the load it can bear."
        .repeat(3);
    // Far more work than two threads can do at once.
    let started = Instant::now();
    let jobs: Vec<_> = (0..12)
        .map(|index| {
            let model = model.clone();
            let text = format!("{index} {long}");
            tokio::spawn(async move { model.embed(vec![text; 8]).await.unwrap() })
        })
        .collect();
    // Meanwhile a runtime task that must wake every 10 ms.
    let mut worst_lateness = Duration::ZERO;
    let mut ticks = 0;
    while jobs.iter().any(|job| !job.is_finished()) {
        let asked = Instant::now();
        tokio::time::sleep(Duration::from_millis(10)).await;
        worst_lateness =
            worst_lateness.max(asked.elapsed().saturating_sub(Duration::from_millis(10)));
        ticks += 1;
    }
    let busy = started.elapsed();
    for job in jobs {
        assert_eq!(job.await.unwrap().vectors.len(), 8);
    }
    println!(
        "96 long texts in {} ms; {ticks} runtime ticks, worst lateness {} ms",
        busy.as_millis(),
        worst_lateness.as_millis()
    );
    // A forward pass of 16 long texts takes far longer than this; had one run on a runtime
    // thread, the timer would have been late by a whole pass.
    assert!(
        busy > Duration::from_millis(500),
        "the model was saturated for a while"
    );
    assert!(
        worst_lateness < busy / 4,
        "the runtime stalled {} ms in {} ms",
        worst_lateness.as_millis(),
        busy.as_millis()
    );
}

/// Embedding jobs end to end: ingest -> Kafka -> worker (in-process model, or an
/// OpenAI-compatible `/v1/embeddings` server) -> Kafka -> Postgres -> `GET /v1/jobs/{id}`.
mod pipeline {
    use super::{cosine, model_dir};
    use serde_json::json;
    use sluice_tests::{Pipeline, PipelineOptions};
    use std::time::{Duration, Instant};

    fn vectors(job: &serde_json::Value) -> Vec<Vec<f32>> {
        serde_json::from_value(job["output"]["embeddings"].clone()).expect("output.embeddings")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedding_jobs_run_end_to_end_beside_chat_jobs() {
        let pipeline = Pipeline::start(PipelineOptions {
            embedding_model_dir: Some(model_dir()),
            ..PipelineOptions::default()
        })
        .await;
        let pair = pipeline
            .submit_body(&json!({
                "user_id": "embedder",
                "model": "all-minilm-l6-v2",
                "input": ["A man is eating food.", "A man is eating a piece of bread."],
            }))
            .await;
        let single = pipeline
            .submit_body(&json!({"user_id": "embedder", "model": "all-minilm-l6-v2", "input": "The girl is carrying a baby."}))
            .await;
        // Any other model name goes to the OpenAI-compatible backend's /v1/embeddings.
        let remote = pipeline
            .submit_body(&json!({"user_id": "embedder", "model": "sim-embed", "input": ["one", "two", "three"]}))
            .await;
        let chat = pipeline.submit("chatter", "still here").await;
        let ids = [pair.job_id, single.job_id, remote.job_id, chat.job_id].map(Into::into);
        pipeline.wait_terminal(&ids, Duration::from_secs(60)).await;

        let pair = pipeline.job(pair.job_id).await.unwrap();
        assert_eq!(pair["status"], "succeeded", "{pair}");
        assert_eq!(pair["output"]["dimensions"], 384);
        assert_eq!(pair["output"]["model"], "all-minilm-l6-v2");
        let pair_vectors = vectors(&pair);
        assert_eq!(pair_vectors.len(), 2);
        let similarity = cosine(&pair_vectors[0], &pair_vectors[1]);
        assert!((similarity - 0.7553).abs() < 1e-3, "cosine {similarity}");
        assert!(pair["output"]["usage"]["prompt_tokens"].as_u64().unwrap() > 10);

        let single = pipeline.job(single.job_id).await.unwrap();
        assert_eq!(vectors(&single).len(), 1, "a string input is one text");

        let remote = pipeline.job(remote.job_id).await.unwrap();
        assert_eq!(remote["status"], "succeeded", "{remote}");
        assert_eq!(
            remote["output"]["dimensions"], 8,
            "the simulated server's vectors"
        );
        assert_eq!(vectors(&remote).len(), 3);

        let chat = pipeline.job(chat.job_id).await.unwrap();
        assert_eq!(chat["output"]["content"], "echo: still here");
        assert!(chat["output"].get("embeddings").is_none());
        pipeline.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn health_checks_and_other_jobs_stay_prompt_while_the_model_is_saturated() {
        let pipeline = Pipeline::start(PipelineOptions {
            embedding_model_dir: Some(model_dir()),
            ..PipelineOptions::default()
        })
        .await;
        let long = "Sluice queues the burst and lets the model take what it can bear. ".repeat(6);
        let started = Instant::now();
        let mut embedding_ids: Vec<sluice_schemas::JobId> = Vec::new();
        for index in 0..24 {
            let texts: Vec<String> = (0..8).map(|n| format!("{index}.{n} {long}")).collect();
            let accepted = pipeline
                .submit_body(&json!({"user_id": format!("bulk-{}", index % 4), "model": "all-minilm-l6-v2", "input": texts}))
                .await;
            embedding_ids.push(accepted.job_id);
        }
        // While the model works through them: a chat job, and the worker's health endpoint.
        let chat = pipeline.submit("interactive", "are you there?").await;
        let health = format!("{}/healthz", pipeline.worker_urls[0]);
        let http = reqwest::Client::new();
        let mut worst_health = Duration::ZERO;
        let mut chat_done = None;
        loop {
            let asked = Instant::now();
            let answer = http.get(&health).send().await.expect("/healthz answers");
            assert!(answer.status().is_success());
            worst_health = worst_health.max(asked.elapsed());
            if chat_done.is_none()
                && pipeline
                    .job(chat.job_id)
                    .await
                    .is_some_and(|job| job["status"] == "succeeded")
            {
                chat_done = Some(started.elapsed());
            }
            let mut finished = 0;
            for id in &embedding_ids {
                if pipeline
                    .job(id)
                    .await
                    .is_some_and(|job| job["status"] == "succeeded")
                {
                    finished += 1;
                }
            }
            if finished == embedding_ids.len() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "the embedding jobs finish"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let saturated = started.elapsed();
        let chat_done = chat_done.expect("the chat job finished while the model was busy");
        println!(
            "192 long texts in {} ms; chat job done after {} ms; worst /healthz {} ms",
            saturated.as_millis(),
            chat_done.as_millis(),
            worst_health.as_millis()
        );
        // Inference on the runtime's threads would hold both back until the model was done.
        assert!(
            chat_done < saturated / 2,
            "the chat job was not held behind the model"
        );
        assert!(worst_health < saturated / 4, "health stayed prompt");
        pipeline.stop().await;
    }
}

#[tokio::test]
async fn a_missing_or_corrupt_model_file_is_an_error_naming_it() {
    let missing = std::env::temp_dir().join(format!("no-model-{}", uuid::Uuid::now_v7()));
    let settings = |dir: &std::path::Path| EmbedderSettings {
        model_dir: dir.to_path_buf(),
        threads: 1,
        max_batch: 1,
        max_wait: Duration::ZERO,
    };
    let error = Embedder::load(settings(&missing)).await.unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains(&missing.join("config.json").display().to_string()),
        "{text}"
    );

    let corrupt = std::env::temp_dir().join(format!("corrupt-model-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&corrupt).unwrap();
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(model_dir().join(name), corrupt.join(name)).unwrap();
    }
    std::fs::write(corrupt.join("model.safetensors"), b"not weights").unwrap();
    let error = Embedder::load(settings(&corrupt)).await.unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains(&corrupt.join("model.safetensors").display().to_string()),
        "{text}"
    );
    std::fs::remove_dir_all(&corrupt).unwrap();
}
