//! Datacenter links over QUIC: the driver around [`crate::replication::session`]. This module
//! holds what the node knows of its peers (addresses, pins, the live link for status); `dial`
//! dials and accepts, `conn` runs one connection's Hello and lifetime, `stream` its reader
//! (frames in -> writer thread -> acks out) and sender (local log -> Elements frames), `send`
//! reads frames and snapshots from storage. Every decision (Hello checks, which duplicate
//! connection survives, where sending resumes, snapshot or catch-up, relay fan-out, byte
//! budgets, restore progress) is the session core's; this driver only moves bytes and tasks.
//! One connection per pair: the side with the lower fingerprint dials (both sides know both
//! fingerprints from their configs); if two connections exist anyway, the one dialled by the
//! lower node id is kept.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::writer::Cmd;
use super::Shared;
use crate::config::PeerConfig;
use crate::ids::{Fingerprint, NodeId};
use crate::net::close;
use crate::replication::session::{HelloError, RestoreProgress, Session};
use crate::replication::StoreError;

mod conn;
mod dial;
mod send;
mod stream;

/// After a restore from a backup: which peers (by index) have not yet confirmed that we hold
/// all of our own log they hold (see [`RestoreProgress`]), shared by the links.
pub struct RestoreState {
    pending: Mutex<RestoreProgress<usize>>,
}

impl RestoreState {
    pub fn new(restored: bool, peers: usize) -> Self {
        RestoreState {
            pending: Mutex::new(RestoreProgress::new(restored, 0..peers)),
        }
    }

    /// Whether ingest must still wait; with how many peers left.
    pub fn waiting(&self) -> Option<usize> {
        self.pending.lock().expect("restore lock").waiting()
    }

    /// Peer `i` has no more of our log. Returns true when that was the last one.
    fn done(&self, i: usize) -> bool {
        self.pending.lock().expect("restore lock").peer_done(&i)
    }

    fn finish(&self) {
        self.pending.lock().expect("restore lock").finish();
    }
}

/// Marks peer `i` done with our own log; the last one ends the restore, durably.
async fn restore_peer_done(shared: &Arc<Shared>, i: usize) {
    if !shared.restore.done(i) {
        return;
    }
    let (tx, rx) = oneshot::channel();
    if shared
        .writer
        .send(Cmd::ClearRestored { reply: tx })
        .await
        .is_err()
    {
        return;
    }
    match rx.await {
        Ok(Ok(())) => {
            shared.restore.finish();
            tracing::info!(
                "restore complete: own log recovered from every peer; taking events again"
            );
        }
        Ok(Err(e)) => shared.note_error(format!("cannot clear the restored mark: {e}")),
        Err(_) => {}
    }
}

pub struct PeerState {
    /// The peer as configured at start; `name` never changes. Address and fingerprints may
    /// change at SIGHUP: read them through [`PeerState::addr`] and [`PeerState::pins`].
    pub cfg: PeerConfig,
    live: Mutex<LivePeer>,
    removed: std::sync::atomic::AtomicBool,
    pub info: Mutex<LinkInfo>,
    /// When a frame last arrived from the peer (ms since the epoch; 0: never), for
    /// `outpost_peer_last_contact_timestamp_seconds`.
    pub last_contact_ms: std::sync::atomic::AtomicU64,
}

/// The configured peers. Grow-only, so a peer's index stays valid for the node's lifetime: a
/// peer added at SIGHUP is appended, a removed one is flagged (its dial loop ends, its
/// certificates are no longer pinned, its link is closed, and it leaves status and metrics).
#[derive(Default)]
pub struct Peers {
    list: std::sync::RwLock<Vec<Arc<PeerState>>>,
}

impl Peers {
    pub fn new(peers: Vec<PeerState>) -> Self {
        Peers {
            list: std::sync::RwLock::new(peers.into_iter().map(Arc::new).collect()),
        }
    }

    pub fn get(&self, i: usize) -> Arc<PeerState> {
        self.list.read().expect("peers lock")[i].clone()
    }

