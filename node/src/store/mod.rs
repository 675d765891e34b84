//! The node's durable storage: the one module that opens redb. It owns the database file
//! `DATA_DIR/outpost.redb`, its schema version, the node's identity record and secrets, and
//! typed transactions that implement the replication storage traits
//! ([`crate::replication::Tables`] for one write transaction, [`crate::replication::LogRead`] for
//! one read transaction) with the same behaviour as [`crate::replication::mem::MemStore`].
//!
//! It must never: decide anything (replication rules live in `replication::core`), commit behind
//! the caller's back, fsync outside [`WriteTxn::commit`], or hand out a redb type. redb allows one
//! write transaction at a time and `begin`/`commit` block: only the writer thread calls
//! [`Store::begin`], never a tokio worker.
//!
//! Layout (schema version 3). Keys are redb-native so that redb's key order is the order the
//! code relies on; values are postcard unless marked. `meta`'s own key and value types never
//! change, so any version can read `schema_version` before touching anything else.
//!
//! What an acknowledgement waits for writes the log and the message records, both at the end of
//! their key order (the log by local sequence; message records by origin then origin
//! sequence: one append point per origin). The state entries it changes stay in memory
//! ([`overlay`], version 3) and reach the state table later in key-ordered flush rounds;
//! `meta.state_upto` says up to which log position the table is complete, and opening the
//! database merges the log after it into the state. Version 1 keyed
//! message records by their random blake3 id, plus an index by origin: two rows per event at
//! random places, written and later deleted. A message is still named by its id: the state entry
//! and the log record say where its record is, and a lookup by id alone scans the retained log.
//! Version 1 databases are migrated when opened (one transaction, one log line).
//!
//! ```text
//! table          key                          value
//! ─────────────  ───────────────────────────  ─────────────────────────────────────────────
//! meta           &str "schema_version"        u32 little-endian (raw)
//!                &str "node"                  NodeMeta
//!                &str "hlc"                   u64 ms LE ++ u32 logical LE (raw, 12 bytes)
//!                &str "log_tail"              u64 LE (raw); highest lseq ever appended, kept
//!                                             apart from `log` so trimming never lowers it
//!                &str "state_upto"            u64 LE (raw); the state table holds every log
//!                                             record up to here; retention keeps the rest
//!                &str "secret/NAME"           raw bytes (identity material)
//! state          (&str account, u8 etype)     Entry          order = MemStore's (String, u8)
//! log            u64 lseq                     ElementRecord  local log, trimmed at the head
//! messages_by_origin                          StoredMsg      {id, lseq, first seen, senders};
//!                (u128 origin, u64 oseq,                     deleted with its log record
//!                 u64 first 8 bytes of id BE)
//! marks          u128 origin                  Mark
//! peers          u128 peer                    PeerProgress
//! ```

pub mod backup;
pub mod check;
pub(crate) mod cluster;
mod overlay;
mod read;
mod tables;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use overlay::{Round, StateOverlay};
pub use read::{ReadTxn, StateRow};
pub use tables::{FlushPlan, RedbTables};

use crate::ids::NodeId;
use crate::replication::StoreError;
use crate::wire::Role;
use overlay::TxnState;
use tables::{META, META_NODE, META_SCHEMA_VERSION};

use crate::limits::{
    SECRET_BYTES_MAX, SECRET_NAME_BYTES_MAX, STATE_CLEAN_BYTES_MAX, STORE_CACHE_BYTES,
};
use crate::model::EventType;
use crate::replication::Entry;

pub const SCHEMA_VERSION: u32 = 3;
pub const DB_FILE: &str = "outpost.redb";

type Result<T> = std::result::Result<T, StoreError>;

/// Why the database could not be opened. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the database {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// redb holds an exclusive lock on the file while a process has it open.
    #[error(
        "the database {path} is in use by another process \
         (is outpost already running with this data directory?)"
    )]
    Locked { path: PathBuf },
    #[error(
        "database schema version {found} at {path} is newer than this outpost supports \
         ({supported}); upgrade outpost"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("the database {path} is corrupt or not an outpost database: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot open the database {path}: the disk is full: {detail}")]
    Full { path: PathBuf, detail: String },
    /// Any other refusal from redb (an old file format, an aborted repair).
    #[error("cannot open the database {path}: {detail}")]
    Storage { path: PathBuf, detail: String },
}

