//! Dialling and accepting datacenter connections: which configured peer a connection belongs
//! to, and the backoff between attempts. Each connection then runs in [`super::conn`].

use std::sync::Arc;

use super::{conn, set_error};
use crate::datacenter::Shared;
use crate::limits::{
    PEER_DIAL_BACKOFF_MAX, PEER_DIAL_BACKOFF_MIN, PEER_DIAL_TIMEOUT_MAX, PEER_DIAL_TIMEOUT_MIN,
};
use crate::net::backoff::Backoff;
use crate::net::{self, close};

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
    let mut backoff = Backoff::new(PEER_DIAL_BACKOFF_MIN, PEER_DIAL_BACKOFF_MAX);
    let mut attempt = PEER_DIAL_TIMEOUT_MIN;
    loop {
        let peer = shared.peers.get(i);
        if peer.removed() {
            return;
        }
        if !peer.dials() {
            // The peer dials us; look again later in case a reload changes that.
            tokio::time::sleep(PEER_DIAL_BACKOFF_MAX).await;
            continue;
        }
        let addr = peer.addr();
        match tokio::time::timeout(attempt, net::connect(&ep, addr)).await {
            Ok(Ok((conn, fp))) if peer.pins(&fp) => {
                if conn::session(shared.clone(), i, conn, true).await {
                    backoff.reset();
                    attempt = PEER_DIAL_TIMEOUT_MIN;
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
                attempt = (attempt * 2).min(PEER_DIAL_TIMEOUT_MAX);
            }
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}
