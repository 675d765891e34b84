//! What the replication core needs from storage, as two traits: [`Tables`] inside one write
//! transaction, [`LogRead`] inside one read transaction. `store::redb` implements them over
//! redb; [`super::mem::MemStore`] implements them over ordered maps for the simulation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{MsgId, NodeId};
use crate::model::{ElementRecord, EventType, Version};
use crate::wire::OriginMark;

/// Bound on the sequences remembered above an origin's contiguous mark. Above it the highest are
/// forgotten: the mark then under-reports, which costs a retransmission, never correctness.
pub const MARK_ABOVE_MAX: usize = 4096;

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
/// set its version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub version: Version,
    pub origin: NodeId,
    pub msg_id: MsgId,
    pub element: Vec<u8>,
}

/// What a node remembers of one message id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgRecord {
    pub origin: NodeId,
    pub oseq: u64,
    pub first_seen_ms: u64,
    /// Distinct peers a copy came from; its length is the message count (empty at the origin).
    pub senders: Vec<NodeId>,
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
        if oseq == self.contiguous + 1 {
            self.contiguous = oseq;
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        } else {
            self.above.insert(oseq);
            while self.above.len() > MARK_ABOVE_MAX {
                self.above.pop_last();
            }
        }
    }

    /// Raises this mark to include everything `other` holds.
    pub fn join(&mut self, other: &Mark) {
        if other.contiguous > self.contiguous {
            self.contiguous = other.contiguous;
            let c = self.contiguous;
            self.above.retain(|&s| s > c);
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
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

    fn message(&self, id: &MsgId) -> Result<Option<MsgRecord>>;
    fn put_message(&mut self, id: &MsgId, rec: &MsgRecord) -> Result<()>;

    fn mark(&self, origin: NodeId) -> Result<Mark>;
    fn put_mark(&mut self, origin: NodeId, mark: &Mark) -> Result<()>;
    fn marks(&self) -> Result<Vec<(NodeId, Mark)>>;

    /// Highest local log sequence ever appended (0 when empty). Never goes down, even when
    /// retention trims the log.
    fn log_tail(&self) -> Result<u64>;
    /// Appends at `lseq` (always `log_tail() + 1`) and indexes it by (origin, oseq).
    fn append_log(&mut self, lseq: u64, rec: &ElementRecord) -> Result<()>;

    fn peer(&self, peer: NodeId) -> Result<PeerProgress>;
    fn put_peer(&mut self, peer: NodeId, p: &PeerProgress) -> Result<()>;
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
