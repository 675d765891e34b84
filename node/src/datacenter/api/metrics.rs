//! `GET /metrics` of a datacenter: every role's scrape plus the store, the writer, the peers.

use crate::datacenter::Shared;
use crate::http::metrics::Scrape;
use crate::ids::NodeId;
use crate::replication::{LogRead, PeerProgress};
use axum::extract::State;
use axum::response::Response;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What one scrape reads from storage, in one read transaction.
#[derive(Default)]
struct Stored {
    tail: u64,
    /// The log position up to which the state table is complete.
    state_upto: u64,
    dirty_entries: u64,
    dirty_bytes: u64,
    entries: u64,
    log_records: u64,
    progress: Vec<(NodeId, PeerProgress)>,
}

pub async fn get_metrics(State(s): State<Arc<Shared>>) -> Response {
    let s2 = s.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let store = s2.store.get()?;
        let entries = store.entry_count()?;
        let r = store.read()?;
        Ok::<_, crate::replication::StoreError>(Stored {
            tail: r.log_tail()?,
            state_upto: r.state_upto()?,
            dirty_entries: store.overlay().dirty_len() as u64,
            dirty_bytes: store.overlay().dirty_bytes() as u64,
            entries,
            log_records: r.log_len()?,
            progress: r.peers()?,
        })
    })
    .await;
    let (stored, store_ok) = match stored {
        Ok(Ok(st)) => (st, 1.0),
        _ => (Stored::default(), 0.0),
    };
    let m = &s.metrics;
    let limits = s.limits();
    let o = Scrape::new(
        &s.meta.role.to_string(),
        &s.meta.name,
        &s.config.data_dir,
        &m.http,
    );
    o.count(
        "outpost_events_ingested_total",
        "Events processed and committed here.",
        &m.events_ingested,
    );
    o.count(
        "outpost_elements_applied_total",
        "Remote elements applied (first copies).",
        &m.elements_applied,
    );
    let received = m.elements_applied.load(Ordering::Relaxed)
        + m.copies_counted.load(Ordering::Relaxed)
        + m.copies_duplicate.load(Ordering::Relaxed);
    o.counter(
        "outpost_copies_received_total",
        "Copies of remote elements received (first, counted and duplicate).",
        received,
    );
    o.count(
        "outpost_copies_counted_total",
        "Later copies that raised a message count.",
        &m.copies_counted,
    );
    o.count(
        "outpost_copies_duplicate_total",
        "Copies that changed nothing (retransmissions, own messages, trimmed).",
        &m.copies_duplicate,
    );
    o.count(
        "outpost_elements_sent_total",
        "Elements sent to peers (originated and relayed).",
        &m.elements_sent,
    );
    o.count(
        "outpost_snapshots_sent_total",
        "Snapshots sent to peers behind log retention.",
        &m.snapshots_sent,
    );
    o.count(
        "outpost_commits_total",
        "Write transactions committed.",
        &m.commits,
    );
    o.count(
        "outpost_commit_failures_total",
        "Group commits that failed (disk full, I/O error); their requests were answered with an error.",
        &m.commit_failures,
    );
    o.count(
        "outpost_frames_refused_total",
        "Peer frames refused as malformed or hostile.",
        &m.frames_refused,
    );
    o.count(
        "outpost_watchers_slow_closed_total",
        "GET /v1/watch clients disconnected because they did not read for 10 s.",
        &m.watchers_slow_closed,
    );
    o.gauge(
        "outpost_watchers",
        "GET /v1/watch streams open.",
        crate::http::watch::watchers() as f64,
    );
    o.count(
        "outpost_api_unauthorized_total",
        "API requests refused for a missing or wrong token.",
        &m.api_refused,
    );
    o.count(
        "outpost_reloads_total",
        "Configuration reloads applied (SIGHUP).",
        &m.reloads,
    );
    o.count(
        "outpost_reload_failures_total",
        "Configuration reloads refused (a bad config; the node kept the previous one).",
        &m.reload_failures,
    );
    o.count(
        "outpost_backups_total",
        "Backups taken through the API.",
        &m.backups,
    );

    // Queues against their bounds.
    let queued = s.writer.max_capacity() - s.writer.capacity();
    o.gauge(
        "outpost_writer_queue",
        "Requests waiting for the writer thread.",
        queued as f64,
    );
    o.gauge(
        "outpost_writer_queue_max",
        "Bound of the writer queue (limits.ingest_queue_max).",
        s.writer.max_capacity() as f64,
    );
    o.gauge(
        "outpost_log_records",
        "Records retained in the local log.",
        stored.log_records as f64,
    );
    o.gauge(
        "outpost_state_dirty_entries",
        "State entries committed (in the log) and not yet written to the state table.",
        stored.dirty_entries as f64,
    );
    o.gauge(
        "outpost_state_dirty_bytes",
        "Bytes of those entries (a flush round starts at 8 MiB, everything is written at 16 MiB).",
        stored.dirty_bytes as f64,
    );
    o.gauge(
        "outpost_state_replay_records",
        "Log records after the point up to which the state table is complete: what a restart merges into the state.",
        stored.tail.saturating_sub(stored.state_upto) as f64,
    );
    o.gauge(
        "outpost_log_records_max",
        "Bound of the local log (limits.log_records_max).",
        limits.log_records_max as f64,
    );
    o.gauge(
        "outpost_log_retention_seconds",
        "How long log records are kept for catch-up (limits.log_retention).",
        limits.log_retention.as_secs_f64(),
    );
    o.gauge(
        "outpost_peer_in_flight_max",
        "Log positions unacknowledged per peer before sending pauses (limits.in_flight_max).",
        s.config.limits.in_flight_max as f64,
    );
    o.add(m.commit_latency.0.clone());
    o.add(m.replication_latency.clone());

    // State of the node.
    o.gauge(
        "outpost_entries",
        "Rows of the state table.",
        stored.entries as f64,
    );
    o.gauge(
        "outpost_log_tail",
        "Highest local log position.",
        stored.tail as f64,
    );
    o.gauge(
        "outpost_ready",
        "1 once the database is open and the endpoints bound.",
        f64::from(u8::from(s.ready.load(Ordering::Relaxed))),
    );
    o.gauge(
        "outpost_disk_full",
        "1 while commits fail for lack of space (ingest answers 503).",
        f64::from(u8::from(s.disk_full.load(Ordering::Relaxed))),
    );
    o.gauge(
        "outpost_storage_readable",
        "1 when this scrape could read the database.",
        store_ok,
    );
    o.gauge(
        "outpost_restoring",
        "1 while a node restored from a backup recovers its own log from its peers (ingest answers 503).",
        f64::from(u8::from(s.restore.waiting().is_some())),
    );

    // Peers.
    let peers = s.peers.active();
    let mut rows = Vec::with_capacity(peers.len());
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
        let contact = p.last_contact_ms.load(Ordering::Relaxed);
        rows.push((
            p.cfg.name.clone(),
            p.lag(stored.tail, acked) as f64,
            f64::from(u8::from(connected)),
            contact,
        ));
    }
    let by_peer = |f: fn(&(String, f64, f64, u64)) -> f64| {
        rows.iter()
            .map(move |r| (vec![r.0.as_str()], f(r)))
            .collect::<Vec<_>>()
    };
    o.labelled(
        "outpost_peer_lag",
        "Log positions the peer has not acknowledged.",
        &["peer"],
        by_peer(|r| r.1),
    );
    o.labelled(
        "outpost_peer_up",
        "Whether the link to the peer is up.",
        &["peer"],
        by_peer(|r| r.2),
    );
    o.labelled(
        "outpost_peer_last_contact_timestamp_seconds",
        "When a frame last arrived from the peer, seconds since the Unix epoch (absent: never since start).",
        &["peer"],
        rows.iter()
            .filter(|r| r.3 > 0)
            .map(|r| (vec![r.0.as_str()], r.3 as f64 / 1000.0)),
    );
    o.gauge("outpost_peers", "Configured peers.", peers.len() as f64);
    o.gauge(
        "outpost_peers_up",
        "Peers whose link is up.",
        rows.iter().filter(|r| r.2 > 0.0).count() as f64,
    );
    o.answer()
}
