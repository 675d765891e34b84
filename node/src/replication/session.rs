//! One datacenter link's session, sans I/O: the Hello and its checks, which of two duplicate
//! connections survives, where sending resumes (catch-up from the log, or a snapshot when the
//! log the peer needs was trimmed), which relays go to which peer under a fan-out, how many
//! bytes go in one frame and how many a receiver may hold before its writer applies them, and
//! the recovery of this node's own log after a restore.
//!
//! Like quinn-proto's `Connection`, it takes inputs at a `now` the caller passes in and answers
//! with what to send or do; it never reads a clock, never does I/O, never logs, and knows
//! nothing of the driver (`crate::datacenter`). The QUIC driver and the simulation both run it.

use std::collections::BTreeSet;

use super::core::{goes_to, resume_point, Core};
use super::link::{LinkLimits, Outbound};
use super::tables::{Entry, LogRead, Mark, MsgKey, MsgRecord, PeerProgress, StoreError, Tables};
use crate::ids::{MsgId, NodeId};
use crate::limits::{
    HELLO_LACKS_CHECK_MAX, PEER_PENDING_BYTES_MAX, PEER_PENDING_FRAMES_MAX,
    PEER_PENDING_PERMIT_BYTES, RECORD_OVERHEAD_BYTES, SNAPSHOT_ROWS_MAX,
};
use crate::model::EventType;
use crate::wire::{
    CatchUpBatch, CatchUpRequest, Elements, Hello, Role, SnapshotChunk, SnapshotEnd, SnapshotEntry,
    PROTOCOL_VERSION,
};

/// Permits of the whole pending budget.
pub const PENDING_PERMITS: u32 = (PEER_PENDING_BYTES_MAX / PEER_PENDING_PERMIT_BYTES) as u32;

/// Why a peer's Hello was refused; the connection is closed with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Another protocol version: closed with the version code, so both sides say so clearly.
    #[error("version: {0}")]
    Version(String),
    /// Anything else wrong with it.
    #[error("{0}")]
    Protocol(String),
}

/// Our Hello to a peer: marks, and where we are in the peer's log (`progress`, if we know the
/// peer).
pub fn hello(
    me: NodeId,
    name: &str,
    log_epoch: u64,
    progress: Option<&PeerProgress>,
    marks: &[(NodeId, Mark)],
) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        node_id: me,
        role: Role::Datacenter,
        name: name.to_string(),
        log_epoch,
        resume: progress
            .filter(|p| p.recv_epoch != 0)
            .map(|p| (p.recv_epoch, p.received)),
        marks: marks.iter().map(|(o, m)| m.to_wire(*o)).collect(),
    }
}

impl Core {
    /// Our Hello to `peer`: marks, and where we are in the peer's log. (Here rather than in
    /// `core.rs`: the Hello is the session's, and the core does not import the session.)
    pub fn hello(&self, t: &impl Tables, peer: Option<NodeId>) -> Result<Hello, StoreError> {
        let progress = peer.map(|p| t.peer(p)).transpose()?;
        Ok(hello(
            self.node_id,
            &self.name,
            t.log_epoch()?,
            progress.as_ref(),
            &t.marks()?,
        ))
    }
}

