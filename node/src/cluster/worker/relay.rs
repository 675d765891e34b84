//! Publications that travel through a load balancer, both ends of it.
//!
//! - On a load balancer: the accept loop takes connections only from its dependents (their
//!   certificates come with the pool; the TLS pin set refuses the others, and the fingerprint is
//!   checked again after the handshake), reads each one's `RelayHello`, and forwards to it the
//!   `Relay`s the controller sends, as they are: it can neither read nor change them.
//! - On a dependent: one link to its load balancer, dialled once the controller said where it
//!   is; the publications it reads go to the core like direct ones. Nothing is ever sent back on
//!   that stream: acks travel on the direct connection to the controller. Bundle transfers open
//!   streams of their own on the link (`fetch`; the load balancer's side is `bundle_relay`).
//!
//! A machine that is not a load balancer accepts no connection at all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::core::WorkerRefusal;
use super::WorkerShared;
use crate::cluster::body::{Dependent, LbRoute, Pool};
use crate::ids::{Fingerprint, NodeId};
use crate::limits::{HELLO_TIMEOUT, RELAY_LINK_STABLE, RELAY_QUEUE_MAX};
use crate::limits::{WORKER_DIAL_BACKOFF_MAX, WORKER_DIAL_BACKOFF_MIN};
use crate::net::backoff::Backoff;
use crate::net::{self, close};
use crate::wire::{
    read_frame, write_frame, FrameError, Message, Publication, Relay, RelayHello,
    CLUSTER_PROTOCOL_VERSION,
};

/// A load balancer's relay: who may dial it, and who did.
#[derive(Default)]
pub(crate) struct RelayState {
    /// Every dependent of the current pool, by certificate.
    allowed: BTreeMap<Fingerprint, Dependent>,
    conns: BTreeMap<NodeId, RelayConn>,
    generation: u64,
}

struct RelayConn {
    generation: u64,
    name: String,
    conn: quinn::Connection,
    tx: mpsc::Sender<Publication>,
}

impl RelayState {
    pub(crate) fn allowed_fingerprints(&self) -> impl Iterator<Item = Fingerprint> + '_ {
        self.allowed.keys().copied()
    }

    /// `(name, node id)` of each connected dependent.
    pub(crate) fn connections(&self) -> Vec<(String, NodeId)> {
        self.conns
            .iter()
            .map(|(id, c)| (c.name.clone(), *id))
            .collect()
    }
}

/// A new pool: only its dependents may dial now; a dependent that left it is disconnected.
pub(crate) fn set_pool(shared: &WorkerShared, pool: &Pool) {
    {
        let mut r = shared.relay.lock().expect("relay lock");
        r.allowed = pool
            .dependents
            .iter()
            .map(|d| (d.fingerprint, d.clone()))
            .collect();
        let gone: Vec<NodeId> = r
            .conns
            .iter()
            .filter(|(id, c)| {
                let fp = net::peer_fingerprint(&c.conn);
                fp.and_then(|fp| r.allowed.get(&fp))
                    .is_none_or(|d| d.node_id != **id)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(c) = r.conns.remove(&id) {
                tracing::info!(dependent = %c.name, "no longer a dependent: relay connection closed");
                c.conn
                    .close(close::UNKNOWN_PEER.into(), b"no longer a dependent");
            }
        }
    }
    shared.refresh_pins();
}

/// A publication for dependent `to`, from the controller: handed as is to its connection, or
/// dropped when it has none or its queue is full.
pub(crate) fn forward(shared: &WorkerShared, r: Relay) {
    let Relay { to, publication } = r;
    let drop_it = |why: &str| {
        shared
            .metrics
            .relay_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(dependent = %to, seq = publication.seq, "relayed publication dropped: {why}");
    };
    if !shared.is_lb {
        return drop_it("this machine is not a load balancer");
    }
    if publication.machine != to {
        // Its dependent would refuse it as hostile and drop the link; the controller resends.
        shared.note_error(format!(
            "the controller relayed a publication of machine {} to {to}; dropped",
            publication.machine
        ));
        return drop_it("addressed to another machine");
    }
    let r = shared.relay.lock().expect("relay lock");
    let Some(c) = r.conns.get(&to) else {
        drop(r);
        return drop_it("dependent not connected");
    };
    let seq = publication.seq;
    match c.tx.try_send(publication) {
        Ok(()) => {
            shared
                .metrics
                .relay_forwarded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(_) => {
            drop(r);
            shared
                .metrics
                .relay_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(dependent = %to, seq, "relayed publication dropped: queue full");
        }
    }
}

/// Accepts every incoming connection; only a load balancer's dependents are kept.
pub(crate) async fn accept_loop(shared: Arc<WorkerShared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match net::accept(incoming).await {
                Ok((conn, fp)) => serve_dependent(shared, conn, fp).await,
                Err(e) => tracing::debug!(%remote, "incoming handshake failed: {e}"),
            }
        });
    }
}

