//! Dialling and accepting datacenter connections: which configured peer a connection belongs
//! to, and the backoff between attempts. Each connection then runs in [`super::conn`].

use std::sync::Arc;
use std::time::Duration;

use super::{conn, set_error};
use crate::datacenter::Shared;
use crate::net::{self, close};

/// Pause between dial attempts: doubles from MIN after each failed attempt, up to MAX; back to
/// MIN after a session. Kept short so that a peer restarting is found within about a second.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long one dial attempt may take. A handshake whose Initial packet went to a peer that was
/// down is retransmitted only after QUIC's growing probe timeouts (1 s, 2 s, 4 s, ...), so an
/// attempt is abandoned early and a fresh one made; the bound doubles after each failure (a
/// lossy or distant link gets its time) up to MAX, and is back to MIN after a session.
const DIAL_TIMEOUT_MIN: Duration = Duration::from_secs(1);
const DIAL_TIMEOUT_MAX: Duration = Duration::from_secs(8);
const _: () = assert!(DIAL_BACKOFF_MIN.as_millis() <= DIAL_BACKOFF_MAX.as_millis());
const _: () = assert!(DIAL_TIMEOUT_MIN.as_millis() <= DIAL_TIMEOUT_MAX.as_millis());

pub(super) async fn accept_loop(shared: Arc<Shared>, ep: quinn::Endpoint) {
    while let Some(incoming) = ep.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match net::accept(incoming).await {
                Ok((conn, fp)) => {
                    let found = shared.peers.active().into_iter().find(|(_, p)| p.pins(&fp));
                    let Some((i, _)) = found else {
                        conn.close(close::UNKNOWN_PEER.into(), b"unknown peer");
                        return;
                    };
                    conn::session(shared, i, conn, false).await;
                }
                Err(e) => tracing::debug!(%remote, "incoming handshake failed: {e}"),
            }
        });
    }
}

pub(super) async fn dial_loop(shared: Arc<Shared>, ep: quinn::Endpoint, i: usize) {
    let mut backoff = DIAL_BACKOFF_MIN;
    let mut attempt = DIAL_TIMEOUT_MIN;
    loop {
        let peer = shared.peers.get(i);
        if peer.removed() {
            return;
        }
        if !peer.dials() {
            // The peer dials us; look again later in case a reload changes that.
            tokio::time::sleep(DIAL_BACKOFF_MAX).await;
            continue;
        }
        let addr = peer.addr();
        match tokio::time::timeout(attempt, net::connect(&ep, addr)).await {
            Ok(Ok((conn, fp))) if peer.pins(&fp) => {
                if conn::session(shared.clone(), i, conn, true).await {
                    backoff = DIAL_BACKOFF_MIN;
                    attempt = DIAL_TIMEOUT_MIN;
                }
            }
            Ok(Ok((conn, fp))) => {
                conn.close(close::UNKNOWN_PEER.into(), b"not the peer dialled");
                set_error(&shared, i, format!("{addr} answered with certificate {fp}"));
            }
            Ok(Err(e)) => set_error(&shared, i, format!("dialling {addr}: {e}")),
            Err(_) => {
                set_error(
                    &shared,
                    i,
                    format!("dialling {addr}: no answer within {attempt:?}"),
                );
                attempt = (attempt * 2).min(DIAL_TIMEOUT_MAX);
            }
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % 100);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
    }
}
