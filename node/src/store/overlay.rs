//! [`StateOverlay`]: the state entries that are committed but not yet in the state table
//! (dirty), and a bounded cache of committed entries that are (clean).
//!
//! Why it exists: an acknowledgement waits for one commit, and that commit should only append
//! (the log and the message records, at the end of their key order). The state table is keyed
//! by account: writing it on every commit costs a random-key B-tree insert per event. So the
//! writer keeps what it changed here and writes the state table later, in whole sorted runs
//! (a *flush round*), once per many commits. Everything a dirty entry holds is also in the log
//! after `state_upto` (the log position up to which the state table is complete, kept in
//! `meta`), and opening the database replays that part of the log into the table, so a crash
//! loses nothing. Retention never trims the log past `state_upto`.
//!
//! Readers see committed state: a lookup checks the overlay first (dirty, then clean) and falls
//! back to the table only on a miss. An entry leaves the overlay only once the table holds it
//! (a dirty entry becomes clean after the commit that wrote it; clean entries are evicted), so
//! a miss at the moment of the lookup means a read transaction begun after it finds the
//! latest committed entry in the table. Whole-table readers (digest, entry count) ask the
//! writer to flush first.
//!
//! It must never: hold an entry that was not committed, drop a dirty entry before the table
//! holds it, or grow past its bounds (the writer flushes at `dirty_bytes_max`; the clean part
//! evicts at `clean_bytes_max`).

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use crate::limits::STATE_ENTRY_OVERHEAD_BYTES;
use crate::model::EventType;
use crate::replication::Entry;

/// A state table key: account and event type code.
pub type Key = (String, u8);

pub(super) fn cost(account: &str, e: &Entry) -> usize {
    account.len() + e.element.len() + STATE_ENTRY_OVERHEAD_BYTES
}

#[derive(Debug)]
struct Dirty {
    entry: Entry,
    /// The table holds no entry of this key (it is counted in `dirty_new`).
    new: bool,
    /// The log tail when the entry became dirty (after that commit): a flush round that
    /// started at `upto` covers the entries dirty since at most `upto`.
    since: u64,
}

/// A flush round in progress: every entry dirty since at most `upto` is written to the table,
/// in key order, a chunk per commit; when the last is written, `state_upto` becomes `upto`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Round {
    pub upto: u64,
    /// The last key written by this round (the next chunk starts after it).
    pub after: Option<Key>,
}

#[derive(Debug, Default)]
struct Inner {
    dirty: BTreeMap<Key, Dirty>,
    dirty_bytes: usize,
    /// Dirty entries whose key the table does not hold yet: the entry count is the table's
    /// rows plus these.
    dirty_new: u64,
    clean: HashMap<Key, Entry>,
    clean_bytes: usize,
    round: Option<Round>,
}

/// See the module documentation. Shared by the writer (the only one that changes it, after
/// each commit) and the readers.
#[derive(Debug)]
pub struct StateOverlay {
    inner: RwLock<Inner>,
    clean_bytes_max: usize,
}

/// One entry a transaction wrote.
#[derive(Debug)]
pub struct TxnEntry {
    pub(super) entry: Entry,
    pub(super) in_table: bool,
    /// No committed entry of this key existed (overlay or table) when it was written.
    pub(super) new: bool,
}

/// What one write transaction did to the state, applied to the overlay once it committed.
#[derive(Debug, Default)]
pub struct TxnState {
    /// Entries this transaction wrote: the entry, whether it wrote it to the table too, and
    /// whether the key was in the state before (overlay or table).
    pub(super) entries: BTreeMap<Key, TxnEntry>,
    /// Dirty entries of the overlay this transaction wrote to the table (a flush chunk).
    pub(super) flushed: Vec<Key>,
    /// The log tail at the end of the transaction.
    pub(super) tail: u64,
    /// The flush round after this transaction: `None` when it completed one (or there was
    /// none), and whether it started or advanced one.
    pub(super) round: Option<Round>,
    /// Whether this transaction moved `state_upto` (completed a round or flushed everything).
    pub(super) state_upto: Option<u64>,
}

