//! Ingest SIGKILLed under load and replaced 2 s later on the same address, with idempotency keys
//! in Redis: a client that got no answer retries with its key. Every key ends with exactly one
//! job (the same id in every 202 for it), and every job with exactly one terminal status.

use crate::faults::Cluster;
use sluice_tests::exclusive_stage;
use sluice_tests::process::{ServiceProcess, free_port};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const JOBS: usize = 200;
/// Jobs `KILL_AT..KILL_AT + BURST` are sent at once, and ingest is killed while they are on
/// their way: some have claimed their key and not yet answered.
const KILL_AT: usize = 60;
const BURST: usize = 20;

/// Every 202 each key got, and how the client fared.
#[derive(Default)]
pub(crate) struct Answers {
    pub(crate) by_key: BTreeMap<usize, Vec<Uuid>>,
    pub(crate) transport_errors: u64,
    pub(crate) in_progress: u64,
    /// How long each `503` took to arrive, and whether it said when to retry.
    pub(crate) unavailable: Vec<(Duration, bool)>,
    pub(crate) other: BTreeMap<u16, u64>,
}

impl Answers {
    /// The one job of each key (every 202 for a key named the same job).
    pub(crate) fn jobs(&self) -> Vec<Uuid> {
        let mut jobs = BTreeSet::new();
        for (index, ids) in &self.by_key {
            assert!(
                ids.iter().all(|id| *id == ids[0]),
                "key {index} answered two different jobs: {ids:?}"
            );
            jobs.insert(ids[0]);
        }
        assert_eq!(jobs.len(), self.by_key.len(), "one job per key");
        jobs.into_iter().collect()
    }
}

async fn ingest(cluster: &Cluster, port: u16, redis_prefix: &str, label: &str) -> ServiceProcess {
    let mut env = cluster.env();
    env.insert("SLUICE_INGEST_ADDR".into(), format!("127.0.0.1:{port}"));
    env.insert(
        "REDIS_URL".into(),
        std::env::var("SLUICE_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:56379".to_owned()),
    );
    env.insert("SLUICE_REDIS_PREFIX".into(), redis_prefix.to_owned());
    env.insert(
        "SLUICE_TIERS".into(),
        r#"{"default": {"rate_per_sec": 100000, "burst": 100000}}"#.into(),
    );
    let process = ServiceProcess::spawn("sluice-ingest", label, &env);
    cluster.wait_ready(&process, port).await;
    process
}

/// Submits job `index` with its key until a 202 arrives, as a client that got no answer (or a
/// `503`) does.
pub(crate) async fn submit_until_accepted(
    http: reqwest::Client,
    url: String,
    index: usize,
    answers: Arc<Mutex<Answers>>,
) {
    let body = serde_json::json!({
        "user_id": format!("user-{}", index % 10), "model": "sim",
        "messages": [{"role": "user", "content": format!("job {index}")}]
    });
    let started = Instant::now();
    loop {
        let sent_at = Instant::now();
        let sent = http
            .post(&url)
            .header("Idempotency-Key", format!("key-{index}"))
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(response) if response.status() == 202 => {
                let accepted: serde_json::Value = response.json().await.unwrap();
                let job_id = accepted["job_id"].as_str().unwrap().parse().unwrap();
                let mut answers = answers.lock().unwrap();
                answers.by_key.entry(index).or_default().push(job_id);
                // Once more with the same key, as a client unsure of the first answer might.
                if answers.by_key[&index].len() < 2 && index.is_multiple_of(5) {
                    drop(answers);
                    continue;
                }
                return;
            }
            Ok(response) if response.status() == 409 => answers.lock().unwrap().in_progress += 1,
            Ok(response) if response.status() == 503 => {
                let retry_after = response.headers().contains_key("retry-after");
                answers
                    .lock()
                    .unwrap()
                    .unavailable
                    .push((sent_at.elapsed(), retry_after));
            }
            Ok(response) => {
                *answers
                    .lock()
                    .unwrap()
                    .other
                    .entry(response.status().as_u16())
                    .or_default() += 1;
            }
            Err(_) => answers.lock().unwrap().transport_errors += 1,
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "job {index} was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_killed_under_load_loses_no_job_and_makes_none_twice() {
    // Alone on the machine: it loads the cores with processes.
    let _stage = exclusive_stage().await;
    let cluster = Cluster::start("ingest SIGKILL").await;
    let _results = cluster.results("results").await;
    let _worker = cluster.worker("worker").await;
    let port = free_port();
    let prefix = format!("test:{}:", Uuid::now_v7().simple());
    let mut first = Some(ingest(&cluster, port, &prefix, "ingest-a").await);
    let mut replacement = None;

    let answers = Arc::new(Mutex::new(Answers::default()));
    let url = format!("http://127.0.0.1:{port}/v1/jobs");
    let mut clients = Vec::with_capacity(JOBS);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for index in 0..JOBS {
        if !(KILL_AT..KILL_AT + BURST).contains(&index) {
            tick.tick().await;
        }
        clients.push(tokio::spawn(submit_until_accepted(
            cluster.http.clone(),
            url.clone(),
            index,
            answers.clone(),
        )));
        if index == KILL_AT + BURST - 1
            && let Some(first) = first.take()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
            first.kill().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            // The replacement starts while the clients keep retrying.
            replacement = Some(ingest(&cluster, port, &prefix, "ingest-b").await);
        }
    }
    for client in clients {
        client.await.unwrap();
    }
    assert!(replacement.is_some());

    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let ids = answers.jobs();
    assert_eq!(ids.len(), JOBS, "one job per key");
    let pool = &cluster.database.pool;
    sluice_tests::wait_terminal(pool, &ids, Duration::from_secs(120)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, JOBS as i64, "no job that no client knows of");
    let not_once = sluice_tests::terminal_not_once(pool, &ids).await;
    assert_eq!(
        not_once, 0,
        "every job recorded exactly one terminal status"
    );
    println!(
        "ingest SIGKILL: {JOBS} keys, {JOBS} jobs, each terminal exactly once; the clients saw {} transport errors, {} `409 in progress`, {} `503`, other answers {:?}",
        answers.transport_errors,
        answers.in_progress,
        answers.unavailable.len(),
        answers.other
    );
}