fn refuse(shared: &WorkerShared, conn: &quinn::Connection, code: u32, why: &str) {
    shared.refused();
    tracing::info!(remote = %conn.remote_address(), "relay connection refused: {why}");
    conn.close(code.into(), why.as_bytes());
}

async fn serve_dependent(shared: Arc<WorkerShared>, conn: quinn::Connection, fp: Fingerprint) {
    let dep = if shared.is_lb {
        shared
            .relay
            .lock()
            .expect("relay lock")
            .allowed
            .get(&fp)
            .cloned()
    } else {
        None
    };
    let Some(dep) = dep else {
        let why = if shared.is_lb {
            "not a dependent of this load balancer"
        } else {
            "this machine accepts no connections"
        };
        return refuse(&shared, &conn, close::UNKNOWN_PEER, why);
    };
    let max = shared.config.limits.frame_bytes_max;
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let first = read_frame(&mut recv, max).await?;
        Ok::<_, HelloError>((send, recv, first))
    })
    .await;
    let (send, recv, hello) = match hello {
        Ok(Ok((send, recv, Some(Message::RelayHello(h))))) => (send, recv, h),
        Ok(Ok((_, _, Some(m)))) => {
            let why = format!("first frame is a {}, not a RelayHello", m.kind());
            return refuse(&shared, &conn, close::PROTOCOL, &why);
        }
        Ok(Ok((_, _, None))) => {
            return refuse(
                &shared,
                &conn,
                close::PROTOCOL,
                "stream closed before RelayHello",
            )
        }
        Ok(Err(e)) => return refuse(&shared, &conn, close::PROTOCOL, &e.to_string()),
        Err(_) => return refuse(&shared, &conn, close::PROTOCOL, "no RelayHello within 10 s"),
    };
    if hello.protocol != CLUSTER_PROTOCOL_VERSION {
        let why = format!(
            "dependent speaks protocol {}, this node speaks {CLUSTER_PROTOCOL_VERSION}",
            hello.protocol
        );
        return refuse(&shared, &conn, close::VERSION, &why);
    }
    if hello.node_id != dep.node_id {
        let why = format!(
            "RelayHello names machine {}, but this certificate is {}'s",
            hello.node_id, dep.name
        );
        return refuse(&shared, &conn, close::PROTOCOL, &why);
    }
    let (tx, rx) = mpsc::channel(RELAY_QUEUE_MAX);
    let generation = {
        let mut r = shared.relay.lock().expect("relay lock");
        // The pool may have changed while the hello was on its way.
        if r.allowed.get(&fp).map(|d| d.node_id) != Some(dep.node_id) {
            drop(r);
            return refuse(&shared, &conn, close::UNKNOWN_PEER, "no longer a dependent");
        }
        r.generation += 1;
        let generation = r.generation;
        let old = r.conns.insert(
            dep.node_id,
            RelayConn {
                generation,
                name: dep.name.clone(),
                conn: conn.clone(),
                tx,
            },
        );
        if let Some(old) = old {
            old.conn.close(
                close::DUPLICATE.into(),
                b"a newer connection from this dependent",
            );
        }
        generation
    };
    tracing::info!(dependent = %dep.name, node_id = %dep.node_id, "dependent connected to the relay");
    // Its bundle transfers come on streams of their own.
    let transfers = tokio::spawn(super::bundle_relay::serve(
        shared.clone(),
        conn.clone(),
        dep.node_id,
        dep.name.clone(),
    ));
    let end = relay_to(&conn, send, recv, rx, max).await;
    transfers.abort();
    {
        let mut r = shared.relay.lock().expect("relay lock");
        if r.conns.get(&dep.node_id).map(|c| c.generation) == Some(generation) {
            r.conns.remove(&dep.node_id);
        }
    }
    match end {
        Ok(()) => tracing::info!(dependent = %dep.name, "relay connection closed"),
        Err(e) => {
            shared.note_error(format!(
                "dependent {}: {e}; relay connection closed",
                dep.name
            ));
            refuse(&shared, &conn, close::PROTOCOL, &e.to_string());
        }
    }
}

