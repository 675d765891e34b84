//! The bundle format: packing is deterministic (same directory, same bytes, same id), a round
//! trip keeps the tree and its modes, and unpacking refuses every hostile archive with its own
//! error and without writing anything beside its destination (invariant 7: bad input is
//! refused, not absorbed).

mod bundle_support;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use bundle_support::{snapshot, RawTar, TempDir, MANIFEST};
use outpost::bundle::{bundle_id_of_file, pack, unpack, BundleError, BundleHasher, BundleLimits};
use tar::EntryType;

fn write(path: &Path, data: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A source tree with odd modes, nesting, an empty file and dir, a symlink and a path longer
/// than a tar header's 100-byte name field.
fn sample_source(root: &Path) {
    write(
        &root.join("outpost-bundle.toml"),
        MANIFEST.as_bytes(),
        0o600,
    );
    write(&root.join("bin/start"), b"#!/bin/sh\nexit 0\n", 0o700);
    write(&root.join("lib/a.txt"), b"alpha", 0o664);
    write(&root.join("lib/empty"), b"", 0o400);
    std::fs::create_dir_all(root.join("var/empty-dir")).unwrap();
    let deep = format!("deep/{}/{}", "d".repeat(60), "f".repeat(60));
    write(&root.join(&deep), &vec![7u8; 70_000], 0o640);
    symlink("../lib/a.txt", root.join("bin/a-link")).unwrap();
    symlink("lib", root.join("lib-link")).unwrap();
}

#[test]
fn pack_is_deterministic_and_the_id_is_the_file_hash() {
    let t = TempDir::new("determinism");
    let src = t.join("src");
    sample_source(&src);
    let one = pack(&src, &t.join("one.bundle")).unwrap();
    // Other mtimes and a different creation order must not change a byte.
    let bumped = std::fs::File::open(src.join("lib/a.txt")).unwrap();
    bumped
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    let two = pack(&src, &t.join("two.bundle")).unwrap();
    let a = std::fs::read(t.join("one.bundle")).unwrap();
    let b = std::fs::read(t.join("two.bundle")).unwrap();
    assert_eq!(
        a, b,
        "packing the same directory twice gave different bytes"
    );
    assert_eq!(one, two);
    assert_eq!(one.bytes, a.len() as u64);
    assert_eq!(one.bundle_id, blake3::hash(&a).to_hex().to_string());
    assert_eq!(
        bundle_id_of_file(&t.join("one.bundle")).unwrap(),
        one.bundle_id
    );
    let mut h = BundleHasher::new();
    for chunk in a.chunks(1000) {
        h.update(chunk);
    }
    assert_eq!(h.finalize(), one.bundle_id);

    // Owner names, uids, mtimes: all zero.
    let mut ar = tar::Archive::new(&a[..]);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        assert_eq!(h.mtime().unwrap(), 0);
        assert_eq!(h.uid().unwrap(), 0);
        assert_eq!(h.gid().unwrap(), 0);
        assert_eq!(h.username_bytes().unwrap_or_default(), b"");
        let mode = h.mode().unwrap();
        assert!(
            [0o644, 0o755, 0o777].contains(&mode),
            "mode {mode:o} for {:?}",
            e.path()
        );
    }
    // The same sources copied elsewhere, created in another order, pack to the same id.
    let other = t.join("other");
    sample_source(&other);
    assert_eq!(
        pack(&other, &t.join("three.bundle")).unwrap().bundle_id,
        one.bundle_id
    );
}

#[test]
fn round_trip_keeps_tree_and_normalised_modes() {
    let t = TempDir::new("roundtrip");
    let src = t.join("src");
    sample_source(&src);
    pack(&src, &t.join("b.bundle")).unwrap();
    let dest = t.join("dest");
    std::fs::create_dir(&dest).unwrap();
    let file = std::fs::File::open(t.join("b.bundle")).unwrap();
    let m = unpack(file, &dest, &BundleLimits::default()).unwrap();
    assert_eq!(m.service, "voice");

    let mut expected = snapshot(&src);
    for v in expected.values_mut() {
        // Modes normalised: 0644 unless executable, then 0755.
        if let Some(rest) = v.strip_prefix("file ") {
            let (mode, hash) = rest.split_once(' ').unwrap();
            let mode = u32::from_str_radix(mode, 8).unwrap();
            let norm = if mode & 0o111 != 0 { "755" } else { "644" };
            *v = format!("file {norm} {hash}");
        } else if v.starts_with("dir ") {
            *v = "dir 755".into();
        }
    }
    assert_eq!(snapshot(&dest), expected);
}