/// Checks a peer's Hello. `proven` is the node id the peer's pinned certificate carries: a
/// Hello naming any other id is a peer speaking for another, and would move that peer's
/// acknowledgements, marks and copy counts.
pub fn check_hello(me: NodeId, h: &Hello, proven: Option<NodeId>) -> Result<(), HelloError> {
    if h.protocol != PROTOCOL_VERSION {
        return Err(HelloError::Version(format!(
            "peer speaks protocol {}, this node speaks {PROTOCOL_VERSION}",
            h.protocol
        )));
    }
    if h.role != Role::Datacenter {
        return Err(HelloError::Protocol(format!(
            "peer is a {}, not a datacenter",
            h.role
        )));
    }
    if proven != Some(h.node_id) {
        return Err(HelloError::Protocol(match proven {
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
    if h.node_id == me {
        return Err(HelloError::Protocol("peer has this node's own id".into()));
    }
    if h.log_epoch == 0 {
        return Err(HelloError::Protocol("log epoch 0".into()));
    }
    Ok(())
}

/// Whether a connection is the one the pair keeps: the one dialled by the lower node id.
pub fn preferred(me: NodeId, peer: NodeId, dialled: bool) -> bool {
    if dialled {
        me < peer
    } else {
        peer < me
    }
}

/// What to do with a new connection to a peer that may already have a live one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Duplicate {
    /// No live connection: take the new one.
    Take,
    /// A live one exists and the new one is preferred (or neither is): close the old one.
    ReplaceOld,
    /// The live one is preferred and the new one is not: close the new one.
    RefuseNew,
}

/// `live`: whether a live connection exists and, if so, whether it is the preferred one.
pub fn choose_connection(live: Option<bool>, new_preferred: bool) -> Duplicate {
    match live {
        None => Duplicate::Take,
        Some(true) if !new_preferred => Duplicate::RefuseNew,
        Some(_) => Duplicate::ReplaceOld,
    }
}

/// The relay fan-out as this node sees it when building a frame for one peer.
#[derive(Clone, Copy, Debug)]
pub struct Relay<'a> {
    /// Most peers a relayed message goes to; 0: every peer.
    pub fanout: usize,
    /// The configured name of the peer the frame is for, if it is known.
    pub target: Option<&'a str>,
    /// The names of every configured peer.
    pub peers: &'a [String],
}

impl Relay<'_> {
    /// Every peer gets every relay.
    pub const ALL: Relay<'static> = Relay {
        fanout: 0,
        target: None,
        peers: &[],
    };

    /// Whether a message relayed from elsewhere goes to the target.
    pub fn chosen(&self, msg: &MsgId) -> bool {
        match self.target {
            Some(target) if self.fanout > 0 => {
                chosen_for_relay(&msg.0, target, self.peers, self.fanout)
            }
            _ => true,
        }
    }
}

/// With a fan-out of k, a relayed message goes to the k peers ranked first by
/// blake3(message id, peer name): every node picks its own k, spread evenly.
pub fn chosen_for_relay(msg: &[u8; 32], target: &str, peers: &[String], k: usize) -> bool {
    let rank = |name: &str| {
        let mut h = blake3::Hasher::new();
        h.update(msg);
        h.update(name.as_bytes());
        *h.finalize().as_bytes()
    };
    let mine = rank(target);
    peers.iter().filter(|p| rank(p) < mine).count() < k
}

/// The bytes of records one outgoing frame may carry: room is left under the frame limit for
/// the encoding's overhead.
pub fn frame_budget(frame_bytes_max: usize) -> usize {
    frame_bytes_max * 3 / 4
}

/// What one record counts for in an outgoing frame or snapshot chunk.
pub fn record_bytes(account: &str, element: &[u8]) -> usize {
    element.len() + account.len() + RECORD_OVERHEAD_BYTES
}

/// What a received frame holds in memory until applied, by a rough measure: each record's
/// bytes, its parsed element (about twice its bytes) and fixed overhead.
pub fn frame_weight<'a>(records: impl Iterator<Item = (&'a str, &'a [u8])>) -> usize {
    records.map(|(a, el)| a.len() + 3 * el.len() + 160).sum()
}

/// The permits of the pending budget a frame of `weight` takes: at least one, and a frame over
/// the whole budget takes all of it (it waits until nothing else is held).
pub fn weight_permits(weight: usize) -> u32 {
    permits_within(weight, PENDING_PERMITS)
}

fn permits_within(weight: usize, capacity: u32) -> u32 {
    weight
        .div_ceil(PEER_PENDING_PERMIT_BYTES)
        .clamp(1, capacity.max(1) as usize) as u32
}

