//! Services as real processes, for tests that kill them (SIGKILL) or stop them (SIGTERM).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// The built binary `name` (e.g. `sluice-worker`), beside this test's own executable.
pub fn binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, as scripts/test does)",
        path.display()
    );
    path
}

/// A free port on the loopback interface (closed again, so a service can bind it), below the
/// kernel's ephemeral range. Why not port 0's pick: that comes from the ephemeral range, which
/// every outgoing connection of the tests running beside this one draws from too, so between
/// closing it here and the service binding it, a client socket could take it (it happened: a
/// service exited with "address in use" and another answered on its port).
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    // Each test binary starts at its own place in 20000..32000, then walks on.
    let start = 20_000 + (std::process::id() % 1_000) as u16 * 12;
    loop {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 12_000;
        let port = 20_000 + (start - 20_000 + offset) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running service process; killed when dropped.
pub struct ServiceProcess {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl ServiceProcess {
    pub fn spawn(binary_name: &str, label: &str, env: &HashMap<String, String>) -> Self {
        let log =
            std::env::temp_dir().join(format!("{label}-{}.log", uuid::Uuid::now_v7().simple()));
        let file = std::fs::File::create(&log).expect("creating a log file");
        let log_filter = env.get("RUST_LOG").cloned().unwrap_or_else(|| {
            std::env::var("SLUICE_TEST_SERVICE_LOG").unwrap_or_else(|_| "info".into())
        });
        let child = Command::new(binary(binary_name))
            .envs(env)
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {binary_name}: {error}"));
        Self {
            name: label.to_owned(),
            child,
            log,
        }
    }

    /// Waits until the service answers `GET /readyz` on `port` with 200; after a minute,
    /// panics with the tail of its log.
    pub async fn wait_ready(&self, http: &reqwest::Client, port: u16) {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let started = std::time::Instant::now();
        while !http
            .get(&url)
            .send()
            .await
            .is_ok_and(|response| response.status().is_success())
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} not ready:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("a running child has a pid")
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("killing the service");
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit; returns whether it exited 0.
    pub async fn terminate(mut self, timeout: Duration) -> bool {
        self.sigterm();
        self.wait_exit(timeout)
            .await
            .is_some_and(|exit| exit.success())
    }

    /// Sends SIGTERM and returns at once.
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    /// Waits up to `timeout` for the process to exit: its exit status, or `None` if it is still
    /// running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(exit)) => Some(exit),
            _ => None,
        }
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}
