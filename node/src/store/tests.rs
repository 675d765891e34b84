//! The store against its model: every operation of the replication traits runs on both
//! [`MemStore`] and redb, and every read must agree. Plus reopen, schema, retention and locking.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::ids::MsgId;
use crate::model::{ElementRecord, EventType, Version};
use crate::replication::mem::MemStore;
use crate::replication::{
    digest, Core, Entry, LogRead, Mark, MsgKey, MsgRecord, PeerProgress, Tables,
};

/// A directory under the system temp dir, unique per process and test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("outpost-store-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn node_meta(epoch: u64) -> NodeMeta {
    NodeMeta {
        node_id: NodeId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
        role: Role::Datacenter,
        name: "dc-test".into(),
        log_epoch: epoch,
        created_ms: 1_700_000_000_000,
    }
}

fn open_init(dir: &TempDir, epoch: u64) -> Store {
    let store = Store::open(dir.path()).expect("open");
    store.init_meta(&node_meta(epoch)).expect("init meta");
    store
}

// Small pools, so that keys collide and overwrite; accounts chosen to probe key order
// ("a" < "a\0" < "ab" < "b", multi-byte UTF-8 last).
const ACCOUNTS: [&str; 7] = ["", "a", "a\0", "ab", "b", "zz", "é"];
const ORIGINS: [NodeId; 4] = [NodeId(1), NodeId(2), NodeId(1 << 100), NodeId(u128::MAX)];
const MSG_IDS: usize = 24;

fn msg_id(i: usize) -> MsgId {
    let mut b = [i as u8; 32];
    b[31] = 0xff - i as u8;
    MsgId(b)
}

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

fn rand_version(rng: &mut StdRng) -> Version {
    Version {
        ms: rng.random_range(0..1000),
        logical: rng.random_range(0..4),
        node: pick(rng, &ORIGINS),
    }
}

fn rand_bytes(rng: &mut StdRng) -> Vec<u8> {
    let n = rng.random_range(0..48);
    (0..n).map(|_| rng.random()).collect()
}

fn rand_entry(rng: &mut StdRng) -> Entry {
    Entry {
        version: rand_version(rng),
        origin: pick(rng, &ORIGINS),
        oseq: rng.random_range(1..20),
        msg_id: msg_id(rng.random_range(0..MSG_IDS)),
        element: rand_bytes(rng),
    }
}

fn rand_record(rng: &mut StdRng) -> ElementRecord {
    ElementRecord {
        origin: pick(rng, &ORIGINS),
        oseq: rng.random_range(1..20),
        account: pick(rng, &ACCOUNTS).to_string(),
        etype: pick(rng, &EventType::ALL),
        version: rand_version(rng),
        element: rand_bytes(rng),
        msg_id: msg_id(rng.random_range(0..MSG_IDS)),
    }
}

fn rand_mark(rng: &mut StdRng) -> Mark {
    let mut m = Mark::default();
    for _ in 0..rng.random_range(0..8) {
        m.insert(rng.random_range(1..16));
    }
    m
}

/// The model of [`RedbTables::trim_log`], over the model's maps.
fn model_trim(m: &mut MemStore, cutoff_ms: u64, keep_max: u64, work_max: usize) -> u64 {
    let mut trimmed = 0;
    while trimmed < work_max as u64 {
        let Some((&lseq, rec)) = m.log.iter().next() else {
            break;
        };
        let rec = rec.clone();
        let msg = m.message(MsgKey::of(&rec), &rec.msg_id).unwrap();
        let old = msg.as_ref().is_none_or(|r| r.first_seen_ms < cutoff_ms);
        if !old && m.log.len() as u64 <= keep_max {
            break;
        }
        m.log.remove(&lseq);
        if msg.is_some_and(|r| r.lseq == lseq) {
            m.messages.remove(&MsgKey::of(&rec));
        }
        trimmed += 1;
    }
    trimmed
}

/// One random write, applied to both.
fn random_write(
    seed: u64,
    rng: &mut StdRng,
    m: &mut MemStore,
    r: &mut RedbTables<'_>,
) -> Result<()> {
    match rng.random_range(0..100) {
        0..=9 => {
            let s = (rng.random_range(0..10_000), rng.random_range(0..10));
            m.set_hlc(s).unwrap();
            r.set_hlc(s)?;
        }
        10..=34 => {
            let (a, t, e) = (
                pick(rng, &ACCOUNTS),
                pick(rng, &EventType::ALL),
                rand_entry(rng),
            );
            m.put_entry(a, t, &e).unwrap();
            r.put_entry(a, t, &e)?;
        }
        35..=54 => {
            let id = msg_id(rng.random_range(0..MSG_IDS));
            let senders = (0..rng.random_range(0..4))
                .map(|_| pick(rng, &ORIGINS))
                .collect();
            let rec = MsgRecord {
                msg_id: id,
                origin: pick(rng, &ORIGINS),
                oseq: rng.random_range(1..20),
                lseq: rng.random_range(0..40),
                first_seen_ms: rng.random_range(0..10),
                senders,
            };
            m.put_message(&rec).unwrap();
            r.put_message(&rec)?;
        }
        55..=64 => {
            let (o, mark) = (pick(rng, &ORIGINS), rand_mark(rng));
            m.put_mark(o, &mark).unwrap();
            r.put_mark(o, &mark)?;
        }
        65..=84 => {
            // Mostly as the core does it: the record and its message record together.
            let rec = rand_record(rng);
            let lseq = Tables::log_tail(m).unwrap() + 1;
            m.append_log(lseq, &rec).unwrap();
            r.append_log(lseq, &rec)?;
            if rng.random_bool(0.8) {
                let msg = MsgRecord {
                    msg_id: rec.msg_id,
                    origin: rec.origin,
                    oseq: rec.oseq,
                    lseq,
                    first_seen_ms: rng.random_range(0..10),
                    senders: Vec::new(),
                };
                m.put_message(&msg).unwrap();
                r.put_message(&msg)?;
            }
        }
        85..=94 => {
            let p = PeerProgress {
                acked_epoch: 0,
                acked_peer_epoch: 0,
                acked: rng.random_range(0..50),
                recv_epoch: rng.random_range(0..3),
                received: rng.random_range(0..50),
            };
            let peer = pick(rng, &ORIGINS);
            m.put_peer(peer, &p).unwrap();
            r.put_peer(peer, &p)?;
        }
        _ => {
            let cutoff = rng.random_range(0..12);
            let keep = rng.random_range(0..40);
            let work = rng.random_range(0..6);
            let want = model_trim(m, cutoff, keep, work);
            assert_eq!(
                r.trim_log(cutoff, keep, work)?,
                want,
                "seed {seed}: trim_log({cutoff}, {keep}, {work})"
            );
        }
    }
    Ok(())
}

