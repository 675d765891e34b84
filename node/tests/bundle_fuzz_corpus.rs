//! Replays the committed seed corpora of the bundle fuzz targets (`fixtures/fuzz/bundle_manifest/`,
//! `fixtures/fuzz/bundle_archive/` and `fixtures/fuzz/bundle_paths/`) through the functions the
//! cargo-fuzz targets run, and checks that each archive seed gets the outcome its name
//! promises. The archive seeds are written by `regenerate_bundle_archive_corpus` (ignored; run it by name after changing them).

mod bundle_support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bundle_support::{RawTar, TempDir};
use outpost::bundle::{
    fuzz_archive, fuzz_bundle_paths, fuzz_manifest, unpack, BundleError, BundleLimits,
};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/fuzz")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

#[test]
fn bundle_fuzz_corpus_replays_without_panic() {
    let mut failures = Vec::new();
    for (target, run) in [
        ("bundle_manifest", fuzz_manifest as fn(&[u8])),
        ("bundle_archive", fuzz_archive as fn(&[u8])),
        ("bundle_paths", fuzz_bundle_paths as fn(&[u8])),
    ] {
        for path in corpus(target) {
            let data = std::fs::read(&path).unwrap();
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "panicked on: {}", failures.join(", "));
}

#[test]
fn bundle_archive_seeds_get_the_outcome_their_name_says() {
    for path in corpus("bundle_archive") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let t = TempDir::new("seed");
        let dest = t.join("dest");
        std::fs::create_dir(&dest).unwrap();
        let r = unpack(
            std::fs::File::open(&path).unwrap(),
            &dest,
            &BundleLimits::default(),
        );
        let ok = match name.as_str() {
            "valid.tar" => r.is_ok(),
            "dotdot.tar" => matches!(r, Err(BundleError::ParentComponent { .. })),
            "absolute.tar" => matches!(r, Err(BundleError::AbsolutePath { .. })),
            "escaping_symlink.tar" => matches!(r, Err(BundleError::UnsafeSymlink { .. })),
            "truncated.tar" => matches!(r, Err(BundleError::Truncated(_))),
            "hardlink.tar" => matches!(r, Err(BundleError::HardLink { .. })),
            "fifo.tar" => matches!(r, Err(BundleError::Special { .. })),
            "through_symlink.tar" => matches!(r, Err(BundleError::BadPath { .. })),
            _ => continue,
        };
        assert!(ok, "{name}: {r:?}");
    }
}

/// Writes the archive seeds. Run with
/// `cargo nextest run -p outpost --run-ignored only -E 'test(regenerate_bundle_archive_corpus)'`.
#[test]
#[ignore]
fn regenerate_bundle_archive_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/fuzz/bundle_archive");
    std::fs::create_dir_all(&dir).unwrap();
    let valid = RawTar::base().finish();
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![("valid.tar", valid.clone())];
    let mut t = RawTar::base();
    t.file("../x", b"x", 0o644);
    seeds.push(("dotdot.tar", t.finish()));
    let mut t = RawTar::base();
    t.file("/tmp/outpost-fuzz-absolute", b"x", 0o644);
    seeds.push(("absolute.tar", t.finish()));
    let mut t = RawTar::base();
    t.symlink("bin/escape", "../../etc");
    seeds.push(("escaping_symlink.tar", t.finish()));
    seeds.push(("truncated.tar", valid[..valid.len() - 1024 - 100].to_vec()));
    let mut t = RawTar::base();
    t.raw(b"hard", tar::EntryType::Link, b"bin/start", b"", 0o644);
    seeds.push(("hardlink.tar", t.finish()));
    let mut t = RawTar::base();
    t.raw(b"fifo", tar::EntryType::Fifo, b"", b"", 0o644);
    seeds.push(("fifo.tar", t.finish()));
    let mut t = RawTar::base();
    t.symlink("lnk", "bin");
    t.file("lnk/evil", b"x", 0o644);
    seeds.push(("through_symlink.tar", t.finish()));
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
