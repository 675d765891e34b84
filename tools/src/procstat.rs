//! What the benchmark reads from /proc: the machine, the load average, the file system under a
//! path, a process's resident memory and the CPU time of its threads.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Clock ticks per second for /proc/*/stat times (USER_HZ; 100 on every Linux that matters).
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Clone, Debug)]
pub struct Machine {
    pub nproc: usize,
    pub model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let mem_total_mib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    Machine {
        nproc: thread::available_parallelism().map_or(1, |n| n.get()),
        model,
        mem_total_mib,
        kernel,
    }
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// The mount that holds `path`: (mount point, file system type, device).
pub fn mount_of(path: &Path) -> Option<(String, String, String)> {
    let path = fs::canonicalize(path).ok()?;
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    let mut best: Option<(String, String, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = f[1].replace("\\040", " ");
        if path.starts_with(&mp) && best.as_ref().is_none_or(|(b, _, _)| mp.len() >= b.len()) {
            best = Some((mp, f[2].to_owned(), f[0].to_owned()));
        }
    }
    best
}

/// Machine-wide CPU seconds spent busy (everything but idle and iowait) so far, from
/// `/proc/stat`: counts every process on the machine, including ones this one cannot see.
pub fn machine_busy_secs() -> f64 {
    let Ok(s) = fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // counted in user.
    let busy: f64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    busy / TICKS_PER_SEC
}

/// VmRSS of a process in KiB, if it is alive.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Whether a process is gone or a zombie (exited, not yet reaped).
pub fn has_exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}

/// utime + stime of a process or thread from its `stat` file, in seconds.
fn stat_cpu_secs(stat: &str) -> Option<(String, f64)> {
    // The comm field is in parentheses and may hold spaces; the fields after the last ')' are
    // state(3) ... utime(14) stime(15), so utime is the 12th after it.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let utime: f64 = rest.get(11)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / TICKS_PER_SEC))
}

/// CPU seconds used so far by a whole process.
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_secs(&stat).map(|(_, s)| s)
}

/// CPU seconds of this process (the benchmark itself).
pub fn self_cpu_secs() -> f64 {
    process_cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// CPU seconds per thread name (threads with the same name are added up).
pub fn threads_cpu_secs(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        if let Ok(stat) = fs::read_to_string(e.path().join("stat")) {
            if let Some((comm, secs)) = stat_cpu_secs(&stat) {
                *out.entry(comm).or_insert(0.0) += secs;
            }
        }
    }
    out
}

/// CPU seconds per thread name used between two snapshots, largest first.
pub fn threads_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = after
        .iter()
        .map(|(k, a)| (k.clone(), a - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Samples the VmRSS of some processes every `every` on a thread of its own and keeps the
/// largest value seen for each; stops when dropped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<Vec<u64>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new(vec![0u64; pids.len()]));
        let (s, m) = (stop.clone(), max.clone());
        let handle = thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || loop {
                {
                    let mut m = m.lock().expect("rss lock");
                    for (i, pid) in pids.iter().enumerate() {
                        if let Some(kib) = rss_kib(*pid) {
                            m[i] = m[i].max(kib);
                        }
                    }
                }
                if s.load(Ordering::Relaxed) {
                    return;
                }
                thread::sleep(every);
            })
            .expect("spawn the RSS sampler");
        RssSampler {
            stop,
            max,
            handle: Some(handle),
        }
    }

    /// Stops sampling (after one last sample) and returns the largest VmRSS of each process, KiB.
    pub fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.max.lock().expect("rss lock").clone()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The ids of a process's threads called `name`.
pub fn thread_ids(pid: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            if let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(tid);
            }
        }
    }
    out
}

/// Share of samples in which a thread was in each scheduler state.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StateShares {
    /// Running or waiting for a core (R).
    pub running: f64,
    /// Uninterruptible sleep, in practice waiting for the disk (D).
    pub disk: f64,
    /// Sleeping: waiting for work (S and the rest).
    pub sleeping: f64,
    pub samples: u64,
}

/// Samples the scheduler state of some threads (one per process, e.g. each node's writer) every
/// `every` on a thread of its own: where a single-threaded stage spends its time.
pub struct StateSampler {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<Vec<[u64; 3]>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl StateSampler {
    /// `threads`: (pid, tid) per process; `None` where the thread was not found.
    pub fn start(threads: Vec<Option<(u32, u32)>>, every: Duration) -> StateSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(vec![[0u64; 3]; threads.len()]));
        let (s, c) = (stop.clone(), counts.clone());
        let handle = thread::Builder::new()
            .name("state-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    {
                        let mut c = c.lock().expect("state lock");
                        for (i, t) in threads.iter().enumerate() {
                            let Some((pid, tid)) = t else { continue };
                            let Ok(stat) =
                                fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
                            else {
                                continue;
                            };
                            let state = stat
                                .rfind(')')
                                .and_then(|k| stat[k + 1..].split_whitespace().next())
                                .unwrap_or("?");
                            let k = match state {
                                "R" => 0,
                                "D" => 1,
                                _ => 2,
                            };
                            c[i][k] += 1;
                        }
                    }
                    thread::sleep(every);
                }
            })
            .expect("spawn the state sampler");
        StateSampler {
            stop,
            counts,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Vec<StateShares> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.counts
            .lock()
            .expect("state lock")
            .iter()
            .map(|c| {
                let n = c.iter().sum::<u64>();
                let f = |x: u64| if n > 0 { x as f64 / n as f64 } else { 0.0 };
                StateShares {
                    running: f(c[0]),
                    disk: f(c[1]),
                    sleeping: f(c[2]),
                    samples: n,
                }
            })
            .collect()
    }
}

impl Drop for StateSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_in_comm() {
        let stat = "1234 (tokio rt (x)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        let (comm, secs) = stat_cpu_secs(stat).unwrap();
        assert_eq!(comm, "tokio rt (x)");
        assert!((secs - 3.0).abs() < 1e-9);
    }
}
