//! The worker's software directory (`DATA_DIR/software`): one directory per installed bundle,
//! named by its id, and two symlinks, `current` and `previous`, switched atomically (a new link
//! under a temporary name renamed over the old one, then an fsync of the directory).
//!
//! ```text
//! software/
//!   <bundle id>/        an unpacked bundle, fsynced before it got its name
//!   current -> <id>     what runs
//!   previous -> <id>    what `rollback` goes back to
//!   running.pid         the supervised process group (supervisor.rs)
//!   tmp-<random>/       an install in progress (or one a crash interrupted; `prune` removes it)
//! ```
//!
//! Every operation is blocking (file system and fsync): from tokio, run it in
//! `spawn_blocking`. One `Installer` per software directory; its methods take `&mut self` so
//! that an install and a prune never race.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::archive::HashingReader;
use super::manifest::Manifest;
use super::{is_bundle_id, unpack, BundleError, BundleLimits};
use crate::limits::BUNDLE_TRAILING_BYTES_MAX;

/// The link to the running software's directory.
pub const CURRENT_LINK: &str = "current";
/// The link to the software `rollback` returns to.
pub const PREVIOUS_LINK: &str = "previous";

/// An installed bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub bundle_id: String,
    /// `software_dir/<bundle id>`.
    pub dir: PathBuf,
    pub manifest: Manifest,
}

pub struct Installer {
    dir: PathBuf,
    limits: BundleLimits,
}

impl Installer {
    /// Opens (and creates if needed) the software directory.
    pub fn new(software_dir: impl Into<PathBuf>) -> io::Result<Installer> {
        let dir = software_dir.into();
        crate::fsmode::create_private_dir_all(&dir)?;
        Ok(Installer {
            dir,
            limits: BundleLimits::default(),
        })
    }

    /// Other bounds for the bundles installed from now on.
    pub fn with_limits(mut self, limits: BundleLimits) -> Installer {
        self.limits = limits;
        self
    }

    pub fn software_dir(&self) -> &Path {
        &self.dir
    }

    /// Where bundle `bundle_id` is (or would be) installed.
    pub fn bundle_dir(&self, bundle_id: &str) -> PathBuf {
        self.dir.join(bundle_id)
    }

