//! A broker of a test's own, for a test that stops it: the shared one serves every other test
//! running beside it. Started by the scripts' own `start_kafka` (the same configuration, in a
//! directory of its own), so it is Apache Kafka exactly as `scripts/run` runs it.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub struct PrivateBroker {
    pub port: u16,
    dir: PathBuf,
    /// `bash` running `start_kafka`, in a process group of its own with the JVM it starts.
    shell: Option<Child>,
}

impl PrivateBroker {
    /// Formats a fresh KRaft storage and starts the broker; returns once it serves.
    pub async fn start(label: &str) -> Self {
        let port = loop {
            let port = crate::process::free_port();
            // The controller listens on the next port.
            if std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break port;
            }
        };
        let dir = std::env::temp_dir().join(format!(
            "sluice-broker-{label}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).expect("creating the broker's directory");
        let mut broker = Self {
            port,
            dir,
            shell: None,
        };
        broker.run().await;
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL to the broker: no controlled shutdown, as a crashed machine or an OOM kill.
    pub async fn kill(&mut self) {
        if let Some(mut shell) = self.shell.take() {
            kill_group(&shell);
            let _ = shell.wait().await;
        }
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.run().await;
    }

    async fn run(&mut self) {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let log = self.dir.join("server.log");
        let _ = std::fs::remove_file(&log);
        let shell = Command::new("bash")
            .args([
                "-c",
                r#"source scripts/lib.sh && start_kafka "$0" "$1" && wait"#,
                &self.port.to_string(),
                &self.dir.to_string_lossy(),
            ])
            .current_dir(repo)
            .env(
                "SLUICE_KAFKA_HEAP",
                std::env::var("SLUICE_TEST_KAFKA_HEAP").unwrap_or("-Xms256m -Xmx512m".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("starting bash for scripts/lib.sh's start_kafka");
        self.shell = Some(shell);
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Kafka Server started") {
                return;
            }
            let exited = self
                .shell
                .as_mut()
                .and_then(|shell| shell.try_wait().ok().flatten());
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(90),
                "the test's own broker did not start ({exited:?}); its log ends:\n{}",
                tail(&text)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(shell) = &self.shell {
            kill_group(shell);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGKILL to the shell's whole process group: the shell and the JVM it started.
fn kill_group(shell: &Child) {
    if let Some(pid) = shell.id() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
