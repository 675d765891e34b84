//! One datacenter connection from its Hello to its end: the Hello exchange (checked by the
//! session core), the duplicate-connection choice, the link's entry in [`super::LinkInfo`],
//! and exactly one log line when it ends.

use std::sync::{Arc, Mutex};

use super::{restore_peer_done, set_error_quiet, stream, SessionError};
use crate::clock::now_ms;
use crate::datacenter::Shared;
use crate::ids::NodeId;
use crate::limits::HELLO_TIMEOUT;
use crate::net::{self, close};
use crate::replication::link::LinkLimits;
use crate::replication::session::{self, Duplicate, Session};
use crate::replication::StoreError;
use crate::wire::{read_frame, write_frame, Hello, Message};

fn hello_for(shared: &Shared, peer: Option<NodeId>) -> Result<Hello, StoreError> {
    let r = shared.store.read()?;
    let progress = peer.map(|p| r.peer(p)).transpose()?;
    Ok(session::hello(
        shared.meta.node_id,
        &shared.meta.name,
        shared.meta.log_epoch,
        progress.as_ref(),
        &r.marks()?,
    ))
}

pub(super) async fn session(
    shared: Arc<Shared>,
    i: usize,
    conn: quinn::Connection,
    dialled: bool,
) -> bool {
    let peer = shared.peers.get(i);
    let max = shared.config.limits.frame_bytes_max;
    let known = peer.info.lock().expect("link lock").node_id;
    let proven = net::cert_id::peer_node_id(&conn);
    let handshake = async {
        if dialled {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(&mut send, &Message::Hello(hello_for(&shared, known)?)).await?;
            let theirs = expect_hello(&mut recv, max).await?;
            Ok::<_, SessionError>((send, recv, theirs))
        } else {
            let (mut send, mut recv) = conn.accept_bi().await?;
            let theirs = expect_hello(&mut recv, max).await?;
            session::check_hello(shared.meta.node_id, &theirs, proven)?;
            write_frame(
                &mut send,
                &Message::Hello(hello_for(&shared, Some(theirs.node_id))?),
            )
            .await?;
            Ok((send, recv, theirs))
        }
    };
    let (send, recv, theirs) = match tokio::time::timeout(HELLO_TIMEOUT, handshake).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            fail(&shared, i, &conn, &e);
            return false;
        }
        Err(_) => {
            fail(&shared, i, &conn, &SessionError::Timeout);
            return false;
        }
    };
    if let Err(e) = session::check_hello(shared.meta.node_id, &theirs, proven) {
        fail(&shared, i, &conn, &e.into());
        return false;
    }
    let peer_id = theirs.node_id;
    let me = shared.meta.node_id;
    let preferred = session::preferred(me, peer_id, dialled);
    let tail = *shared.tail.borrow();
    let limits = LinkLimits {
        in_flight_max: shared.config.limits.in_flight_max,
        ..LinkLimits::default()
    };
    // One read transaction: where the peer stands, and whether it lacks what only a snapshot
    // can give it (the session core decides; see `Session::check_peer_marks`).
    let opened = shared.store.read().and_then(|r| {
        let mut s = Session::open(
            me,
            shared.meta.log_epoch,
            &theirs,
            &r.peer(peer_id)?,
            &r.mark(me)?,
            tail,
            limits,
            now_ms(),
        );
        s.check_peer_marks(&r, &r.marks()?)?;
        Ok(s)
    });
    let s = match opened {
        Ok(s) => s,
        Err(e) => {
            fail(&shared, i, &conn, &e.into());
            return false;
        }
    };
    let start = s.acked();
    let own_request = s.own_log_request().cloned();
    let s = Arc::new(Mutex::new(s));
    let generation = {
        let mut info = peer.info.lock().expect("link lock");
        let live = info
            .conn
            .as_ref()
            .filter(|_| info.connected)
            .map(|_| info.preferred);
        match session::choose_connection(live, preferred) {
            Duplicate::RefuseNew => {
                drop(info);
                conn.close(close::DUPLICATE.into(), b"duplicate connection");
                return true;
            }
            Duplicate::ReplaceOld => {
                if let Some(old) = info.conn.as_ref() {
                    old.close(close::DUPLICATE.into(), b"duplicate connection");
                }
            }
            Duplicate::Take => {}
        }
        info.generation += 1;
        info.node_id = Some(peer_id);
        info.connected = true;
        info.preferred = preferred;
        info.conn = Some(conn.clone());
        info.session = Some(s.clone());
        info.last_error = None;
        info.generation
    };
    tracing::info!(peer = %peer.cfg.name, node_id = %peer_id, dialled, resume_from = start, "link up");
    if own_request.is_none() {
        restore_peer_done(&shared, i).await;
    } else {
        tracing::info!(peer = %peer.cfg.name, "peer holds more of this node's own log: catching up");
    }
    let result = stream::run_link(&shared, i, send, recv, s, own_request).await;
    {
        let mut info = peer.info.lock().expect("link lock");
        if info.generation == generation {
            info.connected = false;
            info.conn = None;
            info.session = None;
        }
    }
    match result {
        Ok(()) => {
            conn.close(close::SHUTDOWN.into(), b"bye");
            tracing::info!(peer = %peer.cfg.name, "link down: the peer ended the stream");
        }
        Err(e) => fail(&shared, i, &conn, &e),
    }
    true
}