    /// The peers that are configured now (not removed), with their indices.
    pub fn active(&self) -> Vec<(usize, Arc<PeerState>)> {
        self.list
            .read()
            .expect("peers lock")
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.removed())
            .map(|(i, p)| (i, p.clone()))
            .collect()
    }

    /// Every peer ever configured, removed ones included (their index is their identity).
    pub fn len_all(&self) -> usize {
        self.list.read().expect("peers lock").len()
    }

    fn push(&self, p: PeerState) -> usize {
        let mut list = self.list.write().expect("peers lock");
        list.push(Arc::new(p));
        list.len() - 1
    }

    /// The pins of every active peer.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.active()
            .iter()
            .flat_map(|(_, p)| p.fingerprints())
            .collect()
    }
}

/// Applies a reloaded peer list: existing peers (by name) take their new address and
/// fingerprints, new ones are added and dialled, missing ones removed. Returns what changed.
pub fn reload_peers(shared: &Arc<Shared>, new: &[PeerConfig]) -> Vec<String> {
    let mut changed = Vec::new();
    let current = shared.peers.active();
    for (i, peer) in &current {
        match new.iter().find(|p| p.name == peer.cfg.name) {
            Some(p) => changed.extend(peer.update(p, &shared.fingerprint)),
            None => {
                peer.remove();
                changed.push(format!("peer {} removed", peer.cfg.name));
                // A restored node no longer waits for a peer that is gone for good.
                let (shared, i) = (shared.clone(), *i);
                tokio::spawn(async move { restore_peer_done(&shared, i).await });
            }
        }
    }
    for p in new {
        if !current.iter().any(|(_, c)| c.cfg.name == p.name) {
            let i = shared
                .peers
                .push(PeerState::new(p.clone(), &shared.fingerprint));
            tokio::spawn(dial::dial_loop(shared.clone(), shared.endpoint.clone(), i));
            changed.push(format!("peer {} added", p.name));
        }
    }
    shared.pins.replace(shared.peers.fingerprints());
    changed
}

/// What SIGHUP may change of a peer: where it is and which certificates it may present.
struct LivePeer {
    addr: std::net::SocketAddr,
    fingerprints: Vec<Fingerprint>,
    /// Whether this side dials (lower fingerprint), decided from the configs alone.
    dials: bool,
}

#[derive(Default)]
pub struct LinkInfo {
    pub node_id: Option<NodeId>,
    pub connected: bool,
    generation: u64,
    conn: Option<quinn::Connection>,
    /// Whether the live connection was dialled by the lower node id.
    preferred: bool,
    session: Option<Arc<Mutex<Session>>>,
    pub last_error: Option<String>,
}

/// The side with the lower fingerprint dials. During a certificate rotation the peer has two
/// fingerprints; if they disagree about who dials, dial: a duplicate is closed after the Hello.
fn dials(theirs: &[Fingerprint], mine: &Fingerprint) -> bool {
    let mine = mine.to_string();
    !theirs.iter().all(|f| f.to_string() < mine)
}

