//! A load balancer's half of its dependents' bundle transfers. A dependent opens a bi stream
//! of its own on its relay connection and sends a `BundleRequest`; the load balancer checks
//! that the request is for that very dependent (the machine of the connection's certificate),
//! opens a bi stream on its own connection to the controller, sends the same request and pipes
//! the answer back byte for byte. It cannot open what it forwards (the bundle is sealed to the
//! dependent) and cannot alter it unnoticed (the dependent checks the signed hash).
//!
//! Memory stays bounded: one chunk in hand per transfer (QUIC flow control does the rest), and
//! at most [`TRANSFERS_PER_DEPENDENT_MAX`] transfers per dependent at once.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::core::Standing;
use super::WorkerShared;
use crate::ids::NodeId;
use crate::limits::{
    STREAM_OPEN_TIMEOUT, TRANSFERS_PER_DEPENDENT_MAX, TRANSFER_CHUNK_BYTES_MAX,
    TRANSFER_REQUEST_TIMEOUT,
};
use crate::net::close;
use crate::wire::{read_frame, write_frame, FrameError, Goodbye, Message};

/// Accepts the transfer streams a dependent opens on its relay connection, until it closes.
pub(crate) async fn serve(
    shared: Arc<WorkerShared>,
    conn: quinn::Connection,
    dependent: NodeId,
    name: String,
) {
    let slots = Arc::new(Semaphore::new(TRANSFERS_PER_DEPENDENT_MAX));
    while let Ok((send, recv)) = conn.accept_bi().await {
        let permit = slots.clone().try_acquire_owned().ok();
        let shared = shared.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut send = send;
            if permit.is_none() {
                return goodbye(
                    &mut send,
                    close::OVERLOADED,
                    &format!(
                        "more than {TRANSFERS_PER_DEPENDENT_MAX} transfers at once through the \
                         load balancer"
                    ),
                )
                .await;
            }
            if let Err(e) = forward(&shared, send, recv, dependent).await {
                tracing::info!(dependent = %name, "bundle transfer not relayed: {e}");
            }
        });
    }
}

async fn goodbye(send: &mut quinn::SendStream, code: u32, reason: &str) {
    let m = Message::Goodbye(Goodbye {
        code,
        reason: reason.to_owned(),
    });
    let _ = write_frame(send, &m).await;
    let _ = send.finish();
}

/// Why a transfer was not relayed (logged; the dependent is told with a Goodbye or a reset).
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("a dependent may fetch only its own bundle, not machine {machine}'s")]
    NotItsOwn { machine: NodeId },
    #[error("a transfer stream starts with a BundleRequest, not a {kind}")]
    NotARequest { kind: &'static str },
    #[error("the stream closed before its request")]
    ClosedEarly,
    #[error("reading the request: {0}")]
    ReadRequest(#[source] FrameError),
    #[error("no request within {TRANSFER_REQUEST_TIMEOUT:?}")]
    NoRequest,
    #[error("the load balancer is not connected to the controller; fetch directly")]
    NoController,
    #[error("the load balancer's controller connection: {0}")]
    ControllerConnection(#[source] quinn::ConnectionError),
    #[error("opening a stream to the controller timed out")]
    OpenTimeout,
    #[error("forwarding the request: {0}")]
    ForwardRequest(#[source] FrameError),
    #[error("writing to the dependent: {0}")]
    WriteDependent(#[source] quinn::WriteError),
    #[error("reading from the controller: {0}")]
    ReadController(#[source] quinn::ReadError),
    #[error("the dependent stopped reading")]
    DependentStopped,
}

impl ForwardError {
    /// Tells the dependent why (`code`) and hands the error back.
    async fn told(self, send: &mut quinn::SendStream, code: u32) -> ForwardError {
        goodbye(send, code, &self.to_string()).await;
        self
    }
}

async fn forward(
    shared: &WorkerShared,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    dependent: NodeId,
) -> Result<(), ForwardError> {
    let max = shared.config.limits.frame_bytes_max;
    let request =
        match tokio::time::timeout(TRANSFER_REQUEST_TIMEOUT, read_frame(&mut recv, max)).await {
            Ok(Ok(Some(Message::BundleRequest(r)))) if r.machine == dependent => r,
            Ok(Ok(Some(Message::BundleRequest(r)))) => {
                shared.refused();
                let e = ForwardError::NotItsOwn { machine: r.machine };
                return Err(e.told(&mut send, close::PROTOCOL).await);
            }
            Ok(Ok(Some(m))) => {
                shared.refused();
                let e = ForwardError::NotARequest { kind: m.kind() };
                return Err(e.told(&mut send, close::PROTOCOL).await);
            }
            Ok(Ok(None)) => return Err(ForwardError::ClosedEarly),
            Ok(Err(e)) => {
                let e = ForwardError::ReadRequest(e);
                return Err(e.told(&mut send, close::PROTOCOL).await);
            }
            Err(_) => {
                let e = ForwardError::NoRequest;
                return Err(e.told(&mut send, close::PROTOCOL).await);
            }
        };
    let conn = {
        let l = shared.controller.lock().expect("controller lock");
        (l.connected && shared.standing() == Standing::Admitted)
            .then(|| l.conn.clone())
            .flatten()
    };
    let Some(conn) = conn else {
        let e = ForwardError::NoController;
        return Err(e.told(&mut send, close::SHUTDOWN).await);
    };
    let (mut csend, mut crecv) =
        match tokio::time::timeout(STREAM_OPEN_TIMEOUT, conn.open_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let e = ForwardError::ControllerConnection(e);
                return Err(e.told(&mut send, close::SHUTDOWN).await);
            }
            Err(_) => {
                let e = ForwardError::OpenTimeout;
                return Err(e.told(&mut send, close::SHUTDOWN).await);
            }
        };
    if let Err(e) = write_frame(&mut csend, &Message::BundleRequest(request)).await {
        let _ = send.reset(close::SHUTDOWN.into());
        return Err(ForwardError::ForwardRequest(e));
    }
    let _ = csend.finish();
    // The dependent gave up (stopped its end): stop asking the controller for more.
    let stopped = send.stopped();
    let pipe = async {
        loop {
            match crecv.read_chunk(TRANSFER_CHUNK_BYTES_MAX, true).await {
                Ok(Some(chunk)) => {
                    if let Err(e) = send.write_chunk(chunk.bytes).await {
                        return Err(ForwardError::WriteDependent(e));
                    }
                }
                Ok(None) => {
                    let _ = send.finish();
                    return Ok(());
                }
                Err(e) => {
                    // Not a clean end: the dependent must not take a short stream for a whole one.
                    let _ = send.reset(close::SHUTDOWN.into());
                    return Err(ForwardError::ReadController(e));
                }
            }
        }
    };
    let r = tokio::select! {
        r = pipe => r,
        _ = stopped => Err(ForwardError::DependentStopped),
    };
    if r.is_err() {
        let _ = crecv.stop(0u32.into());
    }
    r
}
