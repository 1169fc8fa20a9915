//! Figures for the in-process embedding model: load time, one sentence, and throughput of many
//! concurrent single-sentence jobs with dynamic batching off and on.
//!
//! `cargo run --release -p sluice-worker --example embed_bench -- MODEL_DIR [THREADS]`

use sluice_worker::embed::{Embedder, EmbedderSettings};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SENTENCES: [&str; 8] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
];

fn percentile(sorted: &[Duration], quantile: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

async fn load(
    dir: &std::path::Path,
    threads: usize,
    max_batch: usize,
    max_wait_ms: u64,
) -> Embedder {
    Embedder::load(EmbedderSettings {
        model_dir: dir.to_path_buf(),
        threads,
        max_batch,
        max_wait: Duration::from_millis(max_wait_ms),
    })
    .await
    .expect("the model loads")
}

/// `jobs` concurrent one-sentence jobs: (sentences per second, sorted latencies).
async fn concurrent(model: &Embedder, jobs: usize) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..jobs)
        .map(|index| {
            let model = model.clone();
            tokio::spawn(async move {
                let asked = Instant::now();
                let text = format!("{} ({index})", SENTENCES[index % SENTENCES.len()]);
                model.embed(vec![text]).await.expect("embedded");
                asked.elapsed()
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(jobs);
    for task in tasks {
        latencies.push(task.await.expect("a job"));
    }
    latencies.sort();
    (jobs as f64 / started.elapsed().as_secs_f64(), latencies)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: embed_bench MODEL_DIR [THREADS]"));
    let threads: usize = args
        .next()
        .map_or(2, |text| text.parse().expect("a thread count"));

    let single = load(&dir, threads, 1, 0).await;
    println!(
        "model load: {} ms ({threads} threads)",
        single.load_time.as_millis()
    );
    single.embed(vec!["warm up".into()]).await.expect("warm-up");
    let mut one = Vec::new();
    for index in 0..100 {
        let asked = Instant::now();
        single
            .embed(vec![SENTENCES[index % SENTENCES.len()].to_owned()])
            .await
            .expect("embedded");
        one.push(asked.elapsed());
    }
    one.sort();
    println!(
        "one short sentence, alone: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&one, 0.5),
        percentile(&one, 0.99)
    );

    println!(
        "| batching | jobs | sentences/s | latency p50 ms | p99 ms |\n|---|---:|---:|---:|---:|"
    );
    for (label, max_batch, max_wait) in [
        ("off (max batch 1)", 1, 0),
        ("on (max batch 8, 5 ms)", 8, 5),
        ("on (max batch 32, 5 ms)", 32, 5),
    ] {
        let model = load(&dir, threads, max_batch, max_wait).await;
        model.embed(vec!["warm up".into()]).await.expect("warm-up");
        let (rate, latencies) = concurrent(&model, 512).await;
        println!(
            "| {label} | 512 | {rate:.0} | {:.0} | {:.0} |",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
    }
}
