//! Unpacking a bundle: the security boundary between bytes from elsewhere and the worker's
//! disk. Entries are read one at a time (raw: the tar crate's own handling of GNU long names
//! and PAX headers would read them whole into memory, so they are read here, bounded) and every
//! header is checked before anything is written. Files are created with `O_EXCL` through paths
//! whose every directory was checked, with `lstat`, to be a real directory this unpack created;
//! nothing is ever written through a symlink, and nothing is ever overwritten.

use std::cell::Cell;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tar::{Archive, EntryType, PaxExtensions};

use super::manifest::Manifest;
use super::paths::{check_link_target, components, file_mode, set_mode, shown, walk_no_symlinks};
use super::paths::{PathProblem, DIR_MODE};
use super::{BundleError, BundleLimits};
use crate::limits::{PAX_BYTES_MAX, UNPACK_COPY_BUF_BYTES};

const BLOCK: u64 = 512;

/// Unpacks the bundle read from `reader` into `dest_dir`, which must exist and be empty, and
/// returns its validated manifest. Streams: memory use is bounded whatever the input.
///
/// Refuses, each with its own [`BundleError`]: malformed or truncated archives, absolute paths,
/// `..` components, hard links, symlinks that are absolute or resolve outside the bundle,
/// devices, fifos and anything else but regular files, directories and safe symlinks,
/// duplicate paths, paths through a symlink, paths over `limits.path_bytes_max`, more than
/// `limits.entries_max` entries, a file over `limits.file_bytes_max`, files totalling more than
/// `limits.total_bytes_max`, and a missing or invalid manifest (whose `exec[0]` must be an
/// executable regular file of the bundle).
///
/// On error, whatever was already written stays in `dest_dir`: **the caller deletes
/// `dest_dir`** (it is the caller's fresh directory; [`Installer`](super::Installer) does).
/// Nothing is ever written outside it. Nobody else may write into `dest_dir` meanwhile.
pub fn unpack(
    reader: impl Read,
    dest_dir: &Path,
    limits: &BundleLimits,
) -> Result<Manifest, BundleError> {
    let mut listing = fs::read_dir(dest_dir)
        .map_err(|e| BundleError::io(format!("opening {}", dest_dir.display()), e))?;
    if listing.next().is_some() {
        return Err(BundleError::DestNotEmpty(dest_dir.display().to_string()));
    }
    let consumed = Rc::new(Cell::new(0u64));
    let mut archive = Archive::new(Counting {
        inner: reader,
        consumed: consumed.clone(),
    });
    let mut entries = archive
        .entries()
        .map_err(|e| BundleError::Malformed(e.to_string()))?
        .raw(true);
    let mut state = State {
        dest: dest_dir,
        limits,
        count: 0,
        total: 0,
        next_header: 0,
        meta: Pending::default(),
        checked_parent: None,
        buf: vec![0; UNPACK_COPY_BUF_BYTES],
    };
    loop {
        let entry = match entries.next() {
            None => break,
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(read_error(e, state.count)),
        };
        state.entry(entry)?;
    }
    if state.meta.any() {
        return Err(BundleError::Truncated(
            "an extension header describes an entry that never comes".into(),
        ));
    }
    // The tar reader stops at EOF as it does at the zero block that marks the end; only the
    // bytes it consumed tell them apart.
    if consumed.get() < state.next_header + BLOCK {
        return Err(BundleError::Truncated(
            "no end-of-archive marker (the archive was cut)".into(),
        ));
    }
    Manifest::load(dest_dir)
}

/// Counts what the tar reader consumed.
struct Counting<R> {
    inner: R,
    consumed: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.consumed.set(self.consumed.get() + n as u64);
        Ok(n)
    }
}

fn read_error(e: io::Error, count: u64) -> BundleError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => BundleError::Truncated(format!("after entry {count}: {e}")),
        io::ErrorKind::InvalidData | io::ErrorKind::Other => {
            let text = e.to_string();
            if text.contains("failed to read entire block") || text.contains("unexpected EOF") {
                BundleError::Truncated(format!("after entry {count}: {text}"))
            } else {
                BundleError::Malformed(format!("after entry {count}: {text}"))
            }
        }
        _ => BundleError::io(format!("reading the archive after entry {count}"), e),
    }
}

/// GNU long names and PAX values waiting for the entry they describe.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_link: Option<Vec<u8>>,
}

impl Pending {
    fn any(&self) -> bool {
        self.long_name.is_some()
            || self.long_link.is_some()
            || self.pax_path.is_some()
            || self.pax_link.is_some()
    }
}

struct State<'a> {
    dest: &'a Path,
    limits: &'a BundleLimits,
    count: u64,
    total: u64,
    /// Where the header after the last entry starts.
    next_header: u64,
    meta: Pending,
    /// The last parent directory found to be a real directory: entries come sorted, so most
    /// share it. Safe to cache because nothing is ever removed or replaced during an unpack.
    checked_parent: Option<PathBuf>,
    buf: Vec<u8>,
}

