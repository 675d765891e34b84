//! The loop that tells the supervisor how the node is doing: a STATUS line every few seconds,
//! and WATCHDOG=1 only after a round trip through the writer thread, so a writer stuck in a
//! commit (a hung disk, a deadlock) stops the pings and systemd restarts the node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::time::MissedTickBehavior;

use crate::datacenter::writer::Cmd;
use crate::datacenter::Shared;
use crate::limits::STATUS_EVERY;
use crate::ops::notify::Notifier;
use crate::replication::LogRead;

/// Runs until the task is aborted (at shutdown).
pub async fn supervise(shared: Arc<Shared>, notify: Notifier) {
    let ping_every = notify.watchdog_interval();
    let tick = ping_every.map_or(STATUS_EVERY, |p| p.min(STATUS_EVERY));
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut status_at: Option<Instant> = None;
    let mut stuck = false;
    loop {
        every.tick().await;
        if let Some(p) = ping_every {
            match ping_writer(&shared, p).await {
                Ok(took) => {
                    notify.watchdog();
                    if stuck {
                        tracing::info!(
                            "the writer thread answers again (after {took:?}); watchdog pings resumed"
                        );
                        stuck = false;
                    }
                }
                Err(e) => {
                    if !stuck {
                        shared.note_error(format!("watchdog: {e}; withholding the watchdog ping"));
                        stuck = true;
                    }
                }
            }
        }
        if status_at.is_none_or(|t| t.elapsed() >= STATUS_EVERY) {
            status_at = Some(Instant::now());
            notify.status(&status_line(&shared).await);
        }
    }
}

/// One round trip through the writer thread: it answers after whatever it is committing.
pub async fn ping_writer(shared: &Shared, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let (tx, rx) = oneshot::channel();
    let round_trip = async {
        shared
            .writer
            .send(Cmd::Ping { reply: tx })
            .await
            .map_err(|_| "the writer thread has stopped".to_owned())?;
        rx.await
            .map_err(|_| "the writer thread has stopped".to_owned())
    };
    match tokio::time::timeout(timeout, round_trip).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "the writer thread did not answer within {timeout:?}"
        )),
    }
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