/// The receiving half's budgets: frames and bytes (in permits of [`PEER_PENDING_PERMIT_BYTES`])
/// read from the peer and not yet applied. The QUIC driver enforces the same bounds with a
/// channel of [`PEER_PENDING_FRAMES_MAX`] and a semaphore of [`PENDING_PERMITS`] sized by
/// [`weight_permits`] (it must wait asynchronously); the simulation holds frames back with this,
/// at capacities small enough to bind.
#[derive(Clone, Debug)]
pub struct InboundBudget {
    frames_max: usize,
    frames: usize,
    capacity: u32,
    free: u32,
}

impl Default for InboundBudget {
    fn default() -> Self {
        InboundBudget::new(PEER_PENDING_FRAMES_MAX, PENDING_PERMITS)
    }
}

impl InboundBudget {
    pub fn new(frames_max: usize, permits: u32) -> Self {
        InboundBudget {
            frames_max: frames_max.max(1),
            frames: 0,
            capacity: permits.max(1),
            free: permits.max(1),
        }
    }

    /// Takes room for a frame of `weight`, if there is: the permits to give back once it is
    /// applied (with [`Self::release`]).
    pub fn try_take(&mut self, weight: usize) -> Option<u32> {
        let n = permits_within(weight, self.capacity);
        (n <= self.free && self.frames < self.frames_max).then(|| {
            self.free -= n;
            self.frames += 1;
            n
        })
    }

    /// A frame that held `permits` was applied (or dropped).
    pub fn release(&mut self, permits: u32) {
        self.free = (self.free + permits).min(self.capacity);
        self.frames = self.frames.saturating_sub(1);
    }

    /// Whether nothing is held.
    pub fn idle(&self) -> bool {
        self.frames == 0 && self.free == self.capacity
    }
}

/// What the sender reads of the local log for one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Built {
    Elements(Elements),
    /// Records the peer needs were trimmed by retention: it needs a snapshot.
    Trimmed,
}

/// Reads `(after, upto]` of the local log and keeps what goes to `peer` (see [`goes_to`]), and,
/// with a fan-out, only relays the peer is chosen for. `message` finds a record's message
/// record (who sent it to us). The frame ends early once it holds `budget` bytes.
#[allow(clippy::too_many_arguments)]
pub fn build_elements<R: LogRead>(
    r: &R,
    mut message: impl FnMut(&R, MsgKey, &MsgId) -> Result<Option<MsgRecord>, StoreError>,
    me: NodeId,
    peer: NodeId,
    relay: Relay<'_>,
    after: u64,
    upto: u64,
    budget: usize,
) -> Result<Built, StoreError> {
    match r.log_first()? {
        Some(first) if first > after + 1 => return Ok(Built::Trimmed),
        None if r.log_tail()? > after => return Ok(Built::Trimmed),
        _ => {}
    }
    let records = r.log_range(after, (upto - after) as usize)?;
    let mut items = Vec::with_capacity(records.len());
    let mut bytes = 0usize;
    let mut covered = upto;
    for (lseq, rec) in records {
        if bytes > budget {
            covered = lseq - 1;
            break;
        }
        if rec.origin == peer {
            let m = message(r, MsgKey::of(&rec), &rec.msg_id)?;
            if !goes_to(peer, &rec, m.as_ref().map(|m| m.senders.as_slice())) {
                continue;
            }
        }
        if rec.origin != me && !relay.chosen(&rec.msg_id) {
            continue;
        }
        bytes += record_bytes(&rec.account, &rec.element);
        items.push((lseq, rec));
    }
    Ok(Built::Elements(Elements {
        epoch: r.log_epoch()?,
        after,
        upto: covered,
        items,
    }))
}

/// Where a snapshot being sent has got to: one read transaction's state table, in chunks of at
/// most `budget` bytes, the last carrying the marks it reflects and where the log continues.
#[derive(Clone, Debug)]
pub struct SnapshotCursor {
    epoch: u64,
    budget: usize,
    last: Option<(String, EventType)>,
    finished: bool,
}