type Entry<'a, R> = tar::Entry<'a, Counting<R>>;

impl State<'_> {
    fn entry<R: Read>(&mut self, mut entry: Entry<'_, R>) -> Result<(), BundleError> {
        self.count += 1;
        if self.count > self.limits.entries_max {
            return Err(BundleError::TooManyEntries {
                max: self.limits.entries_max,
            });
        }
        let size = entry.size();
        self.next_header = entry
            .raw_file_position()
            .checked_add(size.div_ceil(BLOCK) * BLOCK)
            .ok_or_else(|| BundleError::Malformed("entry size overflows".into()))?;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::GNULongName | EntryType::GNULongLink => {
                let max = self.limits.path_bytes_max as u64 + 1;
                let which = if kind == EntryType::GNULongName {
                    "name"
                } else {
                    "link"
                };
                if size > max {
                    return Err(BundleError::PathTooLong {
                        path: shown(&read_some(&mut entry, 200)),
                        len: size.saturating_sub(1) as usize,
                        max: self.limits.path_bytes_max,
                    });
                }
                let mut v = read_exact_bounded(&mut entry, size)?;
                while v.last() == Some(&0) {
                    v.pop();
                }
                let slot = if kind == EntryType::GNULongName {
                    &mut self.meta.long_name
                } else {
                    &mut self.meta.long_link
                };
                if slot.replace(v).is_some() {
                    return Err(BundleError::Malformed(format!(
                        "two GNU long {which} headers for one entry"
                    )));
                }
                Ok(())
            }
            EntryType::XHeader => {
                if size > PAX_BYTES_MAX {
                    return Err(BundleError::Malformed(format!(
                        "a PAX header of {size} bytes (at most {PAX_BYTES_MAX})"
                    )));
                }
                let data = read_exact_bounded(&mut entry, size)?;
                self.pax(&data)
            }
            EntryType::XGlobalHeader => {
                // Comments (git archive writes one); nothing in them is honoured.
                if size > PAX_BYTES_MAX {
                    return Err(BundleError::Malformed(format!(
                        "a PAX global header of {size} bytes (at most {PAX_BYTES_MAX})"
                    )));
                }
                Ok(())
            }
            _ => self.member(entry, kind, size),
        }
    }

    fn pax(&mut self, data: &[u8]) -> Result<(), BundleError> {
        for ext in PaxExtensions::new(data) {
            let ext = ext.map_err(|e| BundleError::Malformed(format!("PAX header: {e}")))?;
            let key = ext.key_bytes();
            if key == b"path" {
                self.meta.pax_path = Some(ext.value_bytes().to_vec());
            } else if key == b"linkpath" {
                self.meta.pax_link = Some(ext.value_bytes().to_vec());
            } else if key == b"size" || key.starts_with(b"GNU.sparse") {
                return Err(BundleError::Malformed(format!(
                    "PAX key {:?} is not supported in a bundle",
                    String::from_utf8_lossy(key)
                )));
            }
        }
        Ok(())
    }

    fn member<R: Read>(
        &mut self,
        mut entry: Entry<'_, R>,
        kind: EntryType,
        size: u64,
    ) -> Result<(), BundleError> {
        let meta = std::mem::take(&mut self.meta);
        let raw_path: Vec<u8> = match meta.pax_path.or(meta.long_name) {
            Some(p) => p,
            None => entry.header().path_bytes().into_owned(),
        };
        let path_shown = shown(&raw_path);
        let parts = match components(&raw_path, self.limits.path_bytes_max) {
            Ok(p) => p,
            Err(PathProblem::Absolute) => {
                return Err(BundleError::AbsolutePath { path: path_shown })
            }
            Err(PathProblem::Parent) => {
                return Err(BundleError::ParentComponent { path: path_shown })
            }
            Err(PathProblem::TooLong(len)) => {
                return Err(BundleError::PathTooLong {
                    path: path_shown,
                    len,
                    max: self.limits.path_bytes_max,
                })
            }
            Err(PathProblem::Bad(reason)) => {
                return Err(BundleError::BadPath {
                    path: path_shown,
                    reason,
                })
            }
        };
        let special = |what: &str| BundleError::Special {
            path: path_shown.clone(),
            kind: what.to_owned(),
        };
        match kind {
            EntryType::Regular | EntryType::Directory | EntryType::Symlink => {}
            EntryType::Link => return Err(BundleError::HardLink { path: path_shown }),
            EntryType::Char => return Err(special("character device")),
            EntryType::Block => return Err(special("block device")),
            EntryType::Fifo => return Err(special("fifo")),
            EntryType::Continuous => return Err(special("contiguous file")),
            EntryType::GNUSparse => return Err(special("sparse file")),
            other => return Err(special(&format!("type {:?}", char::from(other.as_byte())))),
        }
        if kind != EntryType::Regular && size != 0 {
            return Err(BundleError::Malformed(format!(
                "entry {path_shown:?}: a directory or symlink with {size} bytes of data"
            )));
        }
        if parts.is_empty() {
            // `./` names the root, which exists already.
            if kind == EntryType::Directory {
                return Ok(());
            }
            return Err(BundleError::BadPath {
                path: path_shown,
                reason: "names the bundle root".into(),
            });
        }
        let target = self.checked_path(&parts, &path_shown)?;
        let exists = |e: &io::Error| e.kind() == io::ErrorKind::AlreadyExists;
        match kind {
            EntryType::Directory => {
                DirBuilder::new()
                    .mode(DIR_MODE)
                    .create(&target)
                    .map_err(|e| {
                        if exists(&e) {
                            BundleError::Duplicate {
                                path: path_shown.clone(),
                            }
                        } else {
                            BundleError::io(format!("creating directory {path_shown}"), e)
                        }
                    })?;
                set_mode(&target, DIR_MODE)
                    .map_err(|e| BundleError::io(format!("chmod {path_shown}"), e))?;
            }
            EntryType::Symlink => {
                let link = match meta.pax_link.or(meta.long_link) {
                    Some(l) => l,
                    None => entry
                        .header()
                        .link_name_bytes()
                        .map(|c| c.into_owned())
                        .unwrap_or_default(),
                };
                check_link_target(&parts, &link, self.limits.path_bytes_max).map_err(|reason| {
                    BundleError::UnsafeSymlink {
                        path: path_shown.clone(),
                        target: shown(&link),
                        reason: reason.to_string(),
                    }
                })?;
                let link_path = std::str::from_utf8(&link).expect("checked UTF-8");
                std::os::unix::fs::symlink(link_path, &target).map_err(|e| {
                    if exists(&e) {
                        BundleError::Duplicate {
                            path: path_shown.clone(),
                        }
                    } else {
                        BundleError::io(format!("creating symlink {path_shown}"), e)
                    }
                })?;
            }
            _ => {
                if size > self.limits.file_bytes_max {
                    return Err(BundleError::FileTooLarge {
                        path: path_shown,
                        size,
                        max: self.limits.file_bytes_max,
                    });
                }
                self.total = self.total.saturating_add(size);
                if self.total > self.limits.total_bytes_max {
                    return Err(BundleError::TotalTooLarge {
                        path: path_shown,
                        max: self.limits.total_bytes_max,
                    });
                }
                let mode = file_mode(entry.header().mode().unwrap_or(0o644));
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|e| {
                        if exists(&e) {
                            BundleError::Duplicate {
                                path: path_shown.clone(),
                            }
                        } else {
                            BundleError::io(format!("creating {path_shown}"), e)
                        }
                    })?;
                let mut copied = 0u64;
                loop {
                    let n = entry
                        .read(&mut self.buf)
                        .map_err(|e| read_error(e, self.count))?;
                    if n == 0 {
                        break;
                    }
                    copied += n as u64;
                    file.write_all(&self.buf[..n])
                        .map_err(|e| BundleError::io(format!("writing {path_shown}"), e))?;
                }
                if copied != size {
                    return Err(BundleError::Truncated(format!(
                        "entry {path_shown:?} has {copied} of its {size} bytes"
                    )));
                }
                file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .map_err(|e| BundleError::io(format!("chmod {path_shown}"), e))?;
            }
        }
        Ok(())
    }

    /// The path to create for `parts`, once its parent is known to be a real directory of the
    /// bundle (checked component by component with `lstat`, never through a symlink).
    fn checked_path(&mut self, parts: &[&str], shown: &str) -> Result<PathBuf, BundleError> {
        let parent = &parts[..parts.len() - 1];
        let mut parent_path = self.dest.to_path_buf();
        parent_path.extend(parent);
        if !parent.is_empty() && self.checked_parent.as_deref() != Some(parent_path.as_path()) {
            // The walk checks every component but the last; add a dummy last one.
            let mut probe = parent.to_vec();
            probe.push(".");
            walk_no_symlinks(self.dest, &probe).map_err(|reason| BundleError::BadPath {
                path: shown.to_owned(),
                reason: reason.to_string(),
            })?;
            self.checked_parent = Some(parent_path.clone());
        }
        Ok(parent_path.join(parts[parts.len() - 1]))
    }
}

/// Reads exactly `size` bytes (already bounded by the caller).
fn read_exact_bounded(r: &mut impl Read, size: u64) -> Result<Vec<u8>, BundleError> {
    let mut v = Vec::with_capacity(size as usize);
    r.take(size)
        .read_to_end(&mut v)
        .map_err(|e| read_error(e, 0))?;
    if v.len() as u64 != size {
        return Err(BundleError::Truncated("an extension header is cut".into()));
    }
    Ok(v)
}

/// Up to `n` bytes, for an error message.
fn read_some(r: &mut impl Read, n: u64) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.take(n).read_to_end(&mut v);
    v
}
