//! Faults under load, with the worker and results services as real processes against the real
//! broker and Postgres: a worker killed (SIGKILL) and replaced, the results service killed
//! mid-write and restarted, Postgres restarted, a worker joining (rebalance), and a worker
//! stopped with SIGTERM. Each time every accepted job must end in exactly one terminal status;
//! duplicate model calls are counted and printed.
//!
//! Each test holds the machine alone (`exclusive_stage`): restarting Postgres would disturb any
//! other test, so those with a database wait until it is done.

use sluice_model_sim::Stats;
use sluice_tests::process::{ServiceProcess, free_port};
use sluice_tests::{TestDatabase, TestTopics, exclusive_stage, kafka_args, wait_until};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const JOBS: usize = 300;

/// How long a killed service stays down before its replacement starts, as Kubernetes restarts a
/// pod: well inside the consumers' session timeout, so the replacement joins while the group
/// still counts the dead member.
const RESTART_AFTER: Duration = Duration::from_secs(2);
const JOBS_PER_SECOND: u64 = 60;

pub(crate) struct Cluster {
    name: &'static str,
    /// The broker the services use: the shared one, or a test's own.
    brokers: String,
    pub(crate) topics: TestTopics,
    pub(crate) database: TestDatabase,
    sim: Arc<Stats>,
    /// Where the workers started from now on call the model.
    pub(crate) sim_url: String,
    pub(crate) ingest_url: String,
    pub(crate) http: reqwest::Client,
    stop: CancellationToken,
}

impl Cluster {
    pub(crate) async fn start(name: &'static str) -> Self {
        Self::with_model_time(name, 100).await
    }

    /// A cluster whose simulated model takes `service_time_ms` (plus up to 50 ms) per call.
    async fn with_model_time(name: &'static str, service_time_ms: u64) -> Self {
        Self::on_broker(name, service_time_ms, kafka_args(6).brokers).await
    }

    /// A cluster on the broker at `brokers` (a test's own, which it may stop).
    pub(crate) async fn on_broker(
        name: &'static str,
        service_time_ms: u64,
        brokers: String,
    ) -> Self {
        let sim = |sim: &mut sluice_model_sim::Config| {
            sim.service_time_ms = service_time_ms;
            sim.jitter_ms = 50;
        };
        Self::built(name, brokers, sim, |_| ()).await
    }

    /// A cluster on the broker at `brokers` whose simulated model and ingest have settings of
    /// the test's own.
    pub(crate) async fn built(
        name: &'static str,
        brokers: String,
        sim: impl FnOnce(&mut sluice_model_sim::Config),
        ingest_settings: impl FnOnce(&mut sluice_ingest::Config),
    ) -> Self {
        let mut kafka = kafka_args(6);
        kafka.brokers = brokers;
        let topics = TestTopics::unique();
        topics.create(&kafka).await;
        let database = TestDatabase::create_on_exclusive_stage().await;
        println!(
            "{name}: topics {}.*, database {}",
            topics.requests.trim_end_matches(".requests"),
            database.url
        );
        let stop = CancellationToken::new();

        let mut sim_config = sluice_model_sim::Config::defaults();
        sim(&mut sim_config);
        let sim = sluice_model_sim::SimModel::new(sim_config);
        let stats = sim.stats.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(sim.run(listener, stop.clone()));

        let mut ingest = sluice_ingest::Config::defaults();
        ingest.addr = "127.0.0.1:0".into();
        ingest.kafka = kafka.clone();
        ingest.topics = topics.args();
        ingest.capacity.worker_group = format!("{}-workers", topics.requests);
        ingest.auth = sluice_common::auth::AuthMode::Off;
        ingest.tiers.by_name = sluice_ingest::admission::Tiers::parse(
            r#"{"default": {"rate_per_sec": 100000, "burst": 100000}}"#,
        )
        .unwrap();
        ingest_settings(&mut ingest);
        let ingest = sluice_ingest::Application::build(ingest)
            .await
            .expect("ingest builds");
        let ingest_url = format!("http://{}", ingest.local_addr());
        tokio::spawn(ingest.run_until_stopped(stop.clone()));
        Self {
            name,
            brokers: kafka.brokers,
            topics,
            database,
            sim: stats,
            sim_url,
            ingest_url,
            http: reqwest::Client::new(),
            stop,
        }
    }

    pub(crate) fn env(&self) -> HashMap<String, String> {
        let mut env = self.topics.process_env();
        env.insert("KAFKA_BROKERS".into(), self.brokers.clone());
        env.insert("SLUICE_AUTH".into(), "off".into());
        env
    }

    pub(crate) async fn worker(&self, label: &str) -> ServiceProcess {
        let port = free_port();
        let mut env = self.env();
        env.insert("SLUICE_WORKER_ADDR".into(), format!("127.0.0.1:{port}"));
        env.insert("SLUICE_WORKER_ID".into(), label.into());
        env.insert("MODEL_BASE_URL".into(), self.sim_url.clone());
        env.insert("SLUICE_MAX_IN_FLIGHT".into(), "32".into());
        env.insert("SLUICE_DRAIN_TIMEOUT_MS".into(), "15000".into());
        let process =
            ServiceProcess::spawn("sluice-worker", &format!("{}-{label}", self.name), &env);
        self.wait_ready(&process, port).await;
        process
    }

