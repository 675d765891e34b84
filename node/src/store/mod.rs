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
//! Layout (schema version 2). Keys are redb-native so that redb's key order is the order the
//! code relies on; values are postcard unless marked. `meta`'s own key and value types never
//! change, so any version can read `schema_version` before touching anything else.
//!
//! What an acknowledgement waits for writes the log and the message records, both at the end of
//! their key order (the log by local sequence; message records by origin then origin
//! sequence: one append point per origin), and the state entry of the account. Version 1 keyed
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
mod cluster;
mod read;
mod tables;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use read::{ReadTxn, StateRow};
pub use tables::{RedbTables, StateCache, StateWrites};

use crate::ids::NodeId;
use crate::replication::StoreError;
use crate::wire::Role;
use tables::{META, META_NODE, META_SCHEMA_VERSION};

pub const SCHEMA_VERSION: u32 = 2;
pub const DB_FILE: &str = "outpost.redb";
/// redb's page cache. The default (1 GiB) is too much for a small edge box; the working set
/// (state table + log head + indexes) of a busy node fits comfortably in this.
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Bounds on what [`Store::put_secret`] accepts: identity material is small.
pub const SECRET_NAME_BYTES_MAX: usize = 64;
pub const SECRET_BYTES_MAX: usize = 64 * 1024;

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
    db: Database,
    path: PathBuf,
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
                .set_cache_size(CACHE_BYTES)
                .create(&path)
        })
        .map_err(|_| OpenError::Corrupt {
            path: path.clone(),
            detail: "the storage engine could not read this file (damaged); run `outpost db check` and restore from a backup".into(),
        })?;
        let db = opened.map_err(|e| open_err(&path, e))?;
        let store = Store { db, path };
        store.check_schema()?;
        Ok(store)
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
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(backend)
            .map_err(|e| open_err(&path, e))?;
        let store = Store { db, path };
        store.check_schema()?;
        Ok(store)
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
                Some(Ok(1)) => {
                    let done = tables::migrate_v1(&txn).map_err(|e| corrupt_open(path, e))?;
                    meta.insert(META_SCHEMA_VERSION, &SCHEMA_VERSION.to_le_bytes()[..])
                        .map_err(|e| open_err(path, e))?;
                    tracing::info!(
                        "migrated the database {} from schema version 1 to {SCHEMA_VERSION}: \
                         {} message records rekeyed by origin, {} state entries",
                        path.display(),
                        done.messages,
                        done.entries
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
            opened: std::cell::Cell::new(false),
        })
    }

    /// A snapshot of what is committed. Finish it promptly: it pins old pages.
    pub fn read(&self) -> Result<ReadTxn> {
        let txn = self.db.begin_read().map_err(db_err)?;
        ReadTxn::new(&txn)
    }
}

/// One write transaction. Dropping it without [`WriteTxn::commit`] aborts it: nothing of it
/// becomes visible.
pub struct WriteTxn {
    txn: redb::WriteTransaction,
    /// Whether a table session was opened: a later one may not trust a cache of committed
    /// entries (an earlier session of this transaction may have written them).
    opened: std::cell::Cell<bool>,
}

impl WriteTxn {
    /// Opens every table once for this transaction. Only one [`RedbTables`] may be alive per
    /// transaction at a time (redb refuses to open a table twice). What it keeps back is
    /// written by [`RedbTables::finish`]: call it before [`WriteTxn::commit`] (or use
    /// [`Store::write`], which does).
    pub fn tables(&self) -> Result<RedbTables<'_>> {
        self.opened.set(true);
        RedbTables::open(&self.txn, None)
    }

    /// The same, reading state entries through the writer's cache of committed entries (only
    /// in the transaction's first table session: a later one reads the table).
    pub fn tables_cached<'a>(&'a self, cache: &'a StateCache) -> Result<RedbTables<'a>> {
        let first = !self.opened.replace(true);
        RedbTables::open(&self.txn, first.then_some(cache))
    }

    /// Commits and fsyncs.
    pub fn commit(self) -> Result<()> {
        self.txn.commit().map_err(db_err)
    }
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
