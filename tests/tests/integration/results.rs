//! The results service against a real Postgres: idempotent batch writes, the HTTP errors, and
//! SSE fed by Postgres NOTIFY (a change written by any replica reaches every replica's clients).

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::Utc;
use serde_json::Value;
use sluice_common::kafka::{KafkaSource, Received};
use sluice_results::{AppState, Canceller, Store, Update, router};
use sluice_schemas::{JobId, JobStatus, ModelName, Output, UserId};
use sluice_tests::{TestDatabase, TestTopics, kafka_args, read_sse, wait_until};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

fn update(job_id: JobId, status: JobStatus, attempt: i32) -> Update {
    Update {
        job_id,
        user_id: UserId::parse("u").unwrap(),
        model: ModelName::parse("sim").unwrap(),
        status,
        attempt,
        output: (status == JobStatus::Succeeded).then(|| Output {
            content: "done".into(),
            ..Output::default()
        }),
        error: None,
        worker_id: Some("w1".into()),
        submitted_at: (status == JobStatus::Queued).then(Utc::now),
        deadline: None,
        queued_at: chrono::SubsecRound::trunc_subsecs(Utc::now(), 6),
        started_at: None,
        finished_at: None,
        traceparent: None,
        request_record: None,
        key_id: None,
    }
}

async fn statuses(store: &Store, job_id: JobId) -> Vec<JobStatus> {
    store
        .events_after(job_id, 0, None)
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.status)
        .collect()
}

/// A page origin the test state lets call from a browser.
const ALLOWED_ORIGIN: &str = "https://app.example";

/// The service's state with its real parts: a consumer on test topics (for `/readyz`) and a
/// producer to the test broker (for cancellations).
pub(crate) async fn state(database: &TestDatabase, recheck: Duration) -> AppState {
    let kafka = kafka_args(1);
    let topics = TestTopics::unique();
    topics.create(&kafka).await;
    let source = KafkaSource::subscribe(
        &kafka,
        "test-results",
        &format!("test-results-{}", Uuid::now_v7()),
        &[&topics.status],
    )
    .expect("consumer");
    let health = source.health();
    // Polled as the service polls it, so that it joins its group and `/readyz` can say ready.
    tokio::spawn(async move {
        let mut source = source;
        loop {
            if let Received::Record(record) = source.recv().await {
                source.done(&record);
            }
        }
    });
    let store = Store::new(database.pool.clone());
    let (reads, gatherer) = sluice_results::reads::gathered(store.clone());
    tokio::spawn(gatherer.run(CancellationToken::new()));
    AppState {
        store,
        reads,
        changes: sluice_results::notify::JobChanges::default(),
        answers: sluice_results::deltas::Answers::new(Duration::from_secs(60), 100),
        queue: sluice_results::queue::QueueWatch::default(),
        keepalive: Duration::from_millis(200),
        sse_recheck: recheck,
        consumer: health,
        canceller: Canceller {
            producer: kafka
                .producer_config("test-results")
                .create()
                .expect("producer"),
            topic: topics.control,
        },
        keys: None,
        tokens: None,
        stopping: CancellationToken::new(),
        request_timeout: Duration::from_secs(30),
        streams: sluice_results::streams::Streams::new(sluice_results::Config::defaults().streams),
        cors_origins: vec![ALLOWED_ORIGIN.to_owned()],
        ingest_url: "http://127.0.0.1:8080".into(),
        results_url: "http://127.0.0.1:8081".into(),
        webhook_key: None,
    }
}

/// Serves `serving` on a free port and reads the job's event stream there (for up to 20 s, or
/// until its terminal status), as a browser would.
async fn follow(
    serving: AppState,
    job_id: JobId,
) -> tokio::task::JoinHandle<(Vec<sluice_tests::SseEvent>, usize)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, router(serving)).into_future());
    let response = reqwest::get(format!("{url}/v1/jobs/{job_id}/events"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "a stream opens for any job id");
    tokio::spawn(read_sse(response, Duration::from_secs(20)))
}

