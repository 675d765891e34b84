//! `GET /metrics` in the Prometheus text format (version 0.0.4). Counters end in `_total`;
//! every queue is shown beside its bound (`..._max`), so an operator sees how close it runs.
//! The names in the interface (`outpost_events_ingested_total`, `outpost_elements_applied_total`,
//! `outpost_copies_received_total`, `outpost_peer_lag`) never change.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::ids::NodeId;
use crate::node::Shared;
use crate::replication::{LogRead, PeerProgress};

/// What one scrape reads from storage, in one read transaction.
#[derive(Default)]
struct Stored {
    tail: u64,
    entries: u64,
    log_records: u64,
    progress: Vec<(NodeId, PeerProgress)>,
}

fn write_metric(out: &mut String, kind: &str, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    write_metric(out, "counter", name, help, v.load(Ordering::Relaxed));
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    write_metric(out, "gauge", name, help, v);
}

/// A label value, escaped as the text format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn get_metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let s2 = s.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let r = s2.store.read()?;
        Ok::<_, crate::replication::StoreError>(Stored {
            tail: r.log_tail()?,
            entries: r.entry_count()?,
            log_records: r.log_len()?,
            progress: r.peers()?,
        })
    })
    .await;
    let (stored, store_ok) = match stored {
        Ok(Ok(st)) => (st, 1),
        _ => (Stored::default(), 0),
    };
    let m = &s.metrics;
    let limits = s.limits();
    let mut out = String::with_capacity(4096);
    let o = &mut out;
    let _ = writeln!(
        o,
        "# HELP outpost_build_info The running version.\n# TYPE outpost_build_info gauge\n\
         outpost_build_info{{version=\"{}\",role=\"{}\",name=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        s.meta.role,
        label(&s.meta.name)
    );
    counter(
        o,
        "outpost_events_ingested_total",
        "Events processed and committed here.",
        &m.events_ingested,
    );
    counter(
        o,
        "outpost_elements_applied_total",
        "Remote elements applied (first copies).",
        &m.elements_applied,
    );
    let received = m.elements_applied.load(Ordering::Relaxed)
        + m.copies_counted.load(Ordering::Relaxed)
        + m.copies_duplicate.load(Ordering::Relaxed);
    write_metric(
        o,
        "counter",
        "outpost_copies_received_total",
        "Copies of remote elements received (first, counted and duplicate).",
        received,
    );
    counter(
        o,
        "outpost_copies_counted_total",
        "Later copies that raised a message count.",
        &m.copies_counted,
    );
    counter(
        o,
        "outpost_copies_duplicate_total",
        "Copies that changed nothing (retransmissions, own messages, trimmed).",
        &m.copies_duplicate,
    );
    counter(
        o,
        "outpost_elements_sent_total",
        "Elements sent to peers (originated and relayed).",
        &m.elements_sent,
    );
    counter(
        o,
        "outpost_snapshots_sent_total",
        "Snapshots sent to peers behind log retention.",
        &m.snapshots_sent,
    );
    counter(
        o,
        "outpost_commits_total",
        "Write transactions committed.",
        &m.commits,
    );
    counter(
        o,
        "outpost_commit_failures_total",
        "Group commits that failed (disk full, I/O error); their requests were answered with an error.",
        &m.commit_failures,
    );
    counter(
        o,
        "outpost_frames_refused_total",
        "Peer frames refused as malformed or hostile.",
        &m.frames_refused,
    );
    counter(
        o,
        "outpost_api_unauthorized_total",
        "API requests refused for a missing or wrong token.",
        &m.api_refused,
    );
    counter(
        o,
        "outpost_reloads_total",
        "Configuration reloads applied (SIGHUP).",
        &m.reloads,
    );
    counter(
        o,
        "outpost_reload_failures_total",
        "Configuration reloads refused (a bad config; the node kept the previous one).",
        &m.reload_failures,
    );
    counter(
        o,
        "outpost_backups_total",
        "Backups taken through the API.",
        &m.backups,
    );

    // Queues against their bounds.
    let queued = s.writer.max_capacity() - s.writer.capacity();
    gauge(
        o,
        "outpost_writer_queue",
        "Requests waiting for the writer thread.",
        queued as u64,
    );
    gauge(
        o,
        "outpost_writer_queue_max",
        "Bound of the writer queue (limits.ingest_queue_max).",
        s.writer.max_capacity() as u64,
    );
    gauge(
        o,
        "outpost_log_records",
        "Records retained in the local log.",
        stored.log_records,
    );
    gauge(
        o,
        "outpost_log_records_max",
        "Bound of the local log (limits.log_records_max).",
        limits.log_records_max,
    );
    gauge(
        o,
        "outpost_log_retention_seconds",
        "How long log records are kept for catch-up (limits.log_retention).",
        limits.log_retention.as_secs(),
    );
    gauge(
        o,
        "outpost_peer_in_flight_max",
        "Log positions unacknowledged per peer before sending pauses (limits.in_flight_max).",
        s.config.limits.in_flight_max,
    );
    m.commit_latency.render("outpost_commit_seconds", o);

    // State of the node.
    gauge(
        o,
        "outpost_entries",
        "Rows of the state table.",
        stored.entries,
    );
    gauge(
        o,
        "outpost_log_tail",
        "Highest local log position.",
        stored.tail,
    );
    gauge(
        o,
        "outpost_ready",
        "1 once the database is open and the endpoints bound.",
        u64::from(s.ready.load(Ordering::Relaxed)),
    );
    gauge(
        o,
        "outpost_disk_full",
        "1 while commits fail for lack of space (ingest answers 503).",
        u64::from(s.disk_full.load(Ordering::Relaxed)),
    );
    gauge(
        o,
        "outpost_storage_readable",
        "1 when this scrape could read the database.",
        store_ok,
    );

    // Peers.
    let mut lag = String::new();
    let mut up = String::new();
    let peers = s.peers.active();
    for (_, p) in &peers {
        let (node_id, connected) = {
            let i = p.info.lock().expect("link lock");
            (i.node_id, i.connected)
        };
        let acked = node_id
            .and_then(|id| stored.progress.iter().find(|(n, _)| *n == id))
            .map_or(0, |(_, pp)| {
                pp.acked_in(s.meta.log_epoch, pp.acked_peer_epoch)
            });
        let name = label(&p.cfg.name);
        let _ = writeln!(
            lag,
            "outpost_peer_lag{{peer=\"{name}\"}} {}",
            p.lag(stored.tail, acked)
        );
        let _ = writeln!(
            up,
            "outpost_peer_up{{peer=\"{name}\"}} {}",
            u8::from(connected)
        );
    }
    let _ = write!(
        o,
        "# HELP outpost_peer_lag Log positions the peer has not acknowledged.\n\
         # TYPE outpost_peer_lag gauge\n{lag}\
         # HELP outpost_peer_up Whether the link to the peer is up.\n\
         # TYPE outpost_peer_up gauge\n{up}"
    );
    gauge(o, "outpost_peers", "Configured peers.", peers.len() as u64);
    gauge(
        o,
        "outpost_peers_up",
        "Peers whose link is up.",
        peers
            .iter()
            .filter(|(_, p)| p.info.lock().expect("link lock").connected)
            .count() as u64,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
