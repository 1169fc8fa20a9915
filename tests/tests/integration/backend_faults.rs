//! The model backend killed mid-call (SIGKILL of its process: connections cut, then refused),
//! then started again: every job retries or fails by the worker's rules and ends exactly once,
//! none is left `running`, and jobs after the backend is back succeed.

use crate::faults::Cluster;
use sluice_tests::exclusive_stage;
use sluice_tests::process::{ServiceProcess, free_port};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The simulated model as a process on `port`, one second a call.
async fn backend(cluster: &Cluster, port: u16, label: &str) -> ServiceProcess {
    let env: HashMap<String, String> = [
        ("SIM_ADDR", format!("127.0.0.1:{port}")),
        ("SIM_SERVICE_TIME_MS", "1000".to_owned()),
        ("SIM_CAPACITY", "1000".to_owned()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    let process = ServiceProcess::spawn("sluice-model-sim", label, &env);
    let health = format!("http://127.0.0.1:{port}/healthz");
    sluice_tests::wait_until("the model backend", Duration::from_secs(30), || async {
        let response = cluster.http.get(&health).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    process
}

async fn submit(cluster: &Cluster, count: usize, label: &str) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for index in 0..count {
        let user = format!("user-{}", index % 8);
        ids.push(cluster.submit(&user, &format!("{label} {index}")).await);
    }
    ids
}

/// Waits until every job in `ids` has a terminal status; their statuses, counted.
async fn settle(cluster: &Cluster, ids: &[Uuid]) -> HashMap<String, i64> {
    let pool = &cluster.database.pool;
    sluice_tests::wait_terminal(pool, ids, Duration::from_secs(120)).await;
    let not_once = sluice_tests::terminal_not_once(pool, ids).await;
    assert_eq!(not_once, 0, "every job ended exactly once");
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status || COALESCE(' ' || (error->>'code'), ''), count(*) FROM jobs
             WHERE job_id = ANY($1) GROUP BY 1",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_model_backend_killed_mid_call_leaves_no_job_running() {
    // Alone on the machine: it loads the cores with processes.
    let _stage = exclusive_stage().await;
    let mut cluster = Cluster::start("backend SIGKILL").await;
    let port = free_port();
    let first = backend(&cluster, port, "backend-a").await;
    cluster.sim_url = format!("http://127.0.0.1:{port}");
    let _results = cluster.results("results").await;
    let _worker = cluster.worker("worker").await;

    let during = submit(&cluster, 40, "during").await;
    let stats = format!("http://127.0.0.1:{port}/stats");
    // Why 4: the worker's adaptive limit lets 8 calls at once to a new backend, and grows only
    // as calls succeed.
    sluice_tests::wait_until(
        "calls in flight at the backend",
        Duration::from_secs(30),
        || async {
            let stats: serde_json::Value = cluster
                .http
                .get(&stats)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (stats["open"].as_u64()? >= 4).then_some(())
        },
    )
    .await;
    first.kill().await;
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _second = backend(&cluster, port, "backend-b").await;

    let statuses = settle(&cluster, &during).await;
    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND status IN ('queued', 'running')",
    )
    .bind(&during)
    .fetch_one(&cluster.database.pool)
    .await
    .unwrap();
    assert_eq!(running, 0);
    println!(
        "backend SIGKILL: 40 jobs in flight or queued when the backend died, all ended {:.1} s after: {statuses:?}",
        killed.elapsed().as_secs_f64()
    );

    // Once the backend is back and the worker's breaker has closed again (a cool-down, then one
    // trial call), jobs succeed.
    let mut probes = 0;
    loop {
        probes += 1;
        let probe = submit(&cluster, 1, "probe").await;
        if settle(&cluster, &probe).await.contains_key("succeeded") {
            break;
        }
        assert!(probes < 30, "no job succeeded after the backend came back");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "backend SIGKILL: the first job succeeded {:.1} s after the kill ({probes} probes)",
        killed.elapsed().as_secs_f64()
    );
    let after = submit(&cluster, 10, "after").await;
    let statuses = settle(&cluster, &after).await;
    println!("backend SIGKILL: 10 jobs after the backend returned: {statuses:?}");
    assert_eq!(statuses.get("succeeded"), Some(&10), "{statuses:?}");
}
