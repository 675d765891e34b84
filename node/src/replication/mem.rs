//! An in-memory implementation of the storage traits over ordered maps: the storage model of the
//! simulation. Ordered collections only, so that a seed replays exactly. A transaction
//! ([`MemStore::begin`]) records what it overwrites, so that a commit can be failed on purpose
//! ([`MemStore::abort`]): nothing of it stays, as when redb's commit fails.

use std::collections::BTreeMap;

use super::tables::{Entry, LogRead, Mark, MsgKey, MsgRecord, PeerProgress, Result, Tables};
use crate::ids::{MsgId, NodeId};
use crate::model::{ElementRecord, EventType};
use crate::wire::SnapshotEntry;

#[derive(Clone, Debug, Default)]
pub struct MemStore {
    pub hlc: (u64, u32),
    pub epoch: u64,
    pub entries: BTreeMap<(String, u8), Entry>,
    pub messages: BTreeMap<MsgKey, MsgRecord>,
    pub marks: BTreeMap<NodeId, Mark>,
    pub tail: u64,
    pub log: BTreeMap<u64, ElementRecord>,
    pub peers: BTreeMap<NodeId, PeerProgress>,
    /// Snapshot entries held back until their snapshot's end, per sender: its epoch and the
    /// entries in order.
    pub staged: BTreeMap<NodeId, (u64, Vec<SnapshotEntry>)>,
    /// What the open transaction overwrote, if one is open.
    undo: Option<Box<Undo>>,
}

/// The values a transaction found before writing (None: the key was absent).
#[derive(Clone, Debug, Default)]
struct Undo {
    hlc: Option<(u64, u32)>,
    entries: BTreeMap<(String, u8), Option<Entry>>,
    messages: BTreeMap<MsgKey, Option<MsgRecord>>,
    marks: BTreeMap<NodeId, Option<Mark>>,
    tail: Option<u64>,
    peers: BTreeMap<NodeId, Option<PeerProgress>>,
    staged: BTreeMap<NodeId, Option<(u64, Vec<SnapshotEntry>)>>,
}

impl MemStore {
    pub fn new(epoch: u64) -> Self {
        MemStore {
            epoch,
            ..Default::default()
        }
    }

    /// Opens a write transaction: until [`MemStore::commit`] or [`MemStore::abort`], every write
    /// can be undone.
    pub fn begin(&mut self) {
        assert!(self.undo.is_none(), "one write transaction at a time");
        self.undo = Some(Box::default());
    }

    /// The transaction's writes stay.
    pub fn commit(&mut self) {
        assert!(self.undo.take().is_some(), "commit without a transaction");
    }

    /// The commit failed: everything the transaction wrote is undone.
    pub fn abort(&mut self) {
        let u = self.undo.take().expect("abort without a transaction");
        if let Some(h) = u.hlc {
            self.hlc = h;
        }
        fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, old: BTreeMap<K, Option<V>>) {
            for (k, v) in old {
                match v {
                    Some(v) => map.insert(k, v),
                    None => map.remove(&k),
                };
            }
        }
        restore(&mut self.entries, u.entries);
        restore(&mut self.messages, u.messages);
        restore(&mut self.marks, u.marks);
        restore(&mut self.peers, u.peers);
        restore(&mut self.staged, u.staged);
        if let Some(t) = u.tail {
            self.log.retain(|l, _| *l <= t);
            self.tail = t;
        }
    }

    /// Retention: drops the log records up to `upto`.
    pub fn trim_log(&mut self, upto: u64) {
        self.log.retain(|l, _| *l > upto);
    }

    /// Up to `max` state entries after `after` (exclusive) in key order: snapshot chunks.
    pub fn entries_after(
        &self,
        after: Option<(&str, EventType)>,
        max: usize,
    ) -> Result<Vec<(String, EventType, Entry)>> {
        let lower = match after {
            Some((a, t)) => std::ops::Bound::Excluded((a.to_string(), t.code())),
            None => std::ops::Bound::Unbounded,
        };
        Ok(self
            .entries
            .range((lower, std::ops::Bound::Unbounded))
            .take(max)
            .map(|((a, t), e)| {
                (
                    a.clone(),
                    EventType::from_code(*t).expect("stored type code"),
                    e.clone(),
                )
            })
            .collect())
    }

    /// State entries in key order, for the digest.
    pub fn state(&self) -> impl Iterator<Item = (&str, EventType, &Entry)> {
        self.entries.iter().map(|((a, t), e)| {
            (
                a.as_str(),
                EventType::from_code(*t).expect("stored type code"),
                e,
            )
        })
    }
}

