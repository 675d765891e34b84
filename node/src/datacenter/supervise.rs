//! What the watchdog loop (`crate::ops::watchdog`) asks of a datacenter: a round trip through
//! the writer thread (it answers after whatever it is committing) and the STATUS line.

use std::sync::Arc;
use std::time::Duration;

use crate::datacenter::writer::Cmd;
use crate::datacenter::Shared;
use crate::ops::watchdog::{round_trip, PingError, Watched};
use crate::replication::LogRead;

impl Watched for Shared {
    async fn ping(&self, timeout: Duration) -> Result<(), PingError> {
        ping_writer(self, timeout).await.map(|_| ())
    }
    async fn status_line(node: &Arc<Self>) -> String {
        status_line(node).await
    }
    fn note_error(&self, e: String) {
        Shared::note_error(self, e)
    }
}

/// One round trip through the writer thread: it answers after whatever it is committing.
pub async fn ping_writer(shared: &Shared, timeout: Duration) -> Result<Duration, PingError> {
    round_trip("writer thread", timeout, |reply| async move {
        shared.writer.send(Cmd::Ping { reply }).await.is_ok()
    })
    .await
}

/// What `systemctl status` shows, e.g.
/// `datacenter dc-east: 2/3 peers up, max lag 0, 1234 entries, log tail 5678`.
pub async fn status_line(shared: &Arc<Shared>) -> String {
    let s = shared.clone();
    let read = tokio::task::spawn_blocking(move || {
        let store = s.store.get()?;
        let entries = store.entry_count()?;
        let r = store.read()?;
        Ok::<_, crate::replication::StoreError>((r.log_tail()?, entries, r.peers()?))
    })
    .await;
    let head = format!("{} {}", shared.meta.role, shared.meta.name);
    let (tail, entries, progress) = match read {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return format!("{head}: storage error: {e}"),
        Err(e) => return format!("{head}: {e}"),
    };
    let mut up = 0;
    let mut max_lag = 0;
    let peers = shared.peers.active();
    for (_, p) in &peers {
        let (node_id, connected) = {
            let i = p.info.lock().expect("link lock");
            (i.node_id, i.connected)
        };
        up += usize::from(connected);
        let acked = node_id
            .and_then(|id| progress.iter().find(|(n, _)| *n == id))
            .map_or(0, |(_, pp)| {
                pp.acked_in(shared.meta.log_epoch, pp.acked_peer_epoch)
            });
        max_lag = max_lag.max(p.lag(tail, acked));
    }
    let mut line = format!(
        "{head}: {up}/{} peers up, max lag {max_lag}, {entries} entries, log tail {tail}",
        peers.len()
    );
    if shared.disk_full.load(std::sync::atomic::Ordering::Relaxed) {
        line.push_str("; DISK FULL: ingest refused until space is freed");
    }
    line
}
