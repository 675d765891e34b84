//! The controller's bundle store, on disk under `DATA_DIR/bundles/`:
//!
//! ```text
//! bundles/<bundle id>.bundle          an uploaded bundle, plaintext, content-addressed
//! bundles/tmp/<random>.part           an upload in progress (the directory is emptied at start)
//! bundles/sealed/<dep>-<node>.age     the bundle of deployment <dep> sealed to machine <node>
//! bundles/sealed/<dep>-<node>.age.tmp   ...while it is being sealed (removed at start)
//! ```
//!
//! An upload streams to `tmp/` (never the whole bundle in memory), is hashed as it is written
//! (blake3: the bundle id), checked to be a bundle (its `outpost-bundle.toml` found among the tar
//! entries and parsed), fsynced and renamed to its content address. A sealed bundle is written
//! once per (deployment, machine) with age's streaming encryption, hashed as it is written,
//! fsynced and renamed into place, and served as it is from then on, so a resumed transfer gets
//! the same bytes.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::bundle::{is_bundle_id, Manifest, MANIFEST_FILE};
use crate::cluster::keys;
use crate::ids::NodeId;
use crate::limits::{UPLOAD_IO_BUF_BYTES, UPLOAD_QUEUE_CHUNKS};

/// A manifest entry larger than this is not read (the manifest has its own, lower bound).
const MANIFEST_READ_MAX: u64 = crate::limits::MANIFEST_BYTES_MAX;

/// Paths of the bundle store.
#[derive(Clone, Debug)]
pub(crate) struct BundleStore {
    dir: PathBuf,
}

impl BundleStore {
    pub(crate) fn new(data_dir: &Path) -> BundleStore {
        BundleStore {
            dir: data_dir.join("bundles"),
        }
    }

    /// Creates the directories and removes what an interrupted run left behind: partial
    /// uploads and partial sealed files.
    pub(crate) fn prepare(&self) -> io::Result<()> {
        crate::fsmode::create_private_dir_all(&self.tmp_dir())?;
        crate::fsmode::create_private_dir_all(&self.sealed_dir())?;
        for entry in fs::read_dir(self.tmp_dir())? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
            }
        }
        for entry in fs::read_dir(self.sealed_dir())? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    pub(crate) fn sealed_dir(&self) -> PathBuf {
        self.dir.join("sealed")
    }

    /// Where an uploaded bundle lives. `bundle_id` must be a well-formed id.
    pub(crate) fn bundle_path(&self, bundle_id: &str) -> PathBuf {
        debug_assert!(is_bundle_id(bundle_id));
        self.dir.join(format!("{bundle_id}.bundle"))
    }

    /// Where the bundle of `deployment` sealed to `machine` lives.
    pub(crate) fn sealed_path(&self, deployment: u64, machine: NodeId) -> PathBuf {
        self.sealed_dir()
            .join(format!("{deployment}-{machine}.age"))
    }

    /// Every uploaded bundle, as (bundle id, when it was uploaded).
    pub(crate) fn bundle_files(&self) -> io::Result<Vec<(String, std::time::SystemTime)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".bundle")) else {
                continue;
            };
            if is_bundle_id(id) && entry.file_type()?.is_file() {
                out.push((id.to_owned(), entry.metadata()?.modified()?));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every complete sealed file, as (deployment, machine).
    pub(crate) fn sealed_files(&self) -> io::Result<Vec<(u64, NodeId)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.sealed_dir())? {
            let name = entry?.file_name();
            if let Some(k) = name.to_str().and_then(parse_sealed_name) {
                out.push(k);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// `<deployment>-<node id>.age` -> (deployment, node id).
fn parse_sealed_name(name: &str) -> Option<(u64, NodeId)> {
    let stem = name.strip_suffix(".age")?;
    let (dep, node) = stem.split_once('-')?;
    Some((dep.parse().ok()?, node.parse().ok()?))
}

/// What an upload stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Uploaded {
    pub bundle_id: String,
    pub manifest: Manifest,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    #[error("the bundle is larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error("not a bundle: {0}")]
    NotABundle(String),
    #[error("the upload was interrupted: {0}")]
    Interrupted(String),
    #[error("{0}")]
    Io(io::Error),
}

impl UploadError {
    /// A full disk: the caller answers 503.
    pub(crate) fn is_full(&self) -> bool {
        matches!(self, UploadError::Io(e) if is_full(e))
    }
}

fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == libc::ENOSPC || c == libc::EDQUOT)
}

