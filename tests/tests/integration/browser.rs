//! The console page in a real browser: Debian's Chromium driven by playwright-core
//! (`tests/browser/console_check.mjs`) against a whole pipeline with API keys on. The results
//! service is restarted in the middle of an answer when the script asks.

use sluice_tests::{Pipeline, PipelineOptions};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_works_in_chromium_through_a_results_restart() {
    // In CI a missing browser is a failure like a missing broker: scripts/test provides it.
    let chromium = std::env::var("SLUICE_TEST_CHROMIUM")
        .expect("SLUICE_TEST_CHROMIUM: Debian's chromium (scripts/test installs it)");
    let script_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/browser");
    assert!(
        std::path::Path::new(script_dir)
            .join("node_modules/playwright-core")
            .exists(),
        "tests/browser/node_modules: scripts/test installs playwright-core there"
    );
    // One job at a time from one partition, 1.2 s each, tokens 150 ms apart: a job queued behind
    // three is seen moving up, and its answer is seen growing.
    let mut options = PipelineOptions {
        api_keys: true,
        partitions: 1,
        max_in_flight: 1,
        per_user_in_flight: 1,
        ..PipelineOptions::default()
    };
    options.sim.service_time_ms = 1_200;
    options.sim.token_time_ms = 150;
    let mut pipeline = Pipeline::start(options).await;
    let (_, key) = pipeline.create_key("console-user", "default").await;
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&shots).unwrap();

    let mut child = tokio::process::Command::new("node")
        .arg("console_check.mjs")
        .current_dir(script_dir)
        .env("SLUICE_RESULTS_URL", &pipeline.results_url)
        .env("SLUICE_INGEST_URL", &pipeline.ingest_url)
        .env("SLUICE_API_KEY", &key)
        .env("SLUICE_SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running node");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            println!("{line}");
            if line == "RESTART RESULTS" {
                pipeline.restart_results(Duration::from_secs(2)).await;
                stdin.write_all(b"restarted\n").await.unwrap();
            }
            printed.push(line);
        }
    };
    tokio::time::timeout(Duration::from_secs(180), read)
        .await
        .expect("the browser checks finished within 3 minutes");
    let output = child.wait_with_output().await.unwrap();
    let all = printed.join("\n");
    assert!(
        output.status.success() && all.contains("all browser checks passed"),
        "{all}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(shots.join("console.png").exists());
    pipeline.stop().await;
}
