//! Usage through the whole pipeline: every terminal status adds its tokens and their cost to its
//! user's usage exactly once (a replayed status event adds nothing), an answer from the cache
//! counts as a job with no model tokens, and `GET /v1/usage` serves it by day, model and API key;
//! spend budgets refuse what would pass them (402), counting each job at its real cost once it ends.

use rdkafka::Message;
use rdkafka::producer::FutureRecord;
use serde_json::Value;
use sluice_tests::infra::read_topic;
use sluice_tests::{Pipeline, PipelineOptions, wait_until};
use std::time::Duration;

/// `GET /v1/usage?{query}`, with an API key if given.
async fn usage_as(pipeline: &Pipeline, key: Option<&str>, query: &str) -> (u16, Value) {
    let mut request = pipeline
        .http
        .get(format!("{}/v1/usage?{query}", pipeline.results_url));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn usage(pipeline: &Pipeline, query: &str) -> (u16, Value) {
    usage_as(pipeline, None, query).await
}

/// `POST /v1/jobs` with an API key; the job's id.
async fn submit_as(pipeline: &Pipeline, key: &str, content: &str) -> uuid::Uuid {
    let response = pipeline
        .http
        .post(format!("{}/v1/jobs", pipeline.ingest_url))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": "sim", "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["job_id"].as_str().unwrap().parse().unwrap()
}

/// Every status event of the pipeline published again, as a redelivery would, and read by the
/// results service; returns how many.
async fn replay_status_events(pipeline: &Pipeline) -> usize {
    let records = read_topic(&pipeline.topics.status, 4, 1000, Duration::from_secs(3));
    let producer = pipeline.producer();
    for record in &records {
        let key = std::str::from_utf8(record.key().unwrap()).unwrap();
        producer
            .send(
                FutureRecord::to(&pipeline.topics.status)
                    .key(key)
                    .payload(record.payload().unwrap()),
                Duration::from_secs(10),
            )
            .await
            .expect("republishing a status event");
    }
    let lag = sluice_common::kafka::GroupLag::new(
        &pipeline.kafka,
        &format!("{}-results", pipeline.topics.requests),
        vec![pipeline.topics.status.clone()],
    )
    .unwrap();
    wait_until(
        "results to read the replayed events",
        Duration::from_secs(30),
        || async {
            let reading = lag.read(Duration::from_secs(2)).ok()?;
            (reading.backlog == 0).then_some(())
        },
    )
    .await;
    records.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_counts_each_job_once_by_day_model_and_key_and_says_what_was_cached() {
    let pipeline = Pipeline::start(PipelineOptions {
        model_prices: Some(
            r#"{"sim": {"input_per_million": 2000, "output_per_million": 4000}}"#.into(),
        ),
        api_keys: true,
        ..Default::default()
    })
    .await;
    // One user with two keys (a laptop and a server, say).
    let pool = &pipeline.database.pool;
    let (laptop_id, laptop) = pipeline.create_key("payer", "default").await;
    let (server_id, server) = pipeline.create_key("payer", "default").await;
    let mut ids = Vec::new();
    for (key, content) in [
        (&laptop, "one two three"),
        (&server, "four five"),
        (&server, "six"),
    ] {
        ids.push(submit_as(&pipeline, key, content).await);
    }
    pipeline.wait_terminal(&ids, Duration::from_secs(30)).await;
    // The same question again: the worker answers it from its cache.
    let repeat = submit_as(&pipeline, &laptop, "one two three").await;
    pipeline
        .wait_terminal(&[repeat], Duration::from_secs(30))
        .await;
    let cached: bool =
        sqlx::query_scalar("SELECT (output->>'cached')::boolean FROM jobs WHERE job_id = $1")
            .bind(repeat)
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(cached, "the repeat was answered from the cache");

    // What the jobs themselves say they used.
    let (prompt, completion): (i64, i64) = sqlx::query_as(
        "SELECT sum((output->'usage'->>'prompt_tokens')::bigint)::bigint,
                sum((output->'usage'->>'completion_tokens')::bigint)::bigint
         FROM jobs WHERE user_id = 'payer' AND NOT (output->>'cached')::boolean",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(prompt > 0 && completion > 0);
    let cost = (prompt as f64 * 2000.0 + completion as f64 * 4000.0) / 1e6;

    let check = |body: &Value, key: &str, value: &str| {
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "{body}");
        let row = &data[0];
        assert_eq!(row[key], value, "{body}");
        assert_eq!(row["jobs"], 4, "{body}");
        assert_eq!(row["cached_jobs"], 1, "{body}");
        assert_eq!(row["prompt_tokens"], prompt, "{body}");
        assert_eq!(row["completion_tokens"], completion, "{body}");
        assert_eq!(row["total_tokens"], prompt + completion, "{body}");
        assert!(
            (row["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-9,
            "{body}"
        );
        assert_eq!(body["total"]["jobs"], 4, "{body}");
    };
    let (status, by_model) = usage_as(&pipeline, Some(&laptop), "group_by=model").await;
    assert_eq!(status, 200, "{by_model}");
    check(&by_model, "model", "sim");

    // By key: the laptop's two jobs (one of them cached), the server's two.
    let (_, by_key) = usage_as(&pipeline, Some(&server), "group_by=key").await;
    let rows = by_key["data"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 2, "{by_key}");
    let figures = |key_id: &str| {
        let row = rows
            .iter()
            .find(|row| row["key_id"] == key_id)
            .unwrap_or_else(|| panic!("no row for {key_id}: {by_key}"));
        (
            row["jobs"].as_i64().unwrap(),
            row["cached_jobs"].as_i64().unwrap(),
        )
    };
    assert_eq!(figures(&laptop_id), (2, 1));
    assert_eq!(figures(&server_id), (2, 0));
    assert_eq!(by_key["total"]["prompt_tokens"], prompt, "{by_key}");

    // A redelivery of every status event adds nothing.
    let replayed = replay_status_events(&pipeline).await;
    let today = chrono::Utc::now().date_naive().to_string();
    let (_, by_day) = usage_as(&pipeline, Some(&laptop), "").await;
    assert_eq!(by_day["group_by"], "day");
    check(&by_day, "day", &today);
    println!("usage: {replayed} status events replayed; {by_day}; by key {by_key}");

    // Another user's key sees only its own; with keys on, user_id picks no one else.
    let (_, stranger) = pipeline.create_key("stranger", "default").await;
    let (_, theirs) = usage_as(&pipeline, Some(&stranger), "").await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0, "{theirs}");
    let (status, _) = usage_as(&pipeline, Some(&stranger), "user_id=payer").await;
    assert_eq!(status, 400);
    let (status, _) = usage(&pipeline, "").await;
    assert_eq!(status, 401, "no key, no usage");
    let (status, wrong) = usage_as(&pipeline, Some(&laptop), "group_by=week").await;
    assert_eq!(status, 400, "{wrong}");
    assert!(
        wrong["error"]["message"]
            .as_str()
            .unwrap()
            .contains("group_by")
    );
    let (status, _) = usage_as(&pipeline, Some(&laptop), "from=2026-12-31&to=2026-01-01").await;
    assert_eq!(status, 400);
    pipeline.stop().await;
}
/// `POST /v1/jobs` for `budget-user`, capped at 20 answer tokens.
async fn spend(pipeline: &Pipeline, index: usize) -> reqwest::Response {
    pipeline
        .post_job(&serde_json::json!({
            "user_id": "budget-user",
            "model": "sim",
            "messages": [{"role": "user", "content": format!("spend {index}")}],
            "params": {"max_tokens": 20},
        }))
        .await
}

/// Submits jobs one at a time (`submit(accepted so far)`), each waited to its end, until one is
/// refused with `402`: how many were accepted (counting `accepted` before), and the refusal.
async fn spend_until_refused<Submit, Answer>(
    pipeline: &Pipeline,
    mut accepted: usize,
    submit: Submit,
) -> (usize, reqwest::Response)
where
    Submit: Fn(usize) -> Answer,
    Answer: std::future::Future<Output = reqwest::Response>,
{
    loop {
        let response = submit(accepted).await;
        if response.status() == 402 {
            return (accepted, response);
        }
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        let id: uuid::Uuid = body["job_id"].as_str().unwrap().parse().unwrap();
        pipeline.wait_terminal(&[id], Duration::from_secs(30)).await;
        accepted += 1;
        // The budget's reading of the usage is at most a second old.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(accepted < 20, "the budget never refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_would_pass_its_users_daily_budget_is_refused_with_402() {
    let mut options = PipelineOptions {
        tiers: Some(
            r#"{"default": {"rate_per_sec": 1000, "burst": 1000, "budget_per_day": 0.05}}"#.into(),
        ),
        model_prices: Some(
            r#"{"sim": {"input_per_million": 1000, "output_per_million": 1000}}"#.into(),
        ),
        ..Default::default()
    };
    // Long enough for a second submission to find the first still running.
    options.sim.service_time_ms = 500;
    let pipeline = Pipeline::start(options).await;

    // Each job is estimated at 26 tokens ("spend N" is 2 + 4 for the message, and a cap of
    // 20): 0.026 held while it runs, so a second one at once would pass 0.05.
    let first = spend(&pipeline, 0).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let refused = spend(&pipeline, 1).await;
    assert_eq!(refused.status(), 402);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=86_400).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("daily budget of 0.0500") && message.contains("resets at"),
        "{message}"
    );

    // The jobs really use about 5 tokens (0.005): once each has ended and been recorded, its
    // real cost counts, not its estimate, and more fit in the day.
    let first_id: uuid::Uuid = first["job_id"].as_str().unwrap().parse().unwrap();
    pipeline
        .wait_terminal(&[first_id], Duration::from_secs(30))
        .await;
    let (accepted, refused) =
        spend_until_refused(&pipeline, 1, |accepted| spend(&pipeline, accepted + 1)).await;
    let refusal = refused.json::<Value>().await.unwrap();
    let (_, usage) = usage(&pipeline, "user_id=budget-user").await;
    let spent = usage["total"]["cost_usd"].as_f64().unwrap();
    println!(
        "budget: {accepted} jobs fit a budget of 0.05 at an estimate of 0.026 each; {spent:.4} spent; then {}",
        refusal["error"]["message"]
    );
    assert!(accepted >= 3, "settled usage let only {accepted} jobs in");
    assert!(spent <= 0.05 && spent + 0.026 > 0.05, "spent {spent}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keys_own_budget_refuses_its_jobs_while_the_users_other_keys_go_on() {
    // No budget for the tier: the key's own, 0.05 a day, is the only one.
    let options = PipelineOptions {
        api_keys: true,
        model_prices: Some(
            r#"{"sim": {"input_per_million": 1000, "output_per_million": 1000}}"#.into(),
        ),
        ..Default::default()
    };
    let pipeline = Pipeline::start(options).await;
    let budget = sluice_common::auth::KeyBudget {
        per_day: Some(0.05),
        per_month: None,
    };
    let (capped_id, capped) = sluice_common::auth::create_key_with_budget(
        &pipeline.database.pool,
        "key-budget-user",
        "default",
        Some("capped"),
        budget,
    )
    .await
    .unwrap();
    let (_, free) = pipeline.create_key("key-budget-user", "default").await;
    let submit = |key: String, index: usize| {
        let http = pipeline.http.clone();
        let url = format!("{}/v1/jobs", pipeline.ingest_url);
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&serde_json::json!({
                    "model": "sim",
                    "messages": [{"role": "user", "content": format!("spend {index}")}],
                    "params": {"max_tokens": 20},
                }))
                .send()
                .await
                .unwrap()
        }
    };
    // Each job is estimated at 0.026 and costs about 0.005 once answered: the capped key's
    // jobs, one at a time, fit until its recorded spending and the next estimate pass 0.05.
    let (accepted, refused) =
        spend_until_refused(&pipeline, 0, |accepted| submit(capped.clone(), accepted)).await;
    let retry_after = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = refused.json::<Value>().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("daily budget of 0.0500") && message.contains(&capped_id),
        "{message}"
    );
    assert!(retry_after.parse::<u64>().unwrap() >= 1);
    // The same user's other key has no budget of its own: it goes on.
    let other = submit(free, 100).await;
    assert_eq!(other.status(), 202, "the user's other key");
    let (_, usage) = usage_as(&pipeline, Some(&capped), "group_by=key").await;
    println!(
        "key budget: {accepted} jobs of key {capped_id} fit its 0.05 a day, then: {message}; usage by key: {}",
        usage["data"]
    );
    assert!(accepted >= 3, "settled usage let only {accepted} jobs in");
    pipeline.stop().await;
}