/// Streams `body` into the store: to `tmp/` first, hashed as it is written, refused beyond
/// `max` bytes, checked to be a bundle, fsynced, then renamed to its content address (a bundle
/// already stored under that id is kept as it is). Nothing is left in `tmp/` on any error.
pub(crate) async fn receive(
    store: &BundleStore,
    body: Body,
    max: u64,
) -> Result<Uploaded, UploadError> {
    let part = store
        .tmp_dir()
        .join(format!("{:016x}.part", rand::random::<u64>()));
    let result = receive_into(store, &part, body, max).await;
    if result.is_err() {
        let part = part.clone();
        let _ = tokio::task::spawn_blocking(move || fs::remove_file(part)).await;
    }
    result
}

async fn receive_into(
    store: &BundleStore,
    part: &Path,
    body: Body,
    max: u64,
) -> Result<Uploaded, UploadError> {
    let (tx, rx) = mpsc::channel::<Bytes>(UPLOAD_QUEUE_CHUNKS);
    let writer = {
        let part = part.to_path_buf();
        tokio::task::spawn_blocking(move || write_upload(&part, rx))
    };
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(UploadError::Interrupted(e.to_string()));
                break;
            }
        };
        received += chunk.len() as u64;
        if received > max {
            failure = Some(UploadError::TooLarge { max });
            break;
        }
        // The writer is gone only after an error, which its result says.
        if tx.send(chunk).await.is_err() {
            break;
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| UploadError::Io(io::Error::other(format!("upload writer: {e}"))))?;
    if let Some(f) = failure {
        return Err(f);
    }
    let (bytes, bundle_id) = written.map_err(UploadError::Io)?;
    let store = store.clone();
    let part = part.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let manifest = read_manifest(&part).map_err(UploadError::NotABundle)?;
        let dest = store.bundle_path(&bundle_id);
        if dest.exists() {
            fs::remove_file(&part).map_err(UploadError::Io)?;
            // Uploaded again: its time to be deployed before the sweep takes it starts anew.
            File::options()
                .write(true)
                .open(&dest)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                .map_err(UploadError::Io)?;
        } else {
            fs::rename(&part, &dest).map_err(UploadError::Io)?;
            sync_dir(&store.dir).map_err(UploadError::Io)?;
        }
        Ok(Uploaded {
            bundle_id,
            manifest,
            bytes,
        })
    })
    .await
    .map_err(|e| UploadError::Io(io::Error::other(format!("upload check: {e}"))))?
}

/// The upload's writer thread: what arrives, written and hashed, then fsynced. Returns the
/// size and the bundle id.
fn write_upload(part: &Path, mut rx: mpsc::Receiver<Bytes>) -> io::Result<(u64, String)> {
    let file = crate::fsmode::private_file_options().open(part)?;
    // The hasher sees the buffer's large writes, not the HTTP body's small chunks.
    let mut w = BufWriter::with_capacity(UPLOAD_IO_BUF_BYTES, Hashing::new(file));
    while let Some(chunk) = rx.blocking_recv() {
        w.write_all(&chunk)?;
    }
    let h = w.into_inner().map_err(|e| e.into_error())?;
    h.inner.sync_all()?;
    Ok((h.bytes, h.hasher.finalize().to_hex().to_string()))
}

/// The manifest of the bundle file at `path`: its `outpost-bundle.toml` found among the tar
/// entries (only the headers are read; file contents are skipped by seeking) and parsed. The
/// error says what is wrong.
pub(crate) fn read_manifest(path: &Path) -> Result<Manifest, String> {
    let file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(64 * 1024, file));
    let entries = archive
        .entries_with_seek()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("not a valid tar archive: {e}"))?;
        let is_manifest = {
            let path = entry
                .path()
                .map_err(|e| format!("an entry's path is unreadable: {e}"))?;
            let path: &Path = &path;
            path.strip_prefix("./").unwrap_or(path) == Path::new(MANIFEST_FILE)
        };
        if !is_manifest {
            continue;
        }
        if !entry.header().entry_type().is_file() {
            return Err(format!("{MANIFEST_FILE} is not a regular file"));
        }
        let size = entry.size();
        if size > MANIFEST_READ_MAX {
            return Err(format!(
                "{MANIFEST_FILE}: {size} bytes (at most {MANIFEST_READ_MAX})"
            ));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{MANIFEST_FILE} is truncated: {e}"))?;
        return Manifest::parse(&bytes).map_err(|e| e.to_string());
    }
    Err(format!(
        "no {MANIFEST_FILE} among the archive's entries (pack it with `outpost bundle pack`)"
    ))
}

/// A sealed bundle as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sealed {
    pub bytes: u64,
    /// blake3 of the sealed file.
    pub hash: [u8; 32],
    /// False when the file was already there (sealed by an earlier run) and only hashed.
    pub fresh: bool,
}

