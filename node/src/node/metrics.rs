//! Counters and histograms the node keeps for `/metrics`. Lock-free: atomics only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the commit latency histogram.
pub const COMMIT_BUCKETS_S: [f64; 10] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; COMMIT_BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in COMMIT_BUCKETS_S.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn render(&self, name: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, b) in COMMIT_BUCKETS_S.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

#[derive(Default)]
pub struct Metrics {
    pub events_ingested: AtomicU64,
    pub elements_applied: AtomicU64,
    /// Later copies that raised a message's count.
    pub copies_counted: AtomicU64,
    /// Copies that changed nothing (retransmissions, own messages, trimmed).
    pub copies_duplicate: AtomicU64,
    pub elements_sent: AtomicU64,
    pub commits: AtomicU64,
    pub commit_latency: Histogram,
    pub writer_queue: AtomicU64,
    pub frames_refused: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub api_refused: AtomicU64,
    /// SIGHUP reloads applied, and refused (a bad config).
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Group commits that failed (a full disk, an I/O error).
    pub commit_failures: AtomicU64,
    /// Backups streamed through the API.
    pub backups: AtomicU64,
}
