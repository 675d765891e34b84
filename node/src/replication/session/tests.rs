use serde_json::json;

use super::*;
use crate::model::{Event, RawEvent};
use crate::replication::mem::MemStore;
use crate::replication::Tables;

fn id(n: u128) -> NodeId {
    NodeId(n)
}

fn hello_of(n: u128, epoch: u64) -> Hello {
    hello(id(n), "dc", epoch, None, &[])
}

fn ingest(core: &mut Core, store: &mut MemStore, n: u64) {
    for k in 0..n {
        let ev = Event::from_raw(RawEvent {
            account: format!("acct-{k}"),
            etype: "presence".into(),
            data: json!({"status": format!("s{k}")}),
        })
        .unwrap();
        core.ingest(store, 1_000 + k, &ev).unwrap();
    }
}

/// Invariant 5 (nobody unadmitted) and 4 (counted once per sender): a Hello naming another
/// node id than the certificate proves, our own id, another protocol or role, or epoch 0 is
/// refused, so no peer moves another's acks, marks or counts.
#[test]
fn nobody_unadmitted_hello_checks_refuse_impostors() {
    let me = id(1);
    let good = hello_of(2, 7);
    assert_eq!(check_hello(me, &good, Some(id(2))), Ok(()));
    assert!(matches!(
        check_hello(me, &good, Some(id(3))),
        Err(HelloError::Protocol(m)) if m.contains("proves")
    ));
    assert!(matches!(
        check_hello(me, &good, None),
        Err(HelloError::Protocol(m)) if m.contains("carries no node id")
    ));
    let own = hello_of(1, 7);
    assert!(matches!(
        check_hello(me, &own, Some(id(1))),
        Err(HelloError::Protocol(m)) if m.contains("own id")
    ));
    let old = Hello {
        protocol: PROTOCOL_VERSION + 1,
        ..good.clone()
    };
    assert!(matches!(
        check_hello(me, &old, Some(id(2))),
        Err(HelloError::Version(_))
    ));
    let worker = Hello {
        role: Role::Worker,
        ..good.clone()
    };
    assert!(matches!(
        check_hello(me, &worker, Some(id(2))),
        Err(HelloError::Protocol(m)) if m.contains("not a datacenter")
    ));
    let zero = Hello {
        log_epoch: 0,
        ..good
    };
    assert!(check_hello(me, &zero, Some(id(2))).is_err());
}

/// Invariant 2 (convergence): both sides of a pair keep the same one of two duplicate
/// connections, the one dialled by the lower node id, whatever order they are set up in.
#[test]
fn convergence_duplicate_connections_keep_the_one_dialled_by_the_lower_id() {
    let (lo, hi) = (id(1), id(2));
    // The connection lo dialled is preferred on both sides.
    assert!(preferred(lo, hi, true));
    assert!(preferred(hi, lo, false));
    assert!(!preferred(hi, lo, true));
    assert!(!preferred(lo, hi, false));
    assert_eq!(choose_connection(None, false), Duplicate::Take);
    assert_eq!(choose_connection(Some(true), false), Duplicate::RefuseNew);
    assert_eq!(choose_connection(Some(true), true), Duplicate::ReplaceOld);
    assert_eq!(choose_connection(Some(false), true), Duplicate::ReplaceOld);
    assert_eq!(choose_connection(Some(false), false), Duplicate::ReplaceOld);
}

/// Invariant 1 (durable ack): a peer whose needed log is still retained gets it from the log
/// (catch-up); one behind retention gets a snapshot.
#[test]
fn durable_ack_peer_behind_retention_gets_a_snapshot_else_catch_up() {
    let me = id(1);
    let peer = id(2);
    let mut store = MemStore::new(11);
    let mut core = Core::open(me, "dc", &store).unwrap();
    ingest(&mut core, &mut store, 10);
    let build = |store: &MemStore, after: u64| {
        build_elements(
            store,
            Tables::message,
            me,
            peer,
            Relay::ALL,
            after,
            10,
            usize::MAX,
        )
        .unwrap()
    };
    match build(&store, 0) {
        Built::Elements(e) => {
            assert_eq!((e.after, e.upto, e.items.len()), (0, 10, 10));
        }
        Built::Trimmed => panic!("the whole log is retained"),
    }
    store.trim_log(4);
    assert_eq!(build(&store, 0), Built::Trimmed, "records 1-4 are gone");
    assert_eq!(build(&store, 3), Built::Trimmed, "record 4 is gone");
    assert!(matches!(build(&store, 4), Built::Elements(_)));
    // A snapshot in chunks: every entry once, the end says where the log continues.
    let mut cursor = SnapshotCursor::new(11, 1);
    let mut entries = 0;
    let mut end = None;
    while !cursor.finished() {
        let chunk = cursor
            .next_chunk(
                |a, m| store.entries_after(a, m),
                || {
                    Ok(SnapshotEnd {
                        marks: Vec::new(),
                        resume_after: 10,
                    })
                },
            )
            .unwrap();
        entries += chunk.entries.len();
        end = chunk.end.or(end);
    }
    assert_eq!(entries, 10);
    assert_eq!(end.unwrap().resume_after, 10);
}

