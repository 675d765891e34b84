//! Counters and histograms the datacenter keeps for `/metrics` (encoded in `crate::http::metrics`).
//! Counters are atomics; the histograms are the `prometheus` crate's.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts};

use crate::http::serve::HttpStats;

/// Upper bounds (seconds) of the commit latency histogram.
pub const COMMIT_BUCKETS_S: [f64; 10] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0];

/// Upper bounds (seconds) of the replication latency histogram (origin ingest to commit here).
pub const REPLICATION_BUCKETS_S: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0,
];

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram")
}

pub struct Metrics {
    pub events_ingested: AtomicU64,
    pub elements_applied: AtomicU64,
    /// Later copies that raised a message's count.
    pub copies_counted: AtomicU64,
    /// Copies that changed nothing (retransmissions, own messages, trimmed).
    pub copies_duplicate: AtomicU64,
    pub elements_sent: AtomicU64,
    pub commits: AtomicU64,
    /// `outpost_commit_seconds`.
    pub commit_latency: Latency,
    /// `outpost_replication_latency_seconds`: a remote element's origin HLC time (set at its
    /// ingest there) to the commit of its first copy here.
    pub replication_latency: Histogram,
    pub writer_queue: AtomicU64,
    pub frames_refused: AtomicU64,
    /// `GET /v1/watch` clients disconnected for not reading.
    pub watchers_slow_closed: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub api_refused: AtomicU64,
    /// SIGHUP reloads applied, and refused (a bad config).
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Group commits that failed (a full disk, an I/O error).
    pub commit_failures: AtomicU64,
    /// Backups streamed through the API.
    pub backups: AtomicU64,
    /// The API server's requests and connections.
    pub http: Arc<HttpStats>,
}

/// A latency histogram observed with a [`Duration`].
pub struct Latency(pub Histogram);

impl Latency {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            events_ingested: AtomicU64::new(0),
            elements_applied: AtomicU64::new(0),
            copies_counted: AtomicU64::new(0),
            copies_duplicate: AtomicU64::new(0),
            elements_sent: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commit_latency: Latency(histogram(
                "outpost_commit_seconds",
                "Time of one group commit (write transaction), seconds.",
                &COMMIT_BUCKETS_S,
            )),
            replication_latency: histogram(
                "outpost_replication_latency_seconds",
                "Time from an element's ingest at its origin (its HLC time) to the commit of its first copy here, seconds; frames mixing first and later copies are not sampled.",
                &REPLICATION_BUCKETS_S,
            ),
            writer_queue: AtomicU64::new(0),
            frames_refused: AtomicU64::new(0),
            watchers_slow_closed: AtomicU64::new(0),
            snapshots_sent: AtomicU64::new(0),
            api_refused: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            commit_failures: AtomicU64::new(0),
            backups: AtomicU64::new(0),
            http: Arc::default(),
        }
    }
}

impl Metrics {
    /// One observation per element, from its origin HLC time (ms) to now; a clock ahead of
    /// ours counts as 0.
    pub fn observe_replication(&self, origin_ms: impl Iterator<Item = u64>) {
        let now = crate::clock::now_ms();
        for ms in origin_ms {
            self.replication_latency
                .observe(now.saturating_sub(ms) as f64 / 1000.0);
        }
    }
}
