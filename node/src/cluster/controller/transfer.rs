//! Serving sealed bundles to workers. After its Join a worker (or a load balancer relaying for
//! a dependent) opens a bi stream per transfer on the same connection: its first frame is a
//! `BundleRequest{deployment, machine, offset}`; the answer is a `BundleHeader{total, offset}`
//! frame, the raw sealed bytes `offset..total`, and the end of the stream. A refused request
//! is answered with a `Goodbye{code, reason}` frame and the end of the stream; the connection
//! stays (it is closed only for a malformed frame):
//!
//! - `close::UNKNOWN_PEER`: the requester may not have that machine's bundles (only the
//!   machine itself and its admitted load balancer may);
//! - `close::PROTOCOL`: no such sealed bundle (never sealed, or deleted once its machine was
//!   done with it), an offset beyond its end, or a first frame that is not a `BundleRequest`;
//! - `close::OVERLOADED`: the controller could not check the request now; retry later.
//!
//! Each connection serves at most [`TRANSFERS_PER_CONN`] transfers at once (a further stream
//! waits to be accepted, so QUIC's stream limit pushes back). Transfers run in tasks of their
//! own, never in the connection's control loop; QUIC flow control paces them.

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use quinn::VarInt;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::cmd::DeployCmd;
use super::deploy::ask_core;
use super::shared::ControllerShared;
use crate::ids::{Fingerprint, NodeId};
use crate::limits::{
    TRANSFERS_PER_CONN, TRANSFER_CHUNK_BYTES, TRANSFER_READ_AHEAD_CHUNKS,
    TRANSFER_REQUEST_FRAME_MAX, TRANSFER_REQUEST_TIMEOUT,
};
use crate::net::close;
use crate::wire::{read_frame, write_frame, BundleHeader, FrameError, Goodbye, Message};

/// Accepts the transfer streams of one worker connection (`node`, whose certificate is
/// `fingerprint`) until it closes.
pub(crate) async fn serve(
    shared: Arc<ControllerShared>,
    conn: quinn::Connection,
    node: NodeId,
    fingerprint: Fingerprint,
) {
    let slots = Arc::new(Semaphore::new(TRANSFERS_PER_CONN));
    let mut tasks = JoinSet::new();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let shared = shared.clone();
        let conn = conn.clone();
        tasks.spawn(async move {
            let _permit = permit;
            transfer(&shared, &conn, node, fingerprint, send, recv).await;
        });
        while tasks.try_join_next().is_some() {}
    }
}

/// Counts a transfer in flight while it lives.
struct InFlight<'a>(&'a ControllerShared);