/// Why a dependent's RelayHello did not arrive (the close reason it is sent).
#[derive(Debug, thiserror::Error)]
enum HelloError {
    #[error(transparent)]
    Accept(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Why a relay connection ended badly: the dependent broke the protocol. The text is also the
/// close reason it is sent.
#[derive(Debug, thiserror::Error)]
enum RelayEnd {
    #[error("a dependent sends nothing after its RelayHello, got a {kind}")]
    Unexpected { kind: &'static str },
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Writes the queued publications to the dependent; it must send nothing more.
async fn relay_to(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut rx: mpsc::Receiver<Publication>,
    max: usize,
) -> Result<(), RelayEnd> {
    let reader = async {
        match read_frame(&mut recv, max).await {
            Ok(Some(m)) => Err(RelayEnd::Unexpected { kind: m.kind() }),
            Ok(None) => {
                conn.closed().await;
                Ok(())
            }
            Err(FrameError::Io(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    };
    let writer = async {
        while let Some(p) = rx.recv().await {
            if write_frame(&mut send, &Message::Publication(p))
                .await
                .is_err()
            {
                break;
            }
        }
        Ok(())
    };
    tokio::select! {
        r = reader => r,
        r = writer => r,
    }
}

/// A dependent's link to its load balancer.
#[derive(Default)]
pub(crate) struct DependentLink {
    route: Option<LbRoute>,
    task: Option<tokio::task::JoinHandle<()>>,
    conn: Option<quinn::Connection>,
    generation: u64,
    pub connected: bool,
    pub last_error: Option<String>,
}

impl DependentLink {
    pub(crate) fn route_fingerprint(&self) -> Option<Fingerprint> {
        self.route.as_ref().map(|r| r.fingerprint)
    }
}

/// A dependent's connection to its load balancer, while it is up (bundle transfers go on it).
pub(crate) fn lb_connection(shared: &WorkerShared) -> Option<quinn::Connection> {
    let d = shared.dependent.lock().expect("dependent lock");
    d.connected.then(|| d.conn.clone()).flatten()
}

/// Where the load balancer is now (or that there is none): the link follows.
pub(crate) fn set_route(shared: &Arc<WorkerShared>, route: Option<LbRoute>) {
    let generation = {
        let mut d = shared.dependent.lock().expect("dependent lock");
        if d.route == route && (route.is_none() || d.task.is_some()) {
            return;
        }
        if let Some(t) = d.task.take() {
            t.abort();
        }
        if let Some(c) = d.conn.take() {
            c.close(close::SHUTDOWN.into(), b"the load balancer moved");
        }
        d.generation += 1;
        d.connected = false;
        d.last_error = None;
        d.route = route.clone();
        d.generation
    };
    // Pinned before the first handshake.
    shared.refresh_pins();
    let Some(route) = route else {
        tracing::info!("no load balancer: publications come directly from the controller");
        return;
    };
    tracing::info!(load_balancer = %route.name, addr = %route.addr, "load balancer route");
    let task = tokio::spawn(dependent_loop(shared.clone(), route, generation));
    let mut d = shared.dependent.lock().expect("dependent lock");
    if d.generation == generation {
        d.task = Some(task);
    } else {
        task.abort();
    }
}

/// Stops the link to the load balancer (at shutdown).
pub(crate) fn stop_dependent_link(shared: &WorkerShared) {
    let mut d = shared.dependent.lock().expect("dependent lock");
    if let Some(t) = d.task.take() {
        t.abort();
    }
    d.conn = None;
    d.connected = false;
}

fn link_state(shared: &WorkerShared, generation: u64, f: impl FnOnce(&mut DependentLink)) {
    let mut d = shared.dependent.lock().expect("dependent lock");
    if d.generation == generation {
        f(&mut d);
    }
}

/// The load balancer's address could not be resolved.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("resolving {addr:?}: {source}")]
    Lookup {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr:?} resolves to no address")]
    NoAddress { addr: String },
}

async fn resolve(addr: &str) -> Result<SocketAddr, ResolveError> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(|source| ResolveError::Lookup {
            addr: addr.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| ResolveError::NoAddress {
            addr: addr.to_owned(),
        })
}

async fn dependent_loop(shared: Arc<WorkerShared>, route: LbRoute, generation: u64) {
    let mut backoff = Backoff::new(WORKER_DIAL_BACKOFF_MIN, WORKER_DIAL_BACKOFF_MAX);
    loop {
        let started = Instant::now();
        let (worked, error) = dependent_session(&shared, &route, generation).await;
        link_state(&shared, generation, |d| {
            d.connected = false;
            d.conn = None;
            if let Some(e) = &error {
                if d.last_error.as_deref() != Some(e.as_str()) {
                    tracing::info!(load_balancer = %route.name, "{e}");
                }
                d.last_error = Some(e.clone());
            }
        });
        if worked || started.elapsed() >= RELAY_LINK_STABLE {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

/// One connection to the load balancer. Returns whether it delivered anything, and why it
/// ended.
async fn dependent_session(
    shared: &Arc<WorkerShared>,
    route: &LbRoute,
    generation: u64,
) -> (bool, Option<String>) {
    let lb = &route.name;
    let addr = match resolve(&route.addr).await {
        Ok(a) => a,
        Err(e) => return (false, Some(format!("load balancer {lb}: {e}"))),
    };
    let (conn, fp) = match net::connect(&shared.endpoint, addr).await {
        Ok(x) => x,
        Err(e) => {
            return (
                false,
                Some(format!("dialling load balancer {lb} at {addr}: {e}")),
            )
        }
    };
    if fp != route.fingerprint {
        conn.close(close::UNKNOWN_PEER.into(), b"not the load balancer dialled");
        shared.refused();
        return (
            false,
            Some(format!("{addr} answered with certificate {fp}, not {lb}'s")),
        );
    }
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return (false, Some(format!("load balancer {lb}: {e}"))),
    };
    let hello = Message::RelayHello(RelayHello {
        protocol: CLUSTER_PROTOCOL_VERSION,
        node_id: shared.node_id,
        name: shared.name.clone(),
    });
    if let Err(e) = write_frame(&mut send, &hello).await {
        return (
            false,
            Some(format!("load balancer {lb}: sending RelayHello: {e}")),
        );
    }
    link_state(shared, generation, |d| {
        d.connected = true;
        d.conn = Some(conn.clone());
        d.last_error = None;
    });
    tracing::info!(load_balancer = %lb, %addr, "connected to the load balancer");
    let max = shared.config.limits.frame_bytes_max;
    let mut worked = false;
    let end = loop {
        let p = match read_frame(&mut recv, max).await {
            Ok(Some(Message::Publication(p))) => p,
            Ok(Some(m)) => break Err(format!("the load balancer sent a {}", m.kind())),
            Ok(None) => break Ok("the load balancer closed the stream".to_owned()),
            Err(FrameError::Io(e)) => break Ok(format!("load balancer connection: {e}")),
            Err(e) => break Err(format!("frame from the load balancer: {e}")),
        };
        match shared.feed_relay(p).await {
            None => break Ok("worker shutting down".to_owned()),
            Some(Ok(())) => worked = true,
            Some(Err(WorkerRefusal::Hostile(e))) => break Err(e),
            // Not expected on a relay; the direct connection carries the controller's word.
            Some(Err(WorkerRefusal::Rejected(e))) => break Ok(e),
        }
    };
    drop(send);
    match end {
        Ok(why) => {
            conn.close(close::SHUTDOWN.into(), why.as_bytes());
            (worked, Some(format!("load balancer {lb}: {why}")))
        }
        Err(e) => {
            shared.refused();
            conn.close(close::PROTOCOL.into(), e.as_bytes());
            let e = format!(
                "load balancer {lb}: hostile: {e}; connection closed (the controller resends directly)"
            );
            shared.note_error(e.clone());
            (worked, Some(e))
        }
    }
}
