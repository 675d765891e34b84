//! What the sender reads from storage for one peer: the next Elements frame (the session core
//! decides what goes in it: [`session::build_elements`]) and a snapshot, streamed from one read
//! transaction in the core's chunks ([`SnapshotCursor`]).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::SessionError;
use crate::datacenter::Shared;
use crate::ids::NodeId;
use crate::limits::SNAPSHOT_CHUNKS_AHEAD;
use crate::replication::session::{self, Built, Relay, SnapshotCursor};
use crate::replication::{LogRead, StoreError};
use crate::wire::{write_frame, Message, SnapshotChunk, SnapshotEnd};

/// Reads `(after, upto]` of the local log for `peer_id`, within `budget` bytes.
pub(super) fn build_elements(
    shared: &Shared,
    peer_id: NodeId,
    after: u64,
    upto: u64,
    budget: usize,
) -> Result<Built, StoreError> {
    let r = shared.store.read()?;
    let fanout = shared.config.replication.fanout;
    let (target, names) = if fanout > 0 {
        let peers = shared.peers.active();
        let target = peers
            .iter()
            .find(|(_, p)| p.info.lock().expect("link lock").node_id == Some(peer_id))
            .map(|(_, p)| p.cfg.name.clone());
        let names: Vec<String> = peers.iter().map(|(_, p)| p.cfg.name.clone()).collect();
        (target, names)
    } else {
        (None, Vec::new())
    };
    let relay = Relay {
        fanout,
        target: target.as_deref(),
        peers: &names,
    };
    session::build_elements(
        &r,
        |r, key, id| r.message(key, id),
        shared.meta.node_id,
        peer_id,
        relay,
        after,
        upto,
        budget,
    )
}

/// Streams our whole state table from one read transaction, then the marks it reflects and the
/// log position it corresponds to. Returns that end: the peer continues from its position and
/// holds at least its marks.
pub(super) async fn send_snapshot(
    shared: &Arc<Shared>,
    peer_id: NodeId,
    send: &mut quinn::SendStream,
    budget: usize,
) -> Result<SnapshotEnd, SessionError> {
    let (tx, mut rx) = mpsc::channel::<Result<SnapshotChunk, StoreError>>(SNAPSHOT_CHUNKS_AHEAD);
    let s = shared.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let produce = || -> Result<(), StoreError> {
            let r = s.store.read()?;
            let mut cursor = SnapshotCursor::new(s.meta.log_epoch, budget);
            while !cursor.finished() {
                let chunk = cursor.next_chunk(
                    |after, max| r.entries_after(after, max),
                    // The table is complete up to `state_upto` (what is after it is still only
                    // in the log and the writer's overlay).
                    || {
                        Ok(SnapshotEnd {
                            marks: r.marks()?.iter().map(|(o, m)| m.to_wire(*o)).collect(),
                            resume_after: r.state_upto()?.min(r.log_tail()?),
                        })
                    },
                )?;
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = produce() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    tracing::info!(peer = %peer_id, "peer is behind log retention: sending a snapshot");
    let mut resume = None;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        if let Some(end) = &chunk.end {
            resume = Some(end.clone());
        }
        write_frame(send, &Message::Snapshot(chunk)).await?;
    }
    let _ = reader.await;
    shared
        .metrics
        .snapshots_sent
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    resume.ok_or(SessionError::Shutdown)
}