/// Every read of the log, through [`LogRead`].
fn check_log(seed: u64, m: &MemStore, r: &impl LogRead) {
    assert_eq!(
        r.log_epoch().unwrap(),
        LogRead::log_epoch(m).unwrap(),
        "seed {seed}"
    );
    assert_eq!(
        r.log_tail().unwrap(),
        LogRead::log_tail(m).unwrap(),
        "seed {seed}"
    );
    assert_eq!(
        r.log_first().unwrap(),
        m.log_first().unwrap(),
        "seed {seed}"
    );
    for after in [0, 1, 3, 7, 1000] {
        for max in [0, 1, 2, 5, usize::MAX] {
            assert_eq!(
                r.log_range(after, max).unwrap(),
                m.log_range(after, max).unwrap(),
                "seed {seed}: log_range({after}, {max})"
            );
        }
    }
    for o in ORIGINS {
        for after in [0, 2, 9] {
            for max in [1, 3, usize::MAX] {
                assert_eq!(
                    r.origin_range(o, after, max).unwrap(),
                    m.origin_range(o, after, max).unwrap(),
                    "seed {seed}: origin_range({o:?}, {after}, {max})"
                );
            }
        }
    }
}

/// Message keys to compare: every one the model holds, and a grid of others (absent ones, and
/// present keys asked with another id).
fn message_probes(m: &MemStore) -> Vec<(MsgKey, MsgId)> {
    let mut out: Vec<(MsgKey, MsgId)> = m.messages.iter().map(|(k, r)| (*k, r.msg_id)).collect();
    for o in ORIGINS {
        for oseq in [1, 5, 19] {
            for i in 0..MSG_IDS {
                out.push((MsgKey::new(o, oseq, &msg_id(i)), msg_id(i)));
            }
        }
    }
    if let Some((k, r)) = m.messages.iter().next() {
        let other = MsgId([0xee; 32]);
        if other != r.msg_id {
            out.push((*k, other));
        }
    }
    out
}

/// Every read of a write transaction.
fn check_tables(seed: u64, m: &MemStore, r: &RedbTables<'_>) {
    assert_eq!(r.hlc().unwrap(), m.hlc().unwrap(), "seed {seed}: hlc");
    assert_eq!(Tables::log_epoch(r).unwrap(), m.epoch, "seed {seed}");
    assert_eq!(Tables::log_tail(r).unwrap(), m.tail, "seed {seed}");
    for a in ACCOUNTS {
        for t in EventType::ALL {
            assert_eq!(
                r.entry(a, t).unwrap(),
                m.entry(a, t).unwrap(),
                "seed {seed}"
            );
        }
    }
    for (key, id) in message_probes(m) {
        assert_eq!(
            r.message(key, &id).unwrap(),
            m.message(key, &id).unwrap(),
            "seed {seed}: message {key:?}"
        );
    }
    for o in ORIGINS {
        assert_eq!(r.mark(o).unwrap(), m.mark(o).unwrap(), "seed {seed}");
        assert_eq!(r.peer(o).unwrap(), m.peer(o).unwrap(), "seed {seed}");
    }
    assert_eq!(r.marks().unwrap(), m.marks().unwrap(), "seed {seed}");
    check_log(seed, m, r);
}

/// Every read of a committed snapshot.
fn check_committed(seed: u64, m: &MemStore, r: &ReadTxn) {
    check_log(seed, m, r);
    assert_eq!(
        r.digest().unwrap(),
        digest(m.state()),
        "seed {seed}: digest"
    );
    assert_eq!(
        r.entry_count().unwrap(),
        m.entries.len() as u64,
        "seed {seed}"
    );
    for a in ACCOUNTS {
        let want: Vec<StateRow> = m
            .state()
            .filter(|(acc, _, _)| *acc == a)
            .map(|(acc, t, e)| StateRow {
                account: acc.to_string(),
                etype: t,
                entry: e.clone(),
                message_count: m
                    .message(e.msg_key(), &e.msg_id)
                    .unwrap()
                    .map_or(0, |r| r.senders.len() as u32),
            })
            .collect();
        assert_eq!(
            r.table_state(a, None).unwrap(),
            want,
            "seed {seed}: state({a:?})"
        );
        for t in EventType::ALL {
            let one: Vec<StateRow> = want.iter().filter(|s| s.etype == t).cloned().collect();
            assert_eq!(r.table_state(a, Some(t)).unwrap(), one, "seed {seed}");
        }
    }
    for (key, id) in message_probes(m) {
        assert_eq!(
            r.message(key, &id).unwrap(),
            m.message(key, &id).unwrap(),
            "seed {seed}: message {key:?}"
        );
    }
    // By id alone, the answer is the record of the newest log record with that id.
    for i in 0..MSG_IDS {
        let id = msg_id(i);
        let want = m
            .log
            .values()
            .rev()
            .find(|rec| rec.msg_id == id)
            .and_then(|rec| m.message(MsgKey::of(rec), &id).unwrap());
        assert_eq!(r.find_message(&id).unwrap(), want, "seed {seed}: find {i}");
    }
    let peers: Vec<_> = m.peers.iter().map(|(k, v)| (*k, v.clone())).collect();
    assert_eq!(r.peers().unwrap(), peers, "seed {seed}");
    assert_eq!(r.marks().unwrap(), m.marks().unwrap(), "seed {seed}");
    for o in ORIGINS {
        assert_eq!(r.peer(o).unwrap(), m.peer(o).unwrap(), "seed {seed}");
    }
}