#[tokio::test]
async fn batches_are_idempotent_whatever_the_order_or_repetition() {
    let database = TestDatabase::migrated().await;
    let store = Store::new(database.pool.clone());
    let job_id = JobId::new();
    let (queued, running, done) = (
        update(job_id, JobStatus::Queued, 0),
        update(job_id, JobStatus::Running, 1),
        update(job_id, JobStatus::Succeeded, 1),
    );

    // Terminal first, in its own batch; then everything again, twice, reversed.
    store.apply(std::slice::from_ref(&done)).await.unwrap();
    store
        .apply(&[done.clone(), running.clone(), queued.clone()])
        .await
        .unwrap();
    store
        .apply(&[running.clone(), queued.clone(), done.clone(), done.clone()])
        .await
        .unwrap();

    let job = store.job(job_id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.output.unwrap().content, "done");
    assert!(
        job.timings.submitted_at.is_some(),
        "the late request event still filled its fields"
    );
    assert_eq!(
        statuses(&store, job_id).await,
        [JobStatus::Queued, JobStatus::Succeeded],
        "never moved back to running"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

/// Rows of `jobs` read by sequential scans so far, counted on `pool`'s one connection: its own
/// scans are flushed to the statistics first (a backend otherwise flushes them seconds later).
async fn jobs_rows_read_whole(pool: &sqlx::PgPool) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'jobs'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The planner's row counts come from the last `ANALYZE`: a table analyzed while small and grown
/// since (a fresh database's first minute, a burst) must still be written by key, not read whole
/// for every batch (as it was: a hash join over a sequential scan of `jobs`).
#[tokio::test]
async fn batches_look_jobs_up_by_key_when_the_statistics_are_stale() {
    let database = TestDatabase::migrated().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&database.url)
        .await
        .unwrap();
    let store = Store::new(pool.clone());
    let queued = |count: usize| -> Vec<Update> {
        (0..count)
            .map(|_| update(JobId::new(), JobStatus::Queued, 0))
            .collect()
    };
    store.apply(&queued(20)).await.unwrap();
    sqlx::query("ANALYZE jobs").execute(&pool).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..30 {
        let batch = queued(100);
        store.apply(&batch).await.unwrap();
        jobs.extend(batch.into_iter().map(|update| update.job_id));
    }

    let before = jobs_rows_read_whole(&pool).await;
    for chunk in jobs.chunks(50) {
        let running: Vec<Update> = chunk
            .iter()
            .map(|&job_id| update(job_id, JobStatus::Running, 1))
            .collect();
        store.apply(&running).await.unwrap();
    }
    let read_whole = jobs_rows_read_whole(&pool).await - before;
    println!("rows of jobs read by sequential scans in 60 batches over 3,020 jobs: {read_whole}");
    assert_eq!(read_whole, 0, "the batches read the jobs table whole");
    assert_eq!(
        statuses(&store, jobs[0]).await,
        [JobStatus::Queued, JobStatus::Running]
    );
}

/// Every write of a job's row adds an entry to each index of `jobs` (its status changes are not
/// HOT updates), so an index that repeats another (the same columns, either direction, the same
/// predicate) costs every job for nothing.
#[tokio::test]
async fn no_index_repeats_another() {
    let database = TestDatabase::migrated().await;
    let repeated: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.indexrelid::regclass::text, b.indexrelid::regclass::text
         FROM pg_index a
         JOIN pg_index b ON b.indrelid = a.indrelid AND b.indexrelid > a.indexrelid
              AND b.indkey::text = a.indkey::text
              AND pg_get_expr(b.indpred, b.indrelid) IS NOT DISTINCT FROM pg_get_expr(a.indpred, a.indrelid)
              AND pg_get_expr(b.indexprs, b.indrelid) IS NOT DISTINCT FROM pg_get_expr(a.indexprs, a.indrelid)
         JOIN pg_class t ON t.oid = a.indrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = 'public'",
    )
    .fetch_all(&database.pool)
    .await
    .unwrap();
    assert_eq!(repeated, []);
}

#[tokio::test]
async fn concurrent_writers_of_the_same_jobs_agree() {
    let database = TestDatabase::migrated().await;
    let ids: Vec<JobId> = (0..200).map(|_| JobId::new()).collect();
    let batch = |status, attempt| {
        ids.iter()
            .map(|id| update(*id, status, attempt))
            .collect::<Vec<_>>()
    };
    let writers = [(); 3].map(|_| Store::new(database.pool.clone()));
    // Three writers of every job at once, each with a status of its own: whoever reads a job
    // before another writes it must read it again, and each change is recorded by one of them.
    let (queued, running, done) = (
        batch(JobStatus::Queued, 0),
        batch(JobStatus::Running, 1),
        batch(JobStatus::Succeeded, 1),
    );
    let (a, b, c) = tokio::join!(
        writers[0].apply(&queued),
        writers[1].apply(&running),
        writers[2].apply(&done)
    );
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
            .fetch_all(&database.pool)
            .await
            .unwrap();
    assert_eq!(counts, [("succeeded".to_owned(), 200)]);
    let terminal: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_events WHERE status = 'succeeded'")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(terminal, 200, "each job recorded its terminal status once");
    // What the writers say they recorded is what the table holds, each change said once.
    let mut said: Vec<(Uuid, i64)> = [a, b, c]
        .into_iter()
        .flat_map(|recorded| recorded.unwrap())
        .flat_map(|job| {
            let id = job.job_id.as_uuid();
            job.events.into_iter().map(move |event| (id, event.seq))
        })
        .collect();
    said.sort();
    let held: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT job_id, seq FROM job_events ORDER BY job_id, seq")
            .fetch_all(&database.pool)
            .await
            .unwrap();
    assert_eq!(said, held);
}

