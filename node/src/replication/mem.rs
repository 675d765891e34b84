//! An in-memory implementation of the storage traits over ordered maps: the storage model of the
//! simulation. Ordered collections only, so that a seed replays exactly.

use std::collections::BTreeMap;

use super::tables::{Entry, LogRead, Mark, MsgKey, MsgRecord, PeerProgress, Result, Tables};
use crate::ids::{MsgId, NodeId};
use crate::model::{ElementRecord, EventType};

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
}

impl MemStore {
    pub fn new(epoch: u64) -> Self {
        MemStore {
            epoch,
            ..Default::default()
        }
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
        self.entries
            .insert((account.to_string(), etype.code()), entry.clone());
        Ok(())
    }
    fn message(&self, key: MsgKey, id: &MsgId) -> Result<Option<MsgRecord>> {
        Ok(self.messages.get(&key).filter(|m| m.msg_id == *id).cloned())
    }
    fn put_message(&mut self, rec: &MsgRecord) -> Result<()> {
        self.messages.insert(rec.key(), rec.clone());
        Ok(())
    }
    fn mark(&self, origin: NodeId) -> Result<Mark> {
        Ok(self.marks.get(&origin).cloned().unwrap_or_default())
    }
    fn put_mark(&mut self, origin: NodeId, mark: &Mark) -> Result<()> {
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
        self.tail = lseq;
        self.log.insert(lseq, rec.clone());
        Ok(())
    }
    fn peer(&self, peer: NodeId) -> Result<PeerProgress> {
        Ok(self.peers.get(&peer).cloned().unwrap_or_default())
    }
    fn put_peer(&mut self, peer: NodeId, p: &PeerProgress) -> Result<()> {
        self.peers.insert(peer, p.clone());
        Ok(())
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