/// Invariant 8 (bounded memory): an outgoing frame stops once over its byte budget (and
/// still covers only what it carries); a receiver holds at most its frame and byte budget, a
/// frame over the whole budget takes all of it.
#[test]
fn bounded_memory_frame_and_pending_byte_budgets() {
    let me = id(1);
    let mut store = MemStore::new(3);
    let mut core = Core::open(me, "dc", &store).unwrap();
    ingest(&mut core, &mut store, 10);
    let one = {
        let r = store.log.get(&1).unwrap();
        record_bytes(&r.account, &r.element)
    };
    let built = build_elements(
        &store,
        Tables::message,
        me,
        id(2),
        Relay::ALL,
        0,
        10,
        2 * one,
    )
    .unwrap();
    let Built::Elements(e) = built else {
        panic!("not trimmed")
    };
    assert_eq!(
        e.items.len(),
        3,
        "the record that crosses the budget is the last"
    );
    assert_eq!(e.upto, 3, "the frame covers only what it carries");
    assert_eq!(frame_budget(1 << 20), 786_432);

    let mut b = InboundBudget::new(3, 4);
    let p1 = b
        .try_take(crate::limits::PEER_PENDING_PERMIT_BYTES)
        .unwrap();
    let p2 = b
        .try_take(2 * crate::limits::PEER_PENDING_PERMIT_BYTES)
        .unwrap();
    assert_eq!((p1, p2), (1, 2));
    assert_eq!(
        b.try_take(2 * crate::limits::PEER_PENDING_PERMIT_BYTES),
        None,
        "bytes bound"
    );
    let p3 = b.try_take(1).unwrap();
    assert_eq!(b.try_take(1), None, "frames bound");
    b.release(p1);
    b.release(p2);
    b.release(p3);
    assert!(b.idle());
    assert_eq!(
        b.try_take(100 * crate::limits::PEER_PENDING_PERMIT_BYTES),
        Some(4),
        "takes all"
    );
    assert_eq!(weight_permits(usize::MAX / 2), PENDING_PERMITS);
    assert_eq!(
        frame_weight([("alice", &[0u8; 100][..])].into_iter()),
        5 + 300 + 160
    );
}

/// Relay fan-out (design: "a configured fan-out bounds the relay"): with k, a relayed
/// message goes to exactly k peers, the same k every time; our own messages go to all.
#[test]
fn counted_once_per_sender_fanout_picks_k_peers_deterministically() {
    let peers: Vec<String> = (0..5).map(|i| format!("dc-{i}")).collect();
    for m in 0..50u8 {
        let msg = [m; 32];
        let chosen = peers
            .iter()
            .filter(|p| chosen_for_relay(&msg, p, &peers, 2))
            .count();
        assert_eq!(chosen, 2);
        let relay = Relay {
            fanout: 2,
            target: Some(&peers[0]),
            peers: &peers,
        };
        assert_eq!(
            relay.chosen(&MsgId(msg)),
            chosen_for_relay(&msg, &peers[0], &peers, 2)
        );
    }
    let unknown = Relay {
        fanout: 1,
        target: None,
        peers: &peers,
    };
    assert!(
        unknown.chosen(&MsgId([0; 32])),
        "an unknown target gets all"
    );
}

