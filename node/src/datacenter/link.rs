//! Datacenter links over QUIC: dialling, accepting, the Hello exchange, and per connection a
//! reader (frames in -> writer thread -> acks out) and a sender (local log -> Elements frames,
//! within the window of [`Outbound`]). One connection per pair: the side with the lower
//! fingerprint dials (both sides know both fingerprints from their configs); if two connections
//! exist anyway, the one dialled by the lower node id is kept.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use super::writer::Cmd;
use super::Shared;
use crate::clock::now_ms;
use crate::config::PeerConfig;
use crate::ids::{Fingerprint, NodeId};
use crate::model::EventType;
use crate::net::{self, close};
use crate::replication::core::{goes_to, resume_point};
use crate::replication::link::{LinkLimits, Outbound};
use crate::replication::{Core, LogRead, MsgKey, Received, StoreError};
use crate::wire::{
    read_frame, write_frame, CatchUpRequest, Elements, Hello, Message, Role, SnapshotChunk,
    SnapshotEnd, SnapshotEntry, PROTOCOL_VERSION,
};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
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
/// Frames in flight between the reader and the writer thread, per connection.
const PENDING_MAX: usize = 64;
/// Bytes of those frames, per connection, as decoded (records and their parsed elements:
/// [`frame_weight`]): the bound on what a fast peer (a snapshot, a catch-up) can make this
/// node hold before its writer has applied it. 8 MiB: a few frames of the largest size.
const PENDING_BYTES_MAX: usize = 8 << 20;
/// The unit of the pending byte budget's semaphore permits.
const PENDING_PERMIT_BYTES: usize = 1024;
const _: () = assert!(PENDING_BYTES_MAX / PENDING_PERMIT_BYTES <= u32::MAX as usize);
/// Outgoing control frames (acks) waiting for the sender, per connection.
const CONTROL_MAX: usize = 256;

/// After a restore from a backup: which peers have not yet confirmed that we hold all of our
/// own log they hold. Until none is left, the node takes no new events (it could otherwise
/// number a new event like one it issued before the backup).
pub struct RestoreState {
    pending: Mutex<Option<std::collections::BTreeSet<usize>>>,
}

impl RestoreState {
    pub fn new(restored: bool, peers: usize) -> Self {
        RestoreState {
            // With no peers there is nothing to recover from.
            pending: Mutex::new((restored && peers > 0).then(|| (0..peers).collect())),
        }
    }

    /// Whether ingest must still wait; with how many peers left.
    pub fn waiting(&self) -> Option<usize> {
        self.pending
            .lock()
            .expect("restore lock")
            .as_ref()
            .map(|p| p.len())
    }

    /// Peer `i` has no more of our log. Returns true when that was the last one.
    fn done(&self, i: usize) -> bool {
        let mut p = self.pending.lock().expect("restore lock");
        match p.as_mut() {
            Some(set) => {
                set.remove(&i);
                set.is_empty()
            }
            None => false,
        }
    }

    fn finish(&self) {
        *self.pending.lock().expect("restore lock") = None;
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

/// What the node knows of one configured peer.
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
            tokio::spawn(dial_loop(shared.clone(), shared.endpoint.clone(), i));
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
    outbound: Option<Arc<Mutex<Outbound>>>,
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
            .outbound
            .as_ref()
            .map_or(stored_acked, |o| o.lock().expect("outbound lock").acked());
        tail.saturating_sub(acked.max(stored_acked))
    }
}

pub fn spawn_all(shared: Arc<Shared>, ep: quinn::Endpoint) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(accept_loop(shared.clone(), ep.clone()))];
    // Every peer gets a loop: whether this side dials may change when fingerprints are reloaded.
    for i in 0..shared.peers.len_all() {
        tasks.push(tokio::spawn(dial_loop(shared.clone(), ep.clone(), i)));
    }
    tasks
}

async fn accept_loop(shared: Arc<Shared>, ep: quinn::Endpoint) {
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
                    session(shared, i, conn, false).await;
                }
                Err(e) => tracing::debug!(%remote, "incoming handshake failed: {e}"),
            }
        });
    }
}