/// Who this node is; written once when the database is created, never changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub node_id: NodeId,
    pub role: Role,
    pub name: String,
    /// Incarnation of the local log; nonzero.
    pub log_epoch: u64,
    pub created_ms: u64,
}

/// An open database. `Send + Sync`: share it (e.g. in an `Arc`) between the writer thread and
/// readers.
pub struct Store {
    pub(crate) db: Database,
    path: PathBuf,
    overlay: Arc<StateOverlay>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens `data_dir/outpost.redb`, creating the directory and the database if missing, and
    /// checks (or, when new, writes) the schema version.
    pub fn open(data_dir: &Path) -> std::result::Result<Store, OpenError> {
        let path = data_dir.join(DB_FILE);
        // Owner-only before redb opens the file: it would otherwise create it with the umask's
        // mode, and it holds the node's private keys.
        crate::fsmode::prepare_data_dir(data_dir, DB_FILE).map_err(|source| OpenError::Io {
            path: path.clone(),
            source,
        })?;
        // redb can panic instead of erring on a badly damaged file; that must be a clear
        // refusal to start, not a crash.
        let opened = std::panic::catch_unwind(|| {
            Database::builder()
                .set_cache_size(STORE_CACHE_BYTES)
                .create(&path)
        })
        .map_err(|_| OpenError::Corrupt {
            path: path.clone(),
            detail: "the storage engine could not read this file (damaged); run `outpost db check` and restore from a backup".into(),
        })?;
        let db = opened.map_err(|e| open_err(&path, e))?;
        Store::opened(db, path)
    }

    /// Opens a database over any redb storage backend (the fault-injecting one of the store's
    /// tests); `path` only names it in errors.
    #[cfg(test)]
    pub(crate) fn open_backend(
        backend: impl redb::StorageBackend,
        path: &Path,
    ) -> std::result::Result<Store, OpenError> {
        let path = path.to_path_buf();
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create_with_backend(backend)
            .map_err(|e| open_err(&path, e))?;
        Store::opened(db, path)
    }

    fn opened(db: Database, path: PathBuf) -> std::result::Result<Store, OpenError> {
        let store = Store {
            db,
            path,
            overlay: Arc::new(StateOverlay::new(STATE_CLEAN_BYTES_MAX)),
        };
        store.check_schema()?;
        store
            .replay_state(false)
            .map_err(|e| corrupt_open(&store.path, e))?;
        Ok(store)
    }

    /// Recovery after a crash: merges the log records after `state_upto` (committed and
    /// acknowledged, but not yet in the state table when the process stopped) into the state.
    /// Merging is idempotent, so records the table already reflects are harmless. Bounded by
    /// the writer's flush policy (`STATE_REPLAY_RECORDS_MAX`).
    ///
    /// When opening (`write` false) nothing is written: the merged entries go to the overlay as
    /// dirty, and the writer's next flush round writes them (so a node can open on a full disk
    /// and serve reads). A backup copy (`write` true) writes them to its table.
    pub(super) fn replay_state(&self, write: bool) -> Result<()> {
        let txn = self.begin()?;
        let replayed = {
            let mut t = txn.tables_write_back()?;
            let upto = t.state_upto();
            let tail = crate::replication::Tables::log_tail(&t)?;
            // Invariant at load: the table is complete up to a position of the log, never past
            // its tail (every commit that moves `state_upto` asserts it, see the overlay).
            if upto > tail {
                return Err(StoreError::Corrupt(format!(
                    "the state table is said to be complete up to log position {upto}, past the \
                     log tail {tail}"
                )));
            }
            if upto == tail {
                return Ok(());
            }
            if let Some(first) = crate::replication::LogRead::log_first(&t)? {
                if first > upto + 1 {
                    return Err(StoreError::Corrupt(format!(
                        "the state table is complete up to log position {upto}, but the log \
                         starts at {first}: records in between are gone"
                    )));
                }
            }
            let mut after = upto;
            let mut n = 0u64;
            loop {
                let recs = crate::replication::LogRead::log_range(&t, after, 4096)?;
                let Some((last, _)) = recs.last() else { break };
                after = *last;
                for (_, rec) in &recs {
                    crate::replication::core::replay_record(&mut t, rec)?;
                    n += 1;
                }
            }
            let plan = if write {
                FlushPlan::all(tail)
            } else {
                FlushPlan {
                    through: false,
                    round: None,
                    chunk_max: 0,
                }
            };
            t.finish_with(&plan)?;
            n
        };
        if write {
            txn.commit()?;
        } else {
            // Nothing was written to the tables: abort, and give the overlay what the log says.
            let state = txn.state.take();
            drop(txn);
            self.overlay.committed(state);
        }
        tracing::info!(
            "merged {replayed} log records written after the last state flush into the state of {}",
            self.path.display()
        );
        Ok(())
    }

