//! The worker's unit of work, called directly against the real broker and the simulated model:
//! deadlines, retries with backoff and `Retry-After`, fallbacks, the circuit breaker, and dead
//! letters. Each test reads back the status events it produced.

use rdkafka::Message;
use sluice_schemas::{
    ErrorCode, JobStatus, Message as ChatMessage, ModelName, RequestEvent, Role, StatusEvent,
    UserId,
};
use sluice_tests::infra::read_topic;
use sluice_tests::{TestTopics, kafka_args};
use sluice_worker::{JobContext, Outcome, Record, run_job};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A simulated model on port 0; its stats, and its URL.
pub(crate) async fn sim(
    configure: impl FnOnce(&mut sluice_model_sim::Config),
) -> (Arc<sluice_model_sim::Stats>, String) {
    let mut config = sluice_model_sim::Config::defaults();
    config.service_time_ms = 1;
    configure(&mut config);
    let sim = sluice_model_sim::SimModel::new(config);
    let stats = sim.stats.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(sim.run(listener, CancellationToken::new()));
    (stats, url)
}

fn closed_port_url() -> String {
    format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    )
}

pub(crate) struct Harness {
    pub(crate) topics: TestTopics,
    context: JobContext,
}

impl Harness {
    pub(crate) async fn new(
        model_url: &str,
        configure: impl FnOnce(&mut sluice_worker::Config),
    ) -> Self {
        let kafka = kafka_args(1);
        let topics = TestTopics::unique();
        topics.create(&kafka).await;
        let mut config = sluice_worker::Config::defaults();
        config.model_base_url = model_url.to_owned();
        config.retry_base = Duration::from_millis(10);
        // Most tests here repeat one request; the cache tests turn it on.
        config.cache_ttl = Duration::ZERO;
        configure(&mut config);
        let producer = kafka.producer_config("test-worker").create().unwrap();
        config.worker_id = Some("direct".into());
        config.topics = topics.args();
        let context = JobContext::from_config(&config, producer, CancellationToken::new())
            .await
            .expect("job context");
        Self { topics, context }
    }

    pub(crate) async fn run(&self, payload: Vec<u8>) -> Outcome {
        let record = Record {
            topic: self.topics.requests.clone(),
            partition: 0,
            offset: 7,
            key: Some(b"bob".to_vec()),
            payload: Some(payload),
            trace: Default::default(),
            timestamp_ms: None,
        };
        run_job(&self.context, &record).await
    }

    pub(crate) fn statuses(&self, expected: usize) -> Vec<StatusEvent> {
        read_topic(&self.topics.status, 1, expected, Duration::from_secs(10))
            .iter()
            .map(|record| StatusEvent::decode(record.payload().unwrap()).unwrap())
            .collect()
    }
}

pub(crate) fn request(model: &str, deadline_in_ms: i64) -> RequestEvent {
    let mut job = sluice_tests::chat_event("bob", "direct", deadline_in_ms);
    job.model = ModelName::parse(model).unwrap();
    job
}

/// `running` for attempts 1, 2 and 3, then `succeeded` on the third.
const THREE_ATTEMPTS_THEN_SUCCESS: [(JobStatus, u32); 4] = [
    (JobStatus::Running, 1),
    (JobStatus::Running, 2),
    (JobStatus::Running, 3),
    (JobStatus::Succeeded, 3),
];

