//! The table definitions, the readers shared by write and read transactions, and
//! [`RedbTables`]: the replication [`Tables`] over one redb write transaction.

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, TableError};
use serde::Serialize;

use super::{db_err, decode, fixed, NodeMeta, Result};
use crate::ids::{MsgId, NodeId};
use crate::model::{ElementRecord, EventType};
use crate::replication::{Entry, LogRead, Mark, MsgRecord, PeerProgress, StoreError, Tables};

pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const STATE: TableDefinition<(&str, u8), &[u8]> = TableDefinition::new("state");
pub(super) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(super) const BY_ORIGIN: TableDefinition<(u128, u64), u64> =
    TableDefinition::new("log_by_origin");
pub(super) const MESSAGES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("messages");
pub(super) const MARKS: TableDefinition<u128, &[u8]> = TableDefinition::new("marks");
pub(super) const PEERS: TableDefinition<u128, &[u8]> = TableDefinition::new("peers");

pub(super) const META_SCHEMA_VERSION: &str = "schema_version";
pub(super) const META_NODE: &str = "node";
pub(super) const META_HLC: &str = "hlc";
pub(super) const META_LOG_TAIL: &str = "log_tail";

pub(super) fn create_all(txn: &redb::WriteTransaction) -> std::result::Result<(), TableError> {
    txn.open_table(META)?;
    txn.open_table(STATE)?;
    txn.open_table(LOG)?;
    txn.open_table(BY_ORIGIN)?;
    txn.open_table(MESSAGES)?;
    txn.open_table(MARKS)?;
    txn.open_table(PEERS)?;
    Ok(())
}

// Readers, generic over the table handle so write and read transactions share them.

pub(super) fn read_hlc(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<(u64, u32)> {
    match meta.get(META_HLC).map_err(db_err)? {
        None => Ok((0, 0)),
        Some(v) => {
            let b = fixed::<12>(v.value())?;
            let ms = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
            let logical = u32::from_le_bytes(b[8..].try_into().expect("4 bytes"));
            Ok((ms, logical))
        }
    }
}

pub(super) fn read_log_tail(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u64> {
    match meta.get(META_LOG_TAIL).map_err(db_err)? {
        None => Ok(0),
        Some(v) => Ok(u64::from_le_bytes(fixed::<8>(v.value())?)),
    }
}

pub(super) fn read_log_epoch(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<u64>> {
    let v = meta.get(META_NODE).map_err(db_err)?;
    Ok(v.map(|v| decode::<NodeMeta>("node meta", v.value()))
        .transpose()?
        .map(|m| m.log_epoch))
}

pub(super) fn epoch_or_err(epoch: Option<u64>) -> Result<u64> {
    epoch.ok_or_else(|| StoreError::Corrupt("node identity (log epoch) not initialized".into()))
}

pub(super) fn get_entry(
    state: &impl ReadableTable<(&'static str, u8), &'static [u8]>,
    account: &str,
    etype: EventType,
) -> Result<Option<Entry>> {
    let v = state.get((account, etype.code())).map_err(db_err)?;
    v.map(|v| decode("state entry", v.value())).transpose()
}

pub(super) fn get_message(
    messages: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    id: &MsgId,
) -> Result<Option<MsgRecord>> {
    let v = messages.get(&id.0).map_err(db_err)?;
    v.map(|v| decode("message record", v.value())).transpose()
}

pub(super) fn get_by_node<T: serde::de::DeserializeOwned + Default>(
    t: &impl ReadableTable<u128, &'static [u8]>,
    what: &str,
    id: NodeId,
) -> Result<T> {
    let v = t.get(id.0).map_err(db_err)?;
    Ok(v.map(|v| decode(what, v.value()))
        .transpose()?
        .unwrap_or_default())
}

pub(super) fn all_by_node<T: serde::de::DeserializeOwned>(
    t: &impl ReadableTable<u128, &'static [u8]>,
    what: &str,
) -> Result<Vec<(NodeId, T)>> {
    let mut out = Vec::new();
    for row in t.iter().map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        out.push((NodeId(k.value()), decode(what, v.value())?));
    }
    Ok(out)
}

pub(super) fn log_first(log: &impl ReadableTable<u64, &'static [u8]>) -> Result<Option<u64>> {
    Ok(log.first().map_err(db_err)?.map(|(k, _)| k.value()))
}

pub(super) fn log_range(
    log: &impl ReadableTable<u64, &'static [u8]>,
    after: u64,
    max: usize,
) -> Result<Vec<(u64, ElementRecord)>> {
    let mut out = Vec::new();
    if max == 0 || after == u64::MAX {
        return Ok(out);
    }
    for row in log.range(after + 1..).map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        out.push((k.value(), decode("log record", v.value())?));
        if out.len() == max {
            break;
        }
    }
    Ok(out)
}

/// Like `MemStore`: the first `max` index rows, then the records still in the log.
pub(super) fn origin_range(
    log: &impl ReadableTable<u64, &'static [u8]>,
    by_origin: &impl ReadableTable<(u128, u64), u64>,
    origin: NodeId,
    after_oseq: u64,
    max: usize,
) -> Result<Vec<ElementRecord>> {
    let mut out = Vec::new();
    if max == 0 || after_oseq == u64::MAX {
        return Ok(out);
    }
    let rows = by_origin
        .range((origin.0, after_oseq + 1)..=(origin.0, u64::MAX))
        .map_err(db_err)?;
    for row in rows.take(max) {
        let (_, lseq) = row.map_err(db_err)?;
        if let Some(v) = log.get(lseq.value()).map_err(db_err)? {
            out.push(decode("log record", v.value())?);
        }
    }
    Ok(out)
}

/// Every table of one write transaction, opened once. Implements [`Tables`] and [`LogRead`]
/// (the latter sees the transaction's own uncommitted writes).
pub struct RedbTables<'txn> {
    meta: Table<'txn, &'static str, &'static [u8]>,
    state: Table<'txn, (&'static str, u8), &'static [u8]>,
    log: Table<'txn, u64, &'static [u8]>,
    by_origin: Table<'txn, (u128, u64), u64>,
    messages: Table<'txn, &'static [u8; 32], &'static [u8]>,
    marks: Table<'txn, u128, &'static [u8]>,
    peers: Table<'txn, u128, &'static [u8]>,
    // Cached at open and written through: this is the transaction's only handle on `meta`.
    epoch: Option<u64>,
    hlc: (u64, u32),
    tail: u64,
    /// Reused encoding buffer, so a put does not allocate.
    buf: Vec<u8>,
}