    /// The digest and entry count of the committed state without asking the writer to flush:
    /// the table merged, in key order, with the overlay's dirty entries. Exact while nothing
    /// commits (a full disk); otherwise a commit landing between the read transaction and the
    /// copy of the overlay may show in part. Readers that can, flush first and use
    /// [`ReadTxn::digest`].
    pub fn digest_merged(&self) -> Result<(String, u64)> {
        let (r, dirty) = self
            .overlay
            .with_dirty(|d| self.read().map(|r| (r, d.all())))?;
        let mut out = crate::replication::core::Digester::default();
        let mut dirty = dirty.into_iter().peekable();
        let mut after: Option<(String, EventType)> = None;
        loop {
            let rows = r.entries_after(after.as_ref().map(|(a, t)| (a.as_str(), *t)), 4096)?;
            let Some((a, t, _)) = rows.last() else { break };
            after = Some((a.clone(), *t));
            for (account, etype, entry) in rows {
                let key = (account, etype.code());
                while let Some(((da, dc), de)) = dirty.next_if(|(k, _)| *k < key) {
                    out.push(&da, type_code(dc)?, &de);
                }
                match dirty.next_if(|(k, _)| *k == key) {
                    Some((_, de)) => out.push(&key.0, etype, &de),
                    None => out.push(&key.0, etype, &entry),
                }
            }
        }
        for ((da, dc), de) in dirty {
            out.push(&da, type_code(dc)?, &de);
        }
        Ok(out.finish())
    }

    /// Entries of the committed state: the table's rows plus the dirty entries of keys it does
    /// not hold yet. Needs no flush (the metrics and the status line read it often).
    pub fn entry_count(&self) -> Result<u64> {
        let dirty_new = self.overlay.dirty_new();
        Ok(self.read()?.entry_count()? + dirty_new)
    }

    /// The overlay of committed state entries not yet (or also) in the state table.
    pub fn overlay(&self) -> &StateOverlay {
        &self.overlay
    }

    /// The account's committed state rows, of one type or all, in key order: from the overlay
    /// where it holds them, else from the table (looked up in that order; see
    /// [`overlay`](overlay::StateOverlay)).
    pub fn state(&self, account: &str, etype: Option<EventType>) -> Result<Vec<StateRow>> {
        let types: Vec<EventType> = match etype {
            Some(t) => vec![t],
            None => EventType::ALL.to_vec(),
        };
        let held: Vec<(EventType, Option<Entry>)> = types
            .into_iter()
            .map(|t| (t, self.overlay.get(account, t)))
            .collect();
        let r = self.read()?;
        let mut out = Vec::new();
        for (t, e) in held {
            let e = match e {
                Some(e) => Some(e),
                None => r.entry(account, t)?,
            };
            if let Some(e) = e {
                out.push(r.row(account.to_string(), t, e)?);
            }
        }
        // `EventType::ALL` is in code order: the rows are in key order already.
        Ok(out)
    }

