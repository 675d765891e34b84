//! A worker's software directory: content-addressed installs that verify the id, atomic
//! `current`/`previous` switches, rollback and pruning; a refused bundle leaves nothing behind.

mod bundle_support;

use std::io::Read;
use std::path::Path;

use bundle_support::{fixture, RawTar, TempDir};
use outpost::bundle::{pack, BundleError, Installer, PackInfo, CURRENT_LINK};

fn packed(t: &TempDir, name: &str) -> (PackInfo, std::path::PathBuf) {
    let out = t.join(&format!("{name}.bundle"));
    (pack(&fixture(name), &out).unwrap(), out)
}

fn open(p: &Path) -> std::fs::File {
    std::fs::File::open(p).unwrap()
}

/// Names in the software directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A reader that must not be read.
struct Untouched;
impl Read for Untouched {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        panic!("an installed bundle id was read again")
    }
}

#[test]
fn install_is_content_addressed_and_verified() {
    let t = TempDir::new("install");
    let (voice, file) = packed(&t, "voice");
    let sw = t.join("software");
    let mut inst = Installer::new(&sw).unwrap();
    let got = inst.install(&voice.bundle_id, open(&file)).unwrap();
    assert_eq!(got.dir, sw.join(&voice.bundle_id));
    assert_eq!(got.manifest, voice.manifest);
    assert!(got.dir.join("bin/start").is_file());
    assert_eq!(listing(&sw), [voice.bundle_id.as_str()]);

    // Installed already: reused without reading a byte.
    let again = inst.install(&voice.bundle_id, Untouched).unwrap();
    assert_eq!(again, got);

    // The bytes must hash to the id they are installed under.
    let (messaging, mfile) = packed(&t, "messaging");
    let wrong = "0".repeat(64);
    let e = inst.install(&wrong, open(&mfile)).unwrap_err();
    assert!(
        matches!(&e, BundleError::IdMismatch { actual, .. } if *actual == messaging.bundle_id),
        "{e}"
    );
    assert_eq!(
        listing(&sw),
        [voice.bundle_id.as_str()],
        "a refused install left files"
    );

    // Hostile bytes: refused, nothing left.
    let mut hostile = RawTar::base();
    hostile.file("../escape", b"x", 0o644);
    let bytes = hostile.finish();
    let id = blake3::hash(&bytes).to_hex().to_string();
    let e = inst.install(&id, &bytes[..]).unwrap_err();
    assert!(matches!(e, BundleError::ParentComponent { .. }), "{e}");
    assert_eq!(listing(&sw), [voice.bundle_id.as_str()]);
    assert!(!t.join("escape").exists());

    // Trailing bytes after the archive change the id, so they are checked too.
    let mut padded = std::fs::read(&mfile).unwrap();
    padded.extend_from_slice(b"junk");
    let e = inst.install(&messaging.bundle_id, &padded[..]).unwrap_err();
    assert!(matches!(e, BundleError::IdMismatch { .. }), "{e}");

    for bad in ["../x", "ABC", &"g".repeat(64)] {
        let e = inst.install(bad, &b""[..]).unwrap_err();
        assert!(matches!(e, BundleError::BadBundleId(_)), "{bad}: {e}");
    }
}

#[test]
fn activate_rollback_switch_links_atomically() {
    let t = TempDir::new("activate");
    let (voice, vfile) = packed(&t, "voice");
    let (messaging, mfile) = packed(&t, "messaging");
    let sw = t.join("software");
    let mut inst = Installer::new(&sw).unwrap();
    assert_eq!(inst.current().unwrap(), None);
    let e = inst.activate(&voice.bundle_id).unwrap_err();
    assert!(matches!(e, BundleError::NotInstalled(_)), "{e}");
    let e = inst.rollback().unwrap_err();
    assert!(matches!(e, BundleError::NoPrevious), "{e}");

    inst.install(&voice.bundle_id, open(&vfile)).unwrap();
    inst.install(&messaging.bundle_id, open(&mfile)).unwrap();

    inst.activate(&voice.bundle_id).unwrap();
    assert_eq!(inst.current().unwrap().as_deref(), Some(&*voice.bundle_id));
    assert_eq!(inst.previous().unwrap(), None);
    // `current` is a relative link, so the directory may move.
    assert_eq!(
        std::fs::read_link(sw.join(CURRENT_LINK)).unwrap(),
        Path::new(&voice.bundle_id)
    );
    assert!(sw.join("current/bin/start").is_file());

    inst.activate(&messaging.bundle_id).unwrap();
    assert_eq!(
        inst.current().unwrap().as_deref(),
        Some(&*messaging.bundle_id)
    );
    assert_eq!(inst.previous().unwrap().as_deref(), Some(&*voice.bundle_id));
    // Activating what is current changes nothing.
    inst.activate(&messaging.bundle_id).unwrap();
    assert_eq!(inst.previous().unwrap().as_deref(), Some(&*voice.bundle_id));

    assert_eq!(inst.rollback().unwrap(), voice.bundle_id);
    assert_eq!(inst.current().unwrap().as_deref(), Some(&*voice.bundle_id));
    assert_eq!(
        inst.previous().unwrap().as_deref(),
        Some(&*messaging.bundle_id)
    );
    assert_eq!(inst.rollback().unwrap(), messaging.bundle_id);

    // No temporary link names left over.
    let names = listing(&sw);
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "leftovers: {names:?}"
    );
}

#[test]
fn prune_keeps_current_previous_and_the_newest() {
    let t = TempDir::new("prune");
    let sw = t.join("software");
    let mut inst = Installer::new(&sw).unwrap();
    let mut ids = Vec::new();
    // Four distinct bundles: the three fixtures and a variant of voice.
    for name in ["voice", "messaging", "broken"] {
        let (info, file) = packed(&t, name);
        inst.install(&info.bundle_id, open(&file)).unwrap();
        ids.push(info.bundle_id);
    }
    let variant = t.join("variant");
    std::fs::create_dir_all(variant.join("bin")).unwrap();
    std::fs::copy(fixture("voice/bin/start"), variant.join("bin/start")).unwrap();
    std::fs::write(
        variant.join("outpost-bundle.toml"),
        std::fs::read_to_string(fixture("voice/outpost-bundle.toml"))
            .unwrap()
            .replace("1.0.0", "1.0.1"),
    )
    .unwrap();
    let info = pack(&variant, &t.join("variant.bundle")).unwrap();
    inst.install(&info.bundle_id, open(&t.join("variant.bundle")))
        .unwrap();
    ids.push(info.bundle_id);

    // A crash left an install half done.
    std::fs::create_dir_all(sw.join("tmp-0123456789abcdef/bin")).unwrap();

    inst.activate(&ids[0]).unwrap();
    inst.activate(&ids[1]).unwrap();
    // ids[3] was installed last: kept by keep = 1; ids[2] goes.
    let removed = inst.prune(1).unwrap();
    assert_eq!(removed, [ids[2].clone()]);
    let mut expect = vec![
        ids[0].clone(),
        ids[1].clone(),
        ids[3].clone(),
        "current".into(),
        "previous".into(),
    ];
    expect.sort();
    assert_eq!(listing(&sw), expect);
    assert_eq!(inst.prune(0).unwrap(), [ids[3].clone()]);
    assert!(inst.prune(0).unwrap().is_empty());
    assert_eq!(inst.current().unwrap().as_deref(), Some(&*ids[1]));
    assert_eq!(inst.previous().unwrap().as_deref(), Some(&*ids[0]));
}
