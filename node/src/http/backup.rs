//! `GET /v1/backup`: a consistent copy of the database, streamed. The copy is written first
//! (one read transaction, finished before the first byte goes out: a slow client must not pin
//! old pages), hashed, unlinked while open, then streamed; its blake3 goes in a header so that
//! the client can verify what it wrote. One backup at a time.

use std::io::Seek;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use tokio::io::AsyncReadExt;

use crate::clock::now_ms;
use crate::limits::BACKUP_CHUNK_BYTES;
use crate::replication::StoreError;
use crate::store::backup::BackupInfo;
use crate::store::Store;

/// Header carrying the blake3 (hex) of the whole body.
pub const HASH_HEADER: &str = "x-outpost-blake3";

/// A finished, hashed copy of a database, unlinked and open, ready to stream.
pub struct BackupCopy {
    file: std::fs::File,
    hash: String,
    info: BackupInfo,
}

/// Writes a consistent copy of `store` (every role's tables, one read transaction), hashes it
/// and unlinks it while open. Blocking: call it off the tokio workers (or from the thread that
/// owns the store).
pub fn write_copy(store: &Store) -> Result<BackupCopy, StoreError> {
    let path = store
        .backup_tmp_path()
        .map_err(|e| StoreError::Io(format!("backup directory: {e}")))?;
    let info = store.backup_to(&path)?;
    let hashed = (|| {
        let mut f = std::fs::File::open(&path)?;
        let mut h = blake3::Hasher::new();
        std::io::copy(&mut f, &mut h)?;
        f.rewind()?;
        Ok::<_, std::io::Error>((f, h.finalize().to_hex().to_string()))
    })();
    // Unlinked now: the open file is all that is left, and it goes when the stream ends.
    let _ = std::fs::remove_file(&path);
    let (file, hash) = hashed.map_err(|e| StoreError::Io(format!("backup copy: {e}")))?;
    Ok(BackupCopy { file, hash, info })
}

/// The response streaming `copy`, with its length and blake3 in headers. `guard` lives until
/// the last byte is sent (a one-backup-at-a-time flag, for instance).
pub fn stream_copy(copy: BackupCopy, node_name: &str, guard: impl Send + 'static) -> Response {
    let BackupCopy { file, hash, info } = copy;
    tracing::info!(
        bytes = info.bytes,
        rows = info.rows,
        blake3 = %hash,
        "backup taken; streaming it"
    );
    let state = Some((tokio::fs::File::from_std(file), guard));
    let stream = futures_util::stream::unfold(state, |state| async move {
        let (mut file, guard) = state?;
        let mut buf = vec![0u8; BACKUP_CHUNK_BYTES];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some((file, guard))))
            }
            Err(e) => Some((Err::<Bytes, _>(e), None)),
        }
    });
    let name = format!(
        "attachment; filename=\"outpost-{}-{}.redb\"",
        node_name,
        now_ms() / 1000
    );
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.bytes));
    if let Ok(v) = HeaderValue::from_str(&name) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&hash) {
        h.insert(HASH_HEADER, v);
    }
    resp
}
