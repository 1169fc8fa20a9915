//! A server the pipeline depends on taken away under load: the broker killed and started again
//! 10 s later, Postgres stopped for 30 s. Clients retry refused submissions with their
//! `Idempotency-Key`, as the `503`'s `Retry-After` asks. Every key must end with exactly one job
//! and every job with exactly one terminal status; ingest must refuse promptly while the broker
//! is gone; the results service must say it is not ready and store nothing (commit no offset)
//! while Postgres is gone, and its event streams must carry on as `EventSource` follows them.

use crate::faults::Cluster;
use crate::ingest_faults::{Answers, submit_until_accepted};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_tests::broker::PrivateBroker;
use sluice_tests::{SseEvent, exclusive_stage, follow_to_terminal, kafka_args};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// At 50 a second: the load runs before, through and after the outage.
const JOBS: usize = 1_000;
const OUTAGE: Duration = Duration::from_secs(10);
/// Ingest's default `SLUICE_PUBLISH_TIMEOUT_MS`: no answer may take longer.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// What a client's clock may add to ingest's publish timeout: ingest runs in this test's process,
/// beside the 1,000 clients, on two cores the broker's JVM shares as it starts again. Why 2 s: a
/// CI run on 2026-12-02, on a machine where the broker took 25 s to come back, timed one refusal
/// at 6.45 s against a slack of 1 s (earlier CI runs had kept within it).
const CLIENT_SLACK: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_killed_for_ten_seconds_under_load_loses_nothing() {
    // Alone on the machine: a second broker and the services as processes load the cores.
    let _stage = exclusive_stage().await;
    let mut broker = PrivateBroker::start("outage").await;
    let cluster = Cluster::on_broker("broker outage", 100, broker.brokers()).await;
    let _results = cluster.results("results").await;
    let _worker = cluster.worker("worker").await;

    let answers = Arc::new(Mutex::new(Answers::default()));
    let load = steady_load(&cluster, JOBS, answers.clone());
    cluster.under_way(50).await;
    broker.kill().await;
    let killed = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    broker.restart().await;
    let down_for = killed.elapsed();
    load.await.unwrap();

    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let ids = answers.jobs();
    assert_eq!(ids.len(), JOBS, "every key was accepted in the end");
    let duplicates = cluster.verify(&ids).await;

    let mut waits: Vec<Duration> = answers.unavailable.iter().map(|(took, _)| *took).collect();
    waits.sort();
    assert!(!waits.is_empty(), "the clients met the outage");
    assert!(
        answers
            .unavailable
            .iter()
            .all(|(_, retry_after)| *retry_after),
        "every 503 says when to retry"
    );
    let slowest = *waits.last().unwrap();
    assert!(
        slowest <= PUBLISH_TIMEOUT + CLIENT_SLACK,
        "a refusal took {slowest:?}, past the publish timeout"
    );
    let median = waits[waits.len() / 2];
    // Why 500 ms: "at once" against the 5 s of a publish that waits; on the client's clock, on
    // two cores the restarting broker shares (a CI run on 2026-12-02 read 180 ms).
    assert!(
        median < Duration::from_millis(500),
        "while the broker is down most refusals are immediate; the median took {median:?}"
    );
    println!(
        "broker outage: down {:.1} s; {JOBS} keys, {JOBS} jobs terminal exactly once, {duplicates} duplicate model calls; {} `503` (median {:.1} ms, slowest {:.0} ms), {} transport errors, other answers {:?}",
        down_for.as_secs_f64(),
        waits.len(),
        median.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3,
        answers.transport_errors,
        answers.other
    );
}

/// `jobs` clients, one started every 20 ms, each submitting until its job is accepted.
fn steady_load(cluster: &Cluster, jobs: usize, answers: Arc<Mutex<Answers>>) -> JoinHandle<()> {
    let (http, url) = (
        cluster.http.clone(),
        format!("{}/v1/jobs", cluster.ingest_url),
    );
    tokio::spawn(async move {
        let mut clients = Vec::with_capacity(jobs);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for index in 0..jobs {
            tick.tick().await;
            let client = submit_until_accepted(http.clone(), url.clone(), index, answers.clone());
            clients.push(tokio::spawn(client));
        }
        for client in clients {
            client.await.unwrap();
        }
    })
}

