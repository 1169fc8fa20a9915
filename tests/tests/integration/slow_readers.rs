//! Readers that open a job's event stream and never read it, against the results service as a
//! process: what they cost it in memory while a long answer streams, and that it closes their
//! connections once they have taken nothing for `SLUICE_HTTP_SEND_TIMEOUT_SECS`, freeing their
//! places. A reader that does read gets the whole answer meanwhile.
//!
//! The kernel's send buffer per connection is capped (`SLUICE_HTTP_SEND_BUFFER_BYTES`, 16 KiB),
//! as for any stream long enough to fill it: uncapped, the kernel takes up to 4 MiB per
//! connection before the process buffers anything (tried: each stuck reader here was sent all
//! of the 781 KiB answer, twice over counting the terminal status's copy).

use crate::faults::Cluster;
use sluice_common::http::MAX_BUFFERED_BYTES;
use sluice_results::deltas::MAX_PIECE_BYTES;
use sluice_tests::{exclusive_stage, follow_to_terminal, kafka_args, wait_until};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Readers that never read.
const STUCK: usize = 100;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Each stuck reader may cost the results process at most this much: what its connection
/// buffers (`MAX_BUFFERED_BYTES`, then one event of at most one piece), held in allocations up
/// to twice their length (an event's buffer grows by doubling), and a little more. Less than
/// the answer: a stream does not hold its answer.
const PER_READER_BOUND: u64 = 3 * (MAX_BUFFERED_BYTES + MAX_PIECE_BYTES) as u64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_never_read_cost_bounded_memory_and_are_cut_after_the_send_timeout() {
    let _stage = exclusive_stage().await;
    // The model waits 2 s before its first token, so every stream is open before the answer
    // starts, then answers as fast as it can.
    let sim = |sim: &mut sluice_model_sim::Config| {
        sim.service_time_ms = 2_000;
        sim.token_time_ms = 0;
    };
    let ingest = |ingest: &mut sluice_ingest::Config| ingest.max_body_bytes = 900_000;
    let cluster = Cluster::built("slow readers", kafka_args(6).brokers, sim, ingest).await;
    let _worker = cluster.worker("worker").await;
    let settings = HashMap::from([
        (
            "SLUICE_HTTP_SEND_TIMEOUT_SECS".to_owned(),
            SEND_TIMEOUT.as_secs().to_string(),
        ),
        (
            "SLUICE_HTTP_SEND_BUFFER_BYTES".to_owned(),
            "16384".to_owned(),
        ),
    ]);
    let (results, results_url) = cluster.results_with("results", settings).await;
    let pid = results.pid();

    // A first answer, read by one reader only: what one long answer costs the process whoever
    // reads it (the answer kept, decoding its events) is paid before the baseline.
    let (answer, _) = stream_an_answer(&cluster, &results_url, 0).await;
    let baseline = rss_bytes(pid);
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let (_, stuck) = stream_an_answer(&cluster, &results_url, STUCK).await;
    let per_reader = peak.load(Ordering::Relaxed).saturating_sub(baseline) / STUCK as u64;
    sampler.abort();
    println!(
        "slow readers: answer {} KiB; results RSS {} MiB after one reader, peak {} MiB with \
         {STUCK} never-reading streams more: {} KiB per stream (bound {} KiB)",
        answer.len() / 1024,
        baseline / (1 << 20),
        peak.load(Ordering::Relaxed) / (1 << 20),
        per_reader / 1024,
        PER_READER_BOUND / 1024,
    );
    assert!(
        per_reader <= PER_READER_BOUND,
        "a stream whose reader never reads costs {per_reader} bytes"
    );

    // The answer has ended, yet the stuck streams are still open (stalled, not finished) ...
    let stalled = Instant::now();
    let open = gauge(&cluster.http, &results_url, "sluice_sse_connections").await;
    assert_eq!(
        open,
        Some(STUCK as f64),
        "the stuck streams are open after the answer"
    );
    // ... until they have taken nothing for the send timeout: the gauge of open streams falls
    // to 0 and each reader, reading at last, finds its connection closed before the answer's end.
    wait_until(
        "the never-reading streams to be closed",
        SEND_TIMEOUT + Duration::from_secs(20),
        || async {
            let open = gauge(&cluster.http, &results_url, "sluice_sse_connections").await?;
            (open == 0.0).then_some(())
        },
    )
    .await;
    let closed_after = stalled.elapsed();
    let mut received = Vec::new();
    for mut stream in stuck {
        let mut bytes = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes));
        // A reset also says the server closed it.
        let _ = read.await.expect("the server closed the connection");
        received.push(bytes.len());
    }
    let most = received.iter().max().copied().unwrap_or(0);
    println!(
        "slow readers: all {STUCK} closed {:.1} s after the answer ended (send timeout {} s); \
         each had received at most {} KiB of the {} KiB answer",
        closed_after.as_secs_f64(),
        SEND_TIMEOUT.as_secs(),
        most / 1024,
        answer.len() / 1024,
    );
    assert!(
        most < answer.len(),
        "a stuck reader was sent the whole answer"
    );
}

/// Submits a streamed job with an answer of about 800 KB (the model echoes the prompt), opens
/// `stuck` never-reading streams of it, and follows it to the end as `EventSource` does: the
/// whole answer must come in its `delta` events. The answer, and the stuck connections.
async fn stream_an_answer(
    cluster: &Cluster,
    results_url: &str,
    stuck: usize,
) -> (String, Vec<TcpStream>) {
    let prompt: String = (0..80_000).map(|n| format!("word{n:05} ")).collect();
    let body = serde_json::json!({
        "user_id": "reader", "model": "sim", "stream": true,
        "messages": [{"role": "user", "content": prompt}]
    });
    let job_id = cluster.submit_body(&body).await.to_string();
    let address = results_url.trim_start_matches("http://");
    let mut connections = Vec::new();
    for _ in 0..stuck {
        connections.push(never_reading(address, &job_id).await);
    }
    let events_url = format!("{results_url}/v1/jobs/{job_id}/events");
    let (events, _) = follow_to_terminal(&cluster.http, &events_url, Duration::from_secs(60)).await;
    let streamed: String = events
        .iter()
        .filter(|event| event.event.as_deref() == Some("delta"))
        .map(|event| {
            let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
            data["text"].as_str().unwrap().to_owned()
        })
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("succeeded"));
    let terminal: serde_json::Value = serde_json::from_str(&last.data).unwrap();
    let answer = terminal["output"]["content"].as_str().unwrap();
    assert_eq!(streamed, answer, "the reading reader got the whole answer");
    (streamed, connections)
}

/// A connection asking for the job's events with a 4 KiB receive buffer, never read.
async fn never_reading(address: &str, job_id: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(address.parse().unwrap()).await.unwrap();
    let request = format!(
        "GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A process's resident memory now, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    sluice_bench::status_kib(pid, "VmRSS").unwrap_or(0) * 1024
}

/// A gauge's value on a service's `/metrics`.
async fn gauge(http: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series.split('{').next() == Some(name)).then(|| value.parse().ok())?
    })
}
