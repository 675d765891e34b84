//! The workers' connections: the accept loop, and per connection the handshake, the Join, a
//! writer task and a reader loop. This module moves frames between QUIC and the core thread;
//! it decides nothing about admission (the core does) except that the first frame must be a
//! Join of this protocol version. Every connection is bounded: in number, in the time it may
//! take to say who it is, in the frames it may queue. Bundle transfers arrive on further
//! streams of the same connection and are served beside the control loop (`transfer`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::{mpsc, Semaphore};

use super::core::ConnId;
use super::run::ControllerShared;
use super::thread::{cut, Cmd, ConnHandle, Out};
use crate::net::{self, close};
use crate::wire::{encode_frame, read_frame, FrameError, Join, Message, PROTOCOL_VERSION};

/// Connections open at once. A constant rather than a config field: each costs a few tasks and
/// two small queues, and the target is 1,000 workers per controller with room to spare.
pub(crate) const CONNECTIONS_MAX: usize = 4096;
/// Connections still in their handshake or before their Join, at once: a flood of strangers
/// costs at most this many handshakes in flight.
pub(crate) const JOINING_MAX: usize = 1024;
/// From the first packet to the Join frame.
pub(crate) const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one connection before it counts as not keeping up and is closed.
pub(crate) const OUTBOUND_MAX: usize = 256;
/// How long a closing connection may take to deliver what was queued before it.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// The writer coalesces queued frames into writes of about this size.
const WRITE_CHUNK_BYTES: usize = 64 * 1024;

/// Accepts until the endpoint closes.
pub(crate) async fn accept_loop(shared: Arc<ControllerShared>, endpoint: quinn::Endpoint) {
    let open = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let joining = Arc::new(Semaphore::new(JOINING_MAX));
    let next_id = AtomicU64::new(1);
    while let Some(incoming) = endpoint.accept().await {
        let (Ok(open_permit), Ok(join_permit)) = (
            open.clone().try_acquire_owned(),
            joining.clone().try_acquire_owned(),
        ) else {
            shared
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(remote = %incoming.remote_address(), "refusing a connection: at the limit");
            incoming.refuse();
            continue;
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _open = open_permit;
            connection(shared, id, incoming, join_permit).await;
        });
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
    join_permit: tokio::sync::OwnedSemaphorePermit,
) {
    let remote = incoming.remote_address();
    let max = shared.config.limits.frame_bytes_max;
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let (conn, fingerprint) = match tokio::time::timeout_at(deadline, net::accept(incoming)).await {
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
    let first = tokio::time::timeout_at(deadline, first_frame(&conn, max)).await;
    let (send, mut recv, join) = match first {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            refuse(&shared, &conn, &e, remote);
            return;
        }
        Err(_) => {
            refuse(&shared, &conn, &ConnError::Timeout(JOIN_TIMEOUT), remote);
            return;
        }
    };
    drop(join_permit);
    let (out_tx, out_rx) = mpsc::channel(OUTBOUND_MAX);
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
            fingerprint,
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
    if tokio::time::timeout(CLOSE_FLUSH, writer).await.is_err() {
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
        Some(Message::Join(j)) if j.protocol == PROTOCOL_VERSION => j,
        Some(Message::Join(j)) => {
            return Err(ConnError::Version(format!(
                "this controller speaks protocol {PROTOCOL_VERSION}, the worker {}",
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
    shared.note_error(format!("refused {remote}: {reason}"));
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

/// Drains the connection's queue into frames, coalescing what is queued into larger writes.
async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Out>,
    conn: quinn::Connection,
) {
    let mut buf = Vec::with_capacity(WRITE_CHUNK_BYTES);
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
            if buf.len() < WRITE_CHUNK_BYTES {
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
            let _ = tokio::time::timeout(CLOSE_FLUSH, send.stopped()).await;
            conn.close(VarInt::from_u32(code), reason.as_bytes());
            return;
        }
    }
}
