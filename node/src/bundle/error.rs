//! The one error type of packing, unpacking and installing a bundle. Each refusal of a hostile
//! archive has a variant of its own, so that tests (and operators reading a deployment's
//! reason) can tell them apart.

use std::io;

use super::manifest::ManifestError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The bytes are not a well-formed tar archive (bad header, checksum, size field).
    #[error("malformed archive: {0}")]
    Malformed(String),
    /// The archive ends in the middle of an entry, or without its end-of-archive marker.
    #[error("truncated archive: {0}")]
    Truncated(String),
    /// An entry's path starts with `/`.
    #[error("entry {path:?}: absolute paths are refused")]
    AbsolutePath { path: String },
    /// An entry's path has a `..` component.
    #[error("entry {path:?}: `..` components are refused")]
    ParentComponent { path: String },
    /// An entry's path is otherwise unusable (empty, not UTF-8, NUL, a name too long, a parent
    /// that is not a directory of the bundle, a path through a symlink).
    #[error("entry {path:?}: {reason}")]
    BadPath { path: String, reason: String },
    /// An entry's path is longer than `BundleLimits::path_bytes_max`.
    #[error("entry {path:?}...: path of {len} bytes is over the limit of {max}")]
    PathTooLong {
        path: String,
        len: usize,
        max: usize,
    },
    /// A hard link entry.
    #[error("entry {path:?}: hard links are refused")]
    HardLink { path: String },
    /// A device, fifo, socket, sparse or other non-regular entry.
    #[error("entry {path:?}: {kind} entries are refused (only regular files, directories and symlinks inside the bundle)")]
    Special { path: String, kind: String },
    /// A symlink that is absolute or leaves the bundle.
    #[error("entry {path:?}: symlink to {target:?} refused: {reason}")]
    UnsafeSymlink {
        path: String,
        target: String,
        reason: String,
    },
    /// Two entries with the same path.
    #[error("entry {path:?}: duplicate path")]
    Duplicate { path: String },
    /// More entries than `BundleLimits::entries_max`.
    #[error("more than {max} entries")]
    TooManyEntries { max: u64 },
    /// A file over `BundleLimits::file_bytes_max`.
    #[error("entry {path:?}: {size} bytes is over the file limit of {max}")]
    FileTooLarge { path: String, size: u64, max: u64 },
    /// The files together over `BundleLimits::total_bytes_max`.
    #[error("entry {path:?}: files total more than the limit of {max} bytes")]
    TotalTooLarge { path: String, max: u64 },
    /// No `outpost-bundle.toml` at the root of the bundle.
    #[error("no outpost-bundle.toml at the root of the bundle")]
    MissingManifest,
    /// The manifest is there but invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// [`unpack`](super::unpack) was given a destination that is not an empty directory.
    #[error("destination {0} is not an empty directory")]
    DestNotEmpty(String),
    /// The bytes hash to another id than the one they were installed under.
    #[error("bundle id mismatch: expected {expected}, the bytes hash to {actual}")]
    IdMismatch { expected: String, actual: String },
    /// Not 64 lowercase hex characters.
    #[error("invalid bundle id {0:?} (expected 64 lowercase hex characters)")]
    BadBundleId(String),
    /// `activate` of a bundle that was never installed.
    #[error("bundle {0} is not installed")]
    NotInstalled(String),
    /// `rollback` without a previous version.
    #[error("no previous software to roll back to")]
    NoPrevious,
    /// `pack` found something in the directory it will not put in a bundle.
    #[error("cannot pack {path}: {reason}")]
    Unpackable { path: String, reason: String },
}

impl BundleError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> BundleError {
        BundleError::Io {
            context: context.into(),
            source,
        }
    }
}
