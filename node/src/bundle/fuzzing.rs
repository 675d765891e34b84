//! The bodies of the bundle fuzz targets, as plain functions, so that the stable corpus replay
//! test runs exactly the code the fuzzer runs. Each panics only when a property is broken; an
//! `Err` on bad input is the expected outcome.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::manifest::{Manifest, DURATION_MAX};
use super::{unpack, BundleLimits};

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
    assert!(m.stop_timeout <= DURATION_MAX && !m.stop_timeout.is_zero());
    assert!(m.health.timeout <= DURATION_MAX);
    for name in m.env.keys() {
        assert!(!name.to_ascii_uppercase().starts_with("OUTPOST_"));
        assert_ne!(name.to_ascii_uppercase(), "NOTIFY_SOCKET");
    }
}

/// Target `bundle_archive`: arbitrary bytes as a bundle, unpacked with small limits into a
/// fresh directory inside a sandbox directory. Whatever the outcome, nothing may appear in the
/// sandbox beside the destination, and the destination may hold only regular files,
/// directories and symlinks that resolve inside it. The sandbox is removed afterwards.
pub fn fuzz_archive(data: &[u8]) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let sandbox = std::env::temp_dir().join(format!(
        "outpost-fuzz-archive-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let dest = sandbox.join("dest");
    std::fs::create_dir_all(&dest).expect("create the sandbox");
    let limits = BundleLimits {
        total_bytes_max: 1 << 20,
        file_bytes_max: 256 << 10,
        entries_max: 256,
        path_bytes_max: 256,
    };
    let _ = unpack(data, &dest, &limits);
    let beside: Vec<_> = std::fs::read_dir(&sandbox)
        .expect("list the sandbox")
        .map(|e| e.expect("sandbox entry").file_name())
        .collect();
    assert_eq!(beside, ["dest"], "unpack wrote beside its destination");
    check_tree(&dest, &dest);
    std::fs::remove_dir_all(&sandbox).expect("remove the sandbox");
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
