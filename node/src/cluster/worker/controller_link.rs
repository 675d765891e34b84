//! The worker's connection to its controller: dial (pinned to the configured fingerprint), one
//! bidirectional stream, the Join as its first frame, then frames both ways until it breaks;
//! then dial again after a jittered backoff. Frames go to the core through the driver, except
//! `Relay`, which a load balancer forwards without opening. Heartbeats are sent from here once
//! admitted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::core::{Standing, WorkerRefusal};
use super::{relay, WorkerShared};
use crate::limits::{
    HEARTBEAT_DEFAULT, JOIN_REFUSED_RETRY, JOIN_REJECTED_RETRY, STANDING_POLL, STREAM_OPEN_TIMEOUT,
    WORKER_CONTROL_QUEUE_MAX,
};
use crate::limits::{WORKER_DIAL_BACKOFF_MAX, WORKER_DIAL_BACKOFF_MIN};
use crate::net::backoff::{jittered, Backoff};
use crate::net::{self, close};
use crate::wire::{
    read_frame, write_frame, Admission, FrameError, JoinRefusal, Message, TOKEN_NOT_ACCEPTED,
};

/// How a session with the controller ended.
enum End {
    /// The connection broke or the controller closed it.
    Closed(String),
    /// The controller sent something the core refuses: close and dial again.
    Hostile(String),
    /// The controller refuses this machine.
    Rejected(String),
    /// The controller refused this Join for now, and said why.
    Refused(JoinRefusal),
    Shutdown,
}