/// Why the peer closed the connection, when it did so on purpose with a reason (shutting down,
/// settings reloaded, removed from its config, a duplicate connection).
fn closed_cleanly_by_peer(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c)
            if [close::SHUTDOWN, close::DUPLICATE]
                .iter()
                .any(|&code| c.error_code == quinn::VarInt::from_u32(code)) =>
        {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

/// Ends a connection that failed, with exactly one log line: INFO with the peer's reason when
/// the peer closed it on purpose, else WARN with what went wrong (hostile input also lands in
/// the node's last errors).
pub(super) fn fail(shared: &Shared, i: usize, conn: &quinn::Connection, e: &SessionError) {
    let name = shared.peers.get(i).cfg.name.clone();
    if matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::LocallyClosed)
    ) {
        // This node closed it (shutdown, reload, a duplicate replaced) and said why there.
        tracing::info!(peer = %name, "link down: closed by this node");
        return;
    }
    if let Some(reason) = closed_cleanly_by_peer(conn) {
        tracing::info!(peer = %name, "link down: the peer closed it: {reason}");
        set_error_quiet(shared, i, format!("closed by the peer: {reason}"));
        return;
    }
    if matches!(e, SessionError::Shutdown) {
        // This node is stopping on purpose: the peer is told why, and it is not a warning.
        conn.close(close::SHUTDOWN.into(), close::SHUTDOWN_REASON.as_bytes());
        tracing::info!(peer = %name, "link down: {}", close::SHUTDOWN_REASON);
        return;
    }
    let reason = e.to_string();
    if matches!(e, SessionError::Protocol(_) | SessionError::Frame(_)) {
        shared
            .metrics
            .frames_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        shared.record_error(format!("peer {name}: {reason}"));
    }
    tracing::warn!(peer = %name, "link down: {reason}");
    conn.close(e.close_code().into(), reason.as_bytes());
    set_error_quiet(shared, i, reason);
}

async fn expect_hello(recv: &mut quinn::RecvStream, max: usize) -> Result<Hello, SessionError> {
    match read_frame(recv, max).await? {
        Some(Message::Hello(h)) => Ok(h),
        Some(Message::Goodbye(g)) => Err(SessionError::Goodbye(g.reason)),
        Some(_) => Err(SessionError::Protocol("first frame is not a Hello".into())),
        None => Err(SessionError::Protocol("stream closed before Hello".into())),
    }
}
