//! Reading jobs from where an API key cannot go: a job's stream token (its `events_url`, for a
//! browser's EventSource) grants that job only; and `GET /v1/jobs`, a user's own jobs a page at
//! a time.

use serde_json::{Value, json};
use sluice_common::tokens::{StreamTokenArgs, StreamTokens};
use sluice_tests::{Pipeline, PipelineOptions, read_sse};
use std::time::Duration;

async fn keyed_pipeline() -> (Pipeline, String, String) {
    let pipeline = Pipeline::start(PipelineOptions {
        api_keys: true,
        openai_models: vec!["sim".into()],
        ..PipelineOptions::default()
    })
    .await;
    let (_, alice) = pipeline.create_key("alice", "default").await;
    let (_, bob) = pipeline.create_key("bob", "default").await;
    (pipeline, alice, bob)
}

async fn submit(pipeline: &Pipeline, key: &str, content: &str) -> Value {
    let response = pipeline
        .http
        .post(format!("{}/v1/jobs", pipeline.ingest_url))
        .bearer_auth(key)
        .json(&json!({"model": "sim", "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json().await.unwrap()
}

async fn status_and_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jobs_events_url_is_all_a_browser_needs_and_grants_that_job_only() {
    let (pipeline, alice, bob) = keyed_pipeline().await;
    let accepted = submit(&pipeline, &alice, "follow me").await;
    let events_url = accepted["events_url"].as_str().unwrap().to_owned();
    let (base, token) = events_url
        .split_once("?token=")
        .expect("a token in events_url");
    let job_id = accepted["job_id"].as_str().unwrap();
    assert_eq!(
        base,
        format!("{}/v1/jobs/{job_id}/events", pipeline.results_url)
    );

    // No key, only the URL: the job's events to the end, and the job itself.
    let response = pipeline.http.get(&events_url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let (events, _) = read_sse(response, Duration::from_secs(30)).await;
    let last: Value = serde_json::from_str(&events.last().unwrap().data).unwrap();
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["output"]["content"], "echo: follow me");
    let job_url = format!("{}/v1/jobs/{job_id}?token={token}", pipeline.results_url);
    let job: Value = pipeline
        .http
        .get(&job_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["job_id"], job_id);

    // The same token on another job (Bob's, or another of Alice's) finds nothing.
    let other = submit(&pipeline, &bob, "not yours").await;
    let other_id = other["job_id"].as_str().unwrap();
    for url in [
        format!(
            "{}/v1/jobs/{other_id}/events?token={token}",
            pipeline.results_url
        ),
        format!("{}/v1/jobs/{other_id}?token={token}", pipeline.results_url),
    ] {
        let response = pipeline.http.get(&url).send().await.unwrap();
        assert_eq!(
            status_and_code(response).await,
            (404, "job_not_found".into()),
            "{url}"
        );
    }
    // Nothing but reading that job: not cancelling it, not listing.
    let response = pipeline.http.delete(&job_url).send().await.unwrap();
    assert_eq!(
        status_and_code(response).await,
        (401, "unauthorized".into())
    );
    let list = format!("{}/v1/jobs?token={token}", pipeline.results_url);
    let response = pipeline.http.get(&list).send().await.unwrap();
    assert_eq!(
        status_and_code(response).await,
        (401, "unauthorized".into())
    );

    // Forged and expired tokens are told apart, with a 401 each.
    let mut forged = token.to_owned();
    let last_char = forged.pop().unwrap();
    forged.push(if last_char == 'A' { 'B' } else { 'A' });
    let response = pipeline
        .http
        .get(format!("{base}?token={forged}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(response).await,
        (401, "invalid_token".into())
    );
    // Signed with the deployment's own secret (from Postgres: none is configured here), an hour
    // and a second ago.
    let tokens = StreamTokens::load(
        &StreamTokenArgs {
            secrets: Vec::new(),
            ttl: Duration::from_secs(3600),
        },
        &pipeline.database.pool,
    )
    .await
    .unwrap();
    let job_id = sluice_schemas::JobId::parse(job_id).unwrap();
    let expired = tokens.issue(job_id, chrono::Utc::now() - chrono::Duration::seconds(3601));
    let response = pipeline
        .http
        .get(format!("{base}?token={expired}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(response).await,
        (401, "token_expired".into())
    );

    // The OpenAI front door hands out the same URL, in a header.
    let response = pipeline
        .http
        .post(format!("{}/v1/chat/completions", pipeline.ingest_url))
        .bearer_auth(&alice)
        .json(&json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let url = response.headers()["x-sluice-events-url"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(url.contains("/events?token="), "{url}");
    let response = pipeline.http.get(&url).send().await.unwrap();
    let (events, _) = read_sse(response, Duration::from_secs(30)).await;
    assert_eq!(events.last().unwrap().event.as_deref(), Some("succeeded"));
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_lists_their_own_jobs_newest_first_a_page_at_a_time() {
    let (pipeline, alice, bob) = keyed_pipeline().await;
    let mut alices = Vec::new();
    for index in 0..5 {
        let accepted = submit(&pipeline, &alice, &format!("alice {index}")).await;
        alices.push(accepted["job_id"].as_str().unwrap().to_owned());
    }
    submit(&pipeline, &bob, "bob's").await;
    let ids: Vec<uuid::Uuid> = alices.iter().map(|id| id.parse().unwrap()).collect();
    pipeline.wait_terminal(&ids, Duration::from_secs(30)).await;

    let list = |key: &str, query: &str| {
        let request = pipeline
            .http
            .get(format!("{}/v1/jobs{query}", pipeline.results_url))
            .bearer_auth(key);
        async move { request.send().await.unwrap() }
    };
    let ids_of = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|job| job["job_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut seen = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let page: Value = list(&alice, &query).await.json().await.unwrap();
        assert_eq!(page["object"], "list");
        seen.extend(ids_of(&page));
        if page["has_more"] == false {
            break;
        }
        query = format!("?limit=2&after={}", page["last_id"].as_str().unwrap());
    }
    let newest_first: Vec<String> = alices.iter().rev().cloned().collect();
    assert_eq!(
        seen, newest_first,
        "every job once, newest first, none of Bob's"
    );

    let succeeded: Value = list(&alice, "?status=succeeded&model=sim")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids_of(&succeeded), newest_first);
    let none: Value = list(&alice, "?status=failed").await.json().await.unwrap();
    assert_eq!(none["data"], json!([]));
    assert_eq!(none["has_more"], false);
    let bobs: Value = list(&bob, "").await.json().await.unwrap();
    assert_eq!(bobs["data"].as_array().unwrap().len(), 1);

    for (query, named) in [
        ("?limit=0", "limit"),
        ("?limit=many", "limit"),
        ("?status=done", "status"),
        ("?after=nope", "after"),
        ("?user_id=bob", "user_id"),
    ] {
        let response = list(&alice, query).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_query");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("bad query: {named}")),
            "{body}"
        );
    }
    let response = pipeline
        .http
        .get(format!("{}/v1/jobs", pipeline.results_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    pipeline.stop().await;
}
