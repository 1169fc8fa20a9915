//! What the services cost while the bench runs, read from `/proc`: CPU time and resident memory.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A service to watch, given as `name=pid`.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

impl std::str::FromStr for Watched {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, pid) = text
            .split_once('=')
            .ok_or_else(|| format!("expected name=pid, got {text:?}"))?;
        let pid = pid
            .parse()
            .map_err(|_| format!("not a process id: {pid:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            pid,
        })
    }
}

/// Clock ticks per second of `/proc/PID/stat`; 100 on every Linux this runs on.
const TICKS_PER_SEC: f64 = 100.0;

/// The fields of `/proc/PID/stat` after the command name, which may hold spaces.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

/// CPU time of a process and of its children, live and exited, in seconds: Postgres does its
/// work in one child process per connection.
fn cpu_secs(pid: u32) -> Option<f64> {
    let ticks = |fields: &[String], range: std::ops::Range<usize>| -> f64 {
        range
            .filter_map(|index| fields.get(index)?.parse::<f64>().ok())
            .sum()
    };
    // utime, stime, cutime, cstime are fields 14 to 17 of stat; 11 to 14 after the name.
    let own = ticks(&stat_fields(pid)?, 11..15);
    let children: f64 = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat_fields)
        .filter(|fields| fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid))
        .map(|fields| ticks(&fields, 11..13))
        .sum();
    Some((own + children) / TICKS_PER_SEC)
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Usage {
    /// Cores busy on average over the window.
    pub cpu_cores: f64,
    /// Highest resident memory seen while sampling, MiB.
    pub max_rss_mib: f64,
    /// Highest resident memory over the process's life (`VmHWM`), MiB.
    pub peak_rss_mib: f64,
}

/// Samples every watched process until stopped, then tells what each used.
pub(crate) struct Sampler {
    watched: Vec<Watched>,
    started: Instant,
    cpu_at_start: Vec<Option<f64>>,
    max_rss_kib: Vec<u64>,
}

impl Sampler {
    /// Watches these and the load generator itself, which shares the machine with them.
    pub(crate) fn start(watched: &[Watched]) -> Self {
        let mut watched = watched.to_vec();
        watched.push(Watched {
            name: "load generator".into(),
            pid: std::process::id(),
        });
        Self {
            started: Instant::now(),
            cpu_at_start: watched.iter().map(|w| cpu_secs(w.pid)).collect(),
            max_rss_kib: vec![0; watched.len()],
            watched,
        }
    }

    pub(crate) fn sample(&mut self) {
        for (index, watched) in self.watched.iter().enumerate() {
            let rss = status_kib(watched.pid, "VmRSS").unwrap_or_default();
            self.max_rss_kib[index] = self.max_rss_kib[index].max(rss);
        }
    }

    /// Samples once a second while `work` runs.
    pub(crate) async fn during<T>(&mut self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                output = &mut work => { self.sample(); return output; }
                _ = tick.tick() => self.sample(),
            }
        }
    }

    pub(crate) fn finish(self) -> BTreeMap<String, Usage> {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let mib = |kib: u64| kib as f64 / 1024.0;
        self.watched
            .iter()
            .enumerate()
            .map(|(index, watched)| {
                let cpu = match (self.cpu_at_start[index], cpu_secs(watched.pid)) {
                    (Some(before), Some(after)) => (after - before) / elapsed,
                    _ => 0.0,
                };
                let usage = Usage {
                    cpu_cores: cpu,
                    max_rss_mib: mib(self.max_rss_kib[index]),
                    peak_rss_mib: mib(status_kib(watched.pid, "VmHWM").unwrap_or_default()),
                };
                (watched.name.clone(), usage)
            })
            .collect()
    }
}
