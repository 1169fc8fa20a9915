//! Where a waiting job stands: `queue` events on its events stream while it is queued, and the
//! same position on `GET /v1/jobs/{id}`, in either lane.

use serde_json::{Value, json};
use sluice_tests::{Pipeline, PipelineOptions, read_sse_until, wait_until};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_job_sees_its_position_fall_to_zero_and_an_eta_near_its_real_wait() {
    a_job_watches_its_place_in("interactive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_batch_job_sees_its_place_in_the_batch_lane() {
    a_job_watches_its_place_in("batch").await;
}

/// 50 jobs of one lane (`priority`) behind one slow worker; the eighth watches its place.
async fn a_job_watches_its_place_in(lane: &str) {
    // One worker taking one job at a time from one partition, from a model that takes 1.5 s:
    // 50 jobs queue behind it. (1.5 s: longer than the one-second cadence of queue events, so
    // each position, 0 too, is seen.)
    let mut options = PipelineOptions {
        partitions: 1,
        max_in_flight: 1,
        per_user_in_flight: 1,
        ..PipelineOptions::default()
    };
    options.sim.service_time_ms = 1_500;
    let pipeline = Pipeline::start(options).await;
    let mut accepted = Vec::new();
    for index in 0..50 {
        let body = json!({
            "user_id": "patient",
            "model": "sim",
            "priority": lane,
            "messages": [{"role": "user", "content": format!("job {index}")}],
        });
        let job = pipeline.submit_body(&body).await;
        assert_eq!(job.priority.as_str(), lane);
        accepted.push(job);
    }
    // The eighth: seven ahead of it at first, and three starts to time before it runs.
    let watched = &accepted[7];

    // `GET` shows where it stands too, once results has read its request.
    let shown = wait_until(
        "GET to show a queue position",
        Duration::from_secs(10),
        || async {
            let job = pipeline.job(watched.job_id).await?;
            (job["status"] == "queued" && job["queue"]["position"].is_i64()).then_some(job)
        },
    )
    .await;
    assert!(shown["queue"]["position"].as_i64().unwrap() <= 7, "{shown}");

    // Every event with the moment it arrived.
    let arrivals = Mutex::new(Vec::new());
    let response = pipeline.http.get(&watched.events_url).send().await.unwrap();
    let (events, _) = read_sse_until(response, Duration::from_secs(60), |events| {
        arrivals.lock().unwrap().push(Instant::now());
        let _ = events;
        false
    })
    .await;
    let arrivals = arrivals.into_inner().unwrap();
    let names: Vec<&str> = events
        .iter()
        .map(|event| event.event.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(names.last(), Some(&"succeeded"), "{names:?}");
    let running = names
        .iter()
        .position(|name| *name == "running")
        .expect("it ran");
    let queue: Vec<(Instant, Value)> = (0..running)
        .filter(|&index| names[index] == "queue")
        .map(|index| {
            (
                arrivals[index],
                serde_json::from_str(&events[index].data).unwrap(),
            )
        })
        .collect();
    let positions: Vec<i64> = queue
        .iter()
        .map(|(_, event)| event["position"].as_i64().unwrap())
        .collect();
    println!("{lane} lane: positions {positions:?}");
    assert!(positions.len() >= 3, "{positions:?}");
    assert!(
        positions.windows(2).all(|pair| pair[0] > pair[1]),
        "a position is sent when it changes, and it only falls: {positions:?}"
    );
    assert_eq!(
        positions.last(),
        Some(&0),
        "it reaches the front before it runs"
    );
    // Their ids resume the stream: `<seq>q<position>`.
    let last_queue_id = events[..running]
        .iter()
        .rev()
        .find(|event| event.event.as_deref() == Some("queue"))
        .and_then(|event| event.id.clone())
        .unwrap();
    assert_eq!(last_queue_id, "1q0");

    let (given_at, first_eta) = queue
        .iter()
        .find_map(|(at, event)| event["eta_ms"].as_i64().map(|eta| (*at, eta)))
        .expect("an ETA once jobs have started");
    let waited = arrivals[running].duration_since(given_at).as_millis() as f64;
    let ratio = waited / first_eta.max(1) as f64;
    println!("{lane} lane: first ETA {first_eta} ms; waited {waited:.0} ms; ratio {ratio:.2}");
    assert!(
        (0.5..=2.0).contains(&ratio),
        "ETA {first_eta} ms against {waited:.0} ms"
    );
    pipeline.stop().await;
}
