//! The load generator against the whole pipeline, in a short smoke form: nothing it sends is
//! lost, open loop and closed loop.

use sluice_tests::{Pipeline, PipelineOptions};

fn config(pipeline: &Pipeline) -> sluice_bench::Config {
    sluice_bench::Config {
        ingest: pipeline.ingest_url.clone(),
        rate: None,
        clients: None,
        users: 5,
        duration_secs: 2.0,
        timeout_secs: 30.0,
        model: "sim".into(),
        api_key: None,
        webhook_url: None,
        priority: None,
        json: None,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bench_follows_every_job_to_its_end_and_loses_none() {
    let pipeline = Pipeline::start(PipelineOptions::default()).await;
    let open = sluice_bench::run(sluice_bench::Config {
        rate: Some(40.0),
        ..config(&pipeline)
    })
    .await
    .unwrap();
    println!("{}", open.render());
    assert!(
        open.submitted >= 60,
        "about 80 submissions in 2 s at 40/s, got {}",
        open.submitted
    );
    assert_eq!((open.accepted, open.lost), (open.submitted, 0));
    assert_eq!(
        open.completed.get("succeeded").copied(),
        Some(open.accepted)
    );
    assert_eq!(open.latency.end_to_end.count, open.accepted);
    assert!(open.latency.end_to_end.p50_ms >= open.latency.model.p50_ms);

    let closed = sluice_bench::run(sluice_bench::Config {
        clients: Some(4),
        ..config(&pipeline)
    })
    .await
    .unwrap();
    assert!(closed.accepted > 0);
    assert_eq!(closed.lost, 0);
    assert_eq!(
        closed.completed.get("succeeded").copied(),
        Some(closed.accepted)
    );
    pipeline.stop().await;
}
