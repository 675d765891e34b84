//! The datacenter's replication rules, sans I/O: ingest (process once, log, record), apply
//! (merge without processing, count the sender, relay by appending to the local log), acks and
//! the receive cursor. Everything runs inside one write transaction given as [`Tables`]; the
//! caller commits and only then acknowledges or sends. The caller passes `now_ms` in.
//!
//! Relay needs no code of its own: a first copy is appended to the local log, and every peer's
//! sender streams the local log to that peer, leaving out records whose origin is that peer.

use serde_json::Value;

use super::tables::{Entry, LogRead, Mark, MsgKey, MsgRecord, PeerProgress, StoreError, Tables};
use crate::ids::{MsgId, NodeId};
use crate::limits::ELEMENT_BYTES_MAX;
use crate::limits::{CATCH_UP_BATCH_MAX, SNAPSHOT_ROWS_MAX};
use crate::model::events::{self, ElementError};
use crate::model::{to_canonical, ElementRecord, Event, EventError, EventType, Hlc, Version};
use crate::wire::{CatchUpBatch, CatchUpRequest, Elements, Hello, SnapshotChunk, SnapshotEntry};

/// Why an event was not ingested.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node must first recover its own log from its peers (after a restore).
    #[error("not accepting events yet: {0}")]
    NotReady(String),
}

/// Why a frame of elements from a peer was refused. The connection that carried it is closed;
/// nothing of the frame is stored.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid element from peer: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ElementError> for ApplyError {
    fn from(e: ElementError) -> Self {
        ApplyError::Invalid(e.to_string())
    }
}

/// The answer to an ingested event.
#[derive(Clone, Debug)]
pub struct Ingested {
    pub msg_id: MsgId,
    /// Where the message's record is: this node's origin sequence for it.
    pub oseq: u64,
    pub version: Version,
    /// The element as logged: canonical JSON.
    pub element: Vec<u8>,
    pub lseq: u64,
}

/// What applying one remote record did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// First copy: merged, logged (so relayed), counted.
    First,
    /// A later copy from a peer not counted before: the count rose by one.
    Counted,
    /// A copy from a peer already counted, or of our own message: nothing changed.
    Duplicate,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Acknowledge the sender's log up to here.
    pub ack: u64,
    pub first: u32,
    pub counted: u32,
    pub duplicate: u32,
}

/// One datacenter's replication state machine. Holds only a cache of the clock; everything
/// else is read from and written to [`Tables`].
#[derive(Clone, Debug)]
pub struct Core {
    pub(super) node_id: NodeId,
    pub(super) name: String,
    hlc: Hlc,
}