#[test]
fn pack_refuses_what_a_bundle_may_not_hold() {
    let t = TempDir::new("pack-refusals");
    let src = t.join("src");
    sample_source(&src);

    let no_manifest = t.join("no-manifest");
    std::fs::create_dir(&no_manifest).unwrap();
    let e = pack(&no_manifest, &t.join("x.bundle")).unwrap_err();
    assert!(matches!(e, BundleError::MissingManifest), "{e}");

    std::fs::set_permissions(
        src.join("bin/start"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = pack(&src, &t.join("x.bundle")).unwrap_err();
    assert!(e.to_string().contains("exec[0]"), "{e}");
    std::fs::set_permissions(
        src.join("bin/start"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    for (name, target) in [("escape", "../../etc"), ("abs", "/etc/passwd")] {
        symlink(target, src.join(name)).unwrap();
        let e = pack(&src, &t.join("x.bundle")).unwrap_err();
        assert!(matches!(e, BundleError::Unpackable { .. }), "{name}: {e}");
        std::fs::remove_file(src.join(name)).unwrap();
    }

    let fifo = src.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let e = pack(&src, &t.join("x.bundle")).unwrap_err();
    assert!(e.to_string().contains("special file"), "{e}");
    std::fs::remove_file(&fifo).unwrap();

    let e = pack(&src, &src.join("inside.bundle")).unwrap_err();
    assert!(e.to_string().contains("inside the bundle directory"), "{e}");

    assert!(!t.join("x.bundle").exists());
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    pack(&src, &t.join("ok.bundle")).unwrap();
}

/// Unpacks `bytes` into `sandbox/dest` and checks that nothing appeared beside `dest`.
fn unpack_in_sandbox(tag: &str, bytes: &[u8], limits: &BundleLimits) -> Result<(), BundleError> {
    let t = TempDir::new(tag);
    let dest = t.join("dest");
    std::fs::create_dir(&dest).unwrap();
    let r = unpack(bytes, &dest, limits).map(drop);
    let beside: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, ["dest"], "{tag}: wrote beside the destination");
    r
}

fn refused(tag: &str, t: RawTar) -> BundleError {
    refused_with(tag, t.finish(), &BundleLimits::default())
}

fn refused_with(tag: &str, bytes: Vec<u8>, limits: &BundleLimits) -> BundleError {
    match unpack_in_sandbox(tag, &bytes, limits) {
        Ok(()) => panic!("{tag}: a hostile archive was accepted"),
        Err(e) => e,
    }
}

#[test]
fn hand_made_valid_archive_unpacks() {
    unpack_in_sandbox("valid", &RawTar::base().finish(), &BundleLimits::default()).unwrap();
    // `./`-prefixed names, as `tar cf x.tar .` writes them.
    let mut t = RawTar::default();
    t.dir("./");
    t.dir("./bin/");
    t.file("./bin/start", bundle_support::SCRIPT, 0o755);
    t.file("./outpost-bundle.toml", MANIFEST.as_bytes(), 0o644);
    unpack_in_sandbox("dot-slash", &t.finish(), &BundleLimits::default()).unwrap();
}

#[test]
fn unpack_refuses_absolute_paths() {
    let mut t = RawTar::base();
    t.file("/tmp/outpost-absolute-evil", b"x", 0o644);
    let e = refused("absolute", t);
    assert!(matches!(e, BundleError::AbsolutePath { .. }), "{e}");
    assert!(!Path::new("/tmp/outpost-absolute-evil").exists());
}

#[test]
fn unpack_refuses_parent_components() {
    for (tag, name) in [("dotdot", "../evil"), ("inner-dotdot", "bin/../../evil")] {
        let mut t = RawTar::base();
        t.file(name, b"x", 0o644);
        let e = refused(tag, t);
        assert!(
            matches!(e, BundleError::ParentComponent { .. }),
            "{tag}: {e}"
        );
    }
    // The same through the GNU long-name and PAX path extensions.
    let mut t = RawTar::base();
    t.gnu_long(
        EntryType::GNULongName,
        format!("../{}", "x".repeat(120)).as_bytes(),
    );
    t.file("harmless", b"x", 0o644);
    let e = refused("gnu-long-dotdot", t);
    assert!(matches!(e, BundleError::ParentComponent { .. }), "{e}");
    let mut t = RawTar::base();
    t.pax(&[("path", b"../pax-evil")]);
    t.file("harmless", b"x", 0o644);
    let e = refused("pax-dotdot", t);
    assert!(matches!(e, BundleError::ParentComponent { .. }), "{e}");
}

#[test]
fn unpack_refuses_links() {
    let mut t = RawTar::base();
    t.raw(b"hard", EntryType::Link, b"bin/start", b"", 0o644);
    let e = refused("hardlink", t);
    assert!(matches!(e, BundleError::HardLink { .. }), "{e}");

    for (tag, name, target) in [
        ("abs-symlink", "l", "/etc/passwd"),
        ("up-symlink", "l", "../outside"),
        ("deep-up-symlink", "bin/l", "../.."),
        ("dotdot-after-name", "bin/l", "start/../../.."),
    ] {
        let mut t = RawTar::base();
        t.symlink(name, target);
        let e = refused(tag, t);
        assert!(matches!(e, BundleError::UnsafeSymlink { .. }), "{tag}: {e}");
    }
    // A long escaping target through the GNU long-link extension.
    let mut t = RawTar::base();
    t.gnu_long(
        EntryType::GNULongLink,
        format!("{}/../../..", "a".repeat(120)).as_bytes(),
    );
    t.symlink("l", "");
    let e = refused("gnu-long-link", t);
    assert!(matches!(e, BundleError::UnsafeSymlink { .. }), "{e}");

    // A safe symlink is kept, but nothing is ever written through it.
    let mut t = RawTar::base();
    t.symlink("lnk", "bin");
    t.file("lnk/evil", b"x", 0o644);
    let e = refused("through-symlink", t);
    assert!(
        matches!(&e, BundleError::BadPath { reason, .. } if reason.contains("symlink")),
        "{e}"
    );
    // A symlink may not replace what is there, nor be replaced.
    let mut t = RawTar::base();
    t.symlink("outpost-bundle.toml", "bin/start");
    let e = refused("symlink-over-file", t);
    assert!(matches!(e, BundleError::Duplicate { .. }), "{e}");
    let mut t = RawTar::default();
    t.symlink("bin", ".");
    t.dir("bin");
    let e = refused("dir-over-symlink", t);
    assert!(matches!(e, BundleError::Duplicate { .. }), "{e}");
}

#[test]
fn unpack_refuses_special_files() {
    for (tag, kind) in [
        ("char", EntryType::Char),
        ("block", EntryType::Block),
        ("fifo", EntryType::Fifo),
        ("contiguous", EntryType::Continuous),
        ("unknown", EntryType::new(b'Z')),
    ] {
        let mut t = RawTar::base();
        t.raw(b"dev", kind, b"", b"", 0o644);
        let e = refused(tag, t);
        assert!(matches!(e, BundleError::Special { .. }), "{tag}: {e}");
    }
    // Directories and symlinks carry no data; one that claims some is malformed.
    let mut t = RawTar::base();
    t.raw(b"d", EntryType::Directory, b"", &[0u8; 600], 0o755);
    let e = refused("dir-with-data", t);
    assert!(matches!(e, BundleError::Malformed(_)), "{e}");
}

#[test]
fn unpack_refuses_duplicates_and_orphans() {
    let mut t = RawTar::base();
    t.file("bin/start", b"#!/bin/sh\necho replaced\n", 0o755);
    let e = refused("dup-file", t);
    assert!(matches!(e, BundleError::Duplicate { .. }), "{e}");
    let mut t = RawTar::base();
    t.dir("bin");
    let e = refused("dup-dir", t);
    assert!(matches!(e, BundleError::Duplicate { .. }), "{e}");
    let mut t = RawTar::base();
    t.file("no-such-dir/file", b"x", 0o644);
    let e = refused("no-parent", t);
    assert!(matches!(e, BundleError::BadPath { .. }), "{e}");
    let mut t = RawTar::base();
    t.file("outpost-bundle.toml/x", b"x", 0o644);
    let e = refused("file-as-parent", t);
    assert!(matches!(e, BundleError::BadPath { .. }), "{e}");
    let mut t = RawTar::base();
    t.raw(b"bad\xffname", EntryType::Regular, b"", b"x", 0o644);
    let e = refused("not-utf8", t);
    assert!(matches!(e, BundleError::BadPath { .. }), "{e}");
}

#[test]
fn unpack_enforces_limits() {
    let small = BundleLimits {
        // The base bundle's two files hold 96 bytes.
        total_bytes_max: 150,
        file_bytes_max: 100,
        entries_max: 5,
        path_bytes_max: 40,
    };
    let mut t = RawTar::base();
    t.file(&"p".repeat(41), b"x", 0o644);
    let e = refused_with("long-path", t.finish(), &small);
    assert!(matches!(e, BundleError::PathTooLong { .. }), "{e}");
    let mut t = RawTar::base();
    t.gnu_long(EntryType::GNULongName, "q".repeat(500).as_bytes());
    t.file("x", b"x", 0o644);
    let e = refused_with("long-gnu-name", t.finish(), &small);
    assert!(matches!(e, BundleError::PathTooLong { .. }), "{e}");

    let mut t = RawTar::base();
    for i in 0..3 {
        t.file(&format!("f{i}"), b"x", 0o644);
    }
    let e = refused_with("entries", t.finish(), &small);
    assert!(matches!(e, BundleError::TooManyEntries { max: 5 }), "{e}");

    let mut t = RawTar::base();
    t.file("big", &[1u8; 101], 0o644);
    let e = refused_with("file-size", t.finish(), &small);
    assert!(matches!(e, BundleError::FileTooLarge { .. }), "{e}");

    let mut t = RawTar::base();
    t.file("half", &[1u8; 60], 0o644);
    let e = refused_with("total-size", t.finish(), &small);
    assert!(matches!(e, BundleError::TotalTooLarge { .. }), "{e}");

    // A header claiming a terabyte is refused on its claim, before anything is read.
    let mut t = RawTar::base();
    t.header_only(b"huge", EntryType::Regular, 1 << 40);
    let e = refused_with("claimed-size", t.0, &BundleLimits::default());
    assert!(matches!(e, BundleError::FileTooLarge { .. }), "{e}");
}

#[test]
fn unpack_refuses_a_missing_or_invalid_manifest() {
    let mut t = RawTar::default();
    t.dir("bin");
    t.file("bin/start", bundle_support::SCRIPT, 0o755);
    let e = refused("no-manifest", t);
    assert!(matches!(e, BundleError::MissingManifest), "{e}");

    let mut t = RawTar::default();
    t.dir("bin");
    t.file("bin/start", bundle_support::SCRIPT, 0o755);
    t.file("outpost-bundle.toml", b"service = \"fax\"\n", 0o644);
    let e = refused("bad-manifest", t);
    assert!(
        matches!(&e, BundleError::Manifest(m) if m.field == "service"),
        "{e}"
    );

    let mut t = RawTar::default();
    t.dir("bin");
    t.file("bin/start", bundle_support::SCRIPT, 0o644);
    t.file("outpost-bundle.toml", MANIFEST.as_bytes(), 0o644);
    let e = refused("exec-not-executable", t);
    assert!(
        matches!(&e, BundleError::Manifest(m) if m.field == "exec[0]"),
        "{e}"
    );

    let mut t = RawTar::default();
    t.dir("bin");
    t.file("bin/real", bundle_support::SCRIPT, 0o755);
    t.symlink("bin/start", "real");
    t.file("outpost-bundle.toml", MANIFEST.as_bytes(), 0o644);
    let e = refused("exec-symlink", t);
    assert!(
        matches!(&e, BundleError::Manifest(m) if m.field == "exec[0]"),
        "{e}"
    );
}

#[test]
fn unpack_refuses_truncated_archives() {
    let full = RawTar::base().finish();
    // Cut in the middle of the manifest's data, of a header, and where the end marker belongs.
    for cut in [full.len() - 1024 - 300, 1000, full.len() - 1024] {
        let e = refused_with(
            &format!("cut-{cut}"),
            full[..cut].to_vec(),
            &BundleLimits::default(),
        );
        assert!(
            matches!(e, BundleError::Truncated(_) | BundleError::Malformed(_)),
            "cut at {cut}: {e}"
        );
    }
    let e = refused_with("empty", Vec::new(), &BundleLimits::default());
    assert!(matches!(e, BundleError::Truncated(_)), "{e}");
    let mut garbage = full.clone();
    garbage[100] ^= 0xff; // inside the first header: the checksum no longer matches
    let e = refused_with("checksum", garbage, &BundleLimits::default());
    assert!(matches!(e, BundleError::Malformed(_)), "{e}");
}

#[test]
fn unpack_needs_an_empty_destination() {
    let t = TempDir::new("nonempty");
    std::fs::write(t.join("already"), b"x").unwrap();
    let e = unpack(
        &RawTar::base().finish()[..],
        t.path(),
        &BundleLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(e, BundleError::DestNotEmpty(_)), "{e}");
}
