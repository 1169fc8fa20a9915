//! Ingest and results driven from their OpenAPI document by schemathesis (the tool API teams run
//! against a document): every operation with generated valid and invalid input, every check it
//! has (no 5xx, status codes, content types, headers and bodies as documented, invalid input
//! refused, valid input accepted, authentication not ignored), with API keys on and off.

use sluice_tests::{Pipeline, PipelineOptions};
use std::time::Duration;

async fn pipeline(api_keys: bool) -> Pipeline {
    Pipeline::start(PipelineOptions {
        api_keys,
        // Generated requests come fast: the rate limits are not what is under test.
        tiers: Some(r#"{"default": {"rate_per_sec": 100000, "burst": 100000}}"#.into()),
        // Any model name: the OpenAI routes then accept what schemathesis makes up.
        openai_models: Vec::new(),
        // A stream of a job that never comes ends after a second of silence.
        sse_idle: Duration::from_secs(1),
        ..PipelineOptions::default()
    })
    .await
}

/// Runs schemathesis on the document `base_url` serves; panics with its report when a check
/// fails.
async fn schemathesis(label: &str, base_url: &str, api_key: Option<&str>) {
    let python = std::env::var("SLUICE_TEST_PYTHON")
        .expect("SLUICE_TEST_PYTHON: a python with schemathesis (scripts/test sets it)");
    let mut command = tokio::process::Command::new(&python);
    // Hooks: tests/schema/hooks.py.
    command.env("PYTHONPATH", concat!(env!("CARGO_MANIFEST_DIR"), "/schema"));
    command.env("SCHEMATHESIS_HOOKS", "hooks");
    command.args(["-m", "schemathesis.cli", "--config-file"]);
    command.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/schemathesis.toml"
    ));
    command.arg("run");
    command.arg(format!("{base_url}/openapi.json"));
    command.args(["--url", base_url, "--checks", "all", "--max-examples", "30"]);
    // A budget for the whole run: the stateful phase (following links from one call to the
    // next) would otherwise go on for minutes.
    command.args(["--max-time", "40"]);
    // The same cases in the same order on every run (so far as the time budget reaches).
    command.args(["--seed", "1", "--generation-deterministic"]);
    command.args(["--request-timeout", "10", "--no-color"]);
    command.args(["--max-response-time", "5"]);
    // The configuration's bearer token (unused without keys: the document has no security).
    command.env("SLUICE_API_KEY", api_key.unwrap_or("none"));
    // The whole story of each call, for a failure or a call that timed out.
    let report = std::env::temp_dir().join(format!("schemathesis-{}.ndjson", uuid::Uuid::now_v7()));
    command
        .args(["--report", "ndjson", "--report-ndjson-path"])
        .arg(&report);
    let output = command.output().await.expect("running schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{label}:\n{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found {label} disagreeing with its document (every call: {}):\n{stdout}\n{}",
        report.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_and_results_do_what_their_document_says_without_api_keys() {
    let pipeline = pipeline(false).await;
    schemathesis("ingest, keys off", &pipeline.ingest_url, None).await;
    schemathesis("results, keys off", &pipeline.results_url, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_and_results_do_what_their_document_says_with_api_keys() {
    let pipeline = pipeline(true).await;
    let (_, key) = pipeline.create_key("schema-user", "default").await;
    schemathesis("ingest, keys on", &pipeline.ingest_url, Some(&key)).await;
    schemathesis("results, keys on", &pipeline.results_url, Some(&key)).await;
}
