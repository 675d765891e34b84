//! `GET /metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::node::Shared;
use crate::replication::LogRead;

pub async fn get_metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let m = &s.metrics;
    let mut out = String::with_capacity(2048);
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counter(
        &mut out,
        "outpost_events_ingested_total",
        "Events processed and committed here.",
        load(&m.events_ingested),
    );
    counter(
        &mut out,
        "outpost_elements_applied_total",
        "Remote elements applied (first copies).",
        load(&m.elements_applied),
    );
    counter(
        &mut out,
        "outpost_copies_received_total",
        "Copies of remote elements received (first, counted and duplicate).",
        load(&m.elements_applied) + load(&m.copies_counted) + load(&m.copies_duplicate),
    );
    counter(
        &mut out,
        "outpost_copies_counted_total",
        "Later copies that raised a message count.",
        load(&m.copies_counted),
    );
    counter(
        &mut out,
        "outpost_elements_sent_total",
        "Elements sent to peers (originated and relayed).",
        load(&m.elements_sent),
    );
    counter(
        &mut out,
        "outpost_commits_total",
        "Write transactions committed.",
        load(&m.commits),
    );
    counter(
        &mut out,
        "outpost_frames_refused_total",
        "Peer frames refused as malformed or hostile.",
        load(&m.frames_refused),
    );
    counter(
        &mut out,
        "outpost_api_unauthorized_total",
        "API requests refused for a missing or wrong token.",
        load(&m.api_refused),
    );
    gauge(
        &mut out,
        "outpost_writer_queue",
        "Requests waiting for the writer thread.",
        load(&m.writer_queue),
    );
    gauge(
        &mut out,
        "outpost_writer_queue_max",
        "Bound of the writer queue (limits.ingest_queue_max).",
        s.config.limits.ingest_queue_max as u64,
    );
    m.commit_latency.render("outpost_commit_seconds", &mut out);
    let tail = s.store.read().and_then(|r| r.log_tail()).unwrap_or(0);
    let progress = s.store.read().and_then(|r| r.peers()).unwrap_or_default();
    let _ = writeln!(out, "# HELP outpost_peer_lag Log positions the peer has not acknowledged.\n# TYPE outpost_peer_lag gauge");
    let mut up_lines = String::new();
    for p in &s.peers {
        let (node_id, connected) = {
            let i = p.info.lock().expect("link lock");
            (i.node_id, i.connected)
        };
        let acked = node_id
            .and_then(|id| progress.iter().find(|(n, _)| *n == id))
            .map_or(0, |(_, pp)| pp.acked);
        let _ = writeln!(
            out,
            "outpost_peer_lag{{peer=\"{}\"}} {}",
            p.cfg.name,
            p.lag(tail, acked)
        );
        let _ = writeln!(
            up_lines,
            "outpost_peer_up{{peer=\"{}\"}} {}",
            p.cfg.name, connected as u8
        );
    }
    let _ = writeln!(out, "# HELP outpost_peer_up Whether the link to the peer is up.\n# TYPE outpost_peer_up gauge\n{up_lines}");
    gauge(
        &mut out,
        "outpost_log_tail",
        "Highest local log position.",
        tail,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