const PG_OUTAGE: Duration = Duration::from_secs(30);
/// At 50 a second: before, through and after the outage.
const PG_JOBS: usize = 1_800;
/// Streams followed through the outage, of jobs submitted once Postgres is gone.
const FOLLOWED: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_gone_for_thirty_seconds_stores_everything_when_it_returns() {
    // Alone on the machine: it stops the Postgres every other test uses.
    let _stage = exclusive_stage().await;
    let command = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} (a pg_ctl command for the test Postgres) is set by scripts/test")
        })
    };
    let (stop, start) = (
        command("SLUICE_TEST_PG_STOP"),
        command("SLUICE_TEST_PG_START"),
    );
    let cluster = Cluster::start("Postgres outage").await;
    // Streams end after 5 s without news, so readers reconnect while Postgres is gone.
    let settings = HashMap::from([("SLUICE_SSE_IDLE_SECS".to_owned(), "5".to_owned())]);
    let (_results, results_url) = cluster.results_with("results", settings).await;
    let _worker = cluster.worker("worker").await;
    let offsets = Offsets::of(&cluster);

    let answers = Arc::new(Mutex::new(Answers::default()));
    let load = steady_load(&cluster, PG_JOBS, answers.clone());
    cluster.under_way(50).await;
    let mut restarted = Postgres::stop(&stop, &start).await;

    // Jobs submitted while Postgres is gone, followed as a browser follows them.
    let mut followers = Vec::new();
    for index in 0..FOLLOWED {
        // Ingest needs no Postgres.
        let job = cluster
            .submit("follower", &format!("followed {index}"))
            .await;
        let (http, url) = (
            cluster.http.clone(),
            format!("{results_url}/v1/jobs/{job}/events"),
        );
        followers.push(tokio::spawn(async move {
            follow_to_terminal(&http, &url, Duration::from_secs(120)).await
        }));
    }
    let readyz = format!("{results_url}/readyz");
    let not_ready_after =
        wait_for_status(&cluster.http, &readyz, 503, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let committed_early = offsets.committed();
    let produced_early = offsets.produced();
    tokio::time::sleep(PG_OUTAGE.saturating_sub(restarted.down.elapsed())).await;
    let committed_late = offsets.committed();
    let produced_late = offsets.produced();
    restarted.start().await;
    let ready_after = wait_for_status(&cluster.http, &readyz, 200, Duration::from_secs(60)).await;
    load.await.unwrap();

    assert!(
        produced_late > produced_early,
        "status events kept coming while Postgres was gone ({produced_early} then {produced_late})"
    );
    assert_eq!(
        committed_early, committed_late,
        "no offset committed while nothing could be stored"
    );
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let mut ids = answers.jobs();
    assert_eq!(ids.len(), PG_JOBS, "every key was accepted");
    let mut reconnects = 0;
    for follower in followers {
        let (events, reconnected) = follower.await.unwrap();
        reconnects += reconnected;
        check_followed(&events);
        let job = serde_json::from_str::<serde_json::Value>(&events[0].data).unwrap()["job_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        ids.push(job);
    }
    let duplicates = cluster.verify(&ids).await;
    println!(
        "Postgres outage: down {:.1} s; results not ready {:.1} s after the stop, ready {:.1} s after the start; committed offsets unchanged while {} status events arrived; {} jobs terminal exactly once, {duplicates} duplicate model calls; {FOLLOWED} streams followed to the end with {reconnects} reconnections",
        restarted.down_for.as_secs_f64(),
        not_ready_after.as_secs_f64(),
        ready_after.as_secs_f64(),
        produced_late - produced_early,
        ids.len()
    );
}

/// Postgres stopped, and started again (when the test ends early too: every other test needs it).
struct Postgres {
    down: Instant,
    down_for: Duration,
    start: String,
}

impl Postgres {
    async fn stop(stop: &str, start: &str) -> Self {
        shell(stop).await;
        Self {
            down: Instant::now(),
            down_for: Duration::ZERO,
            start: start.to_owned(),
        }
    }

    async fn start(&mut self) {
        shell(&self.start).await;
        self.down_for = self.down.elapsed();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.down_for.is_zero() {
            let _ = std::process::Command::new("sh")
                .args(["-c", &self.start])
                .status();
        }
    }
}

async fn shell(command: &str) {
    let status = tokio::process::Command::new("sh")
        .args(["-c", command])
        .status()
        .await
        .expect("running a pg_ctl command");
    assert!(status.success(), "`{command}` failed");
}

/// Waits for `url` to answer `status`; how long that took.
async fn wait_for_status(
    http: &reqwest::Client,
    url: &str,
    status: u16,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let answered = http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|response| response.status().as_u16());
        if answered.as_ref().is_ok_and(|answered| *answered == status) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{url} did not answer {status} within {timeout:?} (last: {answered:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A followed stream saw each status once, in order, ending with `succeeded`.
fn check_followed(events: &[SseEvent]) {
    let statuses: Vec<&str> = events
        .iter()
        .filter_map(|event| event.event.as_deref())
        .filter(|name| !matches!(*name, "queue" | "delta"))
        .collect();
    assert_eq!(
        statuses,
        ["queued", "running", "succeeded"],
        "each status once, in order: {events:?}"
    );
}

/// The results group's committed offsets and the status topic's end, summed over partitions.
struct Offsets {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
}

impl Offsets {
    fn of(cluster: &Cluster) -> Self {
        let kafka = kafka_args(6);
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", format!("{}-results", cluster.topics.requests))
            .set("enable.auto.commit", "false")
            .create()
            .expect("a client for the results group's offsets");
        Self {
            consumer,
            topic: cluster.topics.status.clone(),
            partitions: kafka.topic_partitions,
        }
    }

    fn committed(&self) -> i64 {
        let mut list = TopicPartitionList::new();
        for partition in 0..self.partitions {
            list.add_partition(&self.topic, partition);
        }
        let committed = self
            .consumer
            .committed_offsets(list, Duration::from_secs(10))
            .expect("reading the results group's committed offsets");
        committed
            .elements()
            .iter()
            .map(|element| match element.offset() {
                Offset::Offset(offset) => offset,
                _ => 0,
            })
            .sum()
    }

    fn produced(&self) -> i64 {
        (0..self.partitions)
            .map(|partition| {
                self.consumer
                    .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
                    .expect("reading the status topic's end")
                    .1
            })
            .sum()
    }
}