impl PeerState {
    pub fn new(cfg: PeerConfig, mine: &Fingerprint) -> Self {
        let live = LivePeer {
            addr: cfg.addr,
            fingerprints: cfg.fingerprints.clone(),
            dials: dials(&cfg.fingerprints, mine),
        };
        PeerState {
            cfg,
            live: Mutex::new(live),
            removed: std::sync::atomic::AtomicBool::new(false),
            info: Mutex::new(LinkInfo::default()),
            last_contact_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn removed(&self) -> bool {
        self.removed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn remove(&self) {
        self.removed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(conn) = self.info.lock().expect("link lock").conn.as_ref() {
            conn.close(close::SHUTDOWN.into(), b"peer removed from the config");
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.live.lock().expect("peer lock").addr
    }

    /// Whether `fp` is one of the certificates this peer may present.
    pub fn pins(&self, fp: &Fingerprint) -> bool {
        !self.removed()
            && self
                .live
                .lock()
                .expect("peer lock")
                .fingerprints
                .contains(fp)
    }

    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.live.lock().expect("peer lock").fingerprints.clone()
    }

    pub fn dials(&self) -> bool {
        self.live.lock().expect("peer lock").dials
    }

    /// Applies a reloaded address and fingerprints. A live connection is closed so that the
    /// link is re-established under the new settings (a certificate no longer pinned must not
    /// stay connected). Returns what changed, for the reload log line.
    pub fn update(&self, new: &PeerConfig, mine: &Fingerprint) -> Option<String> {
        let mut live = self.live.lock().expect("peer lock");
        if live.addr == new.addr && live.fingerprints == new.fingerprints {
            return None;
        }
        let what = match (live.addr != new.addr, live.fingerprints != new.fingerprints) {
            (true, true) => "address and fingerprints",
            (true, false) => "address",
            _ => "fingerprints",
        };
        live.addr = new.addr;
        live.fingerprints = new.fingerprints.clone();
        live.dials = dials(&new.fingerprints, mine);
        drop(live);
        if let Some(conn) = self.info.lock().expect("link lock").conn.as_ref() {
            conn.close(close::SHUTDOWN.into(), b"peer settings reloaded");
        }
        Some(format!("peer {}: {what}", self.cfg.name))
    }

    /// Log positions the peer has not acknowledged (of `tail`), from the live link if any,
    /// else from storage.
    pub fn lag(&self, tail: u64, stored_acked: u64) -> u64 {
        let info = self.info.lock().expect("link lock");
        let acked = info
            .session
            .as_ref()
            .map_or(stored_acked, |s| s.lock().expect("session lock").acked());
        tail.saturating_sub(acked.max(stored_acked))
    }
}

pub fn spawn_all(shared: Arc<Shared>, ep: quinn::Endpoint) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(dial::accept_loop(shared.clone(), ep.clone()))];
    // Every peer gets a loop: whether this side dials may change when fingerprints are reloaded.
    for i in 0..shared.peers.len_all() {
        tasks.push(tokio::spawn(dial::dial_loop(shared.clone(), ep.clone(), i)));
    }
    tasks
}

/// Records why the link is not up (for status); logs it when it differs from the last reason,
/// so a peer that stays down costs one line, not one per attempt.
fn set_error(shared: &Shared, i: usize, e: String) {
    let peer = shared.peers.get(i);
    let mut info = peer.info.lock().expect("link lock");
    if info.last_error.as_deref() != Some(e.as_str()) {
        tracing::info!(peer = %peer.cfg.name, "link not up: {e}");
    }
    info.last_error = Some(e);
}

/// Records the reason a link ended without logging it (its one log line is written by the
/// caller).
fn set_error_quiet(shared: &Shared, i: usize, e: String) {
    shared
        .peers
        .get(i)
        .info
        .lock()
        .expect("link lock")
        .last_error = Some(e);
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("{0}")]
    Protocol(String),
    #[error("version: {0}")]
    Version(String),
    #[error("frame: {0}")]
    Frame(#[from] crate::wire::FrameError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("timed out waiting for the peer's Hello")]
    Timeout,
    #[error("the node is shutting down")]
    Shutdown,
    #[error("peer said goodbye: {0}")]
    Goodbye(String),
}

impl SessionError {
    pub(super) fn close_code(&self) -> u32 {
        match self {
            SessionError::Protocol(_) | SessionError::Frame(_) => close::PROTOCOL,
            SessionError::Version(_) => close::VERSION,
            SessionError::Shutdown => close::SHUTDOWN,
            _ => close::PROTOCOL,
        }
    }
}

impl From<HelloError> for SessionError {
    fn from(e: HelloError) -> Self {
        match e {
            HelloError::Version(s) => SessionError::Version(s),
            HelloError::Protocol(s) => SessionError::Protocol(s),
        }
    }
}