fn run_model(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = TempDir::new("model");
    let epoch = rng.random_range(1..u64::MAX);
    let mut store = open_init(&dir, epoch);
    let mut model = MemStore::new(epoch);
    for _ in 0..8 {
        let commit = rng.random_bool(0.75);
        let mut scratch = model.clone();
        let txn = store.begin().unwrap();
        // Sometimes two table sessions in one transaction: the second must see the first.
        for _ in 0..rng.random_range(1..3) {
            let mut r = txn.tables().unwrap();
            check_tables(seed, &scratch, &r);
            for _ in 0..rng.random_range(1..30) {
                random_write(seed, &mut rng, &mut scratch, &mut r).unwrap();
                if rng.random_bool(0.2) {
                    check_tables(seed, &scratch, &r);
                }
            }
            check_tables(seed, &scratch, &r);
            r.finish().unwrap();
        }
        if commit {
            txn.commit().unwrap();
            model = scratch;
        } else {
            // redb aborts on drop: nothing of it may be visible.
            drop(txn);
        }
        check_committed(seed, &model, &store.read().unwrap());
        if rng.random_bool(0.2) {
            drop(store);
            store = Store::open(dir.path()).unwrap();
            check_committed(seed, &model, &store.read().unwrap());
        }
    }
}

/// redb behaves as the simulation's storage model, so the simulation proves the real node.
#[test]
fn store_matches_mem_model() {
    let seeds: u64 = std::env::var("OUTPOST_STORE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for seed in 0..seeds {
        run_model(seed);
    }
}

#[test]
fn store_committed_data_survives_reopen() {
    let dir = TempDir::new("reopen");
    let store = open_init(&dir, 7);
    let rec = ElementRecord {
        origin: NodeId(5),
        oseq: 1,
        account: "alice".into(),
        etype: EventType::Presence,
        version: Version {
            ms: 10,
            logical: 0,
            node: NodeId(5),
        },
        element: b"{\"status\":\"busy\"}".to_vec(),
        msg_id: msg_id(1),
    };
    let entry = Entry {
        version: rec.version,
        origin: rec.origin,
        oseq: rec.oseq,
        msg_id: rec.msg_id,
        element: rec.element.clone(),
    };
    let txn = store.begin().unwrap();
    {
        let mut t = txn.tables().unwrap();
        t.put_entry("alice", EventType::Presence, &entry).unwrap();
        t.append_log(1, &rec).unwrap();
        t.put_message(&MsgRecord {
            msg_id: rec.msg_id,
            origin: rec.origin,
            oseq: rec.oseq,
            lseq: 1,
            first_seen_ms: 10,
            senders: vec![NodeId(9)],
        })
        .unwrap();
        t.set_hlc((10, 3)).unwrap();
        t.put_peer(
            NodeId(9),
            &PeerProgress {
                acked_epoch: 0,
                acked_peer_epoch: 0,
                acked: 1,
                recv_epoch: 4,
                received: 2,
            },
        )
        .unwrap();
        t.finish().unwrap();
    }
    txn.commit().unwrap();
    store.put_secret("tls_key_der", b"key bytes").unwrap();
    let before = store.read().unwrap().digest().unwrap();
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.meta().unwrap(), Some(node_meta(7)));
    assert_eq!(
        store.secret("tls_key_der").unwrap().as_deref(),
        Some(&b"key bytes"[..])
    );
    assert_eq!(store.secret("tls_cert_der").unwrap(), None);
    let r = store.read().unwrap();
    assert_eq!(r.digest().unwrap(), before);
    assert_eq!(before.1, 1);
    assert_eq!(r.entry("alice", EventType::Presence).unwrap(), Some(entry));
    assert_eq!(r.log_tail().unwrap(), 1);
    assert_eq!(r.log_epoch().unwrap(), 7);
    assert_eq!(r.origin_range(NodeId(5), 0, 10).unwrap(), vec![rec]);
    assert_eq!(r.peer(NodeId(9)).unwrap().received, 2);
    drop(r);
    assert_eq!(
        store.begin().unwrap().tables().unwrap().hlc().unwrap(),
        (10, 3)
    );
}

#[test]
fn store_init_meta_is_written_once() {
    let dir = TempDir::new("meta");
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.meta().unwrap(), None);
    // Without an identity there is no log epoch to report.
    assert!(store.read().unwrap().log_epoch().is_err());
    store.init_meta(&node_meta(3)).unwrap();
    store.init_meta(&node_meta(3)).unwrap();
    let err = store.init_meta(&node_meta(4)).unwrap_err();
    assert!(err.to_string().contains("already recorded"), "{err}");
    assert_eq!(store.meta().unwrap(), Some(node_meta(3)));
}

