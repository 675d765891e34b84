//! The API token file in the data directory: created once, complete or not at all, mode 0640 so
//! operators in the node's group can use the CLI.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::TOKEN_FILE;
use crate::limits::JOIN_TOKEN_BYTES_MAX;

/// Creates `DIR/token` (32 random bytes, hex) with mode 0640 when it is absent; returns the
/// token either way. The file appears complete or not at all.
pub fn ensure_token(data_dir: &Path) -> io::Result<String> {
    match read_token(data_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    crate::fsmode::create_data_dir(data_dir)?;
    let token = hex::encode(rand::random::<[u8; 32]>());
    let path = data_dir.join(TOKEN_FILE);
    let tmp = data_dir.join(format!(".{TOKEN_FILE}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)?;
        // The umask may have taken the group bit away; operators in the group need it.
        f.set_permissions(fs::Permissions::from_mode(0o640))?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
        // A hard link never replaces an existing file: a concurrent creator wins cleanly.
        fs::hard_link(&tmp, &path)
    })();
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            fs::File::open(data_dir)?.sync_all()?;
            Ok(token)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_token(data_dir),
        Err(e) => Err(e),
    }
}

/// Reads the API token from `DIR/token`.
pub fn read_token(data_dir: &Path) -> io::Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    let text = fs::read_to_string(&path)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(token.to_owned())
}

/// A join token file's trimmed contents (the controller's `admission.join_token_file` and a
/// worker's `controller.join_token_file` read it the same way, so both sides agree on the
/// token); a missing, empty or oversized file is bad config naming `field`.
pub fn read_join_token(path: &Path, field: &str) -> Result<Vec<u8>, super::ConfigError> {
    use std::io::Read;
    let err = |reason: String| super::ConfigError {
        origin: path.display().to_string(),
        field: field.to_owned(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(JOIN_TOKEN_BYTES_MAX + 1).read_to_end(&mut bytes))
        .map_err(|e| err(format!("cannot read the join token: {e}")))?;
    if bytes.len() as u64 > JOIN_TOKEN_BYTES_MAX {
        return Err(err(format!(
            "larger than {JOIN_TOKEN_BYTES_MAX} bytes; not a join token"
        )));
    }
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(err("the join token file is empty".into()));
    }
    Ok(token.to_vec())
}