/// Invariant 1 (durable ack) across a restore: the session asks for our own log when the
/// peer holds more of it, until the peer has no more; the restore ends when every peer is
/// done, not before.
#[test]
fn durable_ack_restore_waits_for_every_peer_own_log() {
    let me = id(1);
    let mut peer_store = MemStore::new(5);
    let mut mine = Mark::default();
    for o in 1..=3 {
        mine.insert(o);
    }
    peer_store.marks.insert(me, mine);
    let theirs = hello(id(2), "dc", 5, None, &peer_store.marks().unwrap());
    let own = Mark::default();
    let mut s = Session::open(
        me,
        9,
        &theirs,
        &PeerProgress::default(),
        &own,
        0,
        LinkLimits::default(),
        0,
    );
    let req = s.own_log_request().cloned().expect("the peer holds more");
    assert_eq!(req.after_oseq, 0);
    let next = CatchUpRequest {
        after_oseq: 2,
        ..req
    };
    assert_eq!(
        s.on_own_log_batch(Some(next.clone())),
        OwnLogStep::Ask(next)
    );
    assert_eq!(s.on_own_log_batch(None), OwnLogStep::Done);
    assert!(s.own_log_request().is_none());

    let mut r = RestoreProgress::new(true, [2u8, 3]);
    assert_eq!(r.waiting(), Some(2));
    assert!(!r.peer_done(&2));
    assert!(!r.peer_done(&2), "the same peer twice is not two");
    assert!(r.peer_done(&3));
    r.finish();
    assert_eq!(r.waiting(), None);
    assert_eq!(RestoreProgress::new(true, Vec::<u8>::new()).waiting(), None);
    assert_eq!(RestoreProgress::new(false, [1u8]).waiting(), None);
}

/// Invariant 4: an ack of another incarnation of our log does not move the window.
#[test]
fn counted_once_per_sender_acks_of_another_epoch_are_ignored() {
    let mut s = Session::open(
        id(1),
        9,
        &hello_of(2, 5),
        &PeerProgress::default(),
        &Mark::default(),
        100,
        LinkLimits::default(),
        0,
    );
    assert_eq!(s.acked(), 0);
    assert!(!s.on_ack(8, 50, 1));
    assert!(s.on_ack(9, 50, 1));
    assert_eq!(s.acked(), 50);
    assert_eq!(s.poll_range(100), Some((50, 100)));
}

/// Invariant 1 (durable ack) across a restore: when a peer asks for our own log back and we
/// count as held sequences whose records we cannot send (trimmed, or held only through a
/// snapshot), it gets a snapshot (found by the simulation: the restored node never got those
/// elements back). When every held sequence was sent, no snapshot.
#[test]
fn durable_ack_restored_peer_gets_a_snapshot_for_records_we_cannot_send() {
    let (me, peer) = (id(1), id(2));
    let mut store = MemStore::new(4);
    let mut core = Core::open(me, "dc", &store).unwrap();
    ingest(&mut core, &mut store, 6);
    let ours = store.mark(me).unwrap();
    let mut s = Session::open(
        peer,
        7,
        &hello(me, "dc", 4, None, &[]),
        &PeerProgress::default(),
        &Mark::default(),
        0,
        LinkLimits::default(),
        0,
    );
    let req = CatchUpRequest {
        origin: me,
        after_oseq: 0,
        max: 1024,
    };
    let batch = Core::answer_catch_up(&store, &req).unwrap();
    assert_eq!(batch.items.len(), 6);
    s.on_catch_up_answered(&req, &batch, &ours);
    assert!(!s.poll_snapshot(), "every held record was sent");
    // Records 1-3 trimmed: the mark still holds them, the answer cannot.
    store.trim_log(3);
    let batch = Core::answer_catch_up(&store, &req).unwrap();
    assert_eq!(batch.items.len(), 3);
    s.on_catch_up_answered(&req, &batch, &ours);
    assert!(s.poll_snapshot());
    assert!(!s.poll_snapshot(), "once per request");
    // A partial batch judges only the range it covers.
    let small = CatchUpRequest { max: 2, ..req };
    let store2 = {
        let mut st = MemStore::new(4);
        let mut c = Core::open(me, "dc", &st).unwrap();
        ingest(&mut c, &mut st, 6);
        st
    };
    let batch = Core::answer_catch_up(&store2, &small).unwrap();
    assert!(!batch.done);
    s.on_catch_up_answered(&small, &batch, &ours);
    assert!(!s.poll_snapshot());
}
