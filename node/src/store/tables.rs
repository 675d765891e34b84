//! The table definitions, the readers shared by write and read transactions, and
//! [`RedbTables`]: the replication [`Tables`] over one redb write transaction.

use std::cell::RefCell;
use std::collections::BTreeMap;

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, TableError};
use serde::{Deserialize, Serialize};

use super::overlay::{Key, Round, StateOverlay, TxnEntry, TxnState};
use super::{db_err, decode, fixed, NodeMeta, Result};
use crate::ids::{MsgId, NodeId};
use crate::limits::MIGRATE_ROWS_PER_TXN;
use crate::model::{ElementRecord, EventType, Version};
use crate::replication::{
    Entry, LogRead, Mark, MsgKey, MsgRecord, PeerProgress, StoreError, Tables,
};
use crate::wire::SnapshotEntry;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const STATE: TableDefinition<(&str, u8), &[u8]> = TableDefinition::new("state");
pub(super) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Message records keyed by [`MsgKey`] as (origin, oseq, id prefix): appended in order.
pub(super) const MESSAGES: TableDefinition<(u128, u64, u64), &[u8]> =
    TableDefinition::new("messages_by_origin");
pub(super) const MARKS: TableDefinition<u128, &[u8]> = TableDefinition::new("marks");
pub(super) const PEERS: TableDefinition<u128, &[u8]> = TableDefinition::new("peers");
/// Snapshot entries held back until their snapshot's end (`Tables::stage_snapshot`): (sender,
/// order) -> postcard (sender's log epoch, entry). Empty between snapshots; created on the first
/// write transaction of a database that predates it (no schema change: nothing else reads it).
pub(super) const STAGED: TableDefinition<(u128, u64), &[u8]> =
    TableDefinition::new("snapshot_staged");

/// Schema version 1's tables, read only by the migration to version 2.
pub(super) mod v1 {
    use redb::TableDefinition;
    use serde::{Deserialize, Serialize};

    use crate::ids::{MsgId, NodeId};
    use crate::model::Version;

    pub const BY_ORIGIN: TableDefinition<(u128, u64), u64> = TableDefinition::new("log_by_origin");
    pub const MESSAGES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("messages");

    #[derive(Serialize, Deserialize)]
    pub struct MsgRecord {
        pub origin: NodeId,
        pub oseq: u64,
        pub first_seen_ms: u64,
        pub senders: Vec<NodeId>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Entry {
        pub version: Version,
        pub origin: NodeId,
        pub msg_id: MsgId,
        pub element: Vec<u8>,
    }
}

/// A message record as stored: its key holds origin and oseq.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredMsg {
    pub msg_id: MsgId,
    pub lseq: u64,
    pub first_seen_ms: u64,
    pub senders: Vec<NodeId>,
}

pub(super) fn msg_key(k: MsgKey) -> (u128, u64, u64) {
    (k.origin.0, k.oseq, k.id_prefix)
}

pub(super) fn stored_msg(m: &MsgRecord) -> StoredMsg {
    StoredMsg {
        msg_id: m.msg_id,
        lseq: m.lseq,
        first_seen_ms: m.first_seen_ms,
        senders: m.senders.clone(),
    }
}

pub(super) fn msg_record((origin, oseq, _): (u128, u64, u64), s: StoredMsg) -> MsgRecord {
    MsgRecord {
        msg_id: s.msg_id,
        origin: NodeId(origin),
        oseq,
        lseq: s.lseq,
        first_seen_ms: s.first_seen_ms,
        senders: s.senders,
    }
}

/// A log record decoded without copying its account and element: what a scan by message id
/// needs. Same encoding as [`ElementRecord`].
#[derive(Deserialize)]
pub(super) struct RecordRef<'a> {
    pub origin: NodeId,
    pub oseq: u64,
    #[allow(dead_code)]
    pub account: &'a str,
    #[allow(dead_code)]
    pub etype: EventType,
    #[allow(dead_code)]
    pub version: Version,
    #[allow(dead_code)]
    pub element: &'a [u8],
    pub msg_id: MsgId,
}

