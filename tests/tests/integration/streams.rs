//! Caps on event streams at the results service: per reader (an API key's user) and in total,
//! and the idle limit that ends a silent stream and frees its place.

use crate::results::state;
use reqwest::StatusCode;
use sluice_common::auth::{KeyStore, create_key};
use sluice_results::router;
use sluice_results::streams::{StreamLimitArgs, Streams};
use sluice_schemas::JobId;
use sluice_tests::{TestDatabase, wait_until};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_per_reader_and_in_total_and_end_when_idle() {
    let database = TestDatabase::migrated().await;
    let mut serving = state(&database, Duration::from_secs(1)).await;
    serving.keys = Some(Arc::new(KeyStore::new(
        database.pool.clone(),
        Duration::from_secs(1),
    )));
    serving.streams = Streams::new(StreamLimitArgs {
        total: 3,
        per_reader: 2,
        idle: Duration::from_secs(2),
    });
    let (_, alice) = create_key(&database.pool, "alice", "default", None)
        .await
        .unwrap();
    let (_, bob) = create_key(&database.pool, "bob", "default", None)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, router(serving)).into_future());
    let http = reqwest::Client::new();
    // A stream of a job not (yet) visible stays open and silent, as for any unknown job.
    let open = |key: &str| {
        http.get(format!("{url}/v1/jobs/{}/events", JobId::new()))
            .bearer_auth(key)
            .send()
    };
    let code = |response: reqwest::Response| async move {
        let retry_after = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: serde_json::Value = response.json().await.unwrap();
        (
            body["error"]["code"].as_str().unwrap().to_owned(),
            retry_after,
        )
    };

    let first = open(&alice).await.unwrap();
    let second = open(&alice).await.unwrap();
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let third = open(&alice).await.unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        code(third).await,
        ("too_many_streams".to_owned(), "5".to_owned())
    );
    let bobs = open(&bob).await.unwrap();
    assert_eq!(bobs.status(), StatusCode::OK);
    let full = open(&bob).await.unwrap();
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        code(full).await,
        ("streams_full".to_owned(), "5".to_owned())
    );

    // Silent for the idle limit (keep-alive comments aside), the streams end.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), first.bytes())
        .await
        .expect("an idle stream ends");
    assert!(ended.is_ok());
    println!(
        "streams: an idle stream ended after {:.1} s (limit 2 s)",
        started.elapsed().as_secs_f64()
    );
    // ... and their places are free again.
    drop((second, bobs));
    wait_until(
        "a place for alice again",
        Duration::from_secs(15),
        || async {
            let response = open(&alice).await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        },
    )
    .await;
}
