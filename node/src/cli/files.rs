//! Files the CLI writes for an operator: complete or not at all (a temporary file beside the
//! destination, fsynced, renamed over it, the directory fsynced), and private (mode 0600: a
//! backup holds the node's private key).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `DIR/.NAME.PID.tmp` for `DIR/NAME`.
pub fn temp_beside(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map_or_else(|| "outpost".into(), |n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// A new file, mode 0600, refusing to reuse an existing one.
pub fn create_private(path: &Path) -> io::Result<File> {
    let _ = fs::remove_file(path);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// fsyncs `file` (written at `tmp`), renames it to `dest`, fsyncs the directory.
pub fn commit(file: File, tmp: &Path, dest: &Path) -> io::Result<()> {
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, dest)?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}