pub(super) const META_SCHEMA_VERSION: &str = "schema_version";
pub(super) const META_NODE: &str = "node";
pub(super) const META_HLC: &str = "hlc";
pub(super) const META_LOG_TAIL: &str = "log_tail";
/// The log position up to which the state table holds every logged record (schema 3).
pub(super) const META_STATE_UPTO: &str = "state_upto";

pub(super) fn create_all(txn: &redb::WriteTransaction) -> std::result::Result<(), TableError> {
    txn.open_table(META)?;
    txn.open_table(STATE)?;
    txn.open_table(LOG)?;
    txn.open_table(MESSAGES)?;
    txn.open_table(MARKS)?;
    txn.open_table(PEERS)?;
    txn.open_table(STAGED)?;
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

pub(super) fn read_state_upto(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64> {
    match meta.get(META_STATE_UPTO).map_err(db_err)? {
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
    messages: &impl ReadableTable<(u128, u64, u64), &'static [u8]>,
    key: MsgKey,
    id: &MsgId,
) -> Result<Option<MsgRecord>> {
    let k = msg_key(key);
    let Some(v) = messages.get(k).map_err(db_err)? else {
        return Ok(None);
    };
    let s: StoredMsg = decode("message record", v.value())?;
    Ok((s.msg_id == *id).then(|| msg_record(k, s)))
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

/// Like `MemStore`: the first `max` message rows of `origin` above `after_oseq`, then the
/// records still in the log.
pub(super) fn origin_range(
    log: &impl ReadableTable<u64, &'static [u8]>,
    messages: &impl ReadableTable<(u128, u64, u64), &'static [u8]>,
    origin: NodeId,
    after_oseq: u64,
    max: usize,
) -> Result<Vec<ElementRecord>> {
    let mut out = Vec::new();
    let Some(from) = after_oseq.checked_add(1) else {
        return Ok(out);
    };
    if max == 0 {
        return Ok(out);
    }
    let rows = messages
        .range((origin.0, from, 0)..=(origin.0, u64::MAX, u64::MAX))
        .map_err(db_err)?;
    for row in rows.take(max) {
        let (_, v) = row.map_err(db_err)?;
        let m: StoredMsg = decode("message record", v.value())?;
        if let Some(v) = log.get(m.lseq).map_err(db_err)? {
            out.push(decode("log record", v.value())?);
        }
    }
    Ok(out)
}

/// Finds a message by its id alone: a scan of the retained log from its newest record back,
/// since records are keyed by origin and sequence (the id is not a key: see the layout). Costs
/// about a microsecond per retained record; callers that know the origin and sequence use
/// [`get_message`].
pub(super) fn find_message(
    log: &impl ReadableTable<u64, &'static [u8]>,
    messages: &impl ReadableTable<(u128, u64, u64), &'static [u8]>,
    id: &MsgId,
) -> Result<Option<MsgRecord>> {
    for row in log.iter().map_err(db_err)?.rev() {
        let (_, v) = row.map_err(db_err)?;
        let r: RecordRef<'_> = postcard::from_bytes(v.value())
            .map_err(|e| StoreError::Corrupt(format!("log record: {e}")))?;
        if r.msg_id == *id {
            return get_message(messages, MsgKey::new(r.origin, r.oseq, id), id);
        }
    }
    Ok(None)
}

/// Every table of one write transaction, opened once. Implements [`Tables`] and [`LogRead`]
/// (the latter sees the transaction's own uncommitted writes).
///
/// The rows every event would rewrite (the hybrid clock, the log tail, the origins' marks) are
/// kept here and written once, by [`RedbTables::finish`], which [`super::Store::write`] calls
/// before it commits: a group of a thousand events writes each of them once, not a thousand
/// times. State entries are kept too: [`RedbTables::finish`] writes them to the table, while
/// the writer's [`RedbTables::finish_with`] may leave them in the [`StateOverlay`] (see there).
pub struct RedbTables<'txn> {
    meta: Table<'txn, &'static str, &'static [u8]>,
    state: Table<'txn, (&'static str, u8), &'static [u8]>,
    log: Table<'txn, u64, &'static [u8]>,
    messages: Table<'txn, (u128, u64, u64), &'static [u8]>,
    marks: Table<'txn, u128, &'static [u8]>,
    peers: Table<'txn, u128, &'static [u8]>,
    staged: Table<'txn, (u128, u64), &'static [u8]>,
    epoch: Option<u64>,
    hlc: (u64, u32),
    hlc_dirty: bool,
    tail: u64,
    tail_dirty: bool,
    /// The log position up to which the state table is complete (as committed).
    state_upto: u64,
    /// The log tail as committed before this transaction.
    committed_tail: u64,
    /// Whether `finish_with` may leave this transaction's entries in the overlay (the writer's
    /// sessions); every other session writes them to the table.
    write_back: bool,
    /// Retention trims no record after this: what a restart would replay.
    trim_upto: u64,
    /// Marks read or written in this transaction; `true` when written.
    mark_cache: BTreeMap<NodeId, (Mark, bool)>,
    /// What this transaction did to the state so far (taken from the [`super::WriteTxn`]'s
    /// cell, given back by `finish`): the entries written, in key order.
    txn_state: TxnState,
    cell: &'txn RefCell<TxnState>,
    overlay: &'txn StateOverlay,
    /// Keys this transaction looked up and found nowhere: a put of one is a new entry.
    absent: RefCell<std::collections::BTreeSet<Key>>,
    /// Reused encoding buffer, so a put does not allocate.
    buf: Vec<u8>,
}

/// How [`RedbTables::finish_with`] writes the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushPlan {
    /// Write this transaction's entries to the table (else they stay in the overlay, dirty).
    pub through: bool,
    /// The flush round to advance (or start: `after` is `None`) by one chunk.
    pub round: Option<Round>,
    /// Most dirty entries of the overlay one chunk writes.
    pub chunk_max: usize,
}

impl FlushPlan {
    /// Every entry written to the table, the overlay's dirty ones included: the table is
    /// complete at the end of the transaction. `committed_tail` is the log tail before it.
    pub fn all(committed_tail: u64) -> FlushPlan {
        FlushPlan {
            through: true,
            round: Some(Round {
                upto: committed_tail,
                after: None,
            }),
            chunk_max: usize::MAX,
        }
    }

    /// This transaction's entries written to the table; the overlay's dirty ones left.
    pub fn through() -> FlushPlan {
        FlushPlan {
            through: true,
            round: None,
            chunk_max: 0,
        }
    }
}

impl<'txn> RedbTables<'txn> {
    pub(super) fn open(
        txn: &'txn redb::WriteTransaction,
        overlay: &'txn StateOverlay,
        cell: &'txn RefCell<TxnState>,
        write_back: bool,
    ) -> Result<Self> {
        let meta = txn.open_table(META).map_err(db_err)?;
        let epoch = read_log_epoch(&meta)?;
        let hlc = read_hlc(&meta)?;
        let tail = read_log_tail(&meta)?;
        let state_upto = read_state_upto(&meta)?;
        Ok(RedbTables {
            meta,
            state: txn.open_table(STATE).map_err(db_err)?,
            log: txn.open_table(LOG).map_err(db_err)?,
            messages: txn.open_table(MESSAGES).map_err(db_err)?,
            marks: txn.open_table(MARKS).map_err(db_err)?,
            peers: txn.open_table(PEERS).map_err(db_err)?,
            staged: txn.open_table(STAGED).map_err(db_err)?,
            epoch,
            hlc,
            hlc_dirty: false,
            tail,
            tail_dirty: false,
            state_upto,
            committed_tail: tail,
            write_back,
            // A session that writes its entries through, with nothing dirty in the overlay,
            // leaves the table complete: nothing to replay, so nothing to keep.
            trim_upto: if write_back || overlay.dirty_len() > 0 {
                state_upto
            } else {
                u64::MAX
            },
            mark_cache: BTreeMap::new(),
            txn_state: cell.take(),
            cell,
            overlay,
            absent: RefCell::default(),
            buf: Vec::with_capacity(1024),
        })
    }

    /// The log position up to which the state table is complete, as committed.
    pub fn state_upto(&self) -> u64 {
        self.state_upto
    }

    /// Writes what this transaction kept back (clock, tail, marks, state entries) to the
    /// tables. Called once, last, before the commit; nothing kept back survives a commit
    /// without it. [`FlushPlan::through`]: the state entries go to the table.
    pub fn finish(self) -> Result<()> {
        self.finish_with(&FlushPlan::through())
    }

    /// [`RedbTables::finish`], writing the state as `plan` says: this transaction's entries to
    /// the table or left dirty in the overlay, and one chunk of a flush round. Moves
    /// `state_upto` when the round completes. The [`super::WriteTxn`]'s commit then tells the
    /// overlay.
    pub fn finish_with(mut self, plan: &FlushPlan) -> Result<()> {
        assert!(
            plan.through || self.write_back,
            "only a write-back session leaves its entries in the overlay"
        );
        let tail = self.tail;
        let mut ts = std::mem::take(&mut self.txn_state);
        debug_assert!(ts.flushed.is_empty(), "one flush chunk per transaction");
        // The chunk of the round: dirty entries of the overlay, in key order, each written as
        // it is now (this transaction's newer entry where it wrote one).
        let mut round = plan.round.clone();
        let mut completed = false;
        if let Some(r) = &mut round {
            let (chunk, done) = self
                .overlay
                .with_dirty(|d| d.chunk(r.upto, r.after.as_ref(), plan.chunk_max.max(1)));
            for (key, entry) in chunk {
                r.after = Some(key.clone());
                match ts.entries.get_mut(&key) {
                    Some(e) => e.in_table = true,
                    None => {
                        self.put_state_row(&key, &entry)?;
                        ts.flushed.push(key);
                    }
                }
            }
            completed = done;
        }
        for (key, e) in ts.entries.iter_mut() {
            if plan.through {
                e.in_table = true;
            }
            if e.in_table {
                let buf = self.encode(&e.entry);
                let r = self.state.insert((key.0.as_str(), key.1), buf.as_slice());
                self.buf = buf;
                r.map_err(db_err)?;
            }
        }
        // Where the table is complete now: a completed round covers everything dirty up to
        // its start, and (when this transaction wrote its own entries) this transaction.
        let nothing_else_dirty = plan.through && {
            let written = ts.flushed.len()
                + ts.entries
                    .keys()
                    .filter(|k| self.overlay.is_dirty(k))
                    .count();
            written == self.overlay.dirty_len()
        };
        // A round covers what was dirty when it started (up to `r.upto`); entries dirtied since
        // (after `r.upto`, before this transaction) are not in it. Only a round that started
        // with this transaction's committed tail leaves nothing else dirty.
        let upto = match &round {
            Some(r) if completed && plan.through && r.upto >= self.committed_tail => Some(tail),
            Some(r) if completed => Some(r.upto.max(self.state_upto)),
            _ if nothing_else_dirty => Some(tail),
            _ => None,
        };
        if let Some(u) = upto {
            assert!(u <= tail, "state_upto {u} past the log tail {tail}");
            if u != self.state_upto {
                self.meta
                    .insert(META_STATE_UPTO, &u.to_le_bytes()[..])
                    .map_err(db_err)?;
            }
            round = None;
        }
        ts.tail = tail;
        ts.round = round;
        ts.state_upto = upto;
        if self.hlc_dirty {
            let (ms, logical) = self.hlc;
            let mut b = [0u8; 12];
            b[..8].copy_from_slice(&ms.to_le_bytes());
            b[8..].copy_from_slice(&logical.to_le_bytes());
            self.meta.insert(META_HLC, &b[..]).map_err(db_err)?;
        }
        if self.tail_dirty {
            self.meta
                .insert(META_LOG_TAIL, &self.tail.to_le_bytes()[..])
                .map_err(db_err)?;
        }
        let marks = std::mem::take(&mut self.mark_cache);
        for (origin, (mark, dirty)) in marks {
            if dirty {
                let buf = self.encode(&mark);
                let r = self.marks.insert(origin.0, buf.as_slice());
                self.buf = buf;
                r.map_err(db_err)?;
            }
        }
        self.cell.replace(ts);
        Ok(())
    }

    fn put_state_row(&mut self, key: &Key, entry: &Entry) -> Result<()> {
        let buf = self.encode(entry);
        let r = self.state.insert((key.0.as_str(), key.1), buf.as_slice());
        self.buf = buf;
        r.map(drop).map_err(db_err)
    }

    /// Encodes `v` into the reused buffer, which the caller takes back with `put_buf`.
    fn encode(&mut self, v: &impl Serialize) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        postcard::to_extend(v, buf).expect("postcard encodes plain structs")
    }

    /// Retention: deletes log records from the head (lowest lseq) while the record's message
    /// was first seen before `cutoff_ms` or more than `keep_max` records are retained, with
    /// their message record. At most `work_max` records per call. Returns how many were
    /// trimmed. Never lowers the log tail. A record whose message record is missing has no
    /// known age and counts as old. Every delete is at the head of the log or of an origin's
    /// message records: sequential, like the appends. Never trims past `state_upto`: the
    /// records after it are what a restart replays into the state table.
    pub fn trim_log(&mut self, cutoff_ms: u64, keep_max: u64, work_max: usize) -> Result<u64> {
        let mut retained = self.log.len().map_err(db_err)?;
        let mut trimmed = 0u64;
        while trimmed < work_max as u64 {
            let (lseq, rec) = match self.log.first().map_err(db_err)? {
                None => break,
                Some((k, v)) => (k.value(), decode::<ElementRecord>("log record", v.value())?),
            };
            // What the state table does not hold yet is replayed from here after a crash.
            if lseq > self.trim_upto {
                break;
            }
            let key = MsgKey::of(&rec);
            let msg = get_message(&self.messages, key, &rec.msg_id)?;
            let old = msg.as_ref().is_none_or(|m| m.first_seen_ms < cutoff_ms);
            if !old && retained <= keep_max {
                break;
            }
            self.log.remove(lseq).map_err(db_err)?;
            // Only the record this log entry wrote: a later copy numbered the same by a
            // restored origin keeps its own.
            if msg.is_some_and(|m| m.lseq == lseq) {
                self.messages.remove(msg_key(key)).map_err(db_err)?;
            }
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

    fn set_hlc(&mut self, state: (u64, u32)) -> Result<()> {
        self.hlc = state;
        self.hlc_dirty = true;
        Ok(())
    }

    fn log_epoch(&self) -> Result<u64> {
        epoch_or_err(self.epoch)
    }

    fn entry(&self, account: &str, etype: EventType) -> Result<Option<Entry>> {
        let key = (account.to_owned(), etype.code());
        if let Some(e) = self.txn_state.entries.get(&key) {
            return Ok(Some(e.entry.clone()));
        }
        if let Some(e) = self.overlay.get_code(&key) {
            return Ok(Some(e));
        }
        let found = get_entry(&self.state, account, etype)?;
        if found.is_none() {
            self.absent.borrow_mut().insert(key);
        }
        Ok(found)
    }

    fn put_entry(&mut self, account: &str, etype: EventType, entry: &Entry) -> Result<()> {
        let key = (account.to_owned(), etype.code());
        let new = match self.txn_state.entries.get(&key) {
            Some(e) => e.new,
            None => self.absent.get_mut().remove(&key),
        };
        let e = TxnEntry {
            entry: entry.clone(),
            in_table: false,
            new,
        };
        self.txn_state.entries.insert(key, e);
        Ok(())
    }

    fn message(&self, key: MsgKey, id: &MsgId) -> Result<Option<MsgRecord>> {
        get_message(&self.messages, key, id)
    }

    fn put_message(&mut self, rec: &MsgRecord) -> Result<()> {
        let buf = self.encode(&stored_msg(rec));
        let r = self.messages.insert(msg_key(rec.key()), buf.as_slice());
        self.buf = buf;
        r.map(drop).map_err(db_err)
    }

    fn mark(&self, origin: NodeId) -> Result<Mark> {
        match self.mark_cache.get(&origin) {
            Some((m, _)) => Ok(m.clone()),
            None => get_by_node(&self.marks, "mark", origin),
        }
    }

    fn put_mark(&mut self, origin: NodeId, mark: &Mark) -> Result<()> {
        self.mark_cache.insert(origin, (mark.clone(), true));
        Ok(())
    }

    fn marks(&self) -> Result<Vec<(NodeId, Mark)>> {
        let mut all: BTreeMap<NodeId, Mark> =
            all_by_node(&self.marks, "mark")?.into_iter().collect();
        for (o, (m, _)) in &self.mark_cache {
            all.insert(*o, m.clone());
        }
        Ok(all.into_iter().collect())
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
        self.tail = lseq;
        self.tail_dirty = true;
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

    fn stage_snapshot(
        &mut self,
        from: NodeId,
        epoch: u64,
        entries: &[SnapshotEntry],
    ) -> Result<()> {
        let range = (from.0, 0)..=(from.0, u64::MAX);
        let (first, last) = {
            let mut it = self.staged.range(range.clone()).map_err(db_err)?;
            let first = match it.next().transpose().map_err(db_err)? {
                Some((k, v)) => {
                    let (e, _) =
                        decode::<(u64, SnapshotEntry)>("staged snapshot entry", v.value())?;
                    Some((e, k.value().1))
                }
                None => None,
            };
            let last = it
                .next_back()
                .transpose()
                .map_err(db_err)?
                .map(|(k, _)| k.value().1);
            (first, last)
        };
        let start = match first {
            Some((e, _)) if e != epoch => {
                self.staged.retain_in(range, |_, _| false).map_err(db_err)?;
                0
            }
            Some((_, seq)) => last.unwrap_or(seq) + 1,
            None => 0,
        };
        for (seq, e) in (start..).zip(entries) {
            let buf = self.encode(&(epoch, e));
            let r = self.staged.insert((from.0, seq), buf.as_slice());
            self.buf = buf;
            r.map_err(db_err)?;
        }
        Ok(())
    }

    fn take_staged(&mut self, from: NodeId, epoch: u64, max: usize) -> Result<Vec<SnapshotEntry>> {
        let range = (from.0, 0)..=(from.0, u64::MAX);
        let rows: Vec<(u64, (u64, SnapshotEntry))> = self
            .staged
            .range(range.clone())
            .map_err(db_err)?
            .take(max)
            .map(|r| {
                let (k, v) = r.map_err(db_err)?;
                Ok((k.value().1, decode("staged snapshot entry", v.value())?))
            })
            .collect::<Result<_>>()?;
        // Every staged row of a sender has one epoch (`stage_snapshot` drops the others).
        if rows.first().is_some_and(|(_, (e, _))| *e != epoch) {
            self.staged.retain_in(range, |_, _| false).map_err(db_err)?;
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(rows.len());
        for (seq, (_, entry)) in rows {
            self.staged.remove((from.0, seq)).map_err(db_err)?;
            out.push(entry);
        }
        Ok(out)
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
        origin_range(&self.log, &self.messages, origin, after_oseq, max)
    }
}

/// What the migration from schema version 1 rewrote.
pub(super) struct Migrated {
    pub messages: u64,
    pub entries: u64,
}

/// Schema 1 to 2, inside the caller's write transaction: message records rekeyed by origin
/// (their log position taken from the old by-origin index), state entries given the origin
/// sequence of their message, the old tables dropped.
pub(super) fn migrate_v1(txn: &redb::WriteTransaction) -> Result<Migrated> {
    let mut done = Migrated {
        messages: 0,
        entries: 0,
    };
    {
        let old = txn.open_table(v1::MESSAGES).map_err(db_err)?;
        let index = txn.open_table(v1::BY_ORIGIN).map_err(db_err)?;
        let log = txn.open_table(LOG).map_err(db_err)?;
        let mut new = txn.open_table(MESSAGES).map_err(db_err)?;
        for row in old.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let id = MsgId(*k.value());
            let m: v1::MsgRecord = decode("message record (schema 1)", v.value())?;
            let Some(lseq) = index.get((m.origin.0, m.oseq)).map_err(db_err)? else {
                continue; // its log record is gone: so is the record in schema 2
            };
            let lseq = lseq.value();
            // Two messages numbered the same (a restored origin): the index names only the
            // later one's record; the earlier one's count is not carried over.
            let logged = log.get(lseq).map_err(db_err)?;
            let matches = match logged {
                Some(r) => decode::<ElementRecord>("log record", r.value())?.msg_id == id,
                None => false,
            };
            if !matches {
                continue;
            }
            let key = MsgKey::new(m.origin, m.oseq, &id);
            let stored = StoredMsg {
                msg_id: id,
                lseq,
                first_seen_ms: m.first_seen_ms,
                senders: m.senders,
            };
            let bytes = postcard::to_stdvec(&stored).expect("postcard encodes plain structs");
            new.insert(msg_key(key), bytes.as_slice()).map_err(db_err)?;
            done.messages += 1;
        }
    }
    {
        let old = txn.open_table(v1::MESSAGES).map_err(db_err)?;
        let mut state = txn.open_table(STATE).map_err(db_err)?;
        let mut after: Option<(String, u8)> = None;
        loop {
            let mut chunk = Vec::with_capacity(MIGRATE_ROWS_PER_TXN);
            {
                let rows = match &after {
                    None => state.iter().map_err(db_err)?,
                    Some((a, c)) => state
                        .range::<(&str, u8)>((
                            std::ops::Bound::Excluded((a.as_str(), *c)),
                            std::ops::Bound::Unbounded,
                        ))
                        .map_err(db_err)?,
                };
                for row in rows.take(MIGRATE_ROWS_PER_TXN) {
                    let (k, v) = row.map_err(db_err)?;
                    let (account, code) = k.value();
                    let e: v1::Entry = decode("state entry (schema 1)", v.value())?;
                    chunk.push((account.to_string(), code, e));
                }
            }
            let Some((a, c, _)) = chunk.last() else {
                break;
            };
            after = Some((a.clone(), *c));
            for (account, code, e) in chunk {
                let oseq = match old.get(&e.msg_id.0).map_err(db_err)? {
                    Some(m) => {
                        decode::<v1::MsgRecord>("message record (schema 1)", m.value())?.oseq
                    }
                    None => 0,
                };
                let entry = Entry {
                    version: e.version,
                    origin: e.origin,
                    oseq,
                    msg_id: e.msg_id,
                    element: e.element,
                };
                let bytes = postcard::to_stdvec(&entry).expect("postcard encodes plain structs");
                state
                    .insert((account.as_str(), code), bytes.as_slice())
                    .map_err(db_err)?;
                done.entries += 1;
            }
        }
    }
    txn.delete_table(v1::MESSAGES).map_err(db_err)?;
    txn.delete_table(v1::BY_ORIGIN).map_err(db_err)?;
    Ok(done)
}
