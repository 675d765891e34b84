//! Helpers shared by the bundle tests: temporary directories, hand-made tar archives (hostile
//! ones included: names written straight into the header bytes, past the tar crate's own
//! checks), directory snapshots and waiting on observable state.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tar::{EntryType, Header};

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "outpost-bundle-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/bundles")
        .join(name)
}

/// A tar archive written entry by entry, with raw control over every header.
#[derive(Default)]
pub struct RawTar(pub Vec<u8>);

pub const MANIFEST: &str =
    "service = \"voice\"\nversion = \"1.0.0\"\nexec = [\"bin/start\"]\n[health]\nalive = \"1s\"\n";
pub const SCRIPT: &[u8] = b"#!/bin/sh\nexit 0\n";

impl RawTar {
    /// A valid bundle's entries: `bin/`, `bin/start`, the manifest (no end marker yet).
    pub fn base() -> RawTar {
        let mut t = RawTar::default();
        t.dir("bin");
        t.file("bin/start", SCRIPT, 0o755);
        t.file("outpost-bundle.toml", MANIFEST.as_bytes(), 0o644);
        t
    }

    /// One entry; `name` and `link` go into the header bytes as they are (at most 100 bytes).
    pub fn raw(&mut self, name: &[u8], kind: EntryType, link: &[u8], data: &[u8], mode: u32) {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        {
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.data(data);
    }

    /// A header claiming `size` bytes, followed by nothing.
    pub fn header_only(&mut self, name: &[u8], kind: EntryType, size: u64) {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
    }

    fn data(&mut self, data: &[u8]) {
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) {
        self.raw(name.as_bytes(), EntryType::Regular, b"", data, mode);
    }

    pub fn dir(&mut self, name: &str) {
        self.raw(name.as_bytes(), EntryType::Directory, b"", b"", 0o755);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.raw(
            name.as_bytes(),
            EntryType::Symlink,
            target.as_bytes(),
            b"",
            0o777,
        );
    }

    /// A GNU long-name (`L`) or long-link (`K`) extension entry.
    pub fn gnu_long(&mut self, kind: EntryType, value: &[u8]) {
        let mut v = value.to_vec();
        v.push(0);
        self.raw(b"././@LongLink", kind, b"", &v, 0o644);
    }

    /// A PAX extension header (`x`) with `key=value` records.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) {
        let mut body = Vec::new();
        for (k, v) in records {
            // "<len> <key>=<value>\n", where len counts the whole record, its digits included.
            let rest = k.len() + v.len() + 3;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.raw(b"PaxHeader", EntryType::XHeader, b"", &body, 0o644);
    }

    /// The end-of-archive marker: two zero blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.0.extend(std::iter::repeat_n(0u8, 1024));
        self.0
    }
}

/// What a directory tree holds: for each relative path, its kind, mode and content or target.
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            out.insert(rel, format!("dir {mode:o}"));
            walk(root, &path, out);
        } else if meta.file_type().is_symlink() {
            let t = std::fs::read_link(&path).unwrap();
            out.insert(rel, format!("link -> {}", t.display()));
        } else {
            let data = std::fs::read(&path).unwrap();
            out.insert(
                rel,
                format!("file {mode:o} {}", blake3::hash(&data).to_hex()),
            );
        }
    }
}

/// Polls `f` every 20 ms until it gives `Some`, or panics after `limit` naming `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `key=value` lines of a state file the sample script writes, once it is complete.
pub fn read_state(path: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let map: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    map.contains_key("reloads").then_some(map)
}

/// Processes of group `pgid` that are not zombies, from /proc.
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = text.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}