fn summary(events: &[StatusEvent]) -> Vec<(JobStatus, u32)> {
    events
        .iter()
        .map(|event| (event.status, event.attempt))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_expires_and_dead_letters() {
    let (stats, url) = sim(|_| {}).await;
    let harness = Harness::new(&url, |_| {}).await;

    let fresh = request("sim", 10_000);
    assert_eq!(
        harness.run(fresh.encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    let mut stale = request("sim", 1_000);
    stale.submitted_at -= chrono::Duration::seconds(5);
    stale.deadline -= chrono::Duration::seconds(5);
    assert_eq!(
        harness.run(stale.encode()).await,
        Outcome::Finished(JobStatus::Expired)
    );
    assert_eq!(
        stats.snapshot().calls,
        1,
        "an expired job never reaches the model"
    );
    assert_eq!(
        harness.run(b"not json".to_vec()).await,
        Outcome::DeadLettered
    );

    let events = harness.statuses(3);
    let seen: Vec<_> = events
        .iter()
        .map(|event| (event.job_id, event.status))
        .collect();
    assert_eq!(
        seen,
        [
            (fresh.job_id, JobStatus::Running),
            (fresh.job_id, JobStatus::Succeeded),
            (stale.job_id, JobStatus::Expired)
        ]
    );
    assert_eq!(
        events[1].output.as_ref().unwrap().model.as_deref(),
        Some("sim")
    );
    assert_eq!(
        events[2].error.as_ref().unwrap().code,
        ErrorCode::DeadlineExceeded
    );
    let dead = read_topic(&harness.topics.requests_dlq, 1, 1, Duration::from_secs(10));
    assert_eq!(dead[0].payload().unwrap(), b"not json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_running_delay_only_attempts_that_outlast_it_publish_running() {
    // One job on a model answering in `service_ms`, with `running` held back 300 ms.
    let statuses = |service_ms: u64, expected: usize| async move {
        let (_, url) = sim(|config| config.service_time_ms = service_ms).await;
        let harness = Harness::new(&url, |config| {
            config.running_after = Duration::from_millis(300);
        })
        .await;
        let outcome = harness.run(request("sim", 10_000).encode()).await;
        assert_eq!(outcome, Outcome::Finished(JobStatus::Succeeded));
        harness.statuses(expected)
    };

    let quick = statuses(1, 1).await;
    assert_eq!(summary(&quick), [(JobStatus::Succeeded, 1)]);
    assert!(
        quick[0].timings.started_at.is_some(),
        "the terminal status carries when the job started"
    );

    let slow = statuses(800, 2).await;
    assert_eq!(
        summary(&slow),
        [(JobStatus::Running, 1), (JobStatus::Succeeded, 1)]
    );
    assert_eq!(slow[0].timings.started_at, slow[1].timings.started_at);
    assert!(
        slow[0].emitted_at - slow[0].timings.started_at.unwrap()
            >= chrono::Duration::milliseconds(300),
        "running went out once the attempt had run for the delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_and_each_attempt_is_reported() {
    let (stats, url) = sim(|sim| sim.fail_first = 2).await;
    let harness = Harness::new(&url, |_| {}).await;
    assert_eq!(
        harness.run(request("sim", 10_000).encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    assert_eq!(stats.snapshot().calls, 3);
    let events = harness.statuses(4);
    assert_eq!(summary(&events), THREE_ATTEMPTS_THEN_SUCCESS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_error_fails_at_once_with_the_backends_message() {
    let (stats, url) = sim(|sim| {
        sim.fail_first = 100;
        sim.failure_status = 400;
    })
    .await;
    let harness = Harness::new(&url, |_| {}).await;
    assert_eq!(
        harness.run(request("sim", 10_000).encode()).await,
        Outcome::Finished(JobStatus::Failed)
    );
    assert_eq!(stats.snapshot().calls, 1, "a 400 is not retried");
    let events = harness.statuses(2);
    let error = events[1].error.as_ref().unwrap();
    assert_eq!(error.code, ErrorCode::BackendError);
    assert!(
        error.message.contains("400") && error.message.contains("simulated failure"),
        "{}",
        error.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let (stats, url) = sim(|sim| {
        sim.fail_first = 1;
        sim.failure_status = 429;
        sim.retry_after_secs = Some(1);
    })
    .await;
    let harness = Harness::new(&url, |_| {}).await;
    let started = Instant::now();
    assert_eq!(
        harness.run(request("sim", 10_000).encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited {:?}, asked for 1 s",
        started.elapsed()
    );
    assert_eq!(stats.snapshot().calls, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_chain_answers_when_the_primary_is_down_and_says_which_model_did() {
    let (stats, url) = sim(|_| {}).await;
    let models = format!(
        r#"{{"backends": {{"down": {{"base_url": "{}"}}}}, "models": {{"big": {{"backend": "down", "fallbacks": ["small"]}}}}}}"#,
        closed_port_url()
    );
    let harness = Harness::new(&url, |config| {
        config.models = sluice_worker::ModelsFile::parse(&models).unwrap();
        config.max_attempts = 2;
    })
    .await;
    let job = request("big", 10_000);
    assert_eq!(
        harness.run(job.encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    let events = harness.statuses(4);
    assert_eq!(summary(&events), THREE_ATTEMPTS_THEN_SUCCESS);
    let output = events[3].output.as_ref().unwrap();
    assert_eq!(
        output.model.as_deref(),
        Some("small"),
        "the job records which model answered"
    );
    assert_eq!(
        events[3].model.as_str(),
        "big",
        "and keeps the model it asked for"
    );
    assert!(!output.degraded);
    assert_eq!(stats.snapshot().calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_fallback_answers_degraded_when_every_model_fails() {
    let models = r#"{"models": {"sim": {"static_fallback": "We are busy; please retry."}}}"#;
    let harness = Harness::new(&closed_port_url(), |config| {
        config.models = sluice_worker::ModelsFile::parse(models).unwrap();
        config.max_attempts = 1;
    })
    .await;
    assert_eq!(
        harness.run(request("sim", 10_000).encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    let events = harness.statuses(2);
    let output = events[1].output.as_ref().unwrap();
    assert!(output.degraded);
    assert_eq!(output.content, "We are busy; please retry.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_fails_fast_without_calling_the_backend() {
    let (stats, url) = sim(|sim| sim.failure_rate = 1.0).await;
    let harness = Harness::new(&url, |config| {
        config.max_attempts = 1;
        config.breaker_threshold = 3;
        config.breaker_cooldown = Duration::from_secs(60);
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            harness.run(request("sim", 10_000).encode()).await,
            Outcome::Finished(JobStatus::Failed)
        );
    }
    assert_eq!(stats.snapshot().calls, 3);
    assert_eq!(
        harness.run(request("sim", 10_000).encode()).await,
        Outcome::Finished(JobStatus::Failed)
    );
    assert_eq!(
        stats.snapshot().calls,
        3,
        "the fourth job never reached the backend"
    );
    let events = harness.statuses(7);
    let last = events.last().unwrap();
    assert_eq!(last.error.as_ref().unwrap().code, ErrorCode::CircuitOpen);
    assert_eq!(last.attempt, 0, "no call was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_running_into_the_deadline_is_cut_off_with_timeout() {
    let (_, url) = sim(|sim| sim.service_time_ms = 5_000).await;
    let harness = Harness::new(&url, |_| {}).await;
    let started = Instant::now();
    assert_eq!(
        harness.run(request("sim", 400).encode()).await,
        Outcome::Finished(JobStatus::Failed)
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut at the deadline, not after the model's 5 s"
    );
    let events = harness.statuses(2);
    assert_eq!(events[1].error.as_ref().unwrap().code, ErrorCode::Timeout);
    assert_eq!(
        summary(&events),
        [(JobStatus::Running, 1), (JobStatus::Failed, 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_adaptive_limit_settles_near_the_backends_capacity() {
    let (stats, url) = sim(|sim| {
        sim.capacity = 16;
        sim.service_time_ms = 100;
    })
    .await;
    let harness = Arc::new(Harness::new(&url, |config| config.concurrency_initial = 4).await);
    // 64 jobs at a time, a worker's whole window, for eight seconds.
    let stop_at = Instant::now() + Duration::from_secs(8);
    let loops: Vec<_> = (0..64)
        .map(|_| {
            let harness = harness.clone();
            tokio::spawn(async move {
                while Instant::now() < stop_at {
                    // Distinct requests: identical ones in flight would share one call.
                    let mut job = request("sim", 60_000);
                    job.task = sluice_schemas::Task::Chat(vec![ChatMessage::text(
                        Role::User,
                        format!("adaptive {}", job.job_id),
                    )]);
                    harness.run(job.encode()).await;
                }
            })
        })
        .collect();
    let backend = harness.context.routes.backend_for("sim").clone();
    let mut samples = Vec::new();
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push((backend.limit.limit(), stats.snapshot().open));
    }
    for handle in loops {
        handle.await.unwrap();
    }
    let settled = &samples[samples.len() / 2..];
    let mean_limit = settled.iter().map(|(limit, _)| limit).sum::<f64>() / settled.len() as f64;
    let mean_queue = settled
        .iter()
        .map(|(_, open)| open.saturating_sub(16) as f64)
        .sum::<f64>()
        / settled.len() as f64;
    let max_queue = settled
        .iter()
        .map(|(_, open)| open.saturating_sub(16))
        .max()
        .unwrap_or(0);
    let calls = stats.snapshot().calls;
    println!(
        "adaptive limit: {mean_limit:.1} on average over the last 4 s (capacity 16); calls waiting inside the model: {mean_queue:.1} on average, {max_queue} at most; {calls} calls in 8 s"
    );
    assert!(
        (12.0..=24.0).contains(&mean_limit),
        "the limit settled at {mean_limit:.1}"
    );
    // The limit shrinks once answers are half as slow again as the fastest: up to a third of
    // it may wait inside the model.
    assert!(
        mean_queue <= mean_limit / 3.0,
        "{mean_queue:.1} calls queued inside the model on average"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_answer_skips_the_model_until_it_expires_or_the_caller_opts_out() {
    let (stats, url) = sim(|_| {}).await;
    let harness = Harness::new(&url, |config| config.cache_ttl = Duration::from_secs(1)).await;
    let ask = || request("sim", 10_000);
    assert_eq!(
        harness.run(ask().encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    assert_eq!(
        harness.run(ask().encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    assert_eq!(
        stats.snapshot().calls,
        1,
        "the second answer came from the cache"
    );
    let mut fresh = ask();
    fresh.cache = false;
    assert_eq!(
        harness.run(fresh.encode()).await,
        Outcome::Finished(JobStatus::Succeeded)
    );
    assert_eq!(stats.snapshot().calls, 2, "cache: false asks the model");
    let mut other_user = ask();
    other_user.user_id = UserId::parse("not-bob").unwrap();
    harness.run(other_user.encode()).await;
    assert_eq!(stats.snapshot().calls, 3, "the cache is per user");
    // Why a sleep: the cache's TTL (1 s) has to pass.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    harness.run(ask().encode()).await;
    assert_eq!(
        stats.snapshot().calls,
        4,
        "an expired answer is asked again"
    );

    let events = harness.statuses(9);
    let outputs: Vec<bool> = events
        .iter()
        .filter_map(|event| event.output.as_ref())
        .map(|output| output.cached)
        .collect();
    assert_eq!(
        outputs,
        [false, true, false, false, false],
        "the cached job says so"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_identical_requests_in_flight_share_one_model_call() {
    let (stats, url) = sim(|sim| sim.service_time_ms = 300).await;
    let harness =
        Arc::new(Harness::new(&url, |config| config.cache_ttl = Duration::from_secs(60)).await);
    let runs = (0..50).map(|_| {
        let harness = harness.clone();
        tokio::spawn(async move { harness.run(request("sim", 10_000).encode()).await })
    });
    for outcome in futures::future::join_all(runs).await {
        assert_eq!(outcome.unwrap(), Outcome::Finished(JobStatus::Succeeded));
    }
    assert_eq!(stats.snapshot().calls, 1, "one call answered all fifty");
}