    pub(crate) async fn results(&self, label: &str) -> ServiceProcess {
        self.results_with(label, HashMap::new()).await.0
    }

    /// A results service with settings of the test's own; and its URL.
    pub(crate) async fn results_with(
        &self,
        label: &str,
        settings: HashMap<String, String>,
    ) -> (ServiceProcess, String) {
        let port = free_port();
        let mut env = self.env();
        env.extend(settings);
        env.insert("SLUICE_RESULTS_ADDR".into(), format!("127.0.0.1:{port}"));
        env.insert("DATABASE_URL".into(), self.database.url.clone());
        env.insert("DATABASE_MAX_CONNECTIONS".into(), "4".into());
        let process =
            ServiceProcess::spawn("sluice-results", &format!("{}-{label}", self.name), &env);
        self.wait_ready(&process, port).await;
        (process, format!("http://127.0.0.1:{port}"))
    }

    /// `POST /v1/jobs` for one chat job of `user`; its id (panics unless the answer is 202).
    pub(crate) async fn submit(&self, user: &str, content: &str) -> Uuid {
        let body = serde_json::json!({
            "user_id": user, "model": "sim",
            "messages": [{"role": "user", "content": content}]
        });
        self.submit_body(&body).await
    }

    /// `POST /v1/jobs` with `body`; the job's id (panics unless the answer is 202).
    pub(crate) async fn submit_body(&self, body: &serde_json::Value) -> Uuid {
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.ingest_url))
            .json(body)
            .send()
            .await
            .expect("POST /v1/jobs");
        assert_eq!(response.status(), 202);
        let accepted: serde_json::Value = response.json().await.expect("a 202 body");
        accepted["job_id"].as_str().unwrap().parse().unwrap()
    }

    pub(crate) async fn wait_ready(&self, process: &ServiceProcess, port: u16) {
        process.wait_ready(&self.http, port).await;
    }

    /// Waits until the load is well under way: the model has answered `calls` calls and is in
    /// the middle of others, so a fault lands mid-flight.
    pub(crate) async fn under_way(&self, calls: u64) {
        wait_until(
            "the load to be under way",
            Duration::from_secs(60),
            || async {
                let seen = self.sim.snapshot();
                (seen.calls >= calls && seen.open > 0).then_some(())
            },
        )
        .await;
    }

    /// Submits `JOBS` jobs at a steady pace in the background; yields the accepted ids.
    fn load(&self) -> JoinHandle<Vec<Uuid>> {
        let (http, url) = (self.http.clone(), format!("{}/v1/jobs", self.ingest_url));
        tokio::spawn(async move {
            let mut accepted = Vec::with_capacity(JOBS);
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / JOBS_PER_SECOND));
            for index in 0..JOBS {
                tick.tick().await;
                let body = serde_json::json!({
                    "user_id": format!("user-{}", index % 10), "model": "sim",
                    "messages": [{"role": "user", "content": format!("job {index}")}]
                });
                let response = http
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .expect("POST /v1/jobs");
                let status = response.status();
                let answer: serde_json::Value = response.json().await.unwrap_or_default();
                match status.as_u16() {
                    202 => {
                        accepted.push(Uuid::parse_str(answer["job_id"].as_str().unwrap()).unwrap())
                    }
                    _ => println!("job {index} refused: {status} {answer}"),
                }
            }
            accepted
        })
    }

    /// Every accepted job has one row and exactly one terminal status change; returns the
    /// number of duplicated model calls.
    async fn check(&self, load: JoinHandle<Vec<Uuid>>) -> u64 {
        let ids = load.await.unwrap();
        assert_eq!(ids.len(), JOBS, "every submission was accepted");
        self.verify(&ids).await
    }

    /// Every job in `ids` (all the jobs there are) has one row and exactly one terminal status
    /// change; returns the number of duplicated model calls.
    pub(crate) async fn verify(&self, ids: &[Uuid]) -> u64 {
        let jobs = ids.len();
        let pool = &self.database.pool;
        let started = Instant::now();
        sluice_tests::wait_terminal(pool, ids, Duration::from_secs(180)).await;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(rows, jobs as i64, "one row per job");
        let statuses: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(statuses, [("succeeded".to_owned(), jobs as i64)]);
        let not_once = sluice_tests::terminal_not_once(pool, ids).await;
        assert_eq!(
            not_once, 0,
            "every job recorded exactly one terminal status"
        );
        let calls = self.sim.snapshot().calls;
        let duplicates = calls.saturating_sub(jobs as u64);
        // The longest a job waited to start: for jobs on a dead member's partitions, how long
        // the group took to give them to a live one.
        let longest_wait: f64 = sqlx::query_scalar(
            "SELECT COALESCE(EXTRACT(EPOCH FROM max(started_at - queued_at))::float8, 0) FROM jobs",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        println!(
            "{}: {jobs} jobs accepted, {jobs} terminal exactly once, 0 lost, {duplicates} duplicate model calls ({calls} calls); longest queue wait {longest_wait:.1} s; settled {:.1} s after the load",
            self.name,
            started.elapsed().as_secs_f64()
        );
        duplicates
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_flight_is_replaced_and_nothing_is_lost() {
    // Alone on the machine: it restarts shared servers and loads the cores.
    let _stage = exclusive_stage().await;
    let cluster = Cluster::start("worker SIGKILL").await;
    let _results = cluster.results("results").await;
    let first = cluster.worker("worker-a").await;
    let load = cluster.load();
    cluster.under_way(JOBS_PER_SECOND).await;
    first.kill().await;
    tokio::time::sleep(RESTART_AFTER).await;
    let _second = cluster.worker("worker-b").await;
    cluster.check(load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_results_service_killed_mid_write_and_restarted_loses_nothing() {
    // Alone on the machine: it restarts shared servers and loads the cores.
    let _stage = exclusive_stage().await;
    let cluster = Cluster::start("results SIGKILL").await;
    let first = cluster.results("results-a").await;
    let _worker = cluster.worker("worker").await;
    let load = cluster.load();
    cluster.under_way(JOBS_PER_SECOND).await;
    first.kill().await;
    tokio::time::sleep(RESTART_AFTER).await;
    let _second = cluster.results("results-b").await;
    cluster.check(load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_load_loses_nothing() {
    // Alone on the machine: it restarts shared servers and loads the cores.
    let _stage = exclusive_stage().await;
    let restart = std::env::var("SLUICE_TEST_PG_RESTART").expect(
        "SLUICE_TEST_PG_RESTART (a command that restarts the test Postgres) is set by scripts/test",
    );
    let cluster = Cluster::start("Postgres restart").await;
    let _results = cluster.results("results").await;
    let _worker = cluster.worker("worker").await;
    let load = cluster.load();
    cluster.under_way(JOBS_PER_SECOND).await;
    let status = tokio::process::Command::new("sh")
        .args(["-c", &restart])
        .status()
        .await
        .expect("restarting Postgres");
    assert!(status.success(), "`{restart}` failed");
    cluster.check(load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_joining_under_load_rebalances_without_loss() {
    // Alone on the machine: it restarts shared servers and loads the cores.
    let _stage = exclusive_stage().await;
    let cluster = Cluster::start("worker joins").await;
    let _results = cluster.results("results").await;
    let _first = cluster.worker("worker-a").await;
    let load = cluster.load();
    cluster.under_way(JOBS_PER_SECOND).await;
    let _second = cluster.worker("worker-b").await;
    cluster.check(load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_commits_and_hands_over_to_another_worker() {
    // Alone on the machine: it restarts shared servers and loads the cores.
    let _stage = exclusive_stage().await;
    let cluster = Cluster::start("worker SIGTERM").await;
    let _results = cluster.results("results").await;
    let first = cluster.worker("worker-a").await;
    let _second = cluster.worker("worker-b").await;
    let load = cluster.load();
    cluster.under_way(JOBS_PER_SECOND).await;
    let log = first.log.clone();
    let clean = first.terminate(Duration::from_secs(30)).await;
    assert!(
        clean,
        "the worker did not exit cleanly:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    cluster.check(load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_stop_signal_exits_at_once_without_draining() {
    // Alone on the machine: it restarts shared servers and loads the cores.
    let _stage = exclusive_stage().await;
    // Model calls of 30 s: the first SIGTERM starts a drain (15 s) that cannot finish soon.
    let cluster = Cluster::with_model_time("second signal", 30_000).await;
    let mut worker = cluster.worker("worker").await;
    let submit = format!("{}/v1/jobs", cluster.ingest_url);
    for index in 0..4 {
        let body = serde_json::json!({
            "user_id": "patient", "model": "sim",
            "messages": [{"role": "user", "content": format!("slow {index}")}]
        });
        let response = cluster.http.post(&submit).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 202);
    }
    wait_until(
        "the worker to be mid-flight",
        Duration::from_secs(30),
        || async { (cluster.sim.snapshot().open > 0).then_some(()) },
    )
    .await;

    worker.sigterm();
    assert!(
        worker.wait_exit(Duration::from_secs(1)).await.is_none(),
        "the first signal starts a drain, which waits for the running calls"
    );
    let second = Instant::now();
    worker.sigterm();
    let exit = worker
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!(
                "still running 5 s after the second signal:\n{}",
                worker.log_tail()
            )
        });
    assert!(!exit.success(), "it exits without a clean drain: {exit}");
    let log = worker.log_tail();
    assert!(log.contains("second stop signal received"), "{log}");
    println!(
        "second signal: the worker exited {:.2} s after it, status {exit}",
        second.elapsed().as_secs_f64()
    );
}