/// Seals the bundle at `bundle` to the age X25519 `recipient` into `out` (streaming: memory
/// stays flat whatever the bundle's size), hashing the ciphertext as it is written; fsyncs it
/// and renames it into place. A file already at `out` is kept and only hashed: a bundle is
/// sealed once per (deployment, machine), so a resumed transfer gets the same bytes.
pub(crate) fn seal(bundle: &Path, recipient: &str, out: &Path) -> Result<Sealed, String> {
    if out.exists() {
        let mut h = blake3::Hasher::new();
        let file = File::open(out).map_err(|e| format!("opening {}: {e}", out.display()))?;
        let bytes = file.metadata().map_err(|e| e.to_string())?.len();
        h.update_reader(BufReader::with_capacity(UPLOAD_IO_BUF_BYTES, file))
            .map_err(|e| format!("reading {}: {e}", out.display()))?;
        return Ok(Sealed {
            bytes,
            hash: *h.finalize().as_bytes(),
            fresh: false,
        });
    }
    let r = keys::parse_recipient(recipient).map_err(|e| e.to_string())?;
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = seal_into(bundle, &r, &tmp);
    let (bytes, hash) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, out).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("renaming into {}: {e}", out.display())
    })?;
    if let Some(dir) = out.parent() {
        sync_dir(dir).map_err(|e| format!("fsync {}: {e}", dir.display()))?;
    }
    Ok(Sealed {
        bytes,
        hash,
        fresh: true,
    })
}

fn seal_into(
    bundle: &Path,
    recipient: &age::x25519::Recipient,
    tmp: &Path,
) -> Result<(u64, [u8; 32]), String> {
    let input = File::open(bundle).map_err(|e| format!("opening the bundle: {e}"))?;
    let mut input = BufReader::with_capacity(UPLOAD_IO_BUF_BYTES, input);
    let file = crate::fsmode::private_file_options()
        .open(tmp)
        .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let write_err = |e: io::Error| format!("writing {}: {e}", tmp.display());
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
            .map_err(|e| format!("age: {e}"))?;
    let mut w = encryptor
        .wrap_output(Hashing::new(BufWriter::with_capacity(
            UPLOAD_IO_BUF_BYTES,
            file,
        )))
        .map_err(write_err)?;
    io::copy(&mut input, &mut w).map_err(|e| format!("sealing: {e}"))?;
    let h = w.finish().map_err(write_err)?;
    let file = h
        .inner
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    Ok((h.bytes, *h.hasher.finalize().as_bytes()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A writer that hashes (blake3) and counts what it passes on.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::keys::SealKey;

    fn temp_dir(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "outpost-bundles-{label}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles")
    }

    #[test]
    fn sealed_names_round_trip() {
        let s = BundleStore::new(Path::new("/x"));
        let node = NodeId::random();
        let p = s.sealed_path(42, node);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_sealed_name(name), Some((42, node)));
        assert_eq!(parse_sealed_name("42-zz.age"), None);
        assert_eq!(parse_sealed_name(&format!("{name}.tmp")), None);
    }

    #[test]
    fn the_manifest_is_found_and_a_sealed_bundle_opens_to_the_same_bytes() {
        let dir = temp_dir("seal");
        let bundle = dir.join("voice.bundle");
        let info = crate::bundle::pack(&fixtures().join("voice"), &bundle).unwrap();
        assert_eq!(read_manifest(&bundle).unwrap(), info.manifest);
        // Not a bundle: garbage, and a tar without a manifest.
        fs::write(dir.join("junk"), vec![7u8; 4096]).unwrap();
        let e = read_manifest(&dir.join("junk")).unwrap_err();
        assert!(e.contains("tar"), "{e}");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_cksum();
        b.append_data(&mut h, "hello.txt", &b"hi\n"[..]).unwrap();
        fs::write(dir.join("plain.tar"), b.into_inner().unwrap()).unwrap();
        let e = read_manifest(&dir.join("plain.tar")).unwrap_err();
        assert!(e.contains(MANIFEST_FILE), "{e}");

        let key = SealKey::generate();
        let out = dir.join("1-x.age");
        let s = seal(&bundle, &key.recipient(), &out).unwrap();
        assert!(s.fresh);
        let sealed = fs::read(&out).unwrap();
        assert_eq!(s.bytes, sealed.len() as u64);
        assert_eq!(&s.hash, blake3::hash(&sealed).as_bytes());
        assert_eq!(key.open(&sealed).unwrap(), fs::read(&bundle).unwrap());
        // Sealed once: a second call hashes what is there.
        let again = seal(&bundle, &key.recipient(), &out).unwrap();
        assert_eq!(
            (again.bytes, again.hash, again.fresh),
            (s.bytes, s.hash, false)
        );
        // A bad recipient leaves nothing behind.
        let bad = dir.join("2-x.age");
        assert!(seal(&bundle, "age1nope", &bad).is_err());
        assert!(!bad.exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