impl Tables for MemStore {
    fn hlc(&self) -> Result<(u64, u32)> {
        Ok(self.hlc)
    }
    fn set_hlc(&mut self, state: (u64, u32)) -> Result<()> {
        if let Some(u) = self.undo.as_mut() {
            u.hlc.get_or_insert(self.hlc);
        }
        self.hlc = state;
        Ok(())
    }
    fn log_epoch(&self) -> Result<u64> {
        Ok(self.epoch)
    }
    fn entry(&self, account: &str, etype: EventType) -> Result<Option<Entry>> {
        Ok(self
            .entries
            .get(&(account.to_string(), etype.code()))
            .cloned())
    }
    fn put_entry(&mut self, account: &str, etype: EventType, entry: &Entry) -> Result<()> {
        let key = (account.to_string(), etype.code());
        if let Some(u) = self.undo.as_mut() {
            let old = self.entries.get(&key).cloned();
            u.entries.entry(key.clone()).or_insert(old);
        }
        self.entries.insert(key, entry.clone());
        Ok(())
    }
    fn message(&self, key: MsgKey, id: &MsgId) -> Result<Option<MsgRecord>> {
        Ok(self.messages.get(&key).filter(|m| m.msg_id == *id).cloned())
    }
    fn put_message(&mut self, rec: &MsgRecord) -> Result<()> {
        if let Some(u) = self.undo.as_mut() {
            let old = self.messages.get(&rec.key()).cloned();
            u.messages.entry(rec.key()).or_insert(old);
        }
        self.messages.insert(rec.key(), rec.clone());
        Ok(())
    }
    fn mark(&self, origin: NodeId) -> Result<Mark> {
        Ok(self.marks.get(&origin).cloned().unwrap_or_default())
    }
    fn put_mark(&mut self, origin: NodeId, mark: &Mark) -> Result<()> {
        if let Some(u) = self.undo.as_mut() {
            let old = self.marks.get(&origin).cloned();
            u.marks.entry(origin).or_insert(old);
        }
        self.marks.insert(origin, mark.clone());
        Ok(())
    }
    fn marks(&self) -> Result<Vec<(NodeId, Mark)>> {
        Ok(self.marks.iter().map(|(o, m)| (*o, m.clone())).collect())
    }
    fn log_tail(&self) -> Result<u64> {
        Ok(self.tail)
    }
    fn append_log(&mut self, lseq: u64, rec: &ElementRecord) -> Result<()> {
        assert_eq!(lseq, self.tail + 1, "log appends are contiguous");
        if let Some(u) = self.undo.as_mut() {
            u.tail.get_or_insert(self.tail);
        }
        self.tail = lseq;
        self.log.insert(lseq, rec.clone());
        Ok(())
    }
    fn peer(&self, peer: NodeId) -> Result<PeerProgress> {
        Ok(self.peers.get(&peer).cloned().unwrap_or_default())
    }
    fn put_peer(&mut self, peer: NodeId, p: &PeerProgress) -> Result<()> {
        if let Some(u) = self.undo.as_mut() {
            let old = self.peers.get(&peer).cloned();
            u.peers.entry(peer).or_insert(old);
        }
        self.peers.insert(peer, p.clone());
        Ok(())
    }