    /// Installs the bundle read from `reader` as `software_dir/<bundle_id>`: unpacks it into
    /// `tmp-<random>` while hashing the stream, refuses it unless the bytes hash to
    /// `bundle_id`, fsyncs every file and directory, renames it into place and fsyncs the
    /// software directory. A bundle id that is already installed is reused without reading
    /// `reader` (bundles are content-addressed). On any error nothing is left behind.
    pub fn install(
        &mut self,
        bundle_id: &str,
        reader: impl Read,
    ) -> Result<Installed, BundleError> {
        check_id(bundle_id)?;
        let dest = self.bundle_dir(bundle_id);
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            let installed = self.installed(bundle_id)?;
            touch(&dest);
            return Ok(installed);
        }
        let tmp = self.dir.join(format!("tmp-{:016x}", rand::random::<u64>()));
        fs::create_dir(&tmp)
            .map_err(|e| BundleError::io(format!("creating {}", tmp.display()), e))?;
        let result = self.fill(&tmp, bundle_id, reader);
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        match fs::rename(&tmp, &dest) {
            Ok(()) => {}
            // Installed meanwhile under the same id: the same bytes, so keep that one.
            Err(_) if dest.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(BundleError::io(
                    format!("renaming into {}", dest.display()),
                    e,
                ));
            }
        }
        touch(&dest);
        fsync_dir(&self.dir)?;
        Ok(Installed {
            bundle_id: bundle_id.to_owned(),
            dir: dest,
            manifest,
        })
    }

    fn fill(
        &self,
        tmp: &Path,
        bundle_id: &str,
        reader: impl Read,
    ) -> Result<Manifest, BundleError> {
        let mut hashing = HashingReader::new(reader);
        let manifest = unpack(&mut hashing, tmp, &self.limits)?;
        let trailing = io::copy(
            &mut (&mut hashing).take(BUNDLE_TRAILING_BYTES_MAX + 1),
            &mut io::sink(),
        )
        .map_err(|e| BundleError::io("reading the bundle", e))?;
        if trailing > BUNDLE_TRAILING_BYTES_MAX {
            return Err(BundleError::Malformed(format!(
                "more than {BUNDLE_TRAILING_BYTES_MAX} bytes after the end of the archive"
            )));
        }
        let actual = hashing.bundle_id();
        if actual != bundle_id {
            return Err(BundleError::IdMismatch {
                expected: bundle_id.to_owned(),
                actual,
            });
        }
        sync_tree(tmp)?;
        Ok(manifest)
    }

    /// An already installed bundle, its manifest read again from its directory.
    pub fn installed(&self, bundle_id: &str) -> Result<Installed, BundleError> {
        check_id(bundle_id)?;
        let dir = self.bundle_dir(bundle_id);
        if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return Err(BundleError::NotInstalled(bundle_id.to_owned()));
        }
        let manifest = Manifest::load(&dir)?;
        Ok(Installed {
            bundle_id: bundle_id.to_owned(),
            dir,
            manifest,
        })
    }

    /// Makes `bundle_id` current; what was current becomes `previous`. Activating the current
    /// bundle changes nothing.
    pub fn activate(&mut self, bundle_id: &str) -> Result<(), BundleError> {
        check_id(bundle_id)?;
        if !self.bundle_dir(bundle_id).is_dir() {
            return Err(BundleError::NotInstalled(bundle_id.to_owned()));
        }
        let old = self
            .current()
            .map_err(|e| BundleError::io("reading current", e))?;
        if old.as_deref() == Some(bundle_id) {
            return Ok(());
        }
        // `previous` first: a crash in between leaves both on the old bundle, which is safe.
        if let Some(old) = &old {
            self.switch(PREVIOUS_LINK, old)?;
        }
        self.switch(CURRENT_LINK, bundle_id)?;
        fsync_dir(&self.dir)
    }

    /// Switches back: `previous` becomes current and the current one becomes previous. Returns
    /// the bundle id that is now current.
    pub fn rollback(&mut self) -> Result<String, BundleError> {
        let prev = self
            .previous()
            .map_err(|e| BundleError::io("reading previous", e))?
            .ok_or(BundleError::NoPrevious)?;
        if !self.bundle_dir(&prev).is_dir() {
            return Err(BundleError::NotInstalled(prev));
        }
        let cur = self
            .current()
            .map_err(|e| BundleError::io("reading current", e))?;
        match &cur {
            Some(cur) => self.switch(PREVIOUS_LINK, cur)?,
            None => {
                let _ = fs::remove_file(self.dir.join(PREVIOUS_LINK));
            }
        }
        self.switch(CURRENT_LINK, &prev)?;
        fsync_dir(&self.dir)?;
        Ok(prev)
    }

    /// The current bundle id, if any.
    pub fn current(&self) -> io::Result<Option<String>> {
        self.read_link(CURRENT_LINK)
    }

    /// The previous bundle id, if any.
    pub fn previous(&self) -> io::Result<Option<String>> {
        self.read_link(PREVIOUS_LINK)
    }

    /// Removes installed bundles other than current and previous, keeping the `keep` most
    /// recently installed of them, and leftovers of interrupted installs and link switches.
    /// Returns the bundle ids removed.
    pub fn prune(&mut self, keep: usize) -> io::Result<Vec<String>> {
        let current = self.current()?;
        let previous = self.previous()?;
        let mut candidates = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.path().symlink_metadata()?;
            if name.starts_with("tmp-") && meta.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else if name.starts_with(".link-") && meta.file_type().is_symlink() {
                fs::remove_file(entry.path())?;
            } else if is_bundle_id(&name)
                && meta.is_dir()
                && current.as_deref() != Some(&name)
                && previous.as_deref() != Some(&name)
            {
                let installed_at = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                candidates.push((installed_at, name));
            }
        }
        // Newest first; ties by name, so the outcome does not depend on listing order.
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut removed = Vec::new();
        for (_, name) in candidates.into_iter().skip(keep) {
            fs::remove_dir_all(self.dir.join(&name))?;
            removed.push(name);
        }
        removed.sort();
        fsync_dir(&self.dir).map_err(io::Error::other)?;
        Ok(removed)
    }

    fn read_link(&self, name: &str) -> io::Result<Option<String>> {
        match fs::read_link(self.dir.join(name)) {
            Ok(target) => {
                let t = target.to_string_lossy().into_owned();
                if is_bundle_id(&t) {
                    Ok(Some(t))
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{name} points to {t:?}, not a bundle id"),
                    ))
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Points `name` at `bundle_id` atomically: a new link, renamed over the old.
    fn switch(&self, name: &str, bundle_id: &str) -> Result<(), BundleError> {
        let tmp = self
            .dir
            .join(format!(".link-{name}-{:016x}", rand::random::<u64>()));
        std::os::unix::fs::symlink(bundle_id, &tmp)
            .map_err(|e| BundleError::io(format!("creating {}", tmp.display()), e))?;
        fs::rename(&tmp, self.dir.join(name)).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            BundleError::io(format!("switching {name}"), e)
        })
    }
}

fn check_id(bundle_id: &str) -> Result<(), BundleError> {
    if is_bundle_id(bundle_id) {
        Ok(())
    } else {
        Err(BundleError::BadBundleId(bundle_id.to_owned()))
    }
}

/// Marks a bundle directory as installed now (prune keeps the most recent).
fn touch(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.set_modified(SystemTime::now());
    }
}

fn fsync_dir(dir: &Path) -> Result<(), BundleError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BundleError::io(format!("fsync {}", dir.display()), e))
}

/// fsyncs every regular file and directory under `root` (symlinks are not followed; their
/// directory's fsync makes them durable), then `root` itself.
fn sync_tree(root: &Path) -> Result<(), BundleError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let read = fs::read_dir(&dir)
            .map_err(|e| BundleError::io(format!("listing {}", dir.display()), e))?;
        for entry in read {
            let entry =
                entry.map_err(|e| BundleError::io(format!("listing {}", dir.display()), e))?;
            let ft = entry
                .file_type()
                .map_err(|e| BundleError::io(format!("stat {}", entry.path().display()), e))?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                File::open(entry.path())
                    .and_then(|f| f.sync_all())
                    .map_err(|e| BundleError::io(format!("fsync {}", entry.path().display()), e))?;
            }
        }
        fsync_dir(&dir)?;
    }
    Ok(())
}