async fn dial_loop(shared: Arc<Shared>, ep: quinn::Endpoint, i: usize) {
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
                if session(shared.clone(), i, conn, true).await {
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
enum SessionError {
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
    fn close_code(&self) -> u32 {
        match self {
            SessionError::Protocol(_) | SessionError::Frame(_) => close::PROTOCOL,
            SessionError::Version(_) => close::VERSION,
            SessionError::Shutdown => close::SHUTDOWN,
            _ => close::PROTOCOL,
        }
    }
}

fn hello_for(shared: &Shared, peer: Option<NodeId>) -> Result<Hello, StoreError> {
    let r = shared.store.read()?;
    let resume = match peer {
        Some(p) => {
            let pp = r.peer(p)?;
            (pp.recv_epoch != 0).then_some((pp.recv_epoch, pp.received))
        }
        None => None,
    };
    Ok(Hello {
        protocol: PROTOCOL_VERSION,
        node_id: shared.meta.node_id,
        role: Role::Datacenter,
        name: shared.meta.name.clone(),
        log_epoch: shared.meta.log_epoch,
        resume,
        marks: r.marks()?.iter().map(|(o, m)| m.to_wire(*o)).collect(),
    })
}

/// Checks a peer's Hello. `proven` is the node id the peer's pinned certificate carries (its
/// CN, see `net::cert_id`): a Hello naming any other id is a peer speaking for another, and
/// would move that peer's acknowledgements, marks and copy counts.
fn check_hello(shared: &Shared, h: &Hello, proven: Option<NodeId>) -> Result<(), SessionError> {
    if h.protocol != PROTOCOL_VERSION {
        return Err(SessionError::Version(format!(
            "peer speaks protocol {}, this node speaks {PROTOCOL_VERSION}",
            h.protocol
        )));
    }
    if h.role != Role::Datacenter {
        return Err(SessionError::Protocol(format!(
            "peer is a {}, not a datacenter",
            h.role
        )));
    }
    if proven != Some(h.node_id) {
        return Err(SessionError::Protocol(match proven {
            Some(p) => format!(
                "Hello names node id {} but the peer's certificate proves {p}",
                h.node_id
            ),
            None => format!(
                "Hello names node id {} but the peer's certificate carries no node id",
                h.node_id
            ),
        }));
    }
    if h.node_id == shared.meta.node_id {
        return Err(SessionError::Protocol("peer has this node's own id".into()));
    }
    if h.log_epoch == 0 {
        return Err(SessionError::Protocol("log epoch 0".into()));
    }
    Ok(())
}

/// Runs one connection to its end. Returns whether the Hello exchange succeeded.
async fn session(shared: Arc<Shared>, i: usize, conn: quinn::Connection, dialled: bool) -> bool {
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
            check_hello(&shared, &theirs, proven)?;
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
    if let Err(e) = check_hello(&shared, &theirs, proven) {
        fail(&shared, i, &conn, &e);
        return false;
    }
    let peer_id = theirs.node_id;
    let me = shared.meta.node_id;
    let preferred = if dialled { me < peer_id } else { peer_id < me };
    let stored = match shared.store.read().and_then(|r| r.peer(peer_id)) {
        Ok(p) => p,
        Err(e) => {
            fail(&shared, i, &conn, &e.into());
            return false;
        }
    };
    let tail = *shared.tail.borrow();
    let start = resume_point(&stored, shared.meta.log_epoch, &theirs, tail);
    let limits = LinkLimits {
        in_flight_max: shared.config.limits.in_flight_max,
        ..LinkLimits::default()
    };
    let outbound = Arc::new(Mutex::new(Outbound::new(limits, start, now_ms())));
    let generation = {
        let mut info = peer.info.lock().expect("link lock");
        if let Some(old) = info.conn.as_ref().filter(|_| info.connected) {
            if info.preferred && !preferred {
                drop(info);
                conn.close(close::DUPLICATE.into(), b"duplicate connection");
                return true;
            }
            old.close(close::DUPLICATE.into(), b"duplicate connection");
        }
        info.generation += 1;
        info.node_id = Some(peer_id);
        info.connected = true;
        info.preferred = preferred;
        info.conn = Some(conn.clone());
        info.outbound = Some(outbound.clone());
        info.last_error = None;
        info.generation
    };
    tracing::info!(peer = %peer.cfg.name, node_id = %peer_id, dialled, resume_from = start, "link up");
    let own_request = match shared
        .store
        .read()
        .and_then(|r| r.mark(shared.meta.node_id))
    {
        Ok(own) => {
            crate::replication::Core::own_log_request_for(shared.meta.node_id, &own, &theirs)
        }
        Err(e) => {
            fail(&shared, i, &conn, &e.into());
            return false;
        }
    };
    if own_request.is_none() {
        restore_peer_done(&shared, i).await;
    } else {
        tracing::info!(peer = %peer.cfg.name, "peer holds more of this node's own log: catching up");
    }
    let result = run_link(
        &shared,
        i,
        peer_id,
        theirs.log_epoch,
        send,
        recv,
        outbound,
        own_request,
    )
    .await;
    {
        let mut info = peer.info.lock().expect("link lock");
        if info.generation == generation {
            info.connected = false;
            info.conn = None;
            info.outbound = None;
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
fn fail(shared: &Shared, i: usize, conn: &quinn::Connection, e: &SessionError) {
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

#[allow(clippy::too_many_arguments)]
async fn run_link(
    shared: &Arc<Shared>,
    i: usize,
    peer_id: NodeId,
    peer_epoch: u64,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    outbound: Arc<Mutex<Outbound>>,
    own_request: Option<CatchUpRequest>,
) -> Result<(), SessionError> {
    let notify = Arc::new(Notify::new());
    let (ctl_tx, ctl_rx) = mpsc::channel::<Message>(CONTROL_MAX);
    if let Some(req) = own_request {
        ctl_tx
            .send(Message::CatchUpRequest(req))
            .await
            .map_err(|_| SessionError::Shutdown)?;
    }
    let (pending_tx, pending_rx) = mpsc::channel(PENDING_MAX);
    let reader = read_loop(
        shared,
        i,
        peer_id,
        peer_epoch,
        recv,
        &outbound,
        &notify,
        pending_tx,
        ctl_tx.clone(),
    );
    let acker = ack_loop(pending_rx, ctl_tx);
    let sender = send_loop(shared, peer_id, send, &outbound, &notify, ctl_rx);
    tokio::select! {
        r = reader => r,
        r = acker => r,
        r = sender => r,
    }
}

type Pending = (
    u64,
    oneshot::Receiver<Result<Received, StoreError>>,
    tokio::sync::OwnedSemaphorePermit,
);

/// What a received frame holds in memory until applied, by a rough measure: each record's
/// bytes, its parsed element (about twice its bytes) and fixed overhead.
fn frame_weight<'a>(records: impl Iterator<Item = (&'a str, &'a [u8])>) -> usize {
    records.map(|(a, el)| a.len() + 3 * el.len() + 160).sum()
}

/// Waits until the connection's pending byte budget has room for a frame of `weight` (a frame
/// over the whole budget waits for all of it).
async fn reserve(
    budget: &Arc<tokio::sync::Semaphore>,
    weight: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, SessionError> {
    let permits = weight
        .div_ceil(PENDING_PERMIT_BYTES)
        .clamp(1, PENDING_BYTES_MAX / PENDING_PERMIT_BYTES) as u32;
    budget
        .clone()
        .acquire_many_owned(permits)
        .await
        .map_err(|_| SessionError::Shutdown)
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    shared: &Arc<Shared>,
    i: usize,
    peer_id: NodeId,
    peer_epoch: u64,
    mut recv: quinn::RecvStream,
    outbound: &Mutex<Outbound>,
    notify: &Notify,
    pending: mpsc::Sender<Pending>,
    ctl: mpsc::Sender<Message>,
) -> Result<(), SessionError> {
    let max = shared.config.limits.frame_bytes_max;
    let epoch = shared.meta.log_epoch;
    let budget = Arc::new(tokio::sync::Semaphore::new(
        PENDING_BYTES_MAX / PENDING_PERMIT_BYTES,
    ));
    loop {
        let Some(msg) = read_frame(&mut recv, max).await? else {
            return Ok(());
        };
        shared
            .peers
            .get(i)
            .last_contact_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        match msg {
            Message::Elements(frame) => {
                let weight = frame_weight(
                    frame
                        .items
                        .iter()
                        .map(|(_, r)| (r.account.as_str(), r.element.as_slice())),
                );
                let permit = reserve(&budget, weight).await?;
                let els = Core::check_elements(&frame)
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                let (tx, rx) = oneshot::channel();
                let frame_epoch = frame.epoch;
                shared
                    .writer
                    .send(Cmd::Receive {
                        from: peer_id,
                        frame,
                        els,
                        reply: tx,
                    })
                    .await
                    .map_err(|_| SessionError::Shutdown)?;
                pending
                    .send((frame_epoch, rx, permit))
                    .await
                    .map_err(|_| SessionError::Shutdown)?;
            }
            Message::Snapshot(chunk) => {
                let weight = frame_weight(
                    chunk
                        .entries
                        .iter()
                        .map(|e| (e.account.as_str(), e.element.as_slice())),
                );
                let permit = reserve(&budget, weight).await?;
                let els = Core::check_snapshot(&chunk)
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                let (tx, rx) = oneshot::channel();
                let chunk_epoch = chunk.epoch;
                shared
                    .writer
                    .send(Cmd::Snapshot {
                        from: peer_id,
                        chunk,
                        els,
                        reply: tx,
                    })
                    .await
                    .map_err(|_| SessionError::Shutdown)?;
                pending
                    .send((chunk_epoch, rx, permit))
                    .await
                    .map_err(|_| SessionError::Shutdown)?;
            }
            Message::Ack { epoch: e, upto } => {
                if e != epoch {
                    continue;
                }
                let progressed = outbound
                    .lock()
                    .expect("outbound lock")
                    .on_ack(upto, now_ms());
                if progressed {
                    notify.notify_one();
                    // Persisting acks is an optimisation (the peer's Hello also says where it
                    // is), so a full queue just skips this one.
                    let _ = shared.writer.try_send(Cmd::Acked {
                        from: peer_id,
                        epoch,
                        upto,
                        peer_epoch,
                    });
                }
            }
            Message::CatchUpRequest(req) => {
                let s = shared.clone();
                let batch = tokio::task::spawn_blocking(move || {
                    Core::answer_catch_up(&s.store.read()?, &req)
                })
                .await
                .map_err(|_| SessionError::Shutdown)??;
                ctl.send(Message::CatchUpBatch(batch))
                    .await
                    .map_err(|_| SessionError::Shutdown)?;
            }
            Message::CatchUpBatch(batch) => {
                let els = Core::check_catch_up(&batch)
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                let (tx, rx) = oneshot::channel();
                shared
                    .writer
                    .send(Cmd::CatchUp {
                        from: peer_id,
                        batch,
                        els,
                        reply: tx,
                    })
                    .await
                    .map_err(|_| SessionError::Shutdown)?;
                match rx.await.map_err(|_| SessionError::Shutdown)?? {
                    Some(next) => ctl
                        .send(Message::CatchUpRequest(next))
                        .await
                        .map_err(|_| SessionError::Shutdown)?,
                    None => restore_peer_done(shared, i).await,
                }
            }
            Message::Goodbye(g) => return Err(SessionError::Goodbye(g.reason)),
            Message::Hello(_) => return Err(SessionError::Protocol("a second Hello".into())),
            other => {
                return Err(SessionError::Protocol(format!(
                    "a cluster message between datacenters ({})",
                    other.kind()
                )))
            }
        }
    }
}

async fn ack_loop(
    mut pending: mpsc::Receiver<Pending>,
    ctl: mpsc::Sender<Message>,
) -> Result<(), SessionError> {
    while let Some((epoch, rx, permit)) = pending.recv().await {
        let got = rx.await.map_err(|_| SessionError::Shutdown)??;
        // Applied: its bytes are no longer held.
        drop(permit);
        ctl.send(Message::Ack {
            epoch,
            upto: got.ack,
        })
        .await
        .map_err(|_| SessionError::Shutdown)?;
    }
    Ok(())
}

async fn send_loop(
    shared: &Arc<Shared>,
    peer_id: NodeId,
    mut send: quinn::SendStream,
    outbound: &Mutex<Outbound>,
    notify: &Notify,
    mut ctl: mpsc::Receiver<Message>,
) -> Result<(), SessionError> {
    let mut tail_rx = shared.tail.clone();
    let frame_budget = shared.config.limits.frame_bytes_max * 3 / 4;
    loop {
        while let Ok(m) = ctl.try_recv() {
            write_frame(&mut send, &m).await?;
        }
        let tail = *tail_rx.borrow_and_update();
        let range = outbound.lock().expect("outbound lock").next_range(tail);
        if let Some((after, upto)) = range {
            let s = shared.clone();
            let built = tokio::task::spawn_blocking(move || {
                build_elements(&s, peer_id, after, upto, frame_budget)
            })
            .await
            .map_err(|_| SessionError::Shutdown)??;
            let sent_upto = match built {
                Built::Elements(frame) => {
                    let (upto, n) = (frame.upto, frame.items.len() as u64);
                    write_frame(&mut send, &Message::Elements(frame)).await?;
                    shared
                        .metrics
                        .elements_sent
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    upto
                }
                Built::Trimmed => send_snapshot(shared, peer_id, &mut send, frame_budget).await?,
            };
            outbound
                .lock()
                .expect("outbound lock")
                .on_sent(sent_upto, now_ms());
            continue;
        }
        tokio::select! {
            m = ctl.recv() => match m {
                Some(m) => write_frame(&mut send, &m).await?,
                None => return Ok(()),
            },
            r = tail_rx.changed() => if r.is_err() { return Err(SessionError::Shutdown) },
            _ = notify.notified() => {}
        }
    }
}

enum Built {
    Elements(Elements),
    /// Records the peer needs were trimmed by retention: it needs a snapshot.
    Trimmed,
}

/// Reads `(after, upto]` of the local log and keeps what goes to this peer (see [`goes_to`]),
/// and, with a fan-out bound, only relays this peer is chosen for. The frame ends
/// early when it reaches `budget` bytes.
fn build_elements(
    shared: &Shared,
    peer_id: NodeId,
    after: u64,
    upto: u64,
    budget: usize,
) -> Result<Built, StoreError> {
    let r = shared.store.read()?;
    match r.log_first()? {
        Some(first) if first > after + 1 => return Ok(Built::Trimmed),
        None if r.log_tail()? > after => return Ok(Built::Trimmed),
        _ => {}
    }
    let records = r.log_range(after, (upto - after) as usize)?;
    let me = shared.meta.node_id;
    let fanout = shared.config.replication.fanout;
    let mut items = Vec::with_capacity(records.len());
    let mut bytes = 0usize;
    let mut covered = upto;
    for (lseq, rec) in records {
        if bytes > budget {
            covered = lseq - 1;
            break;
        }
        if rec.origin == peer_id {
            let m = r.message(MsgKey::of(&rec), &rec.msg_id)?;
            if !goes_to(peer_id, &rec, m.as_ref().map(|m| m.senders.as_slice())) {
                continue;
            }
        }
        if fanout > 0
            && rec.origin != me
            && !chosen_for_relay(shared, &rec.msg_id.0, peer_id, fanout)
        {
            continue;
        }
        bytes += rec.element.len() + rec.account.len() + 96;
        items.push((lseq, rec));
    }
    Ok(Built::Elements(Elements {
        epoch: shared.meta.log_epoch,
        after,
        upto: covered,
        items,
    }))
}

/// Chunks of a snapshot in flight between the reading thread and the stream.
const SNAPSHOT_CHUNKS_AHEAD: usize = 4;

/// Streams our whole state table from one read transaction, then the marks it reflects and the
/// log position it corresponds to. Returns that position: the peer continues from there.
async fn send_snapshot(
    shared: &Arc<Shared>,
    peer_id: NodeId,
    send: &mut quinn::SendStream,
    budget: usize,
) -> Result<u64, SessionError> {
    let (tx, mut rx) = mpsc::channel::<Result<SnapshotChunk, StoreError>>(SNAPSHOT_CHUNKS_AHEAD);
    let s = shared.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let produce = || -> Result<(), StoreError> {
            let r = s.store.read()?;
            let epoch = s.meta.log_epoch;
            let mut last: Option<(String, EventType)> = None;
            loop {
                let rows = r.entries_after(last.as_ref().map(|(a, t)| (a.as_str(), *t)), 4096)?;
                let mut entries = Vec::new();
                let mut bytes = 0;
                let done = rows.len() < 4096;
                for (account, etype, e) in rows {
                    bytes += e.element.len() + account.len() + 96;
                    last = Some((account.clone(), etype));
                    entries.push(SnapshotEntry {
                        account,
                        etype,
                        version: e.version,
                        origin: e.origin,
                        msg_id: e.msg_id,
                        element: e.element,
                    });
                    if bytes > budget {
                        break;
                    }
                }
                let complete = done && last.as_ref().is_none_or(|_| bytes <= budget);
                let end = if complete {
                    // The table is complete up to `state_upto` (what is after it is still only
                    // in the log and the writer's overlay): the peer continues from there, and
                    // retention keeps the log after it.
                    Some(SnapshotEnd {
                        marks: r.marks()?.iter().map(|(o, m)| m.to_wire(*o)).collect(),
                        resume_after: r.state_upto()?.min(r.log_tail()?),
                    })
                } else {
                    None
                };
                let chunk = SnapshotChunk {
                    epoch,
                    entries,
                    end,
                };
                let finished = chunk.end.is_some();
                if tx.blocking_send(Ok(chunk)).is_err() || finished {
                    return Ok(());
                }
            }
        };
        if let Err(e) = produce() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    tracing::info!(peer = %peer_id, "peer is behind log retention: sending a snapshot");
    let mut resume = None;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        if let Some(end) = &chunk.end {
            resume = Some(end.resume_after);
        }
        write_frame(send, &Message::Snapshot(chunk)).await?;
    }
    let _ = reader.await;
    shared
        .metrics
        .snapshots_sent
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    resume.ok_or(SessionError::Shutdown)
}

/// With a fan-out of k, a relayed message goes to the k peers ranked first by
/// blake3(message id, peer name): every node picks its own k, spread evenly.
fn chosen_for_relay(shared: &Shared, msg: &[u8; 32], peer_id: NodeId, k: usize) -> bool {
    let rank = |name: &str| {
        let mut h = blake3::Hasher::new();
        h.update(msg);
        h.update(name.as_bytes());
        *h.finalize().as_bytes()
    };
    let peers = shared.peers.active();
    let Some((_, target)) = peers
        .iter()
        .find(|(_, p)| p.info.lock().expect("link lock").node_id == Some(peer_id))
    else {
        return true;
    };
    let mine = rank(&target.cfg.name);
    peers
        .iter()
        .filter(|(_, p)| rank(&p.cfg.name) < mine)
        .count()
        < k
}

#[cfg(test)]
mod pending_budget_tests {
    use futures_util::FutureExt as _;

    use super::*;

    /// Bounded memory: frames read from a peer and not yet applied hold at most
    /// `PENDING_BYTES_MAX` of the connection's budget; the next frame waits until one is
    /// applied, and a frame over the whole budget waits for all of it.
    #[tokio::test]
    async fn frames_waiting_for_the_writer_stay_within_the_byte_budget() {
        let budget = Arc::new(tokio::sync::Semaphore::new(
            PENDING_BYTES_MAX / PENDING_PERMIT_BYTES,
        ));
        let frame = PENDING_BYTES_MAX / 8;
        let mut held = Vec::new();
        for _ in 0..8 {
            let p = reserve(&budget, frame).now_or_never();
            held.push(p.expect("room in the budget").unwrap());
        }
        assert!(
            reserve(&budget, 1).now_or_never().is_none(),
            "a ninth frame must wait"
        );
        drop(held.pop());
        let p = reserve(&budget, frame).now_or_never();
        held.push(p.expect("room again once one is applied").unwrap());
        held.clear();
        let huge = reserve(&budget, 10 * PENDING_BYTES_MAX).now_or_never();
        let huge = huge
            .expect("a frame over the budget takes all of it")
            .unwrap();
        assert_eq!(budget.available_permits(), 0);
        drop(huge);
        // The weight counts records and their parsed elements.
        assert_eq!(
            frame_weight([("alice", &[0u8; 100][..])].into_iter()),
            5 + 300 + 160
        );
    }
}
