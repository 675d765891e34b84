//! `outpost db check`: verifies a stopped node's database offline and says what is wrong. First
//! redb's own integrity check (page checksums, allocator state), then, in one read transaction,
//! what the code relies on: the schema version and node identity, every row of every table
//! decodes, the message records and the log agree both ways, the log tail covers the log, the
//! marks cover every logged sequence, message records match their log records and state
//! entries, and each log record's id matches its contents.
//!
//! It never changes a row. Opening the file may let redb finish recovery from an unclean
//! shutdown, exactly as starting the node would.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::tables::{
    msg_key, StoredMsg, LOG, MARKS, MESSAGES, META, META_HLC, META_LOG_TAIL, META_NODE,
    META_SCHEMA_VERSION, PEERS, STATE,
};
use super::{open_err, NodeMeta, OpenError, DB_FILE, SCHEMA_VERSION};
use crate::ids::NodeId;
use crate::limits::DB_CHECK_PROBLEMS_SHOWN_MAX;
use crate::limits::MARK_ABOVE_MAX;
use crate::limits::STORE_CACHE_BYTES;
use crate::model::{ElementRecord, EventType};
use crate::replication::core::Digester;
use crate::replication::{Entry, Mark, MsgKey, PeerProgress};

/// What `db check` found.
#[derive(Debug, Default)]
pub struct Report {
    /// What is wrong, each naming the table and key.
    pub problems: Vec<String>,
    /// Problems beyond [`DB_CHECK_PROBLEMS_SHOWN_MAX`].
    pub more_problems: u64,
    pub node: Option<NodeMeta>,
    pub entries: u64,
    pub log_records: u64,
    pub messages: u64,
    pub origins: u64,
    pub peers: u64,
    pub log_tail: u64,
    /// The log position up to which the state table holds every record; the records after it
    /// are merged into the table when the node next opens the database (see `store::overlay`).
    pub state_upto: u64,
    /// State entries whose message record is gone (trimmed by retention, or arrived by snapshot).
    pub entries_without_message: u64,
    /// The state digest, as `outpost state digest` prints it on a running node.
    pub digest: String,
    pub restored: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < DB_CHECK_PROBLEMS_SHOWN_MAX {
            self.problems.push(p);
        } else {
            self.more_problems += 1;
        }
    }

    /// The one line printed when nothing is wrong.
    pub fn summary(&self) -> String {
        let who = self.node.as_ref().map_or_else(String::new, |n| {
            format!("{} {} (node id {}), ", n.role, n.name, n.node_id)
        });
        format!(
            "{who}{} entries, {} log records, {} messages, {} origins, {} peers, log tail {}, \
             digest {}{}",
            self.entries,
            self.log_records,
            self.messages,
            self.origins,
            self.peers,
            self.log_tail,
            self.digest,
            if self.restored {
                ", restored from a backup (catch-up pending)"
            } else {
                ""
            }
        ) + &if self.state_upto < self.log_tail {
            format!(
                "; the state table is complete up to log position {}: {} later records are \
                 merged into it when the node next starts (the digest above is of the table)",
                self.state_upto,
                self.log_tail - self.state_upto
            )
        } else {
            String::new()
        }
    }
}

/// Checks `data_dir/outpost.redb`. An error means it could not be opened at all (missing, in
/// use by a running node, not a redb file, too damaged for redb to open); everything else is in
/// the report.
pub fn check(data_dir: &Path) -> Result<Report, OpenError> {
    let path = data_dir.join(DB_FILE);
    if !path.is_file() {
        return Err(OpenError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such database file"),
        });
    }
    // redb may panic on pages it cannot make sense of (even while opening): that is a finding,
    // not a crash, and its backtrace is no use to an operator.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let run = std::panic::catch_unwind(|| check_file(&path));
    std::panic::set_hook(hook);
    match run {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            Err(OpenError::Corrupt {
                path,
                detail: format!("redb failed reading its pages ({what})"),
            })
        }
    }
}

fn check_file(path: &Path) -> Result<Report, OpenError> {
    let mut db = Database::builder()
        .set_cache_size(STORE_CACHE_BYTES)
        .open(path)
        .map_err(|e| open_err(path, e))?;
    let mut report = Report::default();
    match db.check_integrity() {
        Ok(true) => {}
        Ok(false) => report.problem(
            "redb: the integrity check failed and redb repaired the file (the last commits may \
             be lost)"
                .into(),
        ),
        Err(e) => {
            report.problem(format!("redb: integrity check failed: {e}"));
            return Ok(report);
        }
    }
    check_rows(&db, &mut report);
    Ok(report)
}

/// Opens a table, reporting a missing or mistyped one.
fn open<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
    r: &mut Report,
) -> Option<redb::ReadOnlyTable<K, V>> {
    match txn.open_table(def) {
        Ok(t) => Some(t),
        Err(TableError::TableDoesNotExist(name)) => {
            r.problem(format!("table {name}: missing"));
            None
        }
        Err(e) => {
            r.problem(format!("table {def}: cannot open: {e}"));
            None
        }
    }
}

