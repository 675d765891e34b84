//! File modes of everything a node keeps on disk. The data directory is `0750`: its group (the
//! `outpost` group operators join) may enter it to read the API token (`0640`), and nothing else
//! in it. The database (TLS key, a controller's signing key, machine keys), sealed and plaintext
//! bundles, installed software and every other file or directory a node creates there are
//! owner-only (`0600` / `0700`), whatever the process umask: modes are set at creation (the umask
//! can only remove bits from them) and an existing installation is tightened on start.
//!
//! This module never widens a mode and never touches anything outside the data directory.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The data directory: owner rwx, group r-x (to reach `token`), others nothing.
pub const DATA_DIR_MODE: u32 = 0o750;
/// Directories below the data directory.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Files holding secrets or state: the database, bundles, keys.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// The API token: the `outpost` group may read it (it grants API access, never a key).
pub const TOKEN_FILE_MODE: u32 = 0o640;
/// The one file of the data directory the group may read.
pub const TOKEN_FILE: &str = "token";

/// Creates `dir` and any missing parents as owner-only directories.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Creates the data directory (`0750`) if it does not exist. Missing parents are created with
/// the usual modes: they are the operator's (`/var/lib`), only the last component is ours.
pub fn create_data_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(DATA_DIR_MODE).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens options for a new owner-only file (`create_new`, write).
pub fn private_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true).mode(PRIVATE_FILE_MODE);
    o
}

/// Creates `path` as an empty owner-only file unless it exists, so that a library that
/// creates files with the umask's mode (redb) opens ours instead.
pub fn ensure_private_file(path: &Path) -> io::Result<()> {
    match private_file_options().open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// One mode changed on start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tightened {
    pub path: String,
    pub from: u32,
    pub to: u32,
}

impl std::fmt::Display for Tightened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:04o} -> {:04o}", self.path, self.from, self.to)
    }
}

/// Removes from `path`'s mode every bit that `allowed` does not have. Symbolic links are left
/// alone (their target may be outside the data directory).
fn tighten(path: &Path, allowed: u32, out: &mut Vec<Tightened>) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o7777;
    let to = mode & allowed;
    if to != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(to))?;
        out.push(Tightened {
            path: path.display().to_string(),
            from: mode,
            to,
        });
    }
    Ok(())
}

/// Tightens an existing data directory: the directory to at most `0750`, the token to at most
/// `0640`, every other entry directly in it to owner-only (directories are not walked: what is
/// below an owner-only directory is out of every other user's reach). Returns what changed.
pub fn tighten_data_dir(dir: &Path) -> io::Result<Vec<Tightened>> {
    let mut out = Vec::new();
    tighten(dir, DATA_DIR_MODE, &mut out)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let allowed = if ft.is_dir() {
            PRIVATE_DIR_MODE
        } else if entry.file_name() == TOKEN_FILE {
            TOKEN_FILE_MODE
        } else {
            PRIVATE_FILE_MODE
        };
        tighten(&entry.path(), allowed, &mut out)?;
    }
    Ok(out)
}

/// The data directory prepared for a node: created if missing, tightened if it exists, and the
/// database file created owner-only before the storage engine opens it. Logs one line when a
/// mode had to be tightened.
pub fn prepare_data_dir(dir: &Path, db_file: &str) -> io::Result<()> {
    create_data_dir(dir)?;
    let tightened = tighten_data_dir(dir)?;
    ensure_private_file(&dir.join(db_file))?;
    if !tightened.is_empty() {
        let list: Vec<String> = tightened.iter().map(|t| t.to_string()).collect();
        tracing::warn!(
            "tightened file modes in the data directory (keys must not be readable by other users): {}",
            list.join(", ")
        );
    }
    Ok(())
}

/// The mode bits of `path` (for status and tests).
pub fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(label: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "outpost-fsmode-{label}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn loose_installation_is_tightened_and_the_token_stays_group_readable() {
        let root = tmp("loose");
        let dir = root.join("data");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        for (name, mode) in [
            ("outpost.redb", 0o644),
            ("token", 0o664),
            ("pool.json", 0o666),
        ] {
            fs::write(dir.join(name), b"x").unwrap();
            fs::set_permissions(dir.join(name), fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::create_dir(dir.join("bundles")).unwrap();
        fs::set_permissions(dir.join("bundles"), fs::Permissions::from_mode(0o755)).unwrap();

        let changed = tighten_data_dir(&dir).unwrap();
        assert_eq!(changed.len(), 5, "{changed:?}");
        assert_eq!(mode_of(&dir).unwrap(), 0o750);
        assert_eq!(mode_of(&dir.join("outpost.redb")).unwrap(), 0o600);
        assert_eq!(mode_of(&dir.join("pool.json")).unwrap(), 0o600);
        assert_eq!(mode_of(&dir.join("token")).unwrap(), 0o640);
        assert_eq!(mode_of(&dir.join("bundles")).unwrap(), 0o700);
        // A second pass finds nothing to do, and nothing is ever widened.
        assert!(tighten_data_dir(&dir).unwrap().is_empty());
        fs::set_permissions(dir.join("token"), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(tighten_data_dir(&dir).unwrap().is_empty());
        assert_eq!(mode_of(&dir.join("token")).unwrap(), 0o600);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn created_directories_and_files_are_owner_only() {
        let root = tmp("create");
        let dir = root.join("data");
        create_data_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir).unwrap() & !DATA_DIR_MODE, 0);
        create_private_dir_all(&dir.join("bundles/sealed")).unwrap();
        assert_eq!(mode_of(&dir.join("bundles")).unwrap() & 0o077, 0);
        assert_eq!(mode_of(&dir.join("bundles/sealed")).unwrap() & 0o077, 0);
        ensure_private_file(&dir.join("outpost.redb")).unwrap();
        assert_eq!(mode_of(&dir.join("outpost.redb")).unwrap() & 0o077, 0);
        fs::remove_dir_all(root).unwrap();
    }
}