impl SnapshotCursor {
    pub fn new(epoch: u64, budget: usize) -> Self {
        SnapshotCursor {
            epoch,
            budget,
            last: None,
            finished: false,
        }
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The next chunk. `rows(after, max)` reads up to `max` state rows after `after`; `end()`
    /// says what the complete table reflects (read from the same transaction).
    pub fn next_chunk(
        &mut self,
        rows: impl FnOnce(
            Option<(&str, EventType)>,
            usize,
        ) -> Result<Vec<(String, EventType, Entry)>, StoreError>,
        end: impl FnOnce() -> Result<SnapshotEnd, StoreError>,
    ) -> Result<SnapshotChunk, StoreError> {
        let rows = rows(
            self.last.as_ref().map(|(a, t)| (a.as_str(), *t)),
            SNAPSHOT_ROWS_MAX,
        )?;
        let done = rows.len() < SNAPSHOT_ROWS_MAX;
        let mut entries = Vec::new();
        let mut bytes = 0;
        for (account, etype, e) in rows {
            bytes += record_bytes(&account, &e.element);
            self.last = Some((account.clone(), etype));
            entries.push(SnapshotEntry {
                account,
                etype,
                version: e.version,
                origin: e.origin,
                msg_id: e.msg_id,
                element: e.element,
            });
            if bytes > self.budget {
                break;
            }
        }
        let complete = done && self.last.as_ref().is_none_or(|_| bytes <= self.budget);
        // The table is complete up to the end's `resume_after` (what is after it is still only
        // in the log): the peer continues from there, and retention keeps the log after it.
        let end = if complete { Some(end()?) } else { None };
        self.finished = end.is_some();
        Ok(SnapshotChunk {
            epoch: self.epoch,
            entries,
            end,
        })
    }
}

/// Recovering this node's own log from one peer after a restore.
#[derive(Clone, Debug, PartialEq, Eq)]
enum OwnLog {
    /// The peer holds no more of our log than we do.
    Done,
    /// Asked; the request in progress.
    Asking(CatchUpRequest),
}

/// What the driver does after a catch-up batch of our own log was applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnLogStep {
    /// Ask for the next batch.
    Ask(CatchUpRequest),
    /// This peer has no more of our log: it counts as done for the restore.
    Done,
}

/// One live session with a peer, from its Hello on.
#[derive(Clone, Debug)]
pub struct Session {
    peer: NodeId,
    peer_epoch: u64,
    epoch: u64,
    outbound: Outbound,
    own_log: OwnLog,
    /// The peer needs our state table: see [`Session::on_catch_up_answered`] and
    /// [`Session::check_peer_marks`].
    snapshot_wanted: bool,
    /// The marks of the peer's Hello (bounded like every mark).
    their_marks: Vec<(NodeId, Mark)>,
}

