//! Fairness between users through the whole pipeline: a light user is not stuck behind a heavy
//! user's burst on the same partition.

use sluice_schemas::RequestEvent;
use sluice_tests::{Pipeline, PipelineOptions};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_light_user_behind_a_heavy_burst_on_the_same_partition_finishes_long_before_it() {
    let mut options = PipelineOptions {
        partitions: 1,
        max_in_flight: 16,
        per_user_in_flight: 4,
        ..Default::default()
    };
    options.sim.service_time_ms = 20;
    options.sim.capacity = 200;
    let pipeline = Pipeline::start(options).await;

    // The heavy user publishes straight to Kafka, as high-volume producers do.
    let heavy: Vec<RequestEvent> = (0..2000)
        .map(|index| sluice_tests::chat_event("heavy", &format!("burst {index}"), 300_000))
        .collect();
    pipeline.publish(&pipeline.topics.requests, &heavy).await;

    let submitted = Instant::now();
    let light = pipeline.submit("light", "just one").await.job_id.as_uuid();
    pipeline
        .wait_terminal(&[light], Duration::from_secs(60))
        .await;
    let light_latency = submitted.elapsed();
    let heavy_ids: Vec<Uuid> = heavy.iter().map(|event| event.job_id.as_uuid()).collect();
    let heavy_done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND status_rank = 2")
            .bind(&heavy_ids)
            .fetch_one(&pipeline.database.pool)
            .await
            .unwrap();
    let light_job = pipeline.job(light).await.unwrap();
    println!(
        "fairness: light job terminal in Postgres {} ms after submission (queue wait {} ms, run {} ms at the worker); {heavy_done} of 2000 heavy jobs were done then",
        light_latency.as_millis(),
        light_job["timings"]["queue_wait_ms"],
        light_job["timings"]["run_ms"]
    );
    assert!(
        heavy_done < 1000,
        "the light job waited for {heavy_done} heavy jobs"
    );

    pipeline
        .wait_terminal(&heavy_ids, Duration::from_secs(120))
        .await;
    let stats = pipeline.sim_stats.snapshot();
    assert_eq!(stats.calls, 2001);
    assert!(stats.peak_open <= 16);
    pipeline.stop().await;
}

/// Model tokens of each user's succeeded jobs, as the backend reported them.
async fn tokens_by_user(pipeline: &Pipeline) -> std::collections::HashMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT user_id, sum((output->'usage'->>'total_tokens')::bigint)::bigint FROM jobs \
         WHERE status = 'succeeded' GROUP BY user_id",
    )
    .fetch_all(&pipeline.database.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Two users backlogged at once on one worker whose window (4 calls of 50 ms) is the
/// bottleneck, each with `jobs` jobs of `words` words; returns the model tokens each was served
/// from 2 s to 10 s after publishing. Why not from the start: the share is a property of the
/// backlog, and the first jobs are scheduled on estimates (the default cap) before any usage
/// settles them. Counted from the start, the weighted pair's ratio read 2.26-2.53 for 2 (over the
/// bound once in CI); from 2 s on, 1.95-2.02.
async fn token_shares(users: [(&str, Option<&str>, usize, usize); 2]) -> (i64, i64) {
    let mut options = PipelineOptions {
        partitions: 1,
        max_in_flight: 4,
        per_user_in_flight: 4,
        tiers: Some(
            r#"{"default": {"rate_per_sec": 100000, "burst": 100000},
                "pro": {"rate_per_sec": 100000, "burst": 100000, "weight": 2}}"#
                .into(),
        ),
        ..Default::default()
    };
    options.sim.service_time_ms = 50;
    options.sim.capacity = 100;
    let pipeline = Pipeline::start(options).await;
    // Interleaved on the one partition, as a shared partition has them; straight to Kafka.
    let most = users.iter().map(|user| user.2).max().unwrap();
    let mut events = Vec::new();
    for index in 0..most {
        for (user, tier, jobs, words) in users {
            if index < jobs {
                let mut event = sluice_tests::chat_event(user, &"word ".repeat(words), 300_000);
                event.tier = tier.map(|tier| sluice_schemas::TierName::parse(tier).unwrap());
                // Every call made: no answer shared from the cache or an identical call.
                event.cache = false;
                events.push(event);
            }
        }
    }
    pipeline.publish(&pipeline.topics.requests, &events).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = tokens_by_user(&pipeline).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = tokens_by_user(&pipeline).await;
    let served = |user: &str| {
        let count = |tokens: &std::collections::HashMap<String, i64>| {
            tokens.get(user).copied().unwrap_or(0)
        };
        count(&after) - count(&before)
    };
    let shares = (served(users[0].0), served(users[1].0));
    pipeline.stop().await;
    shares
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backlogged_users_share_a_worker_by_model_tokens_and_tier_weights() {
    // Prompts ten times longer: the simulated model answers with the prompt echoed, so each
    // of "long"'s jobs uses ten times the tokens of "short"'s (401 against 41). Neither sets
    // max_tokens: both are estimated at the default cap, and only the settlement against the
    // reported usage can share the tokens fairly.
    let (long, short) = token_shares([("long", None, 400, 200), ("short", None, 4000, 20)]).await;
    let ratio = long as f64 / short as f64;
    println!("token fairness: long {long} tokens, short {short} tokens in 8 s, ratio {ratio:.2}");
    assert!(long > 0 && short > 0);
    assert!(
        (0.75..=1.25).contains(&ratio),
        "equal weights: the token ratio {ratio:.2} is not within 25% of 1"
    );

    // Weights 2:1 (tier `pro` against `default`), the same prompts.
    let (pro, free) =
        token_shares([("pro", Some("pro"), 4000, 20), ("free", None, 4000, 20)]).await;
    let ratio = pro as f64 / free as f64;
    println!("token fairness: pro {pro} tokens, free {free} tokens in 8 s, ratio {ratio:.2}");
    assert!(
        (1.5..=2.5).contains(&ratio),
        "weights 2:1: the token ratio {ratio:.2} is not within 25% of 2"
    );
}