pub(crate) async fn run(shared: Arc<WorkerShared>) {
    let mut backoff = Backoff::new(WORKER_DIAL_BACKOFF_MIN, WORKER_DIAL_BACKOFF_MAX);
    loop {
        let answered = AtomicBool::new(false);
        let wait = match session(&shared, &answered).await {
            End::Shutdown => return,
            End::Rejected(reason) => {
                shared.note_error(format!(
                    "the controller refuses this machine: {reason}; asking again every {JOIN_REJECTED_RETRY:?}"
                ));
                set_state(&shared, |l| {
                    l.rejected = Some(reason.clone());
                    l.last_error = Some(format!("rejected: {reason}"));
                });
                jittered(JOIN_REJECTED_RETRY)
            }
            End::Refused(why) => {
                let line = format!("the controller refused this machine: {why}");
                set_state(&shared, |l| {
                    // Said once while it lasts, not on every attempt.
                    if l.last_error.as_deref() != Some(line.as_str()) {
                        shared.note_error(format!(
                            "{line}; asking again every {JOIN_REFUSED_RETRY:?}"
                        ));
                    }
                    l.last_error = Some(line.clone());
                });
                backoff.reset();
                jittered(JOIN_REFUSED_RETRY)
            }
            End::Hostile(e) => {
                shared.note_error(format!("controller: {e}; connection closed"));
                set_state(&shared, |l| l.last_error = Some(e.clone()));
                next(&shared, &mut backoff, &answered)
            }
            End::Closed(e) => {
                set_state(&shared, |l| {
                    if l.last_error.as_deref() != Some(e.as_str()) {
                        tracing::info!(controller = %shared.controller_addr, "{e}");
                    }
                    l.last_error = Some(e.clone());
                });
                next(&shared, &mut backoff, &answered)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// The wait before the next dial: short again after a session in which the controller answered;
/// slow while it refuses this machine (it then refuses the key in the handshake itself).
fn next(shared: &WorkerShared, backoff: &mut Backoff, answered: &AtomicBool) -> Duration {
    if answered.load(Ordering::Relaxed) {
        backoff.reset();
    } else if shared
        .controller
        .lock()
        .expect("controller lock")
        .rejected
        .is_some()
    {
        return jittered(JOIN_REJECTED_RETRY);
    }
    backoff.next_wait()
}

fn set_state(shared: &WorkerShared, f: impl FnOnce(&mut super::ControllerLink)) {
    f(&mut shared.controller.lock().expect("controller lock"));
}

async fn session(shared: &Arc<WorkerShared>, answered: &AtomicBool) -> End {
    let addr = shared.controller_addr;
    let (conn, fp) = match net::connect(&shared.endpoint, addr).await {
        Ok(x) => x,
        Err(e) => return End::Closed(format!("dialling the controller at {addr}: {e}")),
    };
    if fp != shared.controller_fingerprint {
        conn.close(close::UNKNOWN_PEER.into(), b"not the controller dialled");
        shared.refused();
        return End::Closed(format!("{addr} answered with certificate {fp}"));
    }
    let (mut send, recv) = match tokio::time::timeout(STREAM_OPEN_TIMEOUT, conn.open_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return End::Closed(format!("controller at {addr}: {e}")),
        Err(_) => {
            conn.close(close::PROTOCOL.into(), b"no stream");
            return End::Closed(format!("controller at {addr}: opening a stream timed out"));
        }
    };
    let Some(join) = shared.join_frame().await else {
        return End::Shutdown;
    };
    if let Err(e) = write_frame(&mut send, &Message::Join(join)).await {
        return End::Closed(format!("controller at {addr}: sending the Join: {e}"));
    }
    let (tx, rx) = mpsc::channel(WORKER_CONTROL_QUEUE_MAX);
    let generation = {
        let mut l = shared.controller.lock().expect("controller lock");
        l.generation += 1;
        l.conn = Some(conn.clone());
        l.tx = Some(tx);
        l.connected = true;
        l.generation
    };
    tracing::info!(controller = %addr, "connected to the controller");
    let end = if shared.input(super::Input::Connected).await {
        tokio::select! {
            e = read_loop(shared, recv, answered) => e,
            e = write_loop(shared, send, rx) => e,
        }
    } else {
        End::Shutdown
    };
    {
        let mut l = shared.controller.lock().expect("controller lock");
        if l.generation == generation {
            l.connected = false;
            l.conn = None;
            l.tx = None;
        }
    }
    match &end {
        End::Hostile(e) => {
            shared.refused();
            conn.close(close::PROTOCOL.into(), e.as_bytes());
        }
        End::Rejected(_) => conn.close(close::SHUTDOWN.into(), b"rejected"),
        End::Refused(_) => conn.close(close::SHUTDOWN.into(), b"refused"),
        End::Shutdown => conn.close(close::SHUTDOWN.into(), b"worker shutting down"),
        End::Closed(e) => conn.close(close::SHUTDOWN.into(), e.as_bytes()),
    }
    tracing::info!(controller = %addr, "disconnected from the controller");
    end
}

async fn read_loop(
    shared: &Arc<WorkerShared>,
    mut recv: quinn::RecvStream,
    answered: &AtomicBool,
) -> End {
    let max = shared.config.limits.frame_bytes_max;
    // What the controller said about this machine's admission, shown as its last error while
    // it waits (a token the controller did not accept).
    let mut note: Option<&'static str> = None;
    loop {
        let msg = match read_frame(&mut recv, max).await {
            Ok(Some(m)) => m,
            Ok(None) => return End::Closed("the controller closed the stream".into()),
            Err(FrameError::Io(e)) => return End::Closed(format!("controller connection: {e}")),
            Err(e) => return End::Hostile(format!("frame from the controller: {e}")),
        };
        answered.store(true, Ordering::Relaxed);
        match &msg {
            Message::Admission(Admission::PendingTokenNotAccepted) => {
                if note.is_none() {
                    shared.note_error(format!("the controller says: {TOKEN_NOT_ACCEPTED}"));
                }
                note = Some(TOKEN_NOT_ACCEPTED);
            }
            Message::Admission(Admission::Refused(why)) => return End::Refused(*why),
            Message::Admission(_) => note = None,
            _ => {}
        }
        match msg {
            Message::Relay(r) => relay::forward(shared, r),
            Message::Goodbye(g) => {
                return End::Closed(format!("the controller said goodbye: {}", g.reason))
            }
            m => match shared.feed_controller(m).await {
                None => return End::Shutdown,
                Some(Ok(())) => {}
                Some(Err(WorkerRefusal::Hostile(e))) => return End::Hostile(e),
                Some(Err(WorkerRefusal::Rejected(e))) => return End::Rejected(e),
            },
        }
        set_state(shared, |l| {
            l.last_error = note.map(str::to_owned);
            l.rejected = None;
        });
    }
}

/// How long until the next heartbeat: the controller's interval once admitted.
fn heartbeat_every(shared: &WorkerShared) -> (bool, Duration) {
    let v = shared.view();
    if v.standing != Standing::Admitted {
        return (false, STANDING_POLL);
    }
    let every = match v.record.heartbeat_ms {
        0 => HEARTBEAT_DEFAULT,
        ms => Duration::from_millis(ms.max(50)),
    };
    (true, every)
}

async fn write_loop(
    shared: &Arc<WorkerShared>,
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Message>,
) -> End {
    let mut beat_at = Instant::now() + heartbeat_every(shared).1;
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return End::Closed("replaced by a newer connection".into()),
            },
            _ = tokio::time::sleep_until(beat_at) => {
                let (admitted, every) = heartbeat_every(shared);
                beat_at = Instant::now() + every;
                if !admitted {
                    continue;
                }
                Message::Heartbeat
            }
        };
        if let Err(e) = write_frame(&mut send, &m).await {
            return End::Closed(format!("writing to the controller: {e}"));
        }
    }
}