impl Session {
    /// A session after the peer's Hello (already checked): sending resumes after what the
    /// peer holds of our log (by what we stored as acknowledged and what its Hello says), and
    /// if it holds more of *our own* log than we do (we were restored), we ask for the rest.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        me: NodeId,
        epoch: u64,
        theirs: &Hello,
        stored: &PeerProgress,
        own: &Mark,
        tail: u64,
        limits: LinkLimits,
        now_ms: u64,
    ) -> Session {
        let start = resume_point(stored, epoch, theirs, tail);
        let own_log = match Core::own_log_request_for(me, own, theirs) {
            Some(req) => OwnLog::Asking(req),
            None => OwnLog::Done,
        };
        Session {
            peer: theirs.node_id,
            peer_epoch: theirs.log_epoch,
            epoch,
            outbound: Outbound::new(limits, start, now_ms),
            own_log,
            snapshot_wanted: false,
            their_marks: theirs
                .marks
                .iter()
                .map(|m| (m.origin, Mark::from_wire(m)))
                .collect(),
        }
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    pub fn peer_epoch(&self) -> u64 {
        self.peer_epoch
    }

    /// Our log position the peer has acknowledged.
    pub fn acked(&self) -> u64 {
        self.outbound.acked()
    }

    pub fn sent(&self) -> u64 {
        self.outbound.sent()
    }

    /// The catch-up request for our own log in progress, if any: sent once the session opens
    /// (and again by a driver whose transport may lose it).
    pub fn own_log_request(&self) -> Option<&CatchUpRequest> {
        match &self.own_log {
            OwnLog::Asking(r) => Some(r),
            OwnLog::Done => None,
        }
    }

    /// A batch of our own log from the peer was applied; `next` is what the core asks for next.
    pub fn on_own_log_batch(&mut self, next: Option<CatchUpRequest>) -> OwnLogStep {
        match next {
            Some(r) => {
                self.own_log = OwnLog::Asking(r.clone());
                OwnLogStep::Ask(r)
            }
            None => {
                self.own_log = OwnLog::Done;
                OwnLogStep::Done
            }
        }
    }

    /// The next slice `(after, upto]` of our log to send, given its tail, if the in-flight
    /// window allows.
    pub fn poll_range(&self, tail: u64) -> Option<(u64, u64)> {
        self.outbound.next_range(tail)
    }

    /// What was read for `(after, upto]` went out (a frame covering up to `upto`, or a snapshot
    /// whose log position is `upto`).
    pub fn on_sent(&mut self, upto: u64, now_ms: u64) {
        self.outbound.on_sent(upto, now_ms);
    }

    /// An Ack from the peer. Returns whether it moved the window (then the driver persists it
    /// and may send more); an ack of another incarnation of our log is ignored.
    pub fn on_ack(&mut self, epoch: u64, upto: u64, now_ms: u64) -> bool {
        epoch == self.epoch && self.outbound.on_ack(upto, now_ms)
    }

    /// We answered the peer's catch-up request with `batch`; `ours` is our mark of that origin.
    /// When we count as held sequences of the range whose records we could not send (trimmed
    /// by retention, or held only through a snapshot, which carries no records), the peer,
    /// restored from a backup, can recover them only from our state table: it gets a snapshot.
    pub fn on_catch_up_answered(
        &mut self,
        req: &CatchUpRequest,
        batch: &CatchUpBatch,
        ours: &Mark,
    ) {
        let upto = match (batch.done, batch.items.last()) {
            (false, Some(last)) => last.oseq,
            _ => ours.highest(),
        };
        if held_in(ours, req.after_oseq, upto) > batch.items.len() as u64 {
            self.snapshot_wanted = true;
        }
    }

    /// Whether the peer lacks what only a snapshot can give it: a sequence its Hello's marks do
    /// not hold, that we hold, and whose record our log no longer has (trimmed, or received
    /// through a snapshot, which carries no records). No frame of our log can ever give it,
    /// and no other holder may have it in a log either (its origin may have been restored from
    /// a backup taken before it): the peer gets a snapshot. `ours` are our marks now.
    ///
    /// Run when the session opens, and again whenever a snapshot raised our marks (what we
    /// gained then we hold only in state), against the marks the peer's Hello gave. Returns
    /// whether a snapshot was asked for.
    pub fn check_peer_marks(
        &mut self,
        r: &impl LogRead,
        ours: &[(NodeId, Mark)],
    ) -> Result<bool, StoreError> {
        let lacks = lacks_snapshot_only(r, ours, &self.their_marks)?;
        self.snapshot_wanted |= lacks;
        Ok(lacks)
    }

    /// The marks of the peer's Hello, for a [`lacks_snapshot_only`] run off the session.
    pub fn their_marks(&self) -> &[(NodeId, Mark)] {
        &self.their_marks
    }

    /// A snapshot ended between us, either way: the peer holds at least the marks its end
    /// carried (ours, if we sent it; its own, if it sent it). Joined into what the peer's Hello
    /// said, so a later [`Session::check_peer_marks`] does not send back what came from it.
    pub fn on_snapshot_end(&mut self, marks: &[crate::wire::OriginMark]) {
        for m in marks {
            let m2 = Mark::from_wire(m);
            match self.their_marks.iter_mut().find(|(o, _)| *o == m.origin) {
                Some((_, mine)) => mine.join(&m2),
                None => self.their_marks.push((m.origin, m2)),
            }
        }
    }

    /// Asks for a snapshot to the peer (what a [`lacks_snapshot_only`] run off the session found).
    pub fn want_snapshot(&mut self) {
        self.snapshot_wanted = true;
    }

    /// Whether to send the peer a snapshot now (once per request for it): the driver sends
    /// one as for a peer behind retention, then continues from the position it reflects.
    pub fn poll_snapshot(&mut self) -> bool {
        std::mem::take(&mut self.snapshot_wanted)
    }

    /// Over a transport that loses frames within a session (the simulation's), resends from
    /// the last ack when nothing moved for the retransmit time. QUIC streams lose nothing
    /// within a connection, so the QUIC driver does not call it: a lost connection is a new
    /// session, which resumes from the peer's Hello.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.outbound.on_tick(now_ms);
    }
}