    fn stage_snapshot(
        &mut self,
        from: NodeId,
        epoch: u64,
        entries: &[SnapshotEntry],
    ) -> Result<()> {
        self.touch_staged(from);
        let slot = self.staged.entry(from).or_insert((epoch, Vec::new()));
        if slot.0 != epoch {
            *slot = (epoch, Vec::new());
        }
        slot.1.extend_from_slice(entries);
        Ok(())
    }

    fn take_staged(&mut self, from: NodeId, epoch: u64, max: usize) -> Result<Vec<SnapshotEntry>> {
        if !self.staged.contains_key(&from) {
            return Ok(Vec::new());
        }
        self.touch_staged(from);
        let (e, list) = self.staged.get_mut(&from).expect("checked above");
        let out = if *e == epoch {
            let n = max.min(list.len());
            list.drain(..n).collect()
        } else {
            list.clear();
            Vec::new()
        };
        if list.is_empty() {
            self.staged.remove(&from);
        }
        Ok(out)
    }
}

impl MemStore {
    /// Records `from`'s staged entries before a transaction first changes them.
    fn touch_staged(&mut self, from: NodeId) {
        if let Some(u) = self.undo.as_mut() {
            let old = self.staged.get(&from).cloned();
            u.staged.entry(from).or_insert(old);
        }
    }
}

impl LogRead for MemStore {
    fn log_epoch(&self) -> Result<u64> {
        Ok(self.epoch)
    }
    fn log_tail(&self) -> Result<u64> {
        Ok(self.tail)
    }
    fn log_first(&self) -> Result<Option<u64>> {
        Ok(self.log.keys().next().copied())
    }
    fn log_range(&self, after: u64, max: usize) -> Result<Vec<(u64, ElementRecord)>> {
        Ok(self
            .log
            .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(max)
            .map(|(l, r)| (*l, r.clone()))
            .collect())
    }
    fn origin_range(
        &self,
        origin: NodeId,
        after_oseq: u64,
        max: usize,
    ) -> Result<Vec<ElementRecord>> {
        let Some(from) = after_oseq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let lo = MsgKey {
            origin,
            oseq: from,
            id_prefix: 0,
        };
        let hi = MsgKey {
            origin,
            oseq: u64::MAX,
            id_prefix: u64::MAX,
        };
        Ok(self
            .messages
            .range(lo..=hi)
            .take(max)
            .filter_map(|(_, m)| self.log.get(&m.lseq).cloned())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MsgId;
    use crate::model::Version;

    /// A failed commit leaves nothing of its transaction (the model of redb's atomic commit
    /// that the simulation's failed-commit fault relies on).
    #[test]
    fn aborted_transaction_leaves_nothing() {
        let mut s = MemStore::new(1);
        let entry = |n: u8| Entry {
            version: Version::ZERO,
            origin: NodeId(1),
            oseq: n as u64,
            msg_id: MsgId([n; 32]),
            element: vec![n],
        };
        s.put_entry("a", EventType::Presence, &entry(1)).unwrap();
        s.set_hlc((5, 0)).unwrap();
        let before = format!("{s:?}");
        s.begin();
        s.put_entry("a", EventType::Presence, &entry(2)).unwrap();
        s.put_entry("b", EventType::Presence, &entry(3)).unwrap();
        s.set_hlc((9, 1)).unwrap();
        let mut m = Mark::default();
        m.insert(1);
        s.put_mark(NodeId(2), &m).unwrap();
        s.put_peer(NodeId(2), &PeerProgress::default()).unwrap();
        s.abort();
        assert_eq!(format!("{s:?}"), before);
        s.begin();
        s.put_entry("b", EventType::Presence, &entry(3)).unwrap();
        s.commit();
        assert!(s
            .entries
            .contains_key(&("b".to_string(), EventType::Presence.code())));
    }
}
