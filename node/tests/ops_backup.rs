//! Backups and `db check` with the real binary:
//!
//! - a backup taken through the API while clients keep writing is a consistent database that
//!   `db check` passes: it holds every event acknowledged before the backup began, is marked as
//!   restored, and a quiet node's backup has the node's digest;
//! - `backup --offline` refuses a running node's directory and copies a stopped one's;
//! - `db check` finds a deleted index row, an undecodable row and overwritten pages (exit 1).

mod ops_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ops_support::{outpost, test_dir, Node};
use outpost::testkit::{sample_event, Api};
use redb::{ReadableTable, TableDefinition};

const BATCH: u64 = 20;

/// A directory holding `file` as its database, as a restore would put it.
fn restore_dir(file: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(file, dir.join("outpost.redb")).unwrap();
    dir.to_owned()
}

fn db_check(dir: &Path) -> (i32, String, String) {
    outpost(&["db", "check", "--data-dir", dir.to_str().unwrap()])
}

/// The `entries` and `digest` of an ok `db check` line.
fn summary(stdout: &str) -> (u64, u64, String) {
    let word_before = |what: &str| -> u64 {
        let i = stdout
            .find(what)
            .unwrap_or_else(|| panic!("{what} in {stdout}"));
        stdout[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    let digest = stdout.split("digest ").nth(1).unwrap()[..64].to_owned();
    (word_before(" entries"), word_before(" log records"), digest)
}

async fn backup_via_cli(api: &str, token: &str, out: &Path) -> (i32, String, String) {
    let args = [
        "backup".to_owned(),
        "--api".into(),
        api.into(),
        "--token".into(),
        token.into(),
        "--out".into(),
        out.to_str().unwrap().into(),
    ];
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        outpost(&args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_is_consistent_and_holds_every_acknowledged_event() {
    let dir = test_dir("ops-backup");
    let mut node = Node::init(&dir, "dc-backup", "");
    node.start(&[]);
    let (base, token) = node.api();
    let api = Api::new(&base, &token);

    // Clients write all along; count what is acknowledged.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let (api, acked, stop) = (api.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && n < 200 * BATCH {
                let batch: Vec<_> = (0..BATCH)
                    .map(|i| sample_event(&format!("acct-{w}-{}", (n + i) % 50), n + i))
                    .collect();
                api.post_batch(&batch).await.expect("batch acknowledged");
                acked.fetch_add(BATCH, Ordering::SeqCst);
                n += BATCH;
            }
        }));
    }
    while acked.load(Ordering::SeqCst) < 10 * BATCH {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let before = acked.load(Ordering::SeqCst);
    let busy = dir.join("busy.redb");
    let (code, out, err) = backup_via_cli(&base, &token, &busy).await;
    assert_eq!(code, 0, "backup under load: {out}{err}");
    let after = acked.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let total = acked.load(Ordering::SeqCst);
    assert!(out.contains("blake3"), "{out}");

    let (code, out, err) = db_check(&restore_dir(&busy, &dir.join("busy")));
    assert_eq!(code, 0, "db check of the backup: {out}{err}");
    assert!(
        out.starts_with("ok: ") && out.contains("restored from a backup"),
        "{out}"
    );
    let (_, records, _) = summary(&out);
    assert!(
        (before..=after).contains(&records),
        "the backup holds {records} log records; {before} were acknowledged before it began \
         and {after} when it ended"
    );

    // Quiet now: the backup has exactly the node's state.
    let quiet = dir.join("quiet.redb");
    let (code, out, err) = backup_via_cli(&base, &token, &quiet).await;
    assert_eq!(code, 0, "{out}{err}");
    let live = api.digest().await.unwrap();
    let (code, out, err) = db_check(&restore_dir(&quiet, &dir.join("quiet")));
    assert_eq!(code, 0, "{out}{err}");
    let (entries, records, digest) = summary(&out);
    assert_eq!(
        (digest.as_str(), entries),
        (live.digest.as_str(), live.entries),
        "{out}"
    );
    assert_eq!(records, total, "{out}");

    // Offline: refused while the node runs, then a copy of the stopped node's database.
    let data_dir = node.data_dir.to_str().unwrap().to_owned();
    let offline = dir.join("offline.redb");
    let offline_s = offline.to_str().unwrap().to_owned();
    let (code, _, err) = outpost(&[
        "backup",
        "--offline",
        "--data-dir",
        &data_dir,
        "--out",
        &offline_s,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    assert!(!offline.exists());
    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0));
    let (code, out, err) = outpost(&[
        "backup",
        "--offline",
        "--data-dir",
        &data_dir,
        "--out",
        &offline_s,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = db_check(&restore_dir(&offline, &dir.join("offline")));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(summary(&out).2, live.digest, "{out}");
    let (code, out, err) = db_check(&node.data_dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains("restored"),
        "the original is not marked restored: {out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small database of a stopped node, copied for each corruption.
fn stopped_node_db(label: &str) -> (PathBuf, PathBuf) {
    let dir = test_dir(label);
    let mut node = Node::init(&dir, "dc-check", "");
    node.start(&[]);
    let (base, token) = node.api();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let api = Api::new(&base, &token);
        let batch: Vec<_> = (0..30)
            .map(|n| sample_event(&format!("a{}", n % 7), n))
            .collect();
        api.post_batch(&batch).await.unwrap();
    });
    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0));
    let (code, out, err) = db_check(&node.data_dir);
    assert_eq!(code, 0, "the intact database passes: {out}{err}");
    (dir.clone(), node.data_dir.join("outpost.redb"))
}

fn corrupt_copy(dir: &Path, db: &Path, name: &str, f: impl FnOnce(&redb::Database)) -> PathBuf {
    let copy = restore_dir(db, &dir.join(name));
    let d = redb::Database::open(copy.join("outpost.redb")).unwrap();
    f(&d);
    drop(d);
    copy
}

#[test]
fn db_check_finds_a_deleted_message_row_a_bad_row_and_overwritten_pages() {
    let (dir, db) = stopped_node_db("ops-check");

    let messages: TableDefinition<(u128, u64, u64), &[u8]> =
        TableDefinition::new("messages_by_origin");
    let copy = corrupt_copy(&dir, &db, "no-message", |d| {
        let txn = d.begin_write().unwrap();
        {
            let mut t = txn.open_table(messages).unwrap();
            let first = t.first().unwrap().map(|(k, _)| k.value()).unwrap();
            t.remove(first).unwrap();
        }
        txn.commit().unwrap();
    });
    let (code, out, _) = db_check(&copy);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("has no record"), "{out}");

    let log: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
    let copy = corrupt_copy(&dir, &db, "bad-row", |d| {
        let txn = d.begin_write().unwrap();
        {
            let mut t = txn.open_table(log).unwrap();
            t.insert(7u64, &[0xffu8, 0xff, 0xff][..]).unwrap();
        }
        txn.commit().unwrap();
    });
    let (code, out, _) = db_check(&copy);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("log[7]: does not decode"), "{out}");

    // Every page after the file header overwritten: redb cannot read the tables.
    let copy = restore_dir(&db, &dir.join("garbage"));
    let path = copy.join("outpost.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in bytes.iter_mut().skip(4096) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&path, bytes).unwrap();
    let (code, out, err) = db_check(&copy);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("corrupt"), "{out}{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
