//! What the replication core needs from storage, as two traits: [`Tables`] inside one write
//! transaction, [`LogRead`] inside one read transaction. `store::redb` implements them over
//! redb; [`super::mem::MemStore`] implements them over ordered maps for the simulation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{MsgId, NodeId};
use crate::limits::MARK_ABOVE_MAX;
use crate::model::{ElementRecord, EventType, Version};
use crate::wire::{OriginMark, SnapshotEntry};

/// A storage failure. `Full` is the disk saying no: callers answer 503 and retry later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage is full: {0}")]
    Full(String),
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// One row of the state table: the merged element of (account, type) and which message last
/// set its version (its id, and where its record is: origin and origin sequence).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub version: Version,
    pub origin: NodeId,
    pub oseq: u64,
    pub msg_id: MsgId,
    pub element: Vec<u8>,
}

impl Entry {
    /// The entry a logged record sets (before any merge with what the table holds).
    pub fn of(rec: &ElementRecord) -> Entry {
        Entry {
            version: rec.version,
            origin: rec.origin,
            oseq: rec.oseq,
            msg_id: rec.msg_id,
            element: rec.element.clone(),
        }
    }

    /// Where the record of the message that set this entry is kept.
    pub fn msg_key(&self) -> MsgKey {
        MsgKey::new(self.origin, self.oseq, &self.msg_id)
    }
}

/// The key of a message record: (origin, origin sequence, the id's first 8 bytes). Ordered by
/// origin then sequence, so a node writes its message records at the end of each origin's range
/// (sequentially), never at a random place as a key by id would. The id prefix tells apart two
/// messages an origin numbered the same (a node restored from an old backup can do that).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgKey {
    pub origin: NodeId,
    pub oseq: u64,
    pub id_prefix: u64,
}

impl MsgKey {
    pub fn new(origin: NodeId, oseq: u64, id: &MsgId) -> MsgKey {
        MsgKey {
            origin,
            oseq,
            id_prefix: id_prefix(id),
        }
    }

    pub fn of(rec: &ElementRecord) -> MsgKey {
        MsgKey::new(rec.origin, rec.oseq, &rec.msg_id)
    }
}

/// The first 8 bytes of a message id, big-endian: the last component of [`MsgKey`].
pub fn id_prefix(id: &MsgId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("32-byte id"))
}

/// What a node remembers of one message, found by its [`MsgKey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgRecord {
    pub msg_id: MsgId,
    pub origin: NodeId,
    pub oseq: u64,
    /// Where its record is in the local log.
    pub lseq: u64,
    pub first_seen_ms: u64,
    /// Distinct peers a copy came from; its length is the message count (empty at the origin).
    pub senders: Vec<NodeId>,
}

impl MsgRecord {
    pub fn key(&self) -> MsgKey {
        MsgKey::new(self.origin, self.oseq, &self.msg_id)
    }
}

/// Durable progress with one peer, in both directions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProgress {
    /// The peer has durably applied our log up to here, in our log epoch `acked_epoch`, while
    /// its own log epoch (its incarnation) was `acked_peer_epoch`.
    pub acked: u64,
    pub acked_epoch: u64,
    pub acked_peer_epoch: u64,
    /// The epoch of the peer's log that `received` refers to.
    pub recv_epoch: u64,
    /// We have durably applied the peer's log up to here.
    pub received: u64,
}

impl PeerProgress {
    /// How far the peer, now in incarnation `peer_epoch`, acknowledged our log in `epoch`: 0
    /// if either side changed incarnation since (a restored database numbers its log anew, and
    /// a restored peer no longer holds what it acknowledged).
    pub fn acked_in(&self, epoch: u64, peer_epoch: u64) -> u64 {
        if self.acked_epoch == epoch && self.acked_peer_epoch == peer_epoch {
            self.acked
        } else {
            0
        }
    }
}

/// What a node holds of one origin's log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub contiguous: u64,
    pub above: BTreeSet<u64>,
}

impl Mark {
    pub fn contains(&self, oseq: u64) -> bool {
        oseq <= self.contiguous || self.above.contains(&oseq)
    }

    pub fn highest(&self) -> u64 {
        self.above.last().copied().unwrap_or(0).max(self.contiguous)
    }

    pub fn insert(&mut self, oseq: u64) {
        if self.contains(oseq) {
            return;
        }
        if Some(oseq) == self.contiguous.checked_add(1) {
            self.contiguous = oseq;
            self.absorb_above();
        } else {
            self.above.insert(oseq);
            while self.above.len() > MARK_ABOVE_MAX {
                self.above.pop_last();
            }
        }
    }

    /// Moves sequences that now follow the contiguous mark into it. Stops at `u64::MAX` (a
    /// hostile peer may claim it) instead of overflowing.
    fn absorb_above(&mut self) {
        while let Some(next) = self.contiguous.checked_add(1) {
            if !self.above.remove(&next) {
                break;
            }
            self.contiguous = next;
        }
    }

    /// The sequences this mark holds and `other` does not, ascending. What `other` holds is
    /// skipped without enumerating it: its contiguous part at once, its `above` set (bounded)
    /// one by one.
    pub fn not_in<'a>(&'a self, other: &'a Mark) -> impl Iterator<Item = u64> + 'a {
        let low = (other.contiguous.saturating_add(1)..=self.contiguous)
            .filter(|s| !other.above.contains(s));
        let high = self
            .above
            .iter()
            .copied()
            .filter(|s| *s > self.contiguous && !other.contains(*s));
        low.chain(high)
    }