async fn get(app: axum::Router, uri: &str, last_event_id: Option<&str>) -> (StatusCode, Value) {
    let mut request = Request::get(uri);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = app
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn http_errors_are_json_with_stable_codes() {
    let database = TestDatabase::migrated().await;
    let app = router(state(&database, Duration::from_secs(2)).await);
    let (status, body) = get(app.clone(), "/v1/jobs/not-a-uuid", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_job_id"))
    );
    // A UUID that is not a v7 can never be a job id: the same 400, before any query.
    let (status, body) = get(app.clone(), &format!("/v1/jobs/{}", Uuid::nil()), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_job_id"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("UUIDv7"),
        "{body}"
    );
    let unknown = JobId::new();
    let (status, body) = get(app.clone(), &format!("/v1/jobs/{unknown}"), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("job_not_found"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&unknown.to_string())
    );
    let (status, body) = get(
        app.clone(),
        &format!("/v1/jobs/{unknown}/events"),
        Some("abc"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_last_event_id"))
    );
    // Every answer carries a request id, the caller's or a new one; a page from an allowed
    // origin may call (and preflight), others get no CORS headers.
    let answer = |request: Request<Body>| {
        let app = app.clone();
        async move { app.oneshot(request).await.unwrap() }
    };
    let response = answer(
        Request::get(format!("/v1/jobs/{unknown}"))
            .header("origin", ALLOWED_ORIGIN)
            .header("x-request-id", "req-1")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.headers()["x-request-id"], "req-1");
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        ALLOWED_ORIGIN
    );
    let generated = answer(Request::get("/healthz").body(Body::empty()).unwrap()).await;
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert!(Uuid::parse_str(id).is_ok(), "a new id is a UUID: {id}");
    let preflight = answer(
        Request::options(format!("/v1/jobs/{unknown}/events"))
            .header("origin", ALLOWED_ORIGIN)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization,last-event-id",
            )
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let allowed_headers = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        allowed_headers.contains("last-event-id") && allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    let stranger = answer(
        Request::get(format!("/v1/jobs/{unknown}"))
            .header("origin", "https://elsewhere.example")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(
        !stranger
            .headers()
            .contains_key("access-control-allow-origin")
    );

    // Ready once the consumer has joined its group (the test's state keeps it polling).
    wait_until("/readyz to say ready", Duration::from_secs(30), || {
        let app = app.clone();
        async move {
            let (status, body) = get(app, "/readyz", None).await;
            (status == StatusCode::OK && body["status"] == "ready").then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_waits_for_an_unknown_job_and_hears_another_replicas_writes_through_notify() {
    let database = TestDatabase::migrated().await;
    // Rechecking only every minute: whatever arrives sooner came through LISTEN/NOTIFY.
    let serving = state(&database, Duration::from_secs(60)).await;
    let stop = CancellationToken::new();
    tokio::spawn(sluice_results::notify::listen(
        serving.store.clone(),
        serving.changes.clone(),
        stop.clone(),
    ));
    let job_id = JobId::new();
    // A job not yet visible still gets a stream.
    let reader = follow(serving, job_id).await;

    // Another replica: its own store on the same database.
    let other_replica = Store::new(database.pool.clone());
    // Why a sleep, not a condition: the scenario is time passing with no job, during which the
    // stream must stay open and send keep-alives (every 200 ms here).
    tokio::time::sleep(Duration::from_millis(700)).await;
    other_replica
        .apply(&[update(job_id, JobStatus::Queued, 0)])
        .await
        .unwrap();
    // Apart in time, so the stream hears `queued` alone before the rest arrive together.
    tokio::time::sleep(Duration::from_millis(300)).await;
    other_replica
        .apply(&[update(job_id, JobStatus::Running, 1)])
        .await
        .unwrap();
    other_replica
        .apply(&[update(job_id, JobStatus::Succeeded, 1)])
        .await
        .unwrap();

    let (events, keepalives) = reader.await.unwrap();
    let names: Vec<_> = events
        .iter()
        .map(|event| event.event.clone().unwrap())
        .collect();
    assert_eq!(names, ["queued", "running", "succeeded"]);
    assert!(
        keepalives >= 1,
        "keep-alive comments flow while the job is not visible"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_whose_notification_was_lost_reaches_its_stream_through_the_recheck() {
    let database = TestDatabase::migrated().await;
    let recheck = Duration::from_millis(300);
    let serving = state(&database, recheck).await;
    let (store, changes) = (serving.store.clone(), serving.changes.clone());
    // No listener: every notification is lost.
    let job_id = JobId::new();
    let reader = follow(serving, job_id).await;
    // Why a sleep: the stream's first read must find nothing, so only a recheck can bring the
    // changes below.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other_replica = Store::new(database.pool.clone());
    for (status, attempt) in [
        (JobStatus::Queued, 0),
        (JobStatus::Running, 1),
        (JobStatus::Succeeded, 1),
    ] {
        other_replica
            .apply(&[update(job_id, status, attempt)])
            .await
            .unwrap();
    }
    // Several recheck intervals with no recheck running: the stream has heard nothing.
    tokio::time::sleep(recheck * 4).await;
    assert!(!reader.is_finished(), "nothing but the recheck can wake it");

    let stop = CancellationToken::new();
    tokio::spawn(sluice_results::notify::recheck(
        store,
        changes,
        recheck,
        stop.clone(),
    ));
    let (events, _) = reader.await.unwrap();
    let names: Vec<_> = events
        .iter()
        .map(|event| event.event.clone().unwrap())
        .collect();
    assert_eq!(names, ["queued", "running", "succeeded"]);
    stop.cancel();
}

#[tokio::test]
async fn gathered_reads_answer_each_read_in_its_place_after_its_seq_for_its_reader() {
    let database = TestDatabase::migrated().await;
    let store = Store::new(database.pool.clone());
    let (first, second, unknown) = (JobId::new(), JobId::new(), JobId::new());
    for job_id in [first, second] {
        store
            .apply(&[
                update(job_id, JobStatus::Queued, 0),
                update(job_id, JobStatus::Running, 1),
            ])
            .await
            .unwrap();
    }
    store
        .apply(&[update(first, JobStatus::Succeeded, 1)])
        .await
        .unwrap();
    let read = |job_id, after_seq, user: Option<&str>| sluice_results::reads::ReadOf {
        job_id,
        after_seq,
        user: user.map(str::to_owned),
    };
    let asked = [
        read(second, 0, None),
        read(first, 1, None),
        read(unknown, 0, None),
        read(first, 0, Some("someone else")),
        read(first, 0, Some("u")),
    ];
    let answers = store.events_after_each(&asked).await.unwrap();
    assert_eq!(answers.len(), asked.len());
    let seqs =
        |index: usize| -> Vec<i64> { answers[index].iter().map(|event| event.seq).collect() };
    assert_eq!(
        (seqs(0), seqs(1), seqs(4)),
        (vec![1, 2], vec![2, 3], vec![1, 2, 3])
    );
    let statuses = |index: usize| -> Vec<JobStatus> {
        answers[index].iter().map(|event| event.status).collect()
    };
    assert_eq!(statuses(0), [JobStatus::Queued, JobStatus::Running]);
    assert_eq!(statuses(1), [JobStatus::Running, JobStatus::Succeeded]);
    assert!(statuses(2).is_empty() && statuses(3).is_empty());
    assert_eq!(statuses(4).len(), 3);
}

/// The writer's and the stream reads' kept connection (`kept.rs`): the same backend from one
/// use to the next, with no pool checks between; when its backend dies, the one use that
/// meets the dead connection fails, and the next runs on a new one.
#[tokio::test]
async fn a_kept_connection_is_used_again_and_replaced_after_its_backend_dies() {
    let database = TestDatabase::create().await;
    let kept = sluice_results::kept::KeptConnection::new(database.pool.clone());
    let backend = async || {
        kept.run(async |connection| {
            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(connection)
                .await
        })
        .await
    };
    let first = backend().await.unwrap();
    assert_eq!(backend().await.unwrap(), first, "kept, not taken anew");

    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert!(killed);
    assert!(
        backend().await.is_err(),
        "the use that meets the dead connection fails"
    );
    let replaced = backend().await.unwrap();
    assert_ne!(replaced, first, "the next use is on a new connection");
    assert_eq!(backend().await.unwrap(), replaced, "which is kept in turn");

    // A use dropped before it ends (its caller timed out) takes its connection with it, back to
    // the pool: the next use does not wait behind the abandoned statement.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        kept.run(async |connection| sqlx::query("SELECT pg_sleep(5)").execute(connection).await),
    )
    .await;
    assert!(abandoned.is_err(), "the caller gave up on it");
    let started = std::time::Instant::now();
    assert_ne!(backend().await.unwrap(), replaced);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