#[test]
fn store_refuses_newer_schema() {
    let dir = TempDir::new("schema");
    let store = Store::open(dir.path()).unwrap();
    let txn = store.db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert(META_SCHEMA_VERSION, &4u32.to_le_bytes()[..])
        .unwrap();
    txn.commit().unwrap();
    drop(store);

    match Store::open(dir.path()) {
        Err(
            e @ OpenError::NewerSchema {
                found: 4,
                supported: 3,
                ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("schema version 4"), "{msg}");
            assert!(msg.contains("upgrade outpost"), "{msg}");
            assert!(msg.contains(DB_FILE), "{msg}");
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
}

#[test]
fn store_refuses_a_file_that_is_not_a_database() {
    let dir = TempDir::new("garbage");
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join(DB_FILE), vec![0x5a; 8192]).unwrap();
    match Store::open(dir.path()) {
        Err(e @ OpenError::Corrupt { .. }) => assert!(e.to_string().contains(DB_FILE), "{e}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn store_second_open_is_refused_while_running() {
    let dir = TempDir::new("lock");
    let first = Store::open(dir.path()).unwrap();
    match Store::open(dir.path()) {
        Err(e @ OpenError::Locked { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("already running"), "{msg}");
            assert!(msg.contains(DB_FILE), "{msg}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(first);
    Store::open(dir.path()).expect("the lock is released on close");
}

fn trim_fixture(store: &Store, n: u64) {
    let txn = store.begin().unwrap();
    {
        let mut t = txn.tables().unwrap();
        for i in 1..=n {
            let rec = ElementRecord {
                origin: NodeId(42),
                oseq: i,
                account: format!("acct{i}"),
                etype: EventType::Element,
                version: Version {
                    ms: i,
                    logical: 0,
                    node: NodeId(42),
                },
                element: b"{}".to_vec(),
                msg_id: msg_id(i as usize),
            };
            t.append_log(i, &rec).unwrap();
            let m = MsgRecord {
                msg_id: rec.msg_id,
                origin: NodeId(42),
                oseq: i,
                lseq: i,
                first_seen_ms: 100 * i,
                senders: vec![NodeId(7)],
            };
            t.put_message(&m).unwrap();
        }
        t.finish().unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn store_trim_log_respects_age_and_size_and_keeps_tail() {
    let dir = TempDir::new("trim");
    let store = open_init(&dir, 1);
    trim_fixture(&store, 10);
    let oseqs = |r: &ReadTxn| -> Vec<u64> {
        r.origin_range(NodeId(42), 0, 100)
            .unwrap()
            .iter()
            .map(|x| x.oseq)
            .collect()
    };

    let txn = store.begin().unwrap();
    {
        let mut t = txn.tables().unwrap();
        // Age: records first seen at 100..=400 are before the cutoff of 450.
        assert_eq!(t.trim_log(450, 100, 100).unwrap(), 4);
        assert_eq!(t.log_first().unwrap(), Some(5));
        assert_eq!(Tables::log_tail(&t).unwrap(), 10);
        let key = |i: usize| MsgKey::new(NodeId(42), i as u64, &msg_id(i));
        for i in 1..=4 {
            assert_eq!(
                t.message(key(i), &msg_id(i)).unwrap(),
                None,
                "message {i} trimmed"
            );
        }
        assert!(t.message(key(5), &msg_id(5)).unwrap().is_some());
        // Size, bounded by work_max: 6 retained, keep 3, at most 2 per call.
        assert_eq!(t.trim_log(0, 3, 2).unwrap(), 2);
        assert_eq!(t.trim_log(0, 3, 2).unwrap(), 1);
        assert_eq!(t.trim_log(0, 3, 2).unwrap(), 0);
        assert_eq!(t.log_first().unwrap(), Some(8));
        t.finish().unwrap();
    }
    txn.commit().unwrap();
    let r = store.read().unwrap();
    assert_eq!(
        oseqs(&r),
        vec![8, 9, 10],
        "index rows of trimmed records are gone"
    );
    assert_eq!(r.log_range(0, 100).unwrap().len(), 3);
    assert_eq!(r.log_tail().unwrap(), 10);
    drop(r);

    // Everything, then an append continues after the old tail, across a reopen.
    store
        .write(|t| {
            assert_eq!(t.trim_log(u64::MAX, 0, 100).unwrap(), 3);
            Ok::<_, StoreError>(())
        })
        .unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let r = store.read().unwrap();
    assert_eq!(r.log_first().unwrap(), None);
    assert_eq!(r.log_tail().unwrap(), 10, "trimming never lowers the tail");
    assert!(oseqs(&r).is_empty());
    for i in 1..=10 {
        assert_eq!(r.find_message(&msg_id(i)).unwrap(), None);
    }
}

#[test]
fn store_full_disk_maps_to_full() {
    let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
    assert!(matches!(db_err(redb::Error::Io(e)), StoreError::Full(_)));
    let e = std::io::Error::from_raw_os_error(libc::EDQUOT);
    assert!(matches!(db_err(redb::Error::Io(e)), StoreError::Full(_)));
    let e = std::io::Error::from_raw_os_error(libc::EIO);
    assert!(matches!(db_err(redb::Error::Io(e)), StoreError::Io(_)));
}

/// A database written with schema version 1 (message records keyed by id, plus an index by
/// origin) opens as version 2 with every message record, count and state entry carried over,
/// and passes `db check`.
#[test]
fn store_migrates_schema_1_to_2() {
    use super::tables::v1;
    let dir = TempDir::new("migrate");
    let store = open_init(&dir, 9);
    let origin = NodeId(42);
    let recs: Vec<ElementRecord> = (1..=5u64)
        .map(|i| {
            let mut rec = ElementRecord {
                origin,
                oseq: i,
                account: format!("acct{}", i % 2),
                etype: EventType::Element,
                version: Version {
                    ms: i,
                    logical: 0,
                    node: origin,
                },
                element: format!("{{\"n\":{i}}}").into_bytes(),
                msg_id: MsgId::default(),
            };
            rec.msg_id = rec.expected_id();
            rec
        })
        .collect();
    // Rewrite the database as version 1 left it.
    {
        let txn = store.db.begin_write().unwrap();
        txn.delete_table(tables::MESSAGES).unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(META_SCHEMA_VERSION, &1u32.to_le_bytes()[..])
                .unwrap();
            meta.insert(tables::META_LOG_TAIL, &5u64.to_le_bytes()[..])
                .unwrap();
            let mut log = txn.open_table(tables::LOG).unwrap();
            let mut index = txn.open_table(v1::BY_ORIGIN).unwrap();
            let mut msgs = txn.open_table(v1::MESSAGES).unwrap();
            let mut state = txn.open_table(tables::STATE).unwrap();
            let mut marks = txn.open_table(tables::MARKS).unwrap();
            for (i, rec) in recs.iter().enumerate() {
                let lseq = i as u64 + 1;
                log.insert(lseq, postcard::to_stdvec(rec).unwrap().as_slice())
                    .unwrap();
                index.insert((origin.0, rec.oseq), lseq).unwrap();
                let m = v1::MsgRecord {
                    origin,
                    oseq: rec.oseq,
                    first_seen_ms: 100 + lseq,
                    senders: vec![NodeId(7); (lseq % 2) as usize],
                };
                msgs.insert(&rec.msg_id.0, postcard::to_stdvec(&m).unwrap().as_slice())
                    .unwrap();
                let e = v1::Entry {
                    version: rec.version,
                    origin,
                    msg_id: rec.msg_id,
                    element: rec.element.clone(),
                };
                state
                    .insert(
                        (rec.account.as_str(), rec.etype.code()),
                        postcard::to_stdvec(&e).unwrap().as_slice(),
                    )
                    .unwrap();
            }
            let mut mark = Mark::default();
            (1..=5).for_each(|s| mark.insert(s));
            marks
                .insert(origin.0, postcard::to_stdvec(&mark).unwrap().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    store
        .put_secret("tls_cert_der", b"cert")
        .and_then(|_| store.put_secret("tls_key_der", b"key"))
        .unwrap();
    drop(store);

    let store = Store::open(dir.path()).expect("a version 1 database is migrated");
    let r = store.read().unwrap();
    for (i, rec) in recs.iter().enumerate() {
        let lseq = i as u64 + 1;
        let m = r
            .message(MsgKey::of(rec), &rec.msg_id)
            .unwrap()
            .expect("every message record carried over");
        assert_eq!((m.lseq, m.first_seen_ms), (lseq, 100 + lseq));
        assert_eq!(m.senders.len() as u64, lseq % 2);
        assert_eq!(r.find_message(&rec.msg_id).unwrap(), Some(m));
    }
    // The last writes of each account set its entry; its count is that message's.
    for (account, last) in [("acct1", &recs[4]), ("acct0", &recs[3])] {
        let rows = store.state(account, None).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].entry.oseq, last.oseq, "{account}");
        assert_eq!(rows[0].message_count as u64, last.oseq % 2, "{account}");
    }
    assert_eq!(r.origin_range(origin, 2, 10).unwrap(), recs[2..].to_vec());
    drop(r);
    drop(store);
    let report = check::check(dir.path()).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.messages, 5);
}

/// Which operation of the storage backend fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Write,
    Sync,
    Read,
}

/// A disk in memory: what the operating system holds (`volatile`, what a reopened process sees
/// after a crash) and what a power cut leaves (`durable`, the bytes as of the last fsync that
/// succeeded).
#[derive(Clone, Debug, Default)]
struct Disk {
    volatile: Vec<u8>,
    durable: Vec<u8>,
}

/// A redb storage backend over a [`Disk`] that fails the `n`th operation of one kind (counting
/// from 1) and every operation after it: a disk that failed once is not trusted again.
#[derive(Debug)]
struct FaultyBackend {
    disk: Arc<Mutex<Disk>>,
    fault: Option<(Fault, u64)>,
    seen: [AtomicU64; 3],
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultyBackend {
    fn new(disk: Arc<Mutex<Disk>>, fault: Option<(Fault, u64)>) -> FaultyBackend {
        FaultyBackend {
            disk,
            fault,
            seen: Default::default(),
            failed: Default::default(),
        }
    }

    fn op(&self, op: Fault) -> std::io::Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the disk failed earlier"));
        }
        let n = self.seen[op as usize].fetch_add(1, Ordering::SeqCst) + 1;
        if self.fault == Some((op, n)) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other(format!("injected {op:?} fault")));
        }
        Ok(())
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.disk.lock().expect("disk lock")
    }
}

impl redb::StorageBackend for FaultyBackend {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.disk().volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.op(Fault::Read)?;
        let disk = self.disk();
        let start = offset as usize;
        let Some(src) = disk.volatile.get(start..start + out.len()) else {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        };
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.op(Fault::Write)?;
        self.disk().volatile.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.op(Fault::Sync)?;
        let mut disk = self.disk();
        disk.durable = disk.volatile.clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.op(Fault::Write)?;
        let mut disk = self.disk();
        let end = offset as usize + data.len();
        if disk.volatile.len() < end {
            disk.volatile.resize(end, 0);
        }
        disk.volatile[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// Whether a committed snapshot holds the model's state, log, message records, marks and
/// peers (used to tell which of two candidate models a reopened image matches).
fn holds(r: &ReadTxn, m: &MemStore) -> bool {
    r.digest().unwrap() == digest(m.state())
        && r.log_tail().unwrap() == Tables::log_tail(m).unwrap()
        && r.log_range(0, usize::MAX).unwrap() == m.log_range(0, usize::MAX).unwrap()
        && message_probes(m)
            .into_iter()
            .all(|(k, id)| r.message(k, &id).unwrap() == m.message(k, &id).unwrap())
        && r.marks().unwrap() == m.marks().unwrap()
        && r.peers().unwrap()
            == m.peers
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect::<Vec<_>>()
}

/// One transaction of random writes; `Err` when the disk failed somewhere in it.
fn faulty_commit(seed: u64, rng: &mut StdRng, store: &Store, scratch: &mut MemStore) -> Result<()> {
    let txn = store.begin()?;
    {
        let mut r = txn.tables()?;
        for _ in 0..rng.random_range(1..40) {
            random_write(seed, rng, scratch, &mut r)?;
        }
        r.finish()?;
    }
    txn.commit()
}

const FAULT_PATH: &str = "faulty-disk/outpost.redb";

/// Opens a fault-free image: it must open (redb repairs what a crash left).
fn open_image(seed: u64, image: &[u8], what: &str) -> Store {
    let disk = Disk {
        volatile: image.to_vec(),
        durable: image.to_vec(),
    };
    Store::open_backend(
        FaultyBackend::new(Arc::new(Mutex::new(disk)), None),
        Path::new(FAULT_PATH),
    )
    .unwrap_or_else(|e| panic!("seed {seed}: the image after a {what} does not open: {e}"))
}

/// A failed write, fsync or read at a random point loses nothing committed and shows nothing
/// uncommitted: after a process crash (the OS's bytes) or a power cut (the last fsync's bytes),
/// the reopened store equals the model at its last successful commit, or at the one commit
/// that reported the failure (its outcome is unknown to the application: redb may fail after
/// the commit is durable), never anything else.
#[test]
fn store_survives_injected_io_faults() {
    let seeds: u64 = std::env::var("OUTPOST_STORE_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    let mut hit = [0u64; 3];
    let mut rounds = 0;
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let epoch = rng.random_range(1..u64::MAX);
        let disk = Arc::new(Mutex::new(Disk::default()));
        {
            let store = Store::open_backend(
                FaultyBackend::new(disk.clone(), None),
                Path::new(FAULT_PATH),
            )
            .unwrap();
            store.init_meta(&node_meta(epoch)).unwrap();
        }
        let mut model = MemStore::new(epoch);
        for _ in 0..4 {
            rounds += 1;
            let op = pick(&mut rng, &[Fault::Write, Fault::Sync, Fault::Read]);
            let n = match op {
                Fault::Write => rng.random_range(1..200),
                Fault::Sync => rng.random_range(1..16),
                Fault::Read => rng.random_range(1..24),
            };
            let backend = FaultyBackend::new(disk.clone(), Some((op, n)));
            let failed = backend.failed.clone();
            // The commit that failed: its outcome is unknown to the application, whatever
            // failed. Not only a failed fsync: redb can fail a write after the commit's own
            // fsync made it durable (seed 122 of 600: a write fault, and the power-cut image
            // holds the commit that reported the error).
            let mut unknown = None;
            if let Ok(store) = Store::open_backend(backend, Path::new(FAULT_PATH)) {
                for _ in 0..8 {
                    let mut scratch = model.clone();
                    match faulty_commit(seed, &mut rng, &store, &mut scratch) {
                        Ok(()) => model = scratch,
                        Err(_) => {
                            unknown = Some(scratch);
                            break;
                        }
                    }
                }
            }
            if failed.load(Ordering::SeqCst) {
                hit[op as usize] += 1;
            }
            let images = disk.lock().unwrap().clone();
            // Either image may hold the commit that failed, or not (see `unknown`).
            let which = |r: &ReadTxn| match &unknown {
                Some(m) if holds(r, m) && !holds(r, &model) => m.clone(),
                _ => model.clone(),
            };
            let cut = open_image(seed, &images.durable, "power cut");
            let r = cut.read().unwrap();
            let cut_model = which(&r);
            check_committed(seed, &cut_model, &r);
            drop(r);
            drop(cut);
            let crash = open_image(seed, &images.volatile, "process crash");
            let r = crash.read().unwrap();
            let crash_model = which(&r);
            check_committed(seed, &crash_model, &r);
            drop(r);
            drop(crash);
            // Go on from one of the two, as the machine would after it.
            let (image, next) = if rng.random_bool(0.5) {
                (images.durable, cut_model)
            } else {
                (images.volatile, crash_model)
            };
            *disk.lock().unwrap() = Disk {
                volatile: image.clone(),
                durable: image,
            };
            model = next;
        }
    }
    // The test proves something only if faults were hit, of every kind, in most rounds.
    for (op, n) in [Fault::Write, Fault::Sync, Fault::Read].iter().zip(hit) {
        assert!(n > 0, "no {op:?} fault was ever hit in {rounds} rounds");
    }
    let total: u64 = hit.iter().sum();
    assert!(
        total * 2 > rounds,
        "faults hit in only {total} of {rounds} rounds: {hit:?}"
    );
}

// The state write-back (store::overlay) through the real replication core.

const WB_ACCOUNTS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];
const WB_PEER: NodeId = NodeId(0x0a0a);
const WB_RELAY: NodeId = NodeId(0x0b0b);

fn wb_event(rng: &mut StdRng, n: u64) -> crate::model::Event {
    let account = pick(rng, &WB_ACCOUNTS).to_string();
    let (etype, data) = match rng.random_range(0..3) {
        0 => (
            EventType::Register,
            serde_json::json!({
                "contact": format!("sip:{account}@10.0.0.{}", rng.random_range(1..4)),
                "expires_s": rng.random_range(0..3) * 60,
            }),
        ),
        1 => (
            EventType::Presence,
            serde_json::json!({ "status": format!("s{n}") }),
        ),
        _ => (
            EventType::Setting,
            serde_json::json!({ "key": format!("k{}", rng.random_range(0..3)), "value": n }),
        ),
    };
    crate::model::Event {
        account,
        etype,
        data,
    }
}

/// Two nodes' worth of cores: ours (`core`, applied to both the store and the model) and a
/// peer whose records we apply as a datacenter would (first copies, and copies relayed by a
/// third node).
struct WbNodes {
    core: Core,
    peer: Core,
    peer_store: MemStore,
    now_ms: u64,
}

/// One write-back transaction of random work on both `t` and `scratch`, the same way.
fn wb_work(
    rng: &mut StdRng,
    nodes: &mut WbNodes,
    t: &mut RedbTables<'_>,
    scratch: &mut MemStore,
) -> Result<()> {
    let mut core_m = nodes.core.clone();
    for _ in 0..rng.random_range(1..12) {
        nodes.now_ms += rng.random_range(0..3);
        let now = nodes.now_ms;
        if rng.random_bool(0.6) {
            let ev = wb_event(rng, now);
            let a = nodes.core.ingest(t, now, &ev);
            let b = core_m.ingest(scratch, now, &ev);
            match (a, b) {
                (Ok(a), Ok(b)) => assert_eq!((a.msg_id, a.lseq), (b.msg_id, b.lseq)),
                (Err(crate::replication::IngestError::Store(e)), _) => return Err(e),
                (a, b) => panic!("ingest differs: {a:?} / {b:?}"),
            }
        } else {
            let ev = wb_event(rng, now);
            let got = nodes
                .peer
                .ingest(&mut nodes.peer_store, now, &ev)
                .expect("the peer ingests");
            let rec = nodes.peer_store.log[&got.lseq].clone();
            let el = Core::check_record(&rec).expect("a valid record");
            for from in [WB_PEER, WB_RELAY] {
                if from == WB_RELAY && rng.random_bool(0.5) {
                    continue;
                }
                let a = nodes.core.apply(t, now, from, &rec, &el)?;
                let b = core_m.apply(scratch, now, from, &rec, &el).unwrap();
                assert_eq!(a, b);
            }
        }
    }
    Ok(())
}

/// A plan as the writer makes them, at random: mostly write-back with a round's chunk of 1 to
/// 3 entries, sometimes through (a snapshot's commit) or everything (a reader's flush).
fn wb_plan(rng: &mut StdRng, store: &Store, committed_tail: u64) -> FlushPlan {
    let round = store.overlay().round().or_else(|| {
        rng.random_bool(0.3).then_some(Round {
            upto: committed_tail,
            after: None,
        })
    });
    match rng.random_range(0..10) {
        0 => FlushPlan::all(committed_tail),
        1 => FlushPlan {
            through: true,
            round,
            chunk_max: rng.random_range(1..4),
        },
        _ => FlushPlan {
            through: false,
            round,
            chunk_max: rng.random_range(1..4),
        },
    }
}

fn wb_commit(
    rng: &mut StdRng,
    store: &Store,
    nodes: &mut WbNodes,
    scratch: &mut MemStore,
) -> Result<()> {
    let txn = store.begin()?;
    {
        let mut t = txn.tables_write_back()?;
        let committed_tail = Tables::log_tail(&t)?;
        wb_work(rng, nodes, &mut t, scratch)?;
        let plan = wb_plan(rng, store, committed_tail);
        t.finish_with(&plan)?;
    }
    txn.commit()
}

/// What readers of committed state see (the overlay first, then the table) is the model's
/// state, entry by entry and by digest, with the model's log tail. `Err` when a read failed
/// (an injected fault).
fn wb_try_check(seed: u64, what: &str, store: &Store, m: &MemStore) -> Result<()> {
    assert_eq!(
        store.digest_merged()?,
        digest(m.state()),
        "seed {seed} ({what}): digest of table and overlay"
    );
    assert_eq!(
        store.entry_count()?,
        m.entries.len() as u64,
        "seed {seed} ({what}): entries counted without a flush"
    );
    for a in WB_ACCOUNTS {
        for t in EventType::ALL {
            let got = store.state(a, Some(t))?.pop().map(|r| r.entry);
            assert_eq!(
                got.as_ref(),
                m.entries.get(&(a.to_string(), t.code())),
                "seed {seed} ({what}): state({a}, {t})"
            );
        }
    }
    assert_eq!(
        LogRead::log_tail(&store.read()?)?,
        Tables::log_tail(m).unwrap(),
        "seed {seed} ({what}): log tail"
    );
    Ok(())
}

fn wb_check(seed: u64, what: &str, store: &Store, m: &MemStore) {
    wb_try_check(seed, what, store, m).unwrap();
}

fn wb_holds(store: &Store, m: &MemStore) -> bool {
    store.digest_merged().unwrap() == digest(m.state())
        && LogRead::log_tail(&store.read().unwrap()).unwrap() == Tables::log_tail(m).unwrap()
}

/// Invariants 1 and 2 under the state write-back: an acknowledged event (a committed
/// transaction) is in the state after any crash, although the state table is written later.
/// Events run through the real replication core; commits leave state entries dirty in the
/// overlay and write them in flush rounds of small chunks, sometimes through or all at once;
/// writes, fsyncs and reads fail at random points. After each fault, the store reopened from
/// the power-cut image and from the crash image (which merges the log after `state_upto` into
/// the state) equals the model at its last successful commit (or at the one that reported the
/// failure: its outcome is unknown); after a full flush, the state *table* alone equals it.
#[test]
fn write_back_state_survives_crashes_and_io_faults() {
    let seeds: u64 = std::env::var("OUTPOST_STORE_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut hit = [0u64; 3];
    let mut rounds = 0;
    let mut replayed = 0;
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let epoch = rng.random_range(1..u64::MAX);
        let disk = Arc::new(Mutex::new(Disk::default()));
        {
            let store = Store::open_backend(
                FaultyBackend::new(disk.clone(), None),
                Path::new(FAULT_PATH),
            )
            .unwrap();
            store.init_meta(&node_meta(epoch)).unwrap();
        }
        let me = node_meta(epoch).node_id;
        let mut model = MemStore::new(epoch);
        let mut nodes = WbNodes {
            core: Core::open(me, "dc-test", &model).unwrap(),
            peer: Core::open(WB_PEER, "dc-peer", &MemStore::new(9)).unwrap(),
            peer_store: MemStore::new(9),
            now_ms: 1_000,
        };
        for _ in 0..4 {
            rounds += 1;
            let op = pick(&mut rng, &[Fault::Write, Fault::Sync, Fault::Read]);
            let n = match op {
                Fault::Write => rng.random_range(1..120),
                Fault::Sync => rng.random_range(1..16),
                Fault::Read => rng.random_range(1..40),
            };
            let backend = FaultyBackend::new(disk.clone(), Some((op, n)));
            let failed = backend.failed.clone();
            let mut unknown = None;
            if let Ok(store) = Store::open_backend(backend, Path::new(FAULT_PATH)) {
                for _ in 0..10 {
                    let mut scratch = model.clone();
                    match wb_commit(&mut rng, &store, &mut nodes, &mut scratch) {
                        Ok(()) => {
                            model = scratch;
                            if wb_try_check(seed, "after a commit", &store, &model).is_err() {
                                break;
                            }
                        }
                        Err(_) => {
                            unknown = Some(scratch);
                            break;
                        }
                    }
                }
            }
            if failed.load(Ordering::SeqCst) {
                hit[op as usize] += 1;
            }
            let images = disk.lock().unwrap().clone();
            // Either image may hold the commit that failed, or not.
            let which = |st: &Store| match &unknown {
                Some(m) if wb_holds(st, m) && !wb_holds(st, &model) => m.clone(),
                _ => model.clone(),
            };
            let cut = open_image(seed, &images.durable, "power cut");
            let cut_model = which(&cut);
            wb_check(seed, "power cut", &cut, &cut_model);
            drop(cut);
            let crash = open_image(seed, &images.volatile, "process crash");
            if crash.overlay().dirty_len() > 0 {
                replayed += 1;
            }
            let crash_model = which(&crash);
            wb_check(seed, "process crash", &crash, &crash_model);
            // Everything written to the table: the table alone is the state.
            let txn = crash.begin().unwrap();
            let tail = Tables::log_tail(&txn.tables().unwrap()).unwrap();
            txn.tables_write_back()
                .unwrap()
                .finish_with(&FlushPlan::all(tail))
                .unwrap();
            txn.commit().unwrap();
            assert_eq!(crash.overlay().dirty_len(), 0, "seed {seed}");
            check_committed(seed, &crash_model, &crash.read().unwrap());
            drop(crash);
            let (image, next) = if rng.random_bool(0.5) {
                (images.durable, cut_model)
            } else {
                (images.volatile, crash_model)
            };
            *disk.lock().unwrap() = Disk {
                volatile: image.clone(),
                durable: image,
            };
            model = next;
            // Our core restarts from what survived.
            nodes.core = Core::open(me, "dc-test", &model).unwrap();
        }
    }
    for (op, n) in [Fault::Write, Fault::Sync, Fault::Read].iter().zip(hit) {
        assert!(n > 0, "no {op:?} fault was ever hit in {rounds} rounds");
    }
    let total: u64 = hit.iter().sum();
    assert!(
        total * 2 > rounds,
        "faults hit in only {total} of {rounds} rounds: {hit:?}"
    );
    assert!(
        replayed * 4 > rounds,
        "the log was merged into the state at reopen in only {replayed} of {rounds} rounds"
    );
}

/// Invariant 1 under retention: the log records after `state_upto` are what a restart merges
/// into the state, so retention never trims them, however old; once a flush moved
/// `state_upto`, they go.
#[test]
fn retention_keeps_the_log_the_state_table_does_not_hold_yet() {
    let dir = TempDir::new("trim-upto");
    let store = open_init(&dir, 3);
    let me = node_meta(3).node_id;
    let mut core = Core::open(me, "dc-test", &store.begin().unwrap().tables().unwrap()).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let write_back = FlushPlan {
        through: false,
        round: None,
        chunk_max: 0,
    };
    for n in 0..20 {
        let txn = store.begin().unwrap();
        let mut t = txn.tables_write_back().unwrap();
        core.ingest(&mut t, 1_000 + n, &wb_event(&mut rng, n))
            .unwrap();
        t.finish_with(&write_back).unwrap();
        txn.commit().unwrap();
    }
    assert!(store.overlay().dirty_len() > 0);
    let trim = |store: &Store| {
        let txn = store.begin().unwrap();
        let mut t = txn.tables_write_back().unwrap();
        let n = t.trim_log(u64::MAX, 0, 1000).unwrap();
        t.finish_with(&write_back).unwrap();
        txn.commit().unwrap();
        n
    };
    assert_eq!(trim(&store), 0, "nothing after state_upto (0) is trimmed");
    let txn = store.begin().unwrap();
    txn.tables_write_back()
        .unwrap()
        .finish_with(&FlushPlan::all(20))
        .unwrap();
    txn.commit().unwrap();
    assert_eq!(store.read().unwrap().state_upto().unwrap(), 20);
    assert_eq!(
        trim(&store),
        20,
        "after the flush, retention trims as before"
    );
}

/// Convergence (invariant 2): redb stages a snapshot's chunks like the model (MemStore), in
/// order, across commits and a reopen; a chunk of another epoch of the sender drops what was
/// staged; taking removes what it returns.
#[test]
fn staged_snapshot_entries_match_the_model() {
    use crate::wire::SnapshotEntry;
    let dir = TempDir::new("staged");
    let store = open_init(&dir, 7);
    let entry = |n: u8| SnapshotEntry {
        account: format!("acct-{n}"),
        etype: EventType::Presence,
        version: Version {
            ms: n as u64,
            logical: 0,
            node: NodeId(5),
        },
        origin: NodeId(5),
        msg_id: msg_id(n as usize),
        element: b"{\"status\":\"busy\"}".to_vec(),
    };
    let mut model = MemStore::new(7);
    let from = NodeId(5);
    let steps: [(u64, Vec<u8>); 3] = [(4, vec![1, 2]), (4, vec![3]), (6, vec![4, 5])];
    for (epoch, ns) in &steps {
        let es: Vec<_> = ns.iter().map(|n| entry(*n)).collect();
        let txn = store.begin().unwrap();
        {
            let mut t = txn.tables().unwrap();
            t.stage_snapshot(from, *epoch, &es).unwrap();
            t.finish().unwrap();
        }
        txn.commit().unwrap();
        model.stage_snapshot(from, *epoch, &es).unwrap();
    }
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let txn = store.begin().unwrap();
    let taken = {
        let mut t = txn.tables().unwrap();
        let first = t.take_staged(from, 6, 1).unwrap();
        let rest = t.take_staged(from, 6, 10).unwrap();
        assert!(t.take_staged(from, 6, 10).unwrap().is_empty());
        t.finish().unwrap();
        [first, rest].concat()
    };
    txn.commit().unwrap();
    let want = [
        model.take_staged(from, 6, 1).unwrap(),
        model.take_staged(from, 6, 10).unwrap(),
    ]
    .concat();
    assert_eq!(taken, want);
    assert_eq!(taken, vec![entry(4), entry(5)], "epoch 4's were dropped");
    // Taking for another epoch than staged removes everything, in both.
    let es = [entry(6)];
    model.stage_snapshot(from, 8, &es).unwrap();
    assert!(model.take_staged(from, 9, 10).unwrap().is_empty());
    assert!(model.staged.is_empty());
    let txn = store.begin().unwrap();
    {
        let mut t = txn.tables().unwrap();
        t.stage_snapshot(from, 8, &es).unwrap();
        assert!(t.take_staged(from, 9, 10).unwrap().is_empty());
        assert!(t.take_staged(from, 8, 10).unwrap().is_empty());
        t.finish().unwrap();
    }
    txn.commit().unwrap();
}
