//! [`ReadTxn`]: one snapshot of what is committed, for senders, catch-up, the API and the
//! digest. Implements [`LogRead`].

use redb::{ReadOnlyTable, ReadableTable, ReadableTableMetadata};

use super::tables::{
    all_by_node, epoch_or_err, find_message, get_by_node, get_entry, get_message, log_first,
    log_range, origin_range, read_log_epoch, read_log_tail, read_state_upto, LOG, MARKS, MESSAGES,
    META, PEERS, STATE,
};
use super::{db_err, decode, Result};
use crate::ids::{MsgId, NodeId};
use crate::model::{ElementRecord, EventType};
use crate::replication::core::Digester;
use crate::replication::{Entry, LogRead, Mark, MsgKey, MsgRecord, PeerProgress, StoreError};

/// One row of the state table, with the message count of the message that last set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRow {
    pub account: String,
    pub etype: EventType,
    pub entry: Entry,
    /// Distinct senders of `entry.msg_id`; 0 at the origin or once its record is trimmed.
    pub message_count: u32,
}

/// A read transaction with every table opened once. It keeps its snapshot (and the pages it
/// pins) until dropped.
pub struct ReadTxn {
    meta: ReadOnlyTable<&'static str, &'static [u8]>,
    state: ReadOnlyTable<(&'static str, u8), &'static [u8]>,
    log: ReadOnlyTable<u64, &'static [u8]>,
    messages: ReadOnlyTable<(u128, u64, u64), &'static [u8]>,
    marks: ReadOnlyTable<u128, &'static [u8]>,
    peers: ReadOnlyTable<u128, &'static [u8]>,
}

impl ReadTxn {
    pub(super) fn new(txn: &redb::ReadTransaction) -> Result<ReadTxn> {
        Ok(ReadTxn {
            meta: txn.open_table(META).map_err(db_err)?,
            state: txn.open_table(STATE).map_err(db_err)?,
            log: txn.open_table(LOG).map_err(db_err)?,
            messages: txn.open_table(MESSAGES).map_err(db_err)?,
            marks: txn.open_table(MARKS).map_err(db_err)?,
            peers: txn.open_table(PEERS).map_err(db_err)?,
        })
    }

    /// The account's rows in the state *table*, of one type or all, in key order (the overlay
    /// may hold newer ones: readers of committed state use [`super::Store::state`]).
    pub fn table_state(&self, account: &str, etype: Option<EventType>) -> Result<Vec<StateRow>> {
        let mut out = Vec::new();
        if let Some(t) = etype {
            if let Some(entry) = get_entry(&self.state, account, t)? {
                out.push(self.row(account.to_string(), t, entry)?);
            }
            return Ok(out);
        }
        for row in self
            .state
            .range((account, 0u8)..=(account, u8::MAX))
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let (_, code) = k.value();
            let entry = decode("state entry", v.value())?;
            out.push(self.row(account.to_string(), type_of(code)?, entry)?);
        }
        Ok(out)
    }

    pub(super) fn row(&self, account: String, etype: EventType, entry: Entry) -> Result<StateRow> {
        let message_count = get_message(&self.messages, entry.msg_key(), &entry.msg_id)?
            .map_or(0, |m| u32::try_from(m.senders.len()).unwrap_or(u32::MAX));
        Ok(StateRow {
            account,
            etype,
            entry,
            message_count,
        })
    }

    /// [`crate::replication::digest`] over the whole state table in key order, and the number
    /// of entries, streamed.
    pub fn digest(&self) -> Result<(String, u64)> {
        let mut d = Digester::default();
        for row in self.state.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (account, code) = k.value();
            let entry: Entry = decode("state entry", v.value())?;
            d.push(account, type_of(code)?, &entry);
        }
        Ok(d.finish())
    }

    /// Up to `max` state entries after `after` (exclusive) in key order: snapshot chunks.
    pub fn entries_after(
        &self,
        after: Option<(&str, EventType)>,
        max: usize,
    ) -> Result<Vec<(String, EventType, Entry)>> {
        let mut out = Vec::with_capacity(max.min(4096));
        let iter = match after {
            Some((a, t)) => self
                .state
                .range::<(&str, u8)>((
                    std::ops::Bound::Excluded((a, t.code())),
                    std::ops::Bound::Unbounded,
                ))
                .map_err(db_err)?,
            None => self.state.iter().map_err(db_err)?,
        };
        for row in iter.take(max) {
            let (k, v) = row.map_err(db_err)?;
            let (account, code) = k.value();
            out.push((
                account.to_string(),
                type_of(code)?,
                decode("state entry", v.value())?,
            ));
        }
        Ok(out)
    }

    pub fn peers(&self) -> Result<Vec<(NodeId, PeerProgress)>> {
        all_by_node(&self.peers, "peer progress")
    }

    pub fn marks(&self) -> Result<Vec<(NodeId, Mark)>> {
        all_by_node(&self.marks, "mark")
    }

    pub fn peer(&self, id: NodeId) -> Result<PeerProgress> {
        get_by_node(&self.peers, "peer progress", id)
    }

    pub fn mark(&self, origin: NodeId) -> Result<Mark> {
        get_by_node(&self.marks, "mark", origin)
    }

    /// The entry the state *table* holds (the overlay may hold a newer one: readers of
    /// committed state use [`super::Store::state`]).
    pub fn entry(&self, account: &str, etype: EventType) -> Result<Option<Entry>> {
        get_entry(&self.state, account, etype)
    }

    /// The log position up to which the state table holds every logged record: what a
    /// snapshot read in this transaction reflects.
    pub fn state_upto(&self) -> Result<u64> {
        read_state_upto(&self.meta)
    }

    /// Rows of the state table.
    pub fn entry_count(&self) -> Result<u64> {
        self.state.len().map_err(db_err)
    }

    /// Records retained in the local log.
    pub fn log_len(&self) -> Result<u64> {
        self.log.len().map_err(db_err)
    }

    /// The record of the message `key` names, if its id is `id`.
    pub fn message(&self, key: MsgKey, id: &MsgId) -> Result<Option<MsgRecord>> {
        get_message(&self.messages, key, id)
    }

    /// The record of message `id` without knowing its origin and sequence: a scan of the
    /// retained log, newest first (see [`super::tables::find_message`]).
    pub fn find_message(&self, id: &MsgId) -> Result<Option<MsgRecord>> {
        find_message(&self.log, &self.messages, id)
    }
}

fn type_of(code: u8) -> Result<EventType> {
    EventType::from_code(code)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown event type code {code} in state")))
}

impl LogRead for ReadTxn {
    fn log_epoch(&self) -> Result<u64> {
        epoch_or_err(read_log_epoch(&self.meta)?)
    }

    fn log_tail(&self) -> Result<u64> {
        read_log_tail(&self.meta)
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