    fn check_schema(&self) -> std::result::Result<(), OpenError> {
        let path = &self.path;
        let txn = self.db.begin_write().map_err(|e| open_err(path, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| open_err(path, e))?;
            let found = meta
                .get(META_SCHEMA_VERSION)
                .map_err(|e| open_err(path, e))?
                .map(|v| fixed::<4>(v.value()).map(u32::from_le_bytes));
            match found {
                Some(Err(e)) => return Err(corrupt_open(path, e)),
                Some(Ok(v)) if v > SCHEMA_VERSION => {
                    return Err(OpenError::NewerSchema {
                        path: path.clone(),
                        found: v,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(Ok(v @ (1 | 2))) => {
                    if v == 1 {
                        let done = tables::migrate_v1(&txn).map_err(|e| corrupt_open(path, e))?;
                        tracing::info!(
                            "migrated the database {} from schema version 1 to 2: \
                             {} message records rekeyed by origin, {} state entries",
                            path.display(),
                            done.messages,
                            done.entries
                        );
                    }
                    // 2 to 3: the state table of a version 2 database is complete up to its
                    // log tail (version 2 wrote it with every commit).
                    let tail = tables::read_log_tail(&meta).map_err(|e| corrupt_open(path, e))?;
                    meta.insert(tables::META_STATE_UPTO, &tail.to_le_bytes()[..])
                        .map_err(|e| open_err(path, e))?;
                    meta.insert(META_SCHEMA_VERSION, &SCHEMA_VERSION.to_le_bytes()[..])
                        .map_err(|e| open_err(path, e))?;
                    tracing::info!(
                        "migrated the database {} from schema version 2 to {SCHEMA_VERSION}: \
                         the state table is complete up to log position {tail}",
                        path.display(),
                    );
                }
                Some(Ok(v)) if v < SCHEMA_VERSION => {
                    return Err(OpenError::Corrupt {
                        path: path.clone(),
                        detail: format!("unknown schema version {v}"),
                    });
                }
                Some(Ok(_)) => {}
                None => {
                    if !meta.is_empty().map_err(|e| open_err(path, e))? {
                        return Err(OpenError::Corrupt {
                            path: path.clone(),
                            detail: "no schema version recorded".into(),
                        });
                    }
                    meta.insert(META_SCHEMA_VERSION, &SCHEMA_VERSION.to_le_bytes()[..])
                        .map_err(|e| open_err(path, e))?;
                }
            }
        }
        // Creates any missing table, so read transactions always find them all.
        tables::create_all(&txn).map_err(|e| open_err(path, e))?;
        txn.commit().map_err(|e| open_err(path, e))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> Result<Option<NodeMeta>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let v = meta.get(META_NODE).map_err(db_err)?;
        v.map(|v| decode("node meta", v.value())).transpose()
    }

    /// Records the node's identity, once. Writing the same identity again is a no-op; a
    /// different one is refused, since the node id names the origin of every element.
    pub fn init_meta(&self, m: &NodeMeta) -> Result<()> {
        assert!(m.log_epoch != 0, "log_epoch must be nonzero");
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate).map_err(db_err)?;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let existing: Option<NodeMeta> = meta
                .get(META_NODE)
                .map_err(db_err)?
                .map(|v| decode("node meta", v.value()))
                .transpose()?;
            match existing {
                Some(e) if &e == m => return Ok(()),
                Some(e) => {
                    return Err(StoreError::Corrupt(format!(
                        "{}: node identity already recorded (node id {}, role {}, name {:?}); \
                         refusing to replace it",
                        self.path.display(),
                        e.node_id,
                        e.role,
                        e.name
                    )));
                }
                None => {}
            }
            let bytes = postcard::to_stdvec(m).expect("postcard encodes plain structs");
            meta.insert(META_NODE, bytes.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub fn secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let v = meta.get(secret_key(name).as_str()).map_err(db_err)?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    /// Stores identity material under `name` ("tls_cert_der", "tls_key_der", ...), replacing
    /// what was there, in its own durable transaction.
    pub fn put_secret(&self, name: &str, bytes: &[u8]) -> Result<()> {
        assert!(
            !name.is_empty() && name.len() <= SECRET_NAME_BYTES_MAX,
            "secret name {name:?} must have 1..={SECRET_NAME_BYTES_MAX} bytes"
        );
        assert!(
            bytes.len() <= SECRET_BYTES_MAX,
            "secret {name:?} of {} bytes, at most {SECRET_BYTES_MAX}",
            bytes.len()
        );
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate).map_err(db_err)?;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert(secret_key(name).as_str(), bytes)
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Runs `f` in one write transaction over every table and commits it (with an fsync) if
    /// `f` succeeds; on an error nothing of it is kept. The way to write through [`Tables`]:
    /// it flushes what [`RedbTables`] keeps back before the commit.
    pub fn write<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut RedbTables<'_>) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let txn = self.begin()?;
        let r = {
            let mut t = txn.tables()?;
            let r = f(&mut t)?;
            t.finish()?;
            r
        };
        txn.commit()?;
        Ok(r)
    }

    /// Begins the (only) write transaction; blocks while another is open. Its commit fsyncs.
    pub fn begin(&self) -> Result<WriteTxn> {
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate).map_err(db_err)?;
        Ok(WriteTxn {
            txn,
            overlay: self.overlay.clone(),
            state: RefCell::new(TxnState::default()),
        })
    }

    /// A snapshot of what is committed. Finish it promptly: it pins old pages.
    pub fn read(&self) -> Result<ReadTxn> {
        let txn = self.db.begin_read().map_err(db_err)?;
        ReadTxn::new(&txn)
    }
}

/// One write transaction. Dropping it without [`WriteTxn::commit`] aborts it: nothing of it
/// becomes visible, in the tables or in the state overlay.
pub struct WriteTxn {
    pub(crate) txn: redb::WriteTransaction,
    overlay: Arc<StateOverlay>,
    /// The state entries written by this transaction's table sessions so far, and what its
    /// commit tells the overlay.
    state: RefCell<TxnState>,
}

impl WriteTxn {
    /// Opens every table once for this transaction. Only one [`RedbTables`] may be alive per
    /// transaction at a time (redb refuses to open a table twice); a later one sees what an
    /// earlier one wrote. What it keeps back is written by [`RedbTables::finish`] (or
    /// `finish_with`): call it before [`WriteTxn::commit`] (or use [`Store::write`], which does).
    pub fn tables(&self) -> Result<RedbTables<'_>> {
        RedbTables::open(&self.txn, &self.overlay, &self.state, false)
    }

    /// The writer's session: like [`WriteTxn::tables`], but [`RedbTables::finish_with`] may
    /// leave the state entries in the overlay (write-back), and retention keeps every record
    /// after `state_upto`.
    pub fn tables_write_back(&self) -> Result<RedbTables<'_>> {
        RedbTables::open(&self.txn, &self.overlay, &self.state, true)
    }