impl<'a> InFlight<'a> {
    fn new(s: &'a ControllerShared) -> Self {
        s.metrics
            .transfers_in_flight
            .fetch_add(1, Ordering::Relaxed);
        InFlight(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .metrics
            .transfers_in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn refuse(shared: &ControllerShared, mut send: quinn::SendStream, code: u32, reason: String) {
    shared
        .metrics
        .transfers_refused
        .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(code, "bundle transfer refused: {reason}");
    let bye = Message::Goodbye(Goodbye {
        code,
        reason: super::cmd::cut(reason),
    });
    if write_frame(&mut send, &bye).await.is_ok() {
        let _ = send.finish();
    }
}

async fn transfer(
    shared: &ControllerShared,
    conn: &quinn::Connection,
    node: NodeId,
    fingerprint: Fingerprint,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match tokio::time::timeout(
        TRANSFER_REQUEST_TIMEOUT,
        read_frame(&mut recv, TRANSFER_REQUEST_FRAME_MAX),
    )
    .await
    {
        Err(_) => {
            let reason = format!("no BundleRequest within {TRANSFER_REQUEST_TIMEOUT:?}");
            return refuse(shared, send, close::PROTOCOL, reason).await;
        }
        Ok(Ok(Some(Message::BundleRequest(r)))) => r,
        Ok(Ok(Some(other))) => {
            let reason = format!(
                "the first frame of a transfer stream must be a BundleRequest, not a {}",
                other.kind()
            );
            return refuse(shared, send, close::PROTOCOL, reason).await;
        }
        // The stream ended, or the connection went.
        Ok(Ok(None)) | Ok(Err(FrameError::Io(_))) => return,
        Ok(Err(e)) => {
            shared.metrics.refusals.fetch_add(1, Ordering::Relaxed);
            let reason = super::cmd::cut(format!("bad frame on a transfer stream: {e}"));
            shared.note_error(format!("connection of {node} refused: {reason}"));
            conn.close(VarInt::from_u32(close::PROTOCOL), reason.as_bytes());
            return;
        }
    };
    let allowed = ask_core(shared, |reply| DeployCmd::Authorize {
        requester: node,
        fingerprint,
        machine: req.machine,
        reply,
    })
    .await;
    match allowed {
        Ok(Ok(())) => {}
        Ok(Err(refused)) => {
            return refuse(shared, send, close::UNKNOWN_PEER, refused.to_string()).await
        }
        Err(reason) => return refuse(shared, send, close::OVERLOADED, reason).await,
    }
    let path = shared.bundles.sealed_path(req.deployment, req.machine);
    let opened = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        Ok::<_, std::io::Error>((f, len))
    })
    .await;
    let (file, total) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            let reason = format!(
                "no bundle of deployment {} sealed to machine {} (never sealed, or no longer needed)",
                req.deployment, req.machine
            );
            return refuse(shared, send, close::PROTOCOL, reason).await;
        }
        Ok(Err(e)) => {
            shared.note_error(format!(
                "cannot read the sealed bundle of deployment {}: {e}",
                req.deployment
            ));
            let reason = format!("the controller cannot read the sealed bundle: {e}");
            return refuse(shared, send, close::OVERLOADED, reason).await;
        }
        Err(e) => return refuse(shared, send, close::OVERLOADED, e.to_string()).await,
    };
    if req.offset > total {
        let reason = format!(
            "offset {} is beyond the sealed bundle's {total} bytes",
            req.offset
        );
        return refuse(shared, send, close::PROTOCOL, reason).await;
    }
    let _in_flight = InFlight::new(shared);
    shared.metrics.transfers.fetch_add(1, Ordering::Relaxed);
    let offset = req.offset;
    match stream_file(shared, send, file, total, offset).await {
        Ok(()) => tracing::debug!(
            deployment = req.deployment,
            machine = %req.machine,
            requester = %node,
            offset,
            total,
            "bundle sent"
        ),
        Err(e) => tracing::debug!(
            deployment = req.deployment,
            machine = %req.machine,
            requester = %node,
            "bundle transfer ended early: {e}"
        ),
    }
}

/// The header, then the file from `offset` to `total`, then the end of the stream. The file is
/// read on a blocking thread a few chunks ahead of the stream.
async fn stream_file(
    shared: &ControllerShared,
    mut send: quinn::SendStream,
    mut file: std::fs::File,
    total: u64,
    offset: u64,
) -> Result<(), String> {
    write_frame(
        &mut send,
        &Message::BundleHeader(BundleHeader { total, offset }),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(TRANSFER_READ_AHEAD_CHUNKS);
    let reader = tokio::task::spawn_blocking(move || {
        if let Err(e) = file.seek(SeekFrom::Start(offset)) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        let mut left = total - offset;
        while left > 0 {
            let mut buf = vec![0u8; TRANSFER_CHUNK_BYTES.min(left as usize)];
            let r = file.read_exact(&mut buf).map(|()| Bytes::from(buf));
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
            left -= TRANSFER_CHUNK_BYTES.min(left as usize) as u64;
        }
    });
    let mut sent = 0u64;
    let result = async {
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(|e| format!("reading the sealed bundle: {e}"))?;
            let n = chunk.len() as u64;
            send.write_chunk(chunk)
                .await
                .map_err(|e| format!("sending: {e}"))?;
            sent += n;
            shared
                .metrics
                .bundle_bytes_served
                .fetch_add(n, Ordering::Relaxed);
        }
        if sent != total - offset {
            return Err(format!(
                "the sealed bundle ended after {sent} of {} bytes",
                total - offset
            ));
        }
        send.finish().map_err(|e| format!("finishing: {e}"))?;
        Ok(())
    }
    .await;
    drop(rx);
    let _ = reader.await;
    result
}
