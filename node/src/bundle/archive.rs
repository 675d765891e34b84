//! Writing bundles, and their content address. A bundle is an uncompressed tar (GNU headers,
//! long names as GNU `L`/`K` entries) with entries in sorted order, mtime 0, uid/gid 0, no owner
//! names and modes normalised to 0644/0755, so that packing the same directory twice gives the
//! same bytes, hence the same id: the blake3 hex of the file.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};

use super::manifest::Manifest;
use super::paths::{check_link_target, file_mode, DIR_MODE};
use super::{BundleError, BundleLimits};
use crate::limits::BUNDLE_PATH_NAME_BYTES_MAX;

/// What [`pack`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackInfo {
    /// blake3 hex of the bundle file.
    pub bundle_id: String,
    pub manifest: Manifest,
    /// Size of the bundle file.
    pub bytes: u64,
}

/// Incremental bundle id: feed it the bundle's bytes in order.
#[derive(Clone, Default)]
pub struct BundleHasher(blake3::Hasher);

impl BundleHasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The bundle id of everything fed so far.
    pub fn finalize(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// A reader that hashes what passes through it (for checking a bundle's id while it is
/// unpacked, in one pass).
pub struct HashingReader<R> {
    inner: R,
    hasher: BundleHasher,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: BundleHasher::new(),
            bytes: 0,
        }
    }
    /// The id of the bytes read so far.
    pub fn bundle_id(&self) -> String {
        self.hasher.finalize()
    }
    /// How many bytes were read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The bundle id of a bundle file, read in a streaming fashion.
pub fn bundle_id_of_file(path: &Path) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Writes and hashes at once, so the id needs no second read of the file.
struct HashingWriter<W> {
    inner: W,
    hasher: BundleHasher,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
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

/// Counts what a file's reader gave, to catch a file that shrank while it was packed.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Packs `dir` (which must hold a valid `outpost-bundle.toml` whose `exec[0]` is an executable
/// file of the directory) into the bundle file `out`, written beside it under a temporary name,
/// fsynced and renamed into place. Refuses special files, symlinks that are absolute or leave
/// the directory, non-UTF-8 names, anything over the default [`BundleLimits`], and an `out`
/// inside `dir`.
pub fn pack(dir: &Path, out: &Path) -> Result<PackInfo, BundleError> {
    let manifest = Manifest::load(dir)?;
    let limits = BundleLimits::default();
    let out_name = out.file_name().ok_or_else(|| BundleError::Unpackable {
        path: out.display().to_string(),
        reason: "the output names no file".into(),
    })?;
    let out_parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir_real = fs::canonicalize(dir)
        .map_err(|e| BundleError::io(format!("resolving {}", dir.display()), e))?;
    let parent_real = fs::canonicalize(&out_parent)
        .map_err(|e| BundleError::io(format!("resolving {}", out_parent.display()), e))?;
    if parent_real.starts_with(&dir_real) {
        return Err(BundleError::Unpackable {
            path: out.display().to_string(),
            reason: "the output file would be inside the bundle directory".into(),
        });
    }

    let tmp = out_parent.join(format!(
        ".{}.tmp-{:016x}",
        out_name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let result = write_bundle(dir, &tmp, &limits);
    let (bundle_id, bytes) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, out).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        BundleError::io(format!("renaming into {}", out.display()), e)
    })?;
    File::open(&out_parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| BundleError::io(format!("fsync {}", out_parent.display()), e))?;
    Ok(PackInfo {
        bundle_id,
        manifest,
        bytes,
    })
}

fn write_bundle(
    dir: &Path,
    tmp: &Path,
    limits: &BundleLimits,
) -> Result<(String, u64), BundleError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| BundleError::io(format!("creating {}", tmp.display()), e))?;
    let writer = HashingWriter {
        inner: BufWriter::with_capacity(256 * 1024, file),
        hasher: BundleHasher::new(),
        bytes: 0,
    };
    let mut packer = Packer {
        builder: Builder::new(writer),
        limits,
        entries: 0,
        total: 0,
    };
    packer.add_dir(dir, &mut Vec::new())?;
    let writer = packer
        .builder
        .into_inner()
        .map_err(|e| BundleError::io("finishing the archive", e))?;
    let id = writer.hasher.finalize();
    let bytes = writer.bytes;
    let file = writer
        .inner
        .into_inner()
        .map_err(|e| BundleError::io(format!("writing {}", tmp.display()), e.into_error()))?;
    file.sync_all()
        .map_err(|e| BundleError::io(format!("fsync {}", tmp.display()), e))?;
    Ok((id, bytes))
}

