//! The in-process embedding model. Inference never runs on the async runtime's threads: a
//! dedicated, bounded rayon pool runs the forward passes, so Kafka polling, health checks and
//! HTTP model calls stay prompt while the model is saturated. A dynamic batcher (like Triton's)
//! groups concurrent jobs into one forward pass, up to `max_batch` texts or `max_wait`.

mod minilm;

pub use minilm::{MAX_TOKENS, MiniLm};

use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub use sluice_common::minilm::LOCAL_MODEL;

#[derive(Debug, Clone)]
pub struct EmbedderSettings {
    /// Holds `config.json`, `model.safetensors` and `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Threads of the model's own pool.
    pub threads: usize,
    /// Most texts in one forward pass; 1 turns batching across jobs off.
    pub max_batch: usize,
    /// Longest the first job of a batch waits for others.
    pub max_wait: Duration,
}

/// Vectors for the texts of one job.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read, padding excluded.
    pub tokens: usize,
}

struct Pending {
    texts: Vec<String>,
    /// How many texts the job sent (`texts` is emptied into the batch).
    count: usize,
    reply: oneshot::Sender<anyhow::Result<Embedded>>,
}

/// A handle to the loaded model and its batcher; cheap to clone.
#[derive(Clone)]
pub struct Embedder {
    sender: mpsc::Sender<Pending>,
    pub dimensions: usize,
    /// Time taken to load the model, for the logs and the README's figures.
    pub load_time: Duration,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dimensions", &self.dimensions)
            .finish()
    }
}

impl Embedder {
    /// Loads the model on its pool; a missing or corrupt file is an error naming the path.
    pub async fn load(settings: EmbedderSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(settings.threads > 0, "the embedding pool needs a thread");
        anyhow::ensure!(
            settings.max_batch > 0,
            "the embedding batch needs room for a text"
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.threads)
            .thread_name(|index| format!("embed-{index}"))
            .build()
            .context("starting the embedding thread pool")?;
        let pool = Arc::new(pool);
        let started = Instant::now();
        let dir = settings.model_dir.clone();
        let model = run_on(&pool, move || MiniLm::load(&dir)).await?;
        let load_time = started.elapsed();
        tracing::info!(
            model = LOCAL_MODEL,
            dir = %settings.model_dir.display(),
            load_ms = load_time.as_millis() as u64,
            threads = settings.threads,
            max_batch = settings.max_batch,
            max_wait_ms = settings.max_wait.as_millis() as u64,
            "embedding model loaded"
        );
        let dimensions = model.dimensions;
        // Bounded: a full queue makes jobs wait for room, not memory grow.
        let (sender, receiver) = mpsc::channel(1024);
        tokio::spawn(batch_loop(receiver, Arc::new(model), pool, settings));
        Ok(Self {
            sender,
            dimensions,
            load_time,
        })
    }

    pub async fn embed(&self, texts: Vec<String>) -> anyhow::Result<Embedded> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Pending {
                count: texts.len(),
                texts,
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the embedding model has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the embedding model has stopped"))?
    }
}

/// Runs `work` on the model's pool and waits for it without holding a runtime thread.
async fn run_on<T: Send + 'static>(
    pool: &rayon::ThreadPool,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (done, result) = oneshot::channel();
    pool.spawn(move || {
        let _ = done.send(work());
    });
    result
        .await
        .map_err(|_| anyhow::anyhow!("the embedding pool dropped a task"))?
}

/// One forward pass at a time; the jobs that arrive meanwhile form the next batch.
async fn batch_loop(
    mut receiver: mpsc::Receiver<Pending>,
    model: Arc<MiniLm>,
    pool: Arc<rayon::ThreadPool>,
    settings: EmbedderSettings,
) {
    while let Some(first) = receiver.recv().await {
        let mut texts = first.count;
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + settings.max_wait;
        while texts < settings.max_batch {
            match tokio::time::timeout_at(until, receiver.recv()).await {
                Ok(Some(pending)) => {
                    texts += pending.count;
                    batch.push(pending);
                }
                _ => break,
            }
        }
        let all: Vec<String> = batch
            .iter_mut()
            .flat_map(|pending| std::mem::take(&mut pending.texts))
            .collect();
        let counts: Vec<usize> = batch.iter().map(|pending| pending.count).collect();
        let (model, max_batch) = (model.clone(), settings.max_batch);
        let started = Instant::now();
        let result = run_on(&pool, move || {
            // One pass per `max_batch` texts: a single large job is cut, never a small one.
            let mut vectors = Vec::with_capacity(all.len());
            let mut token_counts = Vec::with_capacity(all.len());
            for chunk in all.chunks(max_batch) {
                let (chunk_vectors, chunk_tokens) = model.embed(chunk)?;
                vectors.extend(chunk_vectors);
                token_counts.extend(chunk_tokens);
            }
            Ok((vectors, token_counts))
        })
        .await;
        metrics::histogram!("sluice_embedding_batch_texts").record(texts as f64);
        metrics::histogram!("sluice_embedding_forward_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok((vectors, token_counts)) => {
                let mut vectors = vectors.into_iter();
                let mut token_counts = token_counts.into_iter();
                for (pending, count) in batch.into_iter().zip(counts) {
                    let embedded = Embedded {
                        vectors: vectors.by_ref().take(count).collect(),
                        tokens: token_counts.by_ref().take(count).sum(),
                    };
                    let _ = pending.reply.send(Ok(embedded));
                }
            }
            Err(error) => {
                let message = format!("{error:#}");
                for pending in batch {
                    let _ = pending.reply.send(Err(anyhow::anyhow!(message.clone())));
                }
            }
        }
    }
}
