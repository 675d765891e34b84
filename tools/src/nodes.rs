//! What the benchmark reads from running nodes besides the load itself: their process ids (the
//! testkit's `Cluster` does not expose them, so they are found in /proc by config path), their
//! `/metrics` counters, and snapshots of counters and CPU time taken together.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use outpost::testkit::Api;

use crate::procstat;

/// The pid of the `outpost run ... --config CONFIG` process.
pub fn pid_of_config(config: &Path) -> anyhow::Result<u32> {
    let want = config.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").context("reading /proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.iter().any(|a| *a == b"run") && args.contains(&want) {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no process runs with --config {}", config.display()),
        many => bail!(
            "several processes run with --config {}: {many:?}",
            config.display()
        ),
    }
}

/// The counters the benchmark reads from `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub ingested: u64,
    pub applied: u64,
    pub commits: u64,
    pub commit_seconds_sum: f64,
    pub commit_seconds_count: u64,
    pub snapshots_sent: u64,
    /// Rows of the state table (a gauge).
    pub entries: u64,
}

pub fn parse_metrics(text: &str) -> Counters {
    let mut c = Counters::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        match name.trim() {
            "outpost_events_ingested_total" => c.ingested = v as u64,
            "outpost_elements_applied_total" => c.applied = v as u64,
            "outpost_commits_total" => c.commits = v as u64,
            "outpost_commit_seconds_sum" => c.commit_seconds_sum = v,
            "outpost_commit_seconds_count" => c.commit_seconds_count = v as u64,
            "outpost_snapshots_sent_total" => c.snapshots_sent = v as u64,
            "outpost_entries" => c.entries = v as u64,
            _ => {}
        }
    }
    c
}

pub async fn counters(api: &Api) -> anyhow::Result<Counters> {
    let text = api
        .metrics()
        .await
        .with_context(|| format!("GET {}/metrics", api.base))?;
    Ok(parse_metrics(&text))
}

/// Counters and CPU times of every node, and the benchmark's own CPU time, at one moment.
pub struct Snapshot {
    pub at: Instant,
    pub counters: Vec<Counters>,
    pub node_cpu: Vec<f64>,
    pub threads: Vec<BTreeMap<String, f64>>,
    pub bench_cpu: f64,
    /// Machine-wide busy CPU seconds (every process, seen or not).
    pub machine_busy: f64,
}

pub async fn snapshot(apis: &[Api], pids: &[u32]) -> anyhow::Result<Snapshot> {
    let at = Instant::now();
    let node_cpu = pids
        .iter()
        .map(|p| procstat::process_cpu_secs(*p).unwrap_or(0.0))
        .collect();
    let threads = pids
        .iter()
        .map(|p| procstat::threads_cpu_secs(*p))
        .collect();
    let bench_cpu = procstat::self_cpu_secs();
    let machine_busy = procstat::machine_busy_secs();
    let mut counters = Vec::new();
    for a in apis {
        counters.push(self::counters(a).await?);
    }
    Ok(Snapshot {
        at,
        counters,
        node_cpu,
        threads,
        bench_cpu,
        machine_busy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_read() {
        let text = "# HELP outpost_events_ingested_total x\n# TYPE outpost_events_ingested_total counter\noutpost_events_ingested_total 42\noutpost_elements_applied_total 7\noutpost_commits_total 3\noutpost_commit_seconds_bucket{le=\"0.001\"} 1\noutpost_commit_seconds_sum 0.25\noutpost_commit_seconds_count 3\noutpost_snapshots_sent_total 2\noutpost_entries 9\noutpost_peer_lag{peer=\"b\"} 5\n";
        let c = parse_metrics(text);
        assert_eq!((c.ingested, c.applied, c.commits), (42, 7, 3));
        assert_eq!(c.commit_seconds_count, 3);
        assert_eq!((c.snapshots_sent, c.entries), (2, 9));
        assert!((c.commit_seconds_sum - 0.25).abs() < 1e-12);
    }
}
