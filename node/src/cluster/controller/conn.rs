//! The workers' connections: the accept loop, and per connection the handshake, the Join, a
//! writer task and a reader loop. This module moves frames between QUIC and the core thread;
//! it decides nothing about admission (the core does) except that the first frame must be a
//! Join of this protocol version. Every connection is bounded: in number, in the time it may
//! take to say who it is, in the frames it may queue. Bundle transfers arrive on further
//! streams of the same connection and are served beside the control loop (`transfer`).
//!
//! A connection costs little until its Join: a handshake and one task, at most
//! [`JOINING_MAX`] at once. When a new one arrives at that bound, the one that has waited
//! longest without a Join is cut, so a flood of handshakes that never send anything cannot
//! keep a real worker out (a real worker sends its Join one round trip after its handshake).
//! The open-connection permit, the queues, the writer and the core's attention come only with
//! a Join.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::cmd::{cut, Cmd, ConnHandle, Out};
use super::core::{ConnId, Peer};
use super::shared::ControllerShared;
use crate::limits::{
    CONNECTION_CLOSE_FLUSH, CONNECTION_OUTBOUND_MAX, CONNECTION_WRITE_CHUNK_BYTES,
    CONTROLLER_CONNECTIONS_MAX, FIRST_FRAME_TIMEOUT, HANDSHAKE_TIMEOUT,
};
use crate::net::{self, cert_id, close};
use crate::wire::{encode_frame, read_frame, FrameError, Join, Message, CLUSTER_PROTOCOL_VERSION};

/// Accepts until the endpoint closes.
pub(crate) async fn accept_loop(shared: Arc<ControllerShared>, endpoint: quinn::Endpoint) {
    let open = Arc::new(Semaphore::new(CONTROLLER_CONNECTIONS_MAX));
    let joining = Joining::default();
    let next_id = AtomicU64::new(1);
    while let Some(incoming) = endpoint.accept().await {
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let max = shared.joining_max.load(Ordering::Relaxed).max(1);
        let (slot, cut) = joining.enter(id, max);
        if cut > 0 {
            shared
                .metrics
                .connections_refused
                .fetch_add(cut, Ordering::Relaxed);
        }
        let shared = shared.clone();
        let open = open.clone();
        tokio::spawn(async move {
            connection(shared, id, incoming, slot, open).await;
        });
    }
}

/// The connections before their Join, oldest first (ids only grow), each with the sender that
/// cuts it.
#[derive(Clone, Default)]
struct Joining(Arc<Mutex<BTreeMap<ConnId, oneshot::Sender<()>>>>);

/// One connection's place among the joining; leaving it (drop) frees the place.
struct JoinSlot {
    id: ConnId,
    joining: Joining,
    cut: oneshot::Receiver<()>,
}

impl Joining {
    /// A place for connection `id`; at `max`, the oldest are cut to make room. Returns the
    /// place and how many were cut.
    fn enter(&self, id: ConnId, max: usize) -> (JoinSlot, u64) {
        let (tx, rx) = oneshot::channel();
        let mut cut = 0;
        {
            let mut map = self.0.lock().expect("joining lock");
            while map.len() >= max {
                let Some((_, oldest)) = map.pop_first() else {
                    break;
                };
                let _ = oldest.send(());
                cut += 1;
            }
            map.insert(id, tx);
        }
        let slot = JoinSlot {
            id,
            joining: self.clone(),
            cut: rx,
        };
        (slot, cut)
    }
}