    /// Raises this mark to include everything `other` holds.
    pub fn join(&mut self, other: &Mark) {
        if other.contiguous > self.contiguous {
            self.contiguous = other.contiguous;
            let c = self.contiguous;
            self.above.retain(|&s| s > c);
            self.absorb_above();
        }
        for &s in &other.above {
            self.insert(s);
        }
    }

    pub fn to_wire(&self, origin: NodeId) -> OriginMark {
        OriginMark {
            origin,
            contiguous: self.contiguous,
            above: self.above.iter().copied().collect(),
        }
    }

    pub fn from_wire(m: &OriginMark) -> Mark {
        let mut mark = Mark {
            contiguous: m.contiguous,
            above: BTreeSet::new(),
        };
        for &s in m.above.iter().take(MARK_ABOVE_MAX) {
            mark.insert(s);
        }
        mark
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Reads and writes of one write transaction.
pub trait Tables {
    /// Persisted hybrid logical clock state, `(0, 0)` when new.
    fn hlc(&self) -> Result<(u64, u32)>;
    fn set_hlc(&mut self, state: (u64, u32)) -> Result<()>;
    /// Incarnation of the local log; set once when the database is created.
    fn log_epoch(&self) -> Result<u64>;

    fn entry(&self, account: &str, etype: EventType) -> Result<Option<Entry>>;
    fn put_entry(&mut self, account: &str, etype: EventType, entry: &Entry) -> Result<()>;

    /// The record of message `key`, if its full id is `id` (another message numbered the same
    /// by its origin shares the row only by accident of a prefix collision: `None` then).
    fn message(&self, key: MsgKey, id: &MsgId) -> Result<Option<MsgRecord>>;
    fn put_message(&mut self, rec: &MsgRecord) -> Result<()>;

    fn mark(&self, origin: NodeId) -> Result<Mark>;
    fn put_mark(&mut self, origin: NodeId, mark: &Mark) -> Result<()>;
    fn marks(&self) -> Result<Vec<(NodeId, Mark)>>;

    /// Highest local log sequence ever appended (0 when empty). Never goes down, even when
    /// retention trims the log.
    fn log_tail(&self) -> Result<u64>;
    /// Appends at `lseq` (always `log_tail() + 1`). The message record written with it (by
    /// [`Tables::put_message`]) is what finds it by origin.
    fn append_log(&mut self, lseq: u64, rec: &ElementRecord) -> Result<()>;

    fn peer(&self, peer: NodeId) -> Result<PeerProgress>;
    fn put_peer(&mut self, peer: NodeId, p: &PeerProgress) -> Result<()>;

    /// Holds back the entries of a snapshot chunk from `from` (of its log incarnation `epoch`)
    /// until the snapshot's end, like Raft's install-snapshot file: a snapshot is merged whole
    /// or not at all, so a node never holds part of a peer's state without the marks that say
    /// so. Entries staged for another epoch of `from` (the peer was restored meanwhile) are
    /// dropped first.
    fn stage_snapshot(&mut self, from: NodeId, epoch: u64, entries: &[SnapshotEntry])
        -> Result<()>;
    /// Removes and returns up to `max` staged entries of `from`'s snapshot in `epoch`, in the
    /// order staged; staged entries of another epoch are removed and not returned.
    fn take_staged(&mut self, from: NodeId, epoch: u64, max: usize) -> Result<Vec<SnapshotEntry>>;
}

/// Reads of one read transaction, for senders and catch-up.
pub trait LogRead {
    fn log_epoch(&self) -> Result<u64>;
    fn log_tail(&self) -> Result<u64>;
    /// Lowest local log sequence still retained, if any.
    fn log_first(&self) -> Result<Option<u64>>;
    /// Up to `max` records with `lseq > after`, in order.
    fn log_range(&self, after: u64, max: usize) -> Result<Vec<(u64, ElementRecord)>>;
    /// Up to `max` records of `origin` with `oseq > after_oseq`, in oseq order.
    fn origin_range(
        &self,
        origin: NodeId,
        after_oseq: u64,
        max: usize,
    ) -> Result<Vec<ElementRecord>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounded memory and no overflow: a mark at or near `u64::MAX` (a hostile peer can claim
    /// one in its Hello) neither wraps nor panics, and still answers `contains` correctly.
    #[test]
    fn mark_at_u64_max_neither_wraps_nor_panics() {
        let mut m = Mark::default();
        m.insert(u64::MAX);
        m.insert(u64::MAX - 1);
        assert!(m.contains(u64::MAX) && m.contains(u64::MAX - 1) && !m.contains(1));
        assert_eq!(m.highest(), u64::MAX);

        let mut full = Mark {
            contiguous: u64::MAX - 1,
            above: BTreeSet::new(),
        };
        full.insert(u64::MAX);
        assert_eq!(full.contiguous, u64::MAX);
        assert!(full.above.is_empty());
        full.insert(7);
        assert_eq!(full.contiguous, u64::MAX, "everything is already held");

        let mut joined = Mark::default();
        joined.insert(3);
        joined.join(&Mark::from_wire(&full.to_wire(NodeId(1))));
        assert_eq!(joined.contiguous, u64::MAX);
        assert!(joined.above.is_empty());
    }

    /// The contiguous mark absorbs the sequences above it as the gap closes.
    #[test]
    fn mark_closes_gaps() {
        let mut m = Mark::default();
        for s in [3, 5, 2, 4] {
            m.insert(s);
        }
        assert_eq!((m.contiguous, m.above.len()), (0, 4));
        m.insert(1);
        assert_eq!((m.contiguous, m.above.len()), (5, 0));
    }
}