fn check_rows(db: &Database, r: &mut Report) {
    let txn = match db.begin_read() {
        Ok(t) => t,
        Err(e) => return r.problem(format!("cannot begin a read transaction: {e}")),
    };
    let Some(meta) = open(&txn, META, r) else {
        return;
    };
    check_meta(&meta, r);
    let (Some(state), Some(log), Some(messages), Some(marks), Some(peers)) = (
        open(&txn, STATE, r),
        open(&txn, LOG, r),
        open(&txn, MESSAGES, r),
        open(&txn, MARKS, r),
        open(&txn, PEERS, r),
    ) else {
        return;
    };

    let mut mark_of: BTreeMap<NodeId, Mark> = BTreeMap::new();
    each(&marks, "marks", r, |r, k, v| {
        match postcard::from_bytes::<Mark>(v) {
            Ok(m) => {
                mark_of.insert(NodeId(k), m);
            }
            Err(e) => r.problem(format!("marks[{}]: does not decode: {e}", NodeId(k))),
        }
    });
    r.origins = mark_of.len() as u64;
    each(&peers, "peers", r, |r, k, v| {
        r.peers += 1;
        if let Err(e) = postcard::from_bytes::<PeerProgress>(v) {
            r.problem(format!("peers[{}]: does not decode: {e}", NodeId(k)));
        }
    });
    // Message records, against the log they point into.
    each(
        &messages,
        "messages",
        r,
        |r, (origin, oseq, prefix): (u128, u64, u64), v| {
            r.messages += 1;
            let at = format!("messages[({}, {oseq}, {prefix:016x})]", NodeId(origin));
            let m = match postcard::from_bytes::<StoredMsg>(v) {
                Ok(m) => m,
                Err(e) => return r.problem(format!("{at}: does not decode: {e}")),
            };
            if crate::replication::id_prefix(&m.msg_id) != prefix {
                r.problem(format!("{at}: holds message {}, of another key", m.msg_id));
            }
            match log_record(&log, m.lseq) {
                Some(rec) if rec.msg_id == m.msg_id => {}
                Some(rec) => r.problem(format!(
                    "{at}: points at log[{}], which is message {}",
                    m.lseq, rec.msg_id
                )),
                None => r.problem(format!(
                    "{at}: points at log[{}], which does not exist or does not decode",
                    m.lseq
                )),
            }
        },
    );

    // The log, against its message records and the marks.
    let mut highest = 0;
    each(&log, "log", r, |r, lseq: u64, v| {
        r.log_records += 1;
        highest = highest.max(lseq);
        let rec: ElementRecord = match postcard::from_bytes(v) {
            Ok(rec) => rec,
            Err(e) => return r.problem(format!("log[{lseq}]: does not decode: {e}")),
        };
        let at = format!("log[{lseq}] (origin {}, oseq {})", rec.origin, rec.oseq);
        if rec.msg_id != rec.expected_id() {
            r.problem(format!(
                "{at}: message id {} does not match its contents",
                rec.msg_id
            ));
        }
        match messages.get(msg_key(MsgKey::of(&rec))) {
            Ok(Some(m)) => match postcard::from_bytes::<StoredMsg>(m.value()) {
                Ok(m) if m.lseq == lseq => {}
                // The same message logged twice (applied again after a restore): its record
                // names the later copy, which must be the same message.
                Ok(m) => match log_record(&log, m.lseq) {
                    Some(o) if o.msg_id == rec.msg_id => {}
                    _ => r.problem(format!(
                        "{at}: its message record points at log[{}], another record",
                        m.lseq
                    )),
                },
                Err(_) => {} // reported with the messages table
            },
            Ok(None) => r.problem(format!("{at}: message {} has no record", rec.msg_id)),
            Err(e) => r.problem(format!("{at}: reading its message record: {e}")),
        }
        let mark = mark_of.get(&rec.origin).cloned().unwrap_or_default();
        // A mark remembers at most MARK_ABOVE_MAX sequences above its contiguous part and
        // forgets the highest: it may under-report those, never the others.
        let forgotten = mark.above.len() >= MARK_ABOVE_MAX && rec.oseq > mark.highest();
        if !mark.contains(rec.oseq) && !forgotten {
            r.problem(format!(
                "{at}: not covered by the origin's mark (contiguous {}, {} above)",
                mark.contiguous,
                mark.above.len()
            ));
        }
    });
    if highest > r.log_tail {
        r.problem(format!(
            "meta log_tail {} is below the highest log sequence {highest}",
            r.log_tail
        ));
    }
    if r.state_upto > r.log_tail {
        r.problem(format!(
            "meta state_upto {} is past the log tail {}",
            r.state_upto, r.log_tail
        ));
    } else if r.state_upto < r.log_tail {
        // The records after state_upto must all still be in the log: a restart replays them.
        let first = log.first().ok().flatten().map(|(k, _)| k.value());
        if first.is_none_or(|f| f > r.state_upto + 1) {
            r.problem(format!(
                "meta state_upto {}: the log records after it (to {}) are not all retained \
                 (the log starts at {}): the state table misses them",
                r.state_upto,
                r.log_tail,
                first.map_or_else(|| "nothing".to_string(), |f| f.to_string())
            ));
        }
    }

    // The state table, and the digest over it.
    let mut digest = Digester::default();
    each(&state, "state", r, |r, (account, code): (&str, u8), v| {
        r.entries += 1;
        let at = format!("state[({account:?}, {code})]");
        let Some(etype) = EventType::from_code(code) else {
            return r.problem(format!("{at}: unknown event type code {code}"));
        };
        let entry: Entry = match postcard::from_bytes(v) {
            Ok(e) => e,
            Err(e) => return r.problem(format!("{at}: does not decode: {e}")),
        };
        if serde_json::from_slice::<serde_json::Value>(&entry.element).is_err() {
            r.problem(format!("{at}: element is not JSON"));
        }
        match messages.get(msg_key(entry.msg_key())) {
            Ok(Some(m)) => {
                if let Ok(m) = postcard::from_bytes::<StoredMsg>(m.value()) {
                    if m.msg_id != entry.msg_id {
                        r.problem(format!(
                            "{at}: set by message {}, but its key holds message {}",
                            entry.msg_id, m.msg_id
                        ));
                    }
                }
            }
            Ok(None) => r.entries_without_message += 1,
            Err(e) => r.problem(format!("{at}: reading its message record: {e}")),
        }
        digest.push(account, etype, &entry);
    });
    r.digest = digest.finish().0;
}