/// [`Session::check_peer_marks`] without the session: whether a peer with marks `theirs` lacks
/// a sequence we (`ours`) hold only in our state table.
pub fn lacks_snapshot_only(
    r: &impl LogRead,
    ours: &[(NodeId, Mark)],
    theirs: &[(NodeId, Mark)],
) -> Result<bool, StoreError> {
    let none = Mark::default();
    for (origin, mine) in ours {
        let their = theirs
            .iter()
            .find(|(o, _)| o == origin)
            .map_or(&none, |(_, m)| m);
        if lacks_unsendable(r, *origin, mine, their)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `theirs` lacks a sequence of `origin` that `mine` holds and whose record `r`'s log
/// does not have. Looks up at most [`HELLO_LACKS_CHECK_MAX`] lacking sequences, lowest first.
fn lacks_unsendable(
    r: &impl LogRead,
    origin: NodeId,
    mine: &Mark,
    theirs: &Mark,
) -> Result<bool, StoreError> {
    let mut checked = 0;
    let mut lacking = mine.not_in(theirs);
    while checked < HELLO_LACKS_CHECK_MAX {
        let Some(s) = lacking.next() else {
            return Ok(false);
        };
        checked += 1;
        // The first record of the origin at or after `s`: it must be `s` itself.
        let found = r.origin_range(origin, s - 1, 1)?;
        if found.first().is_none_or(|rec| rec.oseq != s) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// How many sequences of `(after, upto]` the mark holds.
fn held_in(m: &Mark, after: u64, upto: u64) -> u64 {
    if after >= upto {
        return 0;
    }
    let below = m.contiguous.min(upto).saturating_sub(after);
    let above = m
        .above
        .range((
            std::ops::Bound::Excluded(after.max(m.contiguous)),
            std::ops::Bound::Included(upto),
        ))
        .count() as u64;
    below + above
}

/// After a restore from a backup: which peers have not yet confirmed that we hold all of our
/// own log they hold. Until none is left, the node takes no new events (it could otherwise
/// number a new event like one it issued before the backup).
#[derive(Clone, Debug)]
pub struct RestoreProgress<K: Ord> {
    pending: Option<BTreeSet<K>>,
}

impl<K: Ord> RestoreProgress<K> {
    pub fn new(restored: bool, peers: impl IntoIterator<Item = K>) -> Self {
        let set: BTreeSet<K> = peers.into_iter().collect();
        // With no peers there is nothing to recover from.
        RestoreProgress {
            pending: (restored && !set.is_empty()).then_some(set),
        }
    }

    /// Whether ingest must still wait; with how many peers left.
    pub fn waiting(&self) -> Option<usize> {
        self.pending.as_ref().map(|p| p.len())
    }

    /// Peer `k` has no more of our log (or is gone for good). Returns true when that was the
    /// last one: the driver then clears the durable restored mark and calls [`Self::finish`].
    pub fn peer_done(&mut self, k: &K) -> bool {
        match self.pending.as_mut() {
            Some(set) => {
                set.remove(k);
                set.is_empty()
            }
            None => false,
        }
    }

    pub fn finish(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests;
