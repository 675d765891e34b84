//! Consistent copies of the database, for `GET /v1/backup` and `outpost backup --offline`: every
//! table copied from ONE read transaction into a fresh redb file, which is then marked as a
//! restore: meta `restored` = 1 and a new random log epoch, so that a node started from it never
//! reuses the cursor space of the log it was copied from (peers acknowledged positions of the old
//! epoch that the copy may not hold). The node's restore catch-up reads [`Store::restored`] and,
//! once caught up, calls [`Store::clear_restored`].
//!
//! It must never write to the database it copies, nor keep the read transaction open longer
//! than the copy takes (it pins old pages): the caller streams the finished file, not the
//! transaction.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, Key, ReadableDatabase, ReadableTable, TableDefinition, Value};

use super::cluster::{CHANNEL, CONFIG, DEPLOYMENTS, MACHINES};
use super::tables::{LOG, MARKS, MESSAGES, META, META_NODE, PEERS, STATE};
use super::{db_err, decode, NodeMeta, Result, Store};
use crate::limits::BACKUP_COPY_ROWS_PER_TXN;
use crate::limits::STORE_CACHE_BYTES;
use crate::replication::StoreError;

/// Meta key: present with value `[1]` in a database restored from a backup until the node has
/// caught up its own log from its peers.
pub const META_RESTORED: &str = "restored";
/// Where backups are assembled, inside the data directory (writable under systemd's
/// `ProtectSystem=strict`, and on the same file system as the database).
pub const TMP_DIR: &str = "tmp";

/// What a backup wrote.
#[derive(Clone, Debug)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub bytes: u64,
    /// Rows copied, over every table.
    pub rows: u64,
    /// The copy's new log epoch.
    pub log_epoch: u64,
}

impl Store {
    /// A fresh path for a backup under `DATA_DIR/tmp/`, creating the directory.
    pub fn backup_tmp_path(&self) -> io::Result<PathBuf> {
        let dir = self
            .path
            .parent()
            .map_or_else(|| PathBuf::from(TMP_DIR), |d| d.join(TMP_DIR));
        crate::fsmode::create_private_dir_all(&dir)?;
        Ok(dir.join(format!(
            "backup-{}-{}.redb",
            std::process::id(),
            hex::encode(rand::random::<[u8; 6]>())
        )))
    }

    /// Writes a consistent copy of the database to `dest` (which must not exist; created mode
    /// 0600: it holds the node's private key), marked as restored with a new log epoch. On
    /// failure nothing is left at `dest`.
    pub fn backup_to(&self, dest: &Path) -> Result<BackupInfo> {
        let r = self.copy_into(dest);
        if r.is_err() {
            let _ = fs::remove_file(dest);
        }
        r
    }

    fn copy_into(&self, dest: &Path) -> Result<BackupInfo> {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| io_err(dest, e))?;
        let out = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(dest)
            .map_err(db_err)?;
        let mut rows = 0;
        {
            // The one read transaction every table is copied from.
            let src = self.db.begin_read().map_err(db_err)?;
            rows += copy_table(&src, &out, META)?;
            rows += copy_table(&src, &out, STATE)?;
            rows += copy_table(&src, &out, LOG)?;
            rows += copy_table(&src, &out, MESSAGES)?;
            rows += copy_table(&src, &out, MARKS)?;
            rows += copy_table(&src, &out, PEERS)?;
            // The cluster roles' tables (a database holds one role; the others are absent).
            rows += copy_table(&src, &out, MACHINES)?;
            rows += copy_table(&src, &out, CHANNEL)?;
            rows += copy_table(&src, &out, DEPLOYMENTS)?;
            rows += copy_table(&src, &out, CONFIG)?;
        }
        let log_epoch = mark_restored(&out)?;
        // The copy's state table is complete up to the source's `state_upto`; the records after
        // it (still in the copied log) are merged into it now, so the backup is whole as it is
        // (what `db check` and a restore read).
        let copy = Store {
            db: out,
            path: dest.to_owned(),
            overlay: std::sync::Arc::new(super::StateOverlay::new(0)),
        };
        copy.replay_state(true)?;
        drop(copy);
        let bytes = fs::metadata(dest).map_err(|e| io_err(dest, e))?.len();
        Ok(BackupInfo {
            path: dest.to_owned(),
            bytes,
            rows,
            log_epoch,
        })
    }

    /// Whether this database was restored from a backup and has not yet caught up its own log.
    pub fn restored(&self) -> Result<bool> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let v = meta.get(META_RESTORED).map_err(db_err)?;
        Ok(v.is_some_and(|v| v.value() == [1u8]))
    }

    /// Clears the restored mark, durably. Opens a write transaction: call it from the writer
    /// thread (or before it starts), never from a tokio worker.
    pub fn clear_restored(&self) -> Result<()> {
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate).map_err(db_err)?;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.remove(META_RESTORED).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }
}

fn io_err(path: &Path, e: io::Error) -> StoreError {
    let full = matches!(e.raw_os_error(), Some(c) if c == libc::ENOSPC || c == libc::EDQUOT);
    let m = format!("{}: {e}", path.display());
    if full {
        StoreError::Full(m)
    } else {
        StoreError::Io(m)
    }
}

/// Copies one table in chunks of non-durable transactions; the last commit (in
/// [`mark_restored`]) makes them all durable.
fn copy_table<K: Key + 'static, V: Value + 'static>(
    src: &redb::ReadTransaction,
    out: &Database,
    def: TableDefinition<K, V>,
) -> Result<u64> {
    let table = match src.open_table(def) {
        Ok(t) => t,
        // Another role's table: nothing to copy.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(db_err(e)),
    };
    let mut rows = table.iter().map_err(db_err)?;
    let mut copied = 0;
    loop {
        let mut txn = out.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::None).map_err(db_err)?;
        let mut done = false;
        {
            let mut t = txn.open_table(def).map_err(db_err)?;
            for _ in 0..BACKUP_COPY_ROWS_PER_TXN {
                let Some(row) = rows.next() else {
                    done = true;
                    break;
                };
                let (k, v) = row.map_err(db_err)?;
                t.insert(k.value(), v.value()).map_err(db_err)?;
                copied += 1;
            }
        }
        txn.commit().map_err(db_err)?;
        if done {
            return Ok(copied);
        }
    }
}

/// Gives the copy a new log epoch and the restored mark, in its final, durable commit.
fn mark_restored(out: &Database) -> Result<u64> {
    let mut txn = out.begin_write().map_err(db_err)?;
    txn.set_durability(Durability::Immediate).map_err(db_err)?;
    let epoch;
    {
        let mut meta = txn.open_table(META).map_err(db_err)?;
        let node: NodeMeta = match meta.get(META_NODE).map_err(db_err)? {
            Some(v) => decode("node meta", v.value())?,
            None => {
                return Err(StoreError::Corrupt(
                    "no node identity to back up (was `outpost init` run?)".into(),
                ))
            }
        };
        epoch = loop {
            let e = rand::random::<u64>() | 1;
            if e != node.log_epoch {
                break e;
            }
        };
        let node = NodeMeta {
            log_epoch: epoch,
            ..node
        };
        let bytes = postcard::to_stdvec(&node).expect("postcard encodes plain structs");
        meta.insert(META_NODE, bytes.as_slice()).map_err(db_err)?;
        meta.insert(META_RESTORED, &[1u8][..]).map_err(db_err)?;
    }
    txn.commit().map_err(db_err)?;
    Ok(epoch)
}