/// Every row of `table`, decoded keys and raw values; a row that cannot be read is reported.
fn each<K, V, F>(table: &redb::ReadOnlyTable<K, V>, name: &str, r: &mut Report, mut f: F)
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
    F: FnMut(&mut Report, K::SelfType<'_>, V::SelfType<'_>),
{
    let iter = match table.iter() {
        Ok(i) => i,
        Err(e) => return r.problem(format!("table {name}: cannot iterate: {e}")),
    };
    for row in iter {
        match row {
            Ok((k, v)) => f(r, k.value(), v.value()),
            Err(e) => {
                r.problem(format!("table {name}: unreadable row: {e}"));
                return;
            }
        }
    }
}

/// Log record `lseq`, if it exists and decodes.
fn log_record(log: &redb::ReadOnlyTable<u64, &'static [u8]>, lseq: u64) -> Option<ElementRecord> {
    let v = log.get(lseq).ok()??;
    postcard::from_bytes(v.value()).ok()
}

fn check_meta(meta: &redb::ReadOnlyTable<&'static str, &'static [u8]>, r: &mut Report) {
    let get = |key: &str| meta.get(key).ok().flatten().map(|v| v.value().to_vec());
    match get(META_SCHEMA_VERSION) {
        None => r.problem("meta schema_version: missing".into()),
        Some(v) => match <[u8; 4]>::try_from(v.as_slice()) {
            Ok(b) if u32::from_le_bytes(b) == SCHEMA_VERSION => {}
            Ok(b) => r.problem(format!(
                "meta schema_version: {} (this outpost reads {SCHEMA_VERSION})",
                u32::from_le_bytes(b)
            )),
            Err(_) => r.problem(format!("meta schema_version: {} bytes, not 4", v.len())),
        },
    }
    match get(META_NODE) {
        None => r.problem("meta node: missing (the node identity; was `outpost init` run?)".into()),
        Some(v) => match postcard::from_bytes::<NodeMeta>(&v) {
            Ok(n) => {
                if n.log_epoch == 0 {
                    r.problem("meta node: log epoch 0".into());
                }
                r.node = Some(n);
            }
            Err(e) => r.problem(format!("meta node: does not decode: {e}")),
        },
    }
    if let Some(v) = get(META_HLC) {
        if v.len() != 12 {
            r.problem(format!("meta hlc: {} bytes, not 12", v.len()));
        }
    }
    match get(META_LOG_TAIL).map(|v| <[u8; 8]>::try_from(v.as_slice())) {
        None => {}
        Some(Ok(b)) => r.log_tail = u64::from_le_bytes(b),
        Some(Err(_)) => r.problem("meta log_tail: not 8 bytes".into()),
    }
    match get(super::tables::META_STATE_UPTO).map(|v| <[u8; 8]>::try_from(v.as_slice())) {
        None => {}
        Some(Ok(b)) => r.state_upto = u64::from_le_bytes(b),
        Some(Err(_)) => r.problem("meta state_upto: not 8 bytes".into()),
    }
    match get(super::backup::META_RESTORED) {
        None => {}
        Some(v) if v == [1u8] => r.restored = true,
        Some(v) => r.problem(format!("meta restored: {v:?}, expected [1]")),
    }
    for secret in ["tls_cert_der", "tls_key_der"] {
        if get(&format!("secret/{secret}")).is_none() {
            r.problem(format!(
                "meta secret/{secret}: missing (the node's TLS identity)"
            ));
        }
    }
}