impl JoinSlot {
    /// Resolves when this connection is cut to make room for a newer one.
    async fn cut(&mut self) {
        // A dropped sender (the place was freed some other way) never cuts.
        if (&mut self.cut).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for JoinSlot {
    fn drop(&mut self) {
        self.joining
            .0
            .lock()
            .expect("joining lock")
            .remove(&self.id);
    }
}

/// Why a connection ended before or after its Join; said to the worker in the close reason.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Version(String),
    #[error("no Join within {0:?}")]
    Timeout(Duration),
    #[error("too many connections without a Join; this one waited longest")]
    Cut,
    #[error("bad frame: {0}")]
    Frame(FrameError),
    #[error("{0}")]
    Gone(String),
}

impl ConnError {
    fn code(&self) -> Option<u32> {
        match self {
            ConnError::Protocol(_) | ConnError::Frame(_) | ConnError::Timeout(_) => {
                Some(close::PROTOCOL)
            }
            ConnError::Cut => Some(close::OVERLOADED),
            ConnError::Version(_) => Some(close::VERSION),
            // The connection is already gone; nothing to say.
            ConnError::Gone(_) => None,
        }
    }
}

/// A frame error that only reports the connection going away is not the peer's fault.
fn frame_error(e: FrameError) -> ConnError {
    match e {
        FrameError::Io(io) => ConnError::Gone(io.to_string()),
        e => ConnError::Frame(e),
    }
}

async fn connection(
    shared: Arc<ControllerShared>,
    id: ConnId,
    incoming: quinn::Incoming,
    mut slot: JoinSlot,
    open: Arc<Semaphore>,
) {
    let remote = incoming.remote_address();
    let max = shared.config.limits.frame_bytes_max;
    // Dropping the handshake when cut or late abandons it; nothing was said yet.
    let handshake = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, net::accept(incoming)) => r,
        _ = slot.cut() => {
            tracing::debug!(%remote, "incoming handshake cut: too many connections without a Join");
            return;
        }
    };
    let (conn, fingerprint) = match handshake {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "incoming handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "incoming handshake timed out");
            return;
        }
    };
    let first = tokio::select! {
        r = tokio::time::timeout(FIRST_FRAME_TIMEOUT, first_frame(&conn, max)) => {
            r.unwrap_or(Err(ConnError::Timeout(FIRST_FRAME_TIMEOUT)))
        }
        _ = slot.cut() => Err(ConnError::Cut),
    };
    let (send, mut recv, join) = match first {
        Ok(x) => x,
        Err(e) => {
            refuse(&shared, &conn, &e, remote);
            return;
        }
    };
    drop(slot);
    let Ok(_open) = open.try_acquire_owned() else {
        shared
            .metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        conn.close(
            VarInt::from_u32(close::OVERLOADED),
            b"the controller is at its connection limit; try again later",
        );
        return;
    };
    let peer = Peer {
        fingerprint,
        node_id: cert_id::peer_node_id(&conn),
    };
    let (out_tx, out_rx) = mpsc::channel(CONNECTION_OUTBOUND_MAX);
    let handle = ConnHandle {
        conn: conn.clone(),
        out: out_tx,
    };
    tracing::debug!(conn = id, %remote, name = %join.name, node_id = %join.node_id, "joined");
    let node_id = join.node_id;
    let registered = shared
        .cmd
        .send(Cmd::Joined {
            conn: id,
            peer,
            join: Box::new(join),
            handle,
        })
        .await;
    if registered.is_err() {
        conn.close(
            VarInt::from_u32(close::SHUTDOWN),
            b"controller shutting down",
        );
        return;
    }
    let writer = tokio::spawn(write_loop(send, out_rx, conn.clone()));
    // Bundle transfers come on further streams, served beside (never inside) this loop.
    let transfers = tokio::spawn(super::transfer::serve(
        shared.clone(),
        conn.clone(),
        node_id,
        fingerprint,
    ));
    let ended = loop {
        match read_frame(&mut recv, max).await {
            // Leaving is the transport's business, not the core's.
            Ok(Some(Message::Goodbye(g))) => {
                break Some(ConnError::Gone(format!("goodbye: {}", g.reason)))
            }
            Ok(Some(msg)) => {
                if shared.cmd.send(Cmd::Frame { conn: id, msg }).await.is_err() {
                    break None;
                }
            }
            Ok(None) => break Some(ConnError::Gone("the worker ended its stream".into())),
            Err(e) => break Some(frame_error(e)),
        }
    };
    match &ended {
        Some(ConnError::Gone(why)) => {
            conn.close(VarInt::from_u32(0), b"stream ended");
            tracing::debug!(conn = id, "connection ended: {why}");
        }
        Some(e) => refuse(&shared, &conn, e, remote),
        None => conn.close(
            VarInt::from_u32(close::SHUTDOWN),
            b"controller shutting down",
        ),
    }
    transfers.abort();
    let _ = shared.cmd.send(Cmd::Closed { conn: id }).await;
    // Give a closing writer its flush; the connection is closed by now either way.
    if tokio::time::timeout(CONNECTION_CLOSE_FLUSH, writer)
        .await
        .is_err()
    {
        tracing::debug!(conn = id, "writer did not finish");
    }
}

/// The worker's stream and its Join, of this protocol version.
async fn first_frame(
    conn: &quinn::Connection,
    max: usize,
) -> Result<(quinn::SendStream, quinn::RecvStream, Join), ConnError> {
    let (send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| ConnError::Gone(format!("no stream: {e}")))?;
    let join = match read_frame(&mut recv, max).await.map_err(frame_error)? {
        Some(Message::Join(j)) if j.protocol == CLUSTER_PROTOCOL_VERSION => j,
        Some(Message::Join(j)) => {
            return Err(ConnError::Version(format!(
                "this controller speaks protocol {CLUSTER_PROTOCOL_VERSION}, the worker {}",
                j.protocol
            )))
        }
        Some(Message::Goodbye(g)) => return Err(ConnError::Gone(format!("goodbye: {}", g.reason))),
        Some(other) => {
            return Err(ConnError::Protocol(format!(
                "the first frame must be a Join, not a {}",
                other.kind()
            )))
        }
        None => {
            return Err(ConnError::Protocol(
                "the stream ended before the Join".into(),
            ))
        }
    };
    Ok((send, recv, join))
}

fn refuse(
    shared: &ControllerShared,
    conn: &quinn::Connection,
    e: &ConnError,
    remote: std::net::SocketAddr,
) {
    let Some(code) = e.code() else {
        tracing::debug!(%remote, "connection ended: {e}");
        return;
    };
    shared.metrics.refusals.fetch_add(1, Ordering::Relaxed);
    let reason = cut(e.to_string());
    let kind = match e {
        ConnError::Timeout(_) => "no Join in time",
        ConnError::Cut => "cut before its Join",
        ConnError::Version(_) => "protocol version",
        _ => "bad first frame",
    };
    shared.note_refusal(kind, format!("refused {remote}: {reason}"));
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

/// Drains the connection's queue into frames, coalescing what is queued into larger writes.
async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Out>,
    conn: quinn::Connection,
) {
    let mut buf = Vec::with_capacity(CONNECTION_WRITE_CHUNK_BYTES);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut closing = None;
        while let Some(o) = next.take() {
            match o {
                Out::Msg(m) => buf.extend_from_slice(&encode_frame(&m)),
                Out::Close { code, reason } => {
                    closing = Some((code, reason));
                    break;
                }
            }
            if buf.len() < CONNECTION_WRITE_CHUNK_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            if let Err(e) = send.write_all(&buf).await {
                tracing::debug!("send stream failed: {e}");
                conn.close(VarInt::from_u32(0), b"send stream failed");
                return;
            }
            buf.clear();
        }
        if let Some((code, reason)) = closing {
            let _ = send.finish();
            let _ = tokio::time::timeout(CONNECTION_CLOSE_FLUSH, send.stopped()).await;
            conn.close(VarInt::from_u32(code), reason.as_bytes());
            return;
        }
    }
}