impl StateOverlay {
    pub fn new(clean_bytes_max: usize) -> StateOverlay {
        StateOverlay {
            inner: RwLock::new(Inner::default()),
            clean_bytes_max,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed entry of (account, type) if the overlay holds it; `None` means the table
    /// holds the latest committed entry (or there is none).
    pub fn get(&self, account: &str, etype: EventType) -> Option<Entry> {
        self.get_code(&(account.to_owned(), etype.code()))
    }

    pub(super) fn get_code(&self, key: &Key) -> Option<Entry> {
        let i = self.read();
        if let Some(d) = i.dirty.get(key) {
            return Some(d.entry.clone());
        }
        i.clean.get(key).cloned()
    }

    /// Bytes of the dirty entries (what a crash would replay from the log).
    pub fn dirty_bytes(&self) -> usize {
        self.read().dirty_bytes
    }

    pub(super) fn is_dirty(&self, key: &Key) -> bool {
        self.read().dirty.contains_key(key)
    }

    /// Dirty entries whose key the state table does not hold yet.
    pub fn dirty_new(&self) -> u64 {
        self.read().dirty_new
    }

    pub fn dirty_len(&self) -> usize {
        self.read().dirty.len()
    }

    pub fn clean_bytes(&self) -> usize {
        self.read().clean_bytes
    }

    /// The flush round in progress, if any.
    pub fn round(&self) -> Option<Round> {
        self.read().round.clone()
    }

    /// Calls `f` with the dirty entries in key order (under the read lock: the writer is the
    /// only one that changes them, and it is the caller).
    pub(super) fn with_dirty<R>(&self, f: impl FnOnce(DirtyView<'_>) -> R) -> R {
        let i = self.read();
        f(DirtyView(&i.dirty))
    }

    /// Applies what a committed transaction did. Called once per commit, after it succeeded.
    pub(super) fn committed(&self, t: TxnState) {
        // Invariant at commit: the state table is never said to be complete past the log.
        assert!(
            t.state_upto.is_none_or(|u| u <= t.tail),
            "state_upto {:?} past the log tail {}",
            t.state_upto,
            t.tail
        );
        let mut i = self.write();
        let i = &mut *i;
        for key in t.flushed {
            if let Some(d) = take_dirty(i, &key) {
                put_clean(i, key, d.entry);
            }
        }
        for (key, e) in t.entries {
            if e.in_table {
                take_dirty(i, &key);
                put_clean(i, key, e.entry);
            } else {
                if let Some(old) = i.clean.remove(&key) {
                    i.clean_bytes -= cost(&key.0, &old);
                }
                let c = cost(&key.0, &e.entry);
                match i.dirty.get_mut(&key) {
                    Some(d) => {
                        i.dirty_bytes = i.dirty_bytes - cost(&key.0, &d.entry) + c;
                        d.entry = e.entry;
                    }
                    None => {
                        i.dirty_bytes += c;
                        i.dirty_new += u64::from(e.new);
                        i.dirty.insert(
                            key,
                            Dirty {
                                entry: e.entry,
                                new: e.new,
                                since: t.tail,
                            },
                        );
                    }
                }
            }
        }
        i.round = t.round;
        evict(i, self.clean_bytes_max);
        debug_assert!(i.clean_bytes <= self.clean_bytes_max);
        debug_assert!(
            t.state_upto.is_none() || i.round.is_none(),
            "a transaction that moved state_upto ended its round"
        );
    }
}

/// Removes a dirty entry (the table holds it now), keeping the counts.
fn take_dirty(i: &mut Inner, key: &Key) -> Option<Dirty> {
    let d = i.dirty.remove(key)?;
    i.dirty_bytes -= cost(&key.0, &d.entry);
    i.dirty_new -= u64::from(d.new);
    Some(d)
}

fn put_clean(i: &mut Inner, key: Key, entry: Entry) {
    let c = cost(&key.0, &entry);
    if let Some(old) = i.clean.insert(key.clone(), entry) {
        i.clean_bytes -= cost(&key.0, &old);
    }
    i.clean_bytes += c;
}

/// Drops clean entries (the table holds each) until under the bound: an arbitrary eighth at a
/// time, everything if that frees nothing.
fn evict(i: &mut Inner, max: usize) {
    while i.clean_bytes > max {
        let mut n = 0u32;
        let mut freed = 0usize;
        i.clean.retain(|(a, _), e| {
            n += 1;
            let keep = n % 8 != 0;
            if !keep {
                freed += cost(a, e);
            }
            keep
        });
        i.clean_bytes -= freed;
        if freed == 0 {
            i.clean.clear();
            i.clean_bytes = 0;
        }
    }
}

/// The dirty entries, for a flush.
pub(super) struct DirtyView<'a>(&'a BTreeMap<Key, Dirty>);

impl DirtyView<'_> {
    /// Every dirty entry, in key order (a copy: at most the writer's dirty bound).
    pub fn all(&self) -> Vec<(Key, Entry)> {
        self.0
            .iter()
            .map(|(k, d)| (k.clone(), d.entry.clone()))
            .collect()
    }

    /// Up to `max` dirty entries after `after` (exclusive), in key order, that a round up to
    /// `upto` covers; and whether none is left after them.
    pub fn chunk(&self, upto: u64, after: Option<&Key>, max: usize) -> (Vec<(Key, Entry)>, bool) {
        use std::ops::Bound;
        let from = match after {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for (k, d) in self.0.range((from, Bound::Unbounded)) {
            if d.since > upto {
                continue;
            }
            if out.len() == max {
                return (out, false);
            }
            out.push((k.clone(), d.entry.clone()));
        }
        (out, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{MsgId, NodeId};
    use crate::model::Version;

    fn entry(n: u64, bytes: usize) -> Entry {
        Entry {
            version: Version {
                ms: n,
                logical: 0,
                node: NodeId(1),
            },
            origin: NodeId(1),
            oseq: n,
            msg_id: MsgId::default(),
            element: vec![b'x'; bytes],
        }
    }

    fn txn(tail: u64, writes: &[(&str, u64, usize, bool)]) -> TxnState {
        TxnState {
            entries: writes
                .iter()
                .map(|&(a, n, bytes, in_table)| {
                    let e = TxnEntry {
                        entry: entry(n, bytes),
                        in_table,
                        new: true,
                    };
                    ((a.to_string(), 3), e)
                })
                .collect(),
            tail,
            ..TxnState::default()
        }
    }

    /// Bounded memory: the clean part never holds more than its bound whatever is committed
    /// through it, and a dirty entry is never evicted (the table does not hold it yet).
    #[test]
    fn clean_entries_stay_within_their_bound_and_dirty_ones_stay() {
        let max = 64 << 10;
        let o = StateOverlay::new(max);
        o.committed(txn(1, &[("dirty", 1, 100, false)]));
        for round in 0..200u64 {
            let names: Vec<String> = (0..50).map(|i| format!("a{round}-{i}")).collect();
            let writes: Vec<(&str, u64, usize, bool)> = names
                .iter()
                .map(|n| (n.as_str(), round, (round as usize * 37) % 2048, true))
                .collect();
            o.committed(txn(round + 2, &writes));
            assert!(o.clean_bytes() <= max, "round {round}: {}", o.clean_bytes());
            assert_eq!(o.dirty_len(), 1);
            assert_eq!(o.get("dirty", EventType::Presence).map(|e| e.oseq), Some(1));
        }
    }

    /// A flush round covers what was dirty when it started, chunk by chunk in key order; an
    /// entry dirtied after the start waits for the next round, and one written again keeps the
    /// place its first write gave it.
    #[test]
    fn a_round_covers_what_was_dirty_at_its_start() {
        let o = StateOverlay::new(1 << 20);
        o.committed(txn(5, &[("b", 1, 10, false), ("a", 2, 10, false)]));
        o.committed(txn(9, &[("c", 3, 10, false), ("a", 4, 10, false)]));
        let (chunk, done) = o.with_dirty(|d| d.chunk(5, None, 1));
        assert_eq!(chunk.len(), 1);
        assert_eq!((chunk[0].0 .0.as_str(), chunk[0].1.oseq), ("a", 4));
        assert!(!done);
        let (chunk, done) = o.with_dirty(|d| d.chunk(5, Some(&("a".into(), 3)), 8));
        let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.0.as_str()).collect();
        assert_eq!(keys, ["b"], "c became dirty after the round started");
        assert!(done);
        // Written to the table by the round: clean now, still answered.
        o.committed(TxnState {
            flushed: vec![("a".into(), 3), ("b".into(), 3)],
            tail: 9,
            ..TxnState::default()
        });
        assert_eq!((o.dirty_len(), o.dirty_new()), (1, 1));
        assert_eq!(o.get("a", EventType::Presence).map(|e| e.oseq), Some(4));
    }
}