struct Packer<'a, W: Write> {
    builder: Builder<W>,
    limits: &'a BundleLimits,
    entries: u64,
    total: u64,
}

impl<W: Write> Packer<'_, W> {
    /// Adds the contents of `dir` (whose path inside the bundle is `rel`), sorted by name.
    fn add_dir(&mut self, dir: &Path, rel: &mut Vec<String>) -> Result<(), BundleError> {
        let read = fs::read_dir(dir)
            .map_err(|e| BundleError::io(format!("listing {}", dir.display()), e))?;
        let mut names = Vec::new();
        for entry in read {
            let entry =
                entry.map_err(|e| BundleError::io(format!("listing {}", dir.display()), e))?;
            names.push(entry.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = dir.join(&name);
            let unpackable = |reason: &str| BundleError::Unpackable {
                path: path.display().to_string(),
                reason: reason.to_owned(),
            };
            let name = name
                .to_str()
                .ok_or_else(|| unpackable("the name is not UTF-8"))?
                .to_owned();
            if name.len() > BUNDLE_PATH_NAME_BYTES_MAX {
                return Err(unpackable("the name is over 255 bytes"));
            }
            rel.push(name);
            let rel_path = rel.join("/");
            if rel_path.len() > self.limits.path_bytes_max {
                return Err(unpackable(&format!(
                    "the path is over {} bytes",
                    self.limits.path_bytes_max
                )));
            }
            self.entries += 1;
            if self.entries > self.limits.entries_max {
                return Err(BundleError::TooManyEntries {
                    max: self.limits.entries_max,
                });
            }
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| BundleError::io(format!("stat {}", path.display()), e))?;
            let ft = meta.file_type();
            let mut header = Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            if ft.is_dir() {
                header.set_entry_type(EntryType::Directory);
                header.set_mode(DIR_MODE);
                header.set_size(0);
                self.builder
                    .append_data(&mut header, &rel_path, io::empty())
                    .map_err(|e| BundleError::io(format!("adding {rel_path}"), e))?;
                self.add_dir(&path, rel)?;
            } else if ft.is_file() {
                let size = meta.len();
                if size > self.limits.file_bytes_max {
                    return Err(unpackable(&format!(
                        "{size} bytes is over the file limit of {}",
                        self.limits.file_bytes_max
                    )));
                }
                self.total += size;
                if self.total > self.limits.total_bytes_max {
                    return Err(unpackable(&format!(
                        "the files total more than {} bytes",
                        self.limits.total_bytes_max
                    )));
                }
                header.set_entry_type(EntryType::Regular);
                header.set_mode(file_mode(meta.permissions().mode()));
                header.set_size(size);
                let file = File::open(&path)
                    .map_err(|e| BundleError::io(format!("opening {}", path.display()), e))?;
                let mut data = Counted {
                    inner: file.take(size),
                    n: 0,
                };
                self.builder
                    .append_data(&mut header, &rel_path, &mut data)
                    .map_err(|e| BundleError::io(format!("adding {rel_path}"), e))?;
                if data.n != size {
                    return Err(unpackable("the file changed while it was packed"));
                }
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)
                    .map_err(|e| BundleError::io(format!("readlink {}", path.display()), e))?;
                let parts: Vec<&str> = rel.iter().map(String::as_str).collect();
                check_link_target(
                    &parts,
                    target.as_os_str().as_bytes(),
                    self.limits.path_bytes_max,
                )
                .map_err(|r| unpackable(&format!("symlink to {}: {r}", target.display())))?;
                header.set_entry_type(EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                self.builder
                    .append_link(&mut header, &rel_path, &target)
                    .map_err(|e| BundleError::io(format!("adding {rel_path}"), e))?;
            } else {
                return Err(unpackable(
                    "special file (only regular files, directories and symlinks are packed)",
                ));
            }
            rel.pop();
        }
        Ok(())
    }
}