    /// Commits and fsyncs; then the state overlay takes in what this transaction did to the
    /// state (only then: an entry in the overlay is always committed).
    pub fn commit(self) -> Result<()> {
        self.txn.commit().map_err(db_err)?;
        self.overlay.committed(self.state.into_inner());
        Ok(())
    }
}

fn type_code(code: u8) -> Result<EventType> {
    EventType::from_code(code)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown event type code {code} in state")))
}

fn secret_key(name: &str) -> String {
    format!("secret/{name}")
}

/// Maps a redb error onto the storage error the replication core understands.
pub(crate) fn db_err(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(e) if is_full(&e) => StoreError::Full(e.to_string()),
        redb::Error::Io(e) => StoreError::Io(e.to_string()),
        redb::Error::Corrupted(m) => StoreError::Corrupt(m),
        // redb latches the first I/O failure: every later operation fails until reopened.
        redb::Error::PreviousIo => StoreError::Io(
            "an earlier write failed; the database must be reopened (restart outpost)".into(),
        ),
        other => StoreError::Io(other.to_string()),
    }
}

fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == libc::ENOSPC || c == libc::EDQUOT)
}

fn open_err(path: &Path, e: impl Into<redb::Error>) -> OpenError {
    let path = path.to_path_buf();
    match e.into() {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            OpenError::Locked { path }
        }
        redb::Error::Io(e) if is_full(&e) => OpenError::Full {
            path,
            detail: e.to_string(),
        },
        // redb's answer to a file that is not a redb database.
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => OpenError::Corrupt {
            path,
            detail: e.to_string(),
        },
        redb::Error::Io(source) => OpenError::Io { path, source },
        redb::Error::Corrupted(detail) => OpenError::Corrupt { path, detail },
        other => OpenError::Storage {
            path,
            detail: other.to_string(),
        },
    }
}

fn corrupt_open(path: &Path, e: StoreError) -> OpenError {
    OpenError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A fixed-width raw value.
pub(crate) fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N]> {
    bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "expected a {N}-byte value, found {} bytes",
            bytes.len()
        ))
    })
}
