//! The bodies of the bundle fuzz targets, as plain functions, so that the stable corpus replay
//! test runs exactly the code the fuzzer runs. Each panics only when a property is broken; an
//! `Err` on bad input is the expected outcome.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::manifest::Manifest;
use super::paths::{check_link_target, components};
use super::{unpack, BundleLimits};
use crate::limits::{BUNDLE_PATH_NAME_BYTES_MAX, MANIFEST_DURATION_MAX};

/// Target `bundle_manifest`: arbitrary bytes as `outpost-bundle.toml`.
pub fn fuzz_manifest(data: &[u8]) {
    let Ok(m) = Manifest::parse(data) else {
        return;
    };
    assert!(crate::config::SERVICES.contains(&m.service.as_str()));
    assert!(!m.version.is_empty());
    assert!(!m.exec.is_empty());
    assert!(!m.exec[0].starts_with('/'));
    assert!(!m.exec[0].split('/').any(|c| c == ".."));
    assert!(m.stop_timeout <= MANIFEST_DURATION_MAX && !m.stop_timeout.is_zero());
    assert!(m.health.timeout <= MANIFEST_DURATION_MAX);
    for name in m.env.keys() {
        assert!(!name.to_ascii_uppercase().starts_with("OUTPOST_"));
        assert_ne!(name.to_ascii_uppercase(), "NOTIFY_SOCKET");
    }
}

/// Target `bundle_archive`: arbitrary bytes as a bundle, unpacked with small limits into a
/// fresh directory inside a sandbox directory. Whatever the outcome, nothing may appear in the
/// sandbox beside the destination, and the destination may hold only regular files,
/// directories and symlinks that resolve inside it. The sandbox is made once per process (on
/// tmpfs, `/dev/shm`, when there is one: an unpack is mostly file system calls) and emptied
/// after each input; it is removed when the process ends normally.
pub fn fuzz_archive(data: &[u8]) {
    SANDBOX.with(|sandbox| {
        let dest = sandbox.0.join("dest");
        std::fs::create_dir(&dest).expect("create the destination");
        let _ = unpack(data, &dest, &ARCHIVE_LIMITS);
        let beside: Vec<_> = std::fs::read_dir(&sandbox.0)
            .expect("list the sandbox")
            .map(|e| e.expect("sandbox entry").file_name())
            .collect();
        assert_eq!(beside, ["dest"], "unpack wrote beside its destination");
        check_tree(&dest, &dest);
        std::fs::remove_dir_all(&dest).expect("empty the sandbox");
    });
}

/// The archive target's limits: small, so that no input spends long writing.
const ARCHIVE_LIMITS: BundleLimits = BundleLimits {
    total_bytes_max: 1 << 20,
    file_bytes_max: 256 << 10,
    entries_max: 256,
    path_bytes_max: 256,
};

/// A directory of this process's own, removed on drop.
struct Sandbox(PathBuf);

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    static SANDBOX: Sandbox = {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() };
        let dir = base.join(format!(
            "outpost-fuzz-archive-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the sandbox");
        Sandbox(dir)
    };
}

/// Target `bundle_paths`: the path rules every archive entry passes before anything touches
/// the disk, in memory (the fast part of `bundle_archive`). The input is an entry's path, then
/// a NUL, then a symlink target. An accepted path has only plain components and fits the
/// limit; an accepted link target, resolved from the link's directory, stays inside the
/// bundle.
pub fn fuzz_bundle_paths(data: &[u8]) {
    let max = ARCHIVE_LIMITS.path_bytes_max;
    let (path, target) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(parts) = components(path, max) else {
        return;
    };
    assert!(path.len() <= max);
    for p in &parts {
        assert!(!p.is_empty() && *p != "." && *p != "..", "component {p:?}");
        assert!(!p.contains(['/', '\0']), "component {p:?}");
        assert!(p.len() <= BUNDLE_PATH_NAME_BYTES_MAX);
    }
    if parts.is_empty() || check_link_target(&parts, target, max).is_err() {
        return;
    }
    // Resolve it: from the link's directory, never above the root.
    let text = std::str::from_utf8(target).expect("accepted a target that is not UTF-8");
    assert!(!text.starts_with('/') && !text.contains('\0') && target.len() <= max);
    let mut at: Vec<&str> = parts[..parts.len() - 1].to_vec();
    let mut named = false;
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                assert!(!named, "accepted `..` after a name in {text:?}");
                assert!(
                    at.pop().is_some(),
                    "{text:?} from {parts:?} leaves the bundle"
                );
            }
            name => {
                named = true;
                at.push(name);
            }
        }
    }
}

fn check_tree(root: &Path, dir: &Path) {
    let root_real = std::fs::canonicalize(root).expect("canonical root");
    for entry in std::fs::read_dir(dir).expect("list") {
        let path: PathBuf = entry.expect("entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("lstat");
        let ft = meta.file_type();
        if ft.is_dir() {
            check_tree(root, &path);
        } else if ft.is_symlink() {
            // A dangling link is harmless; one that resolves must resolve inside.
            if let Ok(real) = std::fs::canonicalize(&path) {
                assert!(
                    real.starts_with(&root_real),
                    "{} resolves outside the bundle, to {}",
                    path.display(),
                    real.display()
                );
            }
        } else {
            assert!(ft.is_file(), "{} is a special file", path.display());
        }
    }
}