impl<'txn> RedbTables<'txn> {
    pub(super) fn open(txn: &'txn redb::WriteTransaction) -> Result<Self> {
        let meta = txn.open_table(META).map_err(db_err)?;
        let epoch = read_log_epoch(&meta)?;
        let hlc = read_hlc(&meta)?;
        let tail = read_log_tail(&meta)?;
        Ok(RedbTables {
            meta,
            state: txn.open_table(STATE).map_err(db_err)?,
            log: txn.open_table(LOG).map_err(db_err)?,
            by_origin: txn.open_table(BY_ORIGIN).map_err(db_err)?,
            messages: txn.open_table(MESSAGES).map_err(db_err)?,
            marks: txn.open_table(MARKS).map_err(db_err)?,
            peers: txn.open_table(PEERS).map_err(db_err)?,
            epoch,
            hlc,
            tail,
            buf: Vec::with_capacity(1024),
        })
    }

    /// Encodes `v` into the reused buffer, which the caller takes back with `put_buf`.
    fn encode(&mut self, v: &impl Serialize) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        postcard::to_extend(v, buf).expect("postcard encodes plain structs")
    }

    /// Retention: deletes log records from the head (lowest lseq) while the record's message
    /// was first seen before `cutoff_ms` or more than `keep_max` records are retained, with
    /// their by-origin index row and message record. At most `work_max` records per call.
    /// Returns how many were trimmed. Never lowers the log tail. A record whose message record
    /// is missing has no known age and counts as old.
    pub fn trim_log(&mut self, cutoff_ms: u64, keep_max: u64, work_max: usize) -> Result<u64> {
        let mut retained = self.log.len().map_err(db_err)?;
        let mut trimmed = 0u64;
        while trimmed < work_max as u64 {
            let (lseq, rec) = match self.log.first().map_err(db_err)? {
                None => break,
                Some((k, v)) => (k.value(), decode::<ElementRecord>("log record", v.value())?),
            };
            let first_seen = get_message(&self.messages, &rec.msg_id)?.map(|m| m.first_seen_ms);
            let old = first_seen.is_none_or(|t| t < cutoff_ms);
            if !old && retained <= keep_max {
                break;
            }
            self.log.remove(lseq).map_err(db_err)?;
            let key = (rec.origin.0, rec.oseq);
            let indexed = self.by_origin.get(key).map_err(db_err)?.map(|v| v.value());
            if indexed == Some(lseq) {
                self.by_origin.remove(key).map_err(db_err)?;
            }
            self.messages.remove(&rec.msg_id.0).map_err(db_err)?;
            retained -= 1;
            trimmed += 1;
        }
        debug_assert!(self.tail >= log_first(&self.log)?.unwrap_or(0));
        Ok(trimmed)
    }
}