impl Core {
    pub fn open(node_id: NodeId, name: &str, t: &impl Tables) -> Result<Core, StoreError> {
        Ok(Core {
            node_id,
            name: name.to_string(),
            hlc: Hlc::new(node_id, t.hlc()?),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Reloads cached state after a failed commit, so nothing uncommitted is believed.
    pub fn reload(&mut self, t: &impl Tables) -> Result<(), StoreError> {
        let (ms, l) = t.hlc()?;
        // The clock may stay ahead: versions it issued were never committed, so never reused.
        let cur = self.hlc.state();
        self.hlc = Hlc::new(self.node_id, cur.max((ms, l)));
        Ok(())
    }

    /// Processes an event here, once: the element is computed, stored, logged (so every peer
    /// will be sent it) and recorded under its message id with a count of 0.
    pub fn ingest(
        &mut self,
        t: &mut impl Tables,
        now_ms: u64,
        ev: &Event,
    ) -> Result<Ingested, IngestError> {
        let current = t.entry(&ev.account, ev.etype)?;
        let floor = current.as_ref().map_or(Version::ZERO, |e| e.version);
        // Only map elements build on the current one; single values are replaced whole.
        let cur_el = current
            .as_ref()
            .filter(|_| ev.etype.is_map())
            .map(|e| parse_stored(&e.element))
            .transpose()?;
        // Compute and check before writing anything, so a refused event leaves no trace.
        let mut hlc = self.hlc.clone();
        let version = hlc.issue(now_ms, floor);
        let element = events::process(ev, cur_el.as_ref(), version, now_ms);
        let bytes = to_canonical(&element);
        if bytes.len() > ELEMENT_BYTES_MAX {
            return Err(EventError::new(
                "data",
                format!(
                    "the account's {} element would be {} bytes, at most {ELEMENT_BYTES_MAX} allowed",
                    ev.etype,
                    bytes.len()
                ),
            )
            .into());
        }
        let mut own = t.mark(self.node_id)?;
        // A peer's snapshot can raise our own mark; at u64::MAX we refuse rather than wrap.
        let oseq = own.highest().checked_add(1).ok_or_else(|| {
            StoreError::Corrupt("this node's origin sequence is exhausted (u64::MAX)".into())
        })?;
        let rec = ElementRecord {
            origin: self.node_id,
            oseq,
            account: ev.account.clone(),
            etype: ev.etype,
            version,
            msg_id: MsgId::default(),
            element: bytes,
        };
        let rec = ElementRecord {
            msg_id: rec.expected_id(),
            ..rec
        };
        let entry = Entry::of(&rec);
        t.put_entry(&ev.account, ev.etype, &entry)?;
        let lseq = t.log_tail()? + 1;
        t.append_log(lseq, &rec)?;
        let element = entry.element;
        t.put_message(&MsgRecord {
            msg_id: rec.msg_id,
            origin: self.node_id,
            oseq,
            lseq,
            first_seen_ms: now_ms,
            senders: Vec::new(),
        })?;
        own.insert(oseq);
        t.put_mark(self.node_id, &own)?;
        t.set_hlc(hlc.state())?;
        self.hlc = hlc;
        Ok(Ingested {
            msg_id: rec.msg_id,
            oseq,
            version,
            element,
            lseq,
        })
    }

    /// Checks a remote record without touching storage: the id matches the contents, and the
    /// account and element are well formed.
    pub fn check_record(rec: &ElementRecord) -> Result<Value, ApplyError> {
        if rec.oseq == 0 {
            return Err(ApplyError::Invalid("origin sequence 0".into()));
        }
        events::validate_account(&rec.account).map_err(|e| ApplyError::Invalid(e.to_string()))?;
        if rec.msg_id != rec.expected_id() {
            return Err(ApplyError::Invalid(format!(
                "message id {} does not match its contents",
                rec.msg_id
            )));
        }
        check_element_bytes(rec.etype, &rec.element)
    }

    /// Applies one remote record that came from peer `from` and passed [`Core::check_record`].
    /// Never runs a processor.
    pub fn apply(
        &mut self,
        t: &mut impl Tables,
        now_ms: u64,
        from: NodeId,
        rec: &ElementRecord,
        el: &Value,
    ) -> Result<Applied, StoreError> {
        if let Some(mut m) = t.message(MsgKey::of(rec), &rec.msg_id)? {
            // At the origin the count stays 0; elsewhere each distinct sender counts once.
            if rec.origin == self.node_id || from == self.node_id || m.senders.contains(&from) {
                return Ok(Applied::Duplicate);
            }
            m.senders.push(from);
            t.put_message(&m)?;
            return Ok(Applied::Counted);
        }
        // No record: a first copy. (Even if the origin's mark covers this sequence: the record
        // may have been trimmed, or a node restored from a backup may have numbered another
        // message the same. Merging is idempotent, so applying again is always safe; skipping
        // could lose a message.)
        let mut mark = t.mark(rec.origin)?;
        self.hlc.observe(now_ms, rec.version);
        merge_entry(t, &rec.account, rec.etype, &Entry::of(rec), el)?;
        let lseq = t.log_tail()? + 1;
        t.append_log(lseq, rec)?;
        let senders = if rec.origin == self.node_id {
            Vec::new()
        } else {
            vec![from]
        };
        t.put_message(&MsgRecord {
            msg_id: rec.msg_id,
            origin: rec.origin,
            oseq: rec.oseq,
            lseq,
            first_seen_ms: now_ms,
            senders,
        })?;
        mark.insert(rec.oseq);
        t.put_mark(rec.origin, &mark)?;
        t.set_hlc(self.hlc.state())?;
        Ok(Applied::First)
    }

    /// Checks every record of a frame from `from` before anything is stored.
    pub fn check_elements(frame: &Elements) -> Result<Vec<Value>, ApplyError> {
        if frame.upto < frame.after {
            return Err(ApplyError::Invalid(format!(
                "range ({}, {}] runs backwards",
                frame.after, frame.upto
            )));
        }
        let mut prev = frame.after;
        let mut els = Vec::with_capacity(frame.items.len());
        for (lseq, rec) in &frame.items {
            if *lseq <= prev || *lseq > frame.upto {
                return Err(ApplyError::Invalid(format!(
                    "log sequence {lseq} out of order in ({}, {}]",
                    frame.after, frame.upto
                )));
            }
            prev = *lseq;
            els.push(Self::check_record(rec)?);
        }
        Ok(els)
    }

    /// Applies a frame of the peer's log that passed [`Core::check_elements`], advancing the
    /// durable receive cursor. A frame that does not start within what we hold is a gap (an
    /// earlier frame was lost): nothing is applied and the answer repeats our cursor.
    pub fn receive(
        &mut self,
        t: &mut impl Tables,
        now_ms: u64,
        from: NodeId,
        frame: &Elements,
        els: &[Value],
    ) -> Result<Received, StoreError> {
        let mut p = t.peer(from)?;
        if p.recv_epoch != frame.epoch {
            p.recv_epoch = frame.epoch;
            p.received = 0;
        }
        let mut out = Received {
            ack: p.received,
            ..Default::default()
        };
        if frame.after > p.received {
            // A gap (an earlier frame was not applied): nothing applied, and the answer
            // repeats our cursor.
            return Ok(out);
        }
        for ((lseq, rec), el) in frame.items.iter().zip(els) {
            if *lseq <= p.received {
                continue;
            }
            match self.apply(t, now_ms, from, rec, el)? {
                Applied::First => out.first += 1,
                Applied::Counted => out.counted += 1,
                Applied::Duplicate => out.duplicate += 1,
            }
        }
        if frame.upto > p.received {
            p.received = frame.upto;
            t.put_peer(from, &p)?;
        }
        out.ack = p.received;
        Ok(out)
    }

    /// Checks a snapshot chunk from a peer before anything is stored.
    pub fn check_snapshot(chunk: &SnapshotChunk) -> Result<Vec<Value>, ApplyError> {
        chunk
            .entries
            .iter()
            .map(|e| {
                events::validate_account(&e.account)
                    .map_err(|err| ApplyError::Invalid(err.to_string()))?;
                check_element_bytes(e.etype, &e.element)
            })
            .collect()
    }

    /// Takes a snapshot chunk (the peer's state table, for a node behind the peer's log
    /// retention). Chunks before the last are staged, not merged ([`Tables::stage_snapshot`]);
    /// the last merges every staged entry and its own like elements (not logged, so not
    /// relayed, and without message records), raises our marks to what the snapshot reflects
    /// and moves our cursor into the peer's log to where its log continues. A snapshot is thus
    /// merged whole or not at all: a connection lost in the middle leaves no part of the
    /// peer's state here that our marks do not account for (such a part could never be sent
    /// on, nor found missing by anyone's marks, if the peer was then restored from a backup).
    pub fn apply_snapshot(
        &mut self,
        t: &mut impl Tables,
        now_ms: u64,
        from: NodeId,
        chunk: &SnapshotChunk,
        els: &[Value],
    ) -> Result<Received, StoreError> {
        let mut p = t.peer(from)?;
        if p.recv_epoch != chunk.epoch {
            p.recv_epoch = chunk.epoch;
            p.received = 0;
        }
        let Some(end) = &chunk.end else {
            t.stage_snapshot(from, chunk.epoch, &chunk.entries)?;
            t.put_peer(from, &p)?;
            return Ok(Received {
                ack: p.received,
                ..Default::default()
            });
        };
        let mut merged = 0u32;
        loop {
            let staged = t.take_staged(from, chunk.epoch, SNAPSHOT_ROWS_MAX)?;
            if staged.is_empty() {
                break;
            }
            for e in &staged {
                let el = parse_stored(&e.element)?;
                self.merge_snapshot_entry(t, now_ms, e, &el)?;
            }
            merged += staged.len() as u32;
        }
        for (e, el) in chunk.entries.iter().zip(els) {
            self.merge_snapshot_entry(t, now_ms, e, el)?;
        }
        merged += chunk.entries.len() as u32;
        for m in &end.marks {
            let mut mine = t.mark(m.origin)?;
            mine.join(&Mark::from_wire(m));
            t.put_mark(m.origin, &mine)?;
        }
        p.received = p.received.max(end.resume_after);
        t.put_peer(from, &p)?;
        t.set_hlc(self.hlc.state())?;
        Ok(Received {
            ack: p.received,
            first: merged,
            ..Default::default()
        })
    }

    fn merge_snapshot_entry(
        &mut self,
        t: &mut impl Tables,
        now_ms: u64,
        e: &SnapshotEntry,
        el: &Value,
    ) -> Result<(), StoreError> {
        self.hlc.observe(now_ms, e.version);
        merge_entry(
            t,
            &e.account,
            e.etype,
            &Entry {
                version: e.version,
                origin: e.origin,
                // Snapshots carry no message records: the entry's message is not found
                // here (its count shows 0), as before the layout keyed them by sequence.
                oseq: 0,
                msg_id: e.msg_id,
                element: e.element.clone(),
            },
            el,
        )
    }

    /// The peer (in its incarnation `peer_epoch`) has durably applied our log up to `upto`.
    pub fn acked(
        &mut self,
        t: &mut impl Tables,
        from: NodeId,
        epoch: u64,
        upto: u64,
        peer_epoch: u64,
    ) -> Result<(), StoreError> {
        if epoch != t.log_epoch()? {
            return Ok(());
        }
        let mut p = t.peer(from)?;
        if upto > p.acked_in(epoch, peer_epoch) {
            p.acked = upto.min(t.log_tail()?);
            p.acked_epoch = epoch;
            p.acked_peer_epoch = peer_epoch;
            t.put_peer(from, &p)?;
        }
        Ok(())
    }
}

/// Whether a record of our local log goes to `peer`. Everything goes to everyone except a
/// record the peer originated *and gave us itself*: it provably holds that one. A record of the
/// peer's that reached us only through others goes back to it, so that a peer restored from a
/// backup gets back what it lost, even when we learn of it after the peer's restore.
pub fn goes_to(peer: NodeId, rec: &ElementRecord, senders: Option<&[NodeId]>) -> bool {
    rec.origin != peer || !senders.is_some_and(|s| s.contains(&peer))
}

/// Where a sender resumes with a peer: the later of what it stored as acknowledged (if both
/// sides are still the incarnations that acknowledged it) and what the peer says in its Hello
/// it durably received of our log.
pub fn resume_point(stored: &PeerProgress, epoch: u64, hello: &Hello, tail: u64) -> u64 {
    let said = hello
        .resume
        .filter(|(e, _)| *e == epoch)
        .map_or(0, |(_, l)| l);
    stored.acked_in(epoch, hello.log_epoch).max(said).min(tail)
}

impl Core {
    /// After a peer's Hello: if the peer holds any sequence of *our own* log that we do not (we
    /// were restored from a backup), ask for the rest, from our contiguous mark on. Not only a
    /// higher one: relays of our own records can reach a restored node before this Hello, so
    /// its highest may already match the peer's while holes below it are records only the
    /// peer still holds.
    pub fn own_log_request(&self, own: &Mark, hello: &Hello) -> Option<CatchUpRequest> {
        Self::own_log_request_for(self.node_id, own, hello)
    }

    /// [`Core::own_log_request`] for node `me`, for drivers that hold no `Core`.
    pub fn own_log_request_for(me: NodeId, own: &Mark, hello: &Hello) -> Option<CatchUpRequest> {
        let theirs = Mark::from_wire(hello.marks.iter().find(|m| m.origin == me)?);
        let lacks = theirs.not_in(own).next().is_some();
        lacks.then_some(CatchUpRequest {
            origin: me,
            after_oseq: own.contiguous,
            max: CATCH_UP_BATCH_MAX,
        })
    }

    /// Answers a catch-up request from our copy of the origin's log.
    pub fn answer_catch_up(
        r: &impl LogRead,
        req: &CatchUpRequest,
    ) -> Result<CatchUpBatch, StoreError> {
        let max = req.max.clamp(1, CATCH_UP_BATCH_MAX);
        let items = r.origin_range(req.origin, req.after_oseq, max as usize)?;
        Ok(CatchUpBatch {
            origin: req.origin,
            done: items.len() < max as usize,
            items,
        })
    }

    /// Checks a catch-up batch before anything is stored: every record valid and of the
    /// batch's origin.
    pub fn check_catch_up(batch: &CatchUpBatch) -> Result<Vec<Value>, ApplyError> {
        if batch.items.len() > CATCH_UP_BATCH_MAX as usize {
            return Err(ApplyError::Invalid(format!(
                "catch-up batch of {} records, at most {CATCH_UP_BATCH_MAX}",
                batch.items.len()
            )));
        }
        batch
            .items
            .iter()
            .map(|rec| {
                if rec.origin != batch.origin {
                    return Err(ApplyError::Invalid(
                        "catch-up record of another origin".into(),
                    ));
                }
                Self::check_record(rec)
            })
            .collect()
    }

    /// Applies a catch-up batch from `from` like copies from that peer (our own records count
    /// nothing). Returns the request for the next batch, if the peer has more.
    pub fn apply_catch_up(
        &mut self,
        t: &mut impl Tables,
        now_ms: u64,
        from: NodeId,
        batch: &CatchUpBatch,
        els: &[Value],
    ) -> Result<Option<CatchUpRequest>, StoreError> {
        for (rec, el) in batch.items.iter().zip(els) {
            self.apply(t, now_ms, from, rec, el)?;
        }
        let last = batch.items.last().map(|r| r.oseq);
        Ok(match (batch.done, last) {
            (false, Some(after_oseq)) => Some(CatchUpRequest {
                origin: batch.origin,
                after_oseq,
                max: CATCH_UP_BATCH_MAX,
            }),
            _ => None,
        })
    }
}

/// An element from the network: at most [`ELEMENT_BYTES_MAX`], canonical JSON, the shape of
/// its type.
fn check_element_bytes(etype: EventType, bytes: &[u8]) -> Result<Value, ApplyError> {
    if bytes.len() > ELEMENT_BYTES_MAX {
        return Err(ApplyError::Invalid(format!(
            "element of {} bytes, at most {ELEMENT_BYTES_MAX}",
            bytes.len()
        )));
    }
    let el: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApplyError::Invalid(format!("element is not JSON: {e}")))?;
    if to_canonical(&el) != bytes {
        return Err(ApplyError::Invalid("element is not canonical JSON".into()));
    }
    events::check_element(etype, &el)?;
    Ok(el)
}

/// Merges `inc` (whose parsed element is `el`) into the stored entry of (account, type). The
/// entry's version, origin and message id follow the newest version merged.
fn merge_entry(
    t: &mut impl Tables,
    account: &str,
    etype: EventType,
    inc: &Entry,
    el: &Value,
) -> Result<(), StoreError> {
    let entry = match t.entry(account, etype)? {
        None => inc.clone(),
        // Single values: the newer version wins whole, no JSON work needed.
        Some(cur) if !etype.is_map() => {
            if inc.version > cur.version {
                inc.clone()
            } else {
                return Ok(());
            }
        }
        Some(cur) => {
            let cur_el = parse_stored(&cur.element)?;
            let merged = events::merge(etype, Some((&cur_el, cur.version)), el, inc.version);
            let newer = inc.version > cur.version;
            Entry {
                version: cur.version.max(inc.version),
                origin: if newer { inc.origin } else { cur.origin },
                oseq: if newer { inc.oseq } else { cur.oseq },
                msg_id: if newer { inc.msg_id } else { cur.msg_id },
                element: to_canonical(&merged),
            }
        }
    };
    t.put_entry(account, etype, &entry)
}

/// Merges a record of the local log into the state table again: recovery of what the state
/// table had not yet been given when the process stopped (see `store::overlay`). Merging is
/// idempotent and the record's element is the element as applied (processed once, at its
/// origin, which stored exactly it), so replaying a record the table already reflects changes
/// nothing.
pub fn replay_record(t: &mut impl Tables, rec: &ElementRecord) -> Result<(), StoreError> {
    let el = parse_stored(&rec.element)?;
    merge_entry(t, &rec.account, rec.etype, &Entry::of(rec), &el)
}

fn parse_stored(bytes: &[u8]) -> Result<Value, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("stored element is not JSON: {e}")))
}

/// blake3 over the state table in key order: what every datacenter compares. Fed one entry at
/// a time, so a large table is never held in memory to hash it.
#[derive(Default)]
pub struct Digester {
    h: blake3::Hasher,
    n: u64,
}

impl Digester {
    pub fn push(&mut self, account: &str, etype: EventType, e: &Entry) {
        self.n += 1;
        self.h.update(&(account.len() as u64).to_be_bytes());
        self.h.update(account.as_bytes());
        self.h.update(&[etype.code()]);
        self.h.update(e.version.to_string().as_bytes());
        self.h.update(&(e.element.len() as u64).to_be_bytes());
        self.h.update(&e.element);
    }

    /// The digest as 64 hex characters, and the number of entries.
    pub fn finish(&self) -> (String, u64) {
        (self.h.finalize().to_hex().to_string(), self.n)
    }
}

pub fn digest<'a>(entries: impl Iterator<Item = (&'a str, EventType, &'a Entry)>) -> (String, u64) {
    let mut d = Digester::default();
    for (a, t, e) in entries {
        d.push(a, t, e);
    }
    d.finish()
}
