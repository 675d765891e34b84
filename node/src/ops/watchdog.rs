//! The one loop that tells the supervisor how a node is doing, for every role: a STATUS line
//! every [`STATUS_EVERY`], and WATCHDOG=1 only after a round trip through the thread that does
//! the role's work (a datacenter's writer, a controller's core, a worker's driver), so a thread
//! stuck in a commit (a hung disk, a deadlock) stops the pings and systemd restarts the node.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::time::MissedTickBehavior;

use super::Notifier;
use crate::limits::STATUS_EVERY;

/// Why a working thread did not answer a ping (the watchdog's and `/readyz`'s).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PingError {
    #[error("the {0} has stopped")]
    Stopped(&'static str),
    #[error("the {what} did not answer within {after:?}")]
    Timeout { what: &'static str, after: Duration },
}

/// One round trip through a working thread (`what`, e.g. "writer thread"): `send` hands it a
/// ping carrying the reply sender and says whether the thread's queue took it; the thread
/// answers after whatever it is doing. Returns how long the round trip took.
pub async fn round_trip<Fut>(
    what: &'static str,
    timeout: Duration,
    send: impl FnOnce(oneshot::Sender<()>) -> Fut,
) -> Result<Duration, PingError>
where
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    let (tx, rx) = oneshot::channel();
    let trip = async {
        if !send(tx).await {
            return Err(PingError::Stopped(what));
        }
        rx.await.map_err(|_| PingError::Stopped(what))
    };
    match tokio::time::timeout(timeout, trip).await {
        Ok(r) => r.map(|()| started.elapsed()),
        Err(_) => Err(PingError::Timeout {
            what,
            after: timeout,
        }),
    }
}

/// What a role's runtime gives the watchdog loop.
pub trait Watched: Send + Sync + 'static {
    /// One round trip through the role's working thread, within `timeout`.
    fn ping(&self, timeout: Duration) -> impl Future<Output = Result<(), PingError>> + Send;
    /// What `systemctl status` shows.
    fn status_line(node: &Arc<Self>) -> impl Future<Output = String> + Send;
    /// Records an error for `outpost status` and the log.
    fn note_error(&self, e: String);
}

/// Runs until the task is aborted (at shutdown).
pub async fn run<W: Watched>(node: Arc<W>, notify: Notifier) {
    let ping_every = notify.watchdog_interval();
    let tick = ping_every.map_or(STATUS_EVERY, |p| p.min(STATUS_EVERY));
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut status_at: Option<Instant> = None;
    let mut stuck = false;
    loop {
        every.tick().await;
        if let Some(p) = ping_every {
            match node.ping(p).await {
                Ok(()) => {
                    notify.watchdog();
                    if stuck {
                        tracing::info!("the node answers again; watchdog pings resumed");
                        stuck = false;
                    }
                }
                Err(e) => {
                    if !stuck {
                        node.note_error(format!("watchdog: {e}; withholding the watchdog ping"));
                        stuck = true;
                    }
                }
            }
        }
        if status_at.is_none_or(|t| t.elapsed() >= STATUS_EVERY) {
            status_at = Some(Instant::now());
            notify.status(&W::status_line(&node).await);
        }
    }
}