impl Tables for RedbTables<'_> {
    fn hlc(&self) -> Result<(u64, u32)> {
        Ok(self.hlc)
    }

    fn set_hlc(&mut self, (ms, logical): (u64, u32)) -> Result<()> {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&ms.to_le_bytes());
        b[8..].copy_from_slice(&logical.to_le_bytes());
        self.meta.insert(META_HLC, &b[..]).map_err(db_err)?;
        self.hlc = (ms, logical);
        Ok(())
    }

    fn log_epoch(&self) -> Result<u64> {
        epoch_or_err(self.epoch)
    }

    fn entry(&self, account: &str, etype: EventType) -> Result<Option<Entry>> {
        get_entry(&self.state, account, etype)
    }

    fn put_entry(&mut self, account: &str, etype: EventType, entry: &Entry) -> Result<()> {
        let buf = self.encode(entry);
        let r = self.state.insert((account, etype.code()), buf.as_slice());
        self.buf = buf;
        r.map(drop).map_err(db_err)
    }

    fn message(&self, id: &MsgId) -> Result<Option<MsgRecord>> {
        get_message(&self.messages, id)
    }

    fn put_message(&mut self, id: &MsgId, rec: &MsgRecord) -> Result<()> {
        let buf = self.encode(rec);
        let r = self.messages.insert(&id.0, buf.as_slice());
        self.buf = buf;
        r.map(drop).map_err(db_err)
    }

    fn mark(&self, origin: NodeId) -> Result<Mark> {
        get_by_node(&self.marks, "mark", origin)
    }

    fn put_mark(&mut self, origin: NodeId, mark: &Mark) -> Result<()> {
        let buf = self.encode(mark);
        let r = self.marks.insert(origin.0, buf.as_slice());
        self.buf = buf;
        r.map(drop).map_err(db_err)
    }

    fn marks(&self) -> Result<Vec<(NodeId, Mark)>> {
        all_by_node(&self.marks, "mark")
    }

    fn log_tail(&self) -> Result<u64> {
        Ok(self.tail)
    }

    fn append_log(&mut self, lseq: u64, rec: &ElementRecord) -> Result<()> {
        assert_eq!(lseq, self.tail + 1, "log appends are contiguous");
        let buf = self.encode(rec);
        let r = self.log.insert(lseq, buf.as_slice());
        self.buf = buf;
        r.map_err(db_err)?;
        self.by_origin
            .insert((rec.origin.0, rec.oseq), lseq)
            .map_err(db_err)?;
        self.meta
            .insert(META_LOG_TAIL, &lseq.to_le_bytes()[..])
            .map_err(db_err)?;
        self.tail = lseq;
        Ok(())
    }

    fn peer(&self, peer: NodeId) -> Result<PeerProgress> {
        get_by_node(&self.peers, "peer progress", peer)
    }

    fn put_peer(&mut self, peer: NodeId, p: &PeerProgress) -> Result<()> {
        let buf = self.encode(p);
        let r = self.peers.insert(peer.0, buf.as_slice());
        self.buf = buf;
        r.map(drop).map_err(db_err)
    }
}

impl LogRead for RedbTables<'_> {
    fn log_epoch(&self) -> Result<u64> {
        epoch_or_err(self.epoch)
    }

    fn log_tail(&self) -> Result<u64> {
        Ok(self.tail)
    }

    fn log_first(&self) -> Result<Option<u64>> {
        log_first(&self.log)
    }

    fn log_range(&self, after: u64, max: usize) -> Result<Vec<(u64, ElementRecord)>> {
        log_range(&self.log, after, max)
    }

    fn origin_range(
        &self,
        origin: NodeId,
        after_oseq: u64,
        max: usize,
    ) -> Result<Vec<ElementRecord>> {
        origin_range(&self.log, &self.by_origin, origin, after_oseq, max)
    }
}
