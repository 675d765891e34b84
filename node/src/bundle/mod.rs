//! Software bundles: the manifest, the deterministic archive and its content address, the
//! hostile-input-proof unpacker, the versioned install directory of a worker, and the supervisor
//! of the software it runs.
//!
//! A bundle is an uncompressed tar of a directory holding `outpost-bundle.toml`
//! ([`manifest`]); its id is the blake3 hex of the bundle file's bytes ([`bundle_id_of_file`]).
//! [`pack`] writes one deterministically, [`unpack`] is the security boundary for bytes that
//! came from elsewhere, [`Installer`] keeps `DATA_DIR/software/<bundle id>/` directories and the
//! `current`/`previous` links, and [`Supervisor`] runs one installed bundle in its own process
//! group with a clean environment.
//!
//! This module never talks to the network (beyond a health check's connection to the software
//! it runs), never decrypts or verifies signatures (sealing is someone else's job: a bundle
//! reaches [`Installer::install`] as plaintext that has already been authenticated), and never
//! writes outside the directories its callers name.

mod archive;
mod error;
mod fuzzing;
mod health;
mod install;
pub mod manifest;
mod paths;
mod procfs;
mod supervisor;
mod unpack;

pub use archive::{bundle_id_of_file, pack, BundleHasher, HashingReader, PackInfo};
pub use error::BundleError;
#[doc(hidden)]
pub use fuzzing::{fuzz_archive, fuzz_bundle_paths, fuzz_manifest};
pub use health::{HealthError, ProbeError};
pub use install::{Installed, Installer, CURRENT_LINK, PREVIOUS_LINK};
pub use manifest::{
    ConfigFormat, ConfigSpec, Health, HealthCheck, HttpTarget, Manifest, ManifestError,
    MANIFEST_FILE,
};
pub use supervisor::{ReloadCommandError, Supervisor, SupervisorError, CHILD_PATH, PID_FILE};
pub use unpack::unpack;

/// Length of a bundle id: blake3, as lowercase hex.
pub const BUNDLE_ID_HEX_LEN: usize = 64;

/// The bounds [`unpack`] (and [`pack`], so that whatever it packs can be unpacked) enforces on a
/// bundle. Every one has a default; a worker may lower them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleLimits {
    /// Sum of the sizes of all regular files.
    pub total_bytes_max: u64,
    /// Size of any one regular file.
    pub file_bytes_max: u64,
    /// Archive entries (files, directories, symlinks and tar extension headers).
    pub entries_max: u64,
    /// Length in bytes of an entry's path, and of a symlink's target.
    pub path_bytes_max: usize,
}

impl Default for BundleLimits {
    fn default() -> Self {
        BundleLimits {
            total_bytes_max: 1 << 30,
            file_bytes_max: 1 << 30,
            entries_max: 100_000,
            path_bytes_max: 1024,
        }
    }
}

/// True for a well-formed bundle id: 64 lowercase hex characters. Anything else is refused
/// before it is used in a path.
pub fn is_bundle_id(s: &str) -> bool {
    s.len() == BUNDLE_ID_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
