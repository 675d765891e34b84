//! `/metrics` of every role in the Prometheus text format (version 0.0.4), encoded by the
//! `prometheus` crate: [`Scrape`] is one scrape's registry, with what every role shows (build,
//! process, database size, HTTP requests); each role adds its own. Counters end in `_total`;
//! every queue is shown beside its bound (`..._max`), so an operator sees how close it runs.
//! The names in the interface (`outpost_events_ingested_total`, `outpost_elements_applied_total`,
//! `outpost_copies_received_total`, `outpost_peer_lag`) never change.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, Opts, Registry, TextEncoder};

use super::serve::HttpStats;

/// One scrape: a fresh registry holding this moment's values and the long-lived histograms.
pub struct Scrape {
    reg: Registry,
}

impl Scrape {
    /// A scrape with what every role shows: `outpost_build_info`, the process metrics
    /// (`process_*`, from /proc), `outpost_db_bytes` and the API server's requests.
    pub fn new(role: &str, name: &str, data_dir: &Path, http: &HttpStats) -> Scrape {
        let s = Scrape {
            reg: Registry::new(),
        };
        s.labelled(
            "outpost_build_info",
            "The running version, role and node name (always 1).",
            &["version", "role", "name"],
            [(vec![env!("CARGO_PKG_VERSION"), role, name], 1.0)],
        );
        s.add(SelfProcess);
        let db = std::fs::metadata(data_dir.join(crate::store::DB_FILE)).map_or(0, |m| m.len());
        s.gauge(
            "outpost_db_bytes",
            "Size of the database file (outpost.redb), bytes.",
            db as f64,
        );
        http.register(&s.reg);
        s
    }

    /// Adds a collector (a long-lived metric: a histogram, a labelled family).
    pub fn add(&self, c: impl Collector + 'static) {
        if let Err(e) = self.reg.register(Box::new(c)) {
            tracing::error!("metrics: {e}");
        }
    }

    pub fn counter(&self, name: &str, help: &str, v: u64) {
        let c = IntCounter::new(name, help).expect("valid metric");
        c.inc_by(v);
        self.add(c);
    }

    /// A counter read from an atomic.
    pub fn count(&self, name: &str, help: &str, v: &AtomicU64) {
        self.counter(name, help, v.load(Ordering::Relaxed));
    }

    pub fn gauge(&self, name: &str, help: &str, v: f64) {
        let g = Gauge::new(name, help).expect("valid metric");
        g.set(v);
        self.add(g);
    }

    /// A gauge family: one sample per row of label values.
    pub fn labelled<'a>(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        rows: impl IntoIterator<Item = (Vec<&'a str>, f64)>,
    ) {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        for (values, v) in rows {
            g.with_label_values(&values).set(v);
        }
        self.add(g);
    }

    /// The answer to `GET /metrics`.
    pub fn answer(self) -> Response {
        let mut out = Vec::with_capacity(8192);
        if let Err(e) = TextEncoder::new().encode(&self.reg.gather(), &mut out) {
            tracing::error!("metrics: {e}");
        }
        ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], out).into_response()
    }
}

/// This process's `process_*` metrics: one collector for the process (its CPU counter is
/// cumulative), shared by every node the process runs.
struct SelfProcess;

fn process_collector() -> &'static prometheus::process_collector::ProcessCollector {
    static P: OnceLock<prometheus::process_collector::ProcessCollector> = OnceLock::new();
    P.get_or_init(prometheus::process_collector::ProcessCollector::for_self)
}

impl Collector for SelfProcess {
    fn desc(&self) -> Vec<&Desc> {
        process_collector().desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        process_collector().collect()
    }
}
