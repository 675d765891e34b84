use serde_json::json;

use super::*;
use crate::model::{Event, RawEvent};
use crate::replication::mem::MemStore;
use crate::replication::Tables;
use crate::wire::SnapshotEntry;

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

/// Invariant 1 (durable ack) across a restore, found by the soak (seed 1592595579, fan-out 1):
/// relays of our own records can reach a restored node before a peer's Hello, so its highest
/// own sequence already matches the peer's while a hole below it is a record only that peer
/// holds. The session asks whenever the peer holds any own sequence we lack.
#[test]
fn durable_ack_restored_node_asks_for_holes_below_its_highest() {
    let me = id(1);
    let mut theirs_mark = Mark::default();
    for o in 1..=10 {
        theirs_mark.insert(o);
    }
    let theirs = hello(id(2), "dc", 5, None, &[(me, theirs_mark.clone())]);
    // Restored at 5, then got 8..=10 relayed back: highest 10 like the peer's, 6 and 7 lacking.
    let mut own = Mark::default();
    for o in [1, 2, 3, 4, 5, 8, 9, 10] {
        own.insert(o);
    }
    let req = Core::own_log_request_for(me, &own, &theirs).expect("holes below the highest");
    assert_eq!(req.after_oseq, 5);
    // Holding everything the peer holds (and more): nothing to ask.
    assert!(Core::own_log_request_for(me, &theirs_mark, &theirs).is_none());
    own.insert(6);
    own.insert(7);
    assert!(Core::own_log_request_for(me, &own, &theirs).is_none());
}

/// Invariants 1 and 2 after a restore, found by the soak (seed 1592591466 and 20 others): a
/// peer whose Hello marks lack a sequence we hold only in our state table (its record trimmed,
/// or received through a snapshot) can get it only through a snapshot, so it gets one; a
/// sequence our log still holds goes by frames, no snapshot. What a snapshot between us carried
/// counts as held by the peer, so the check never sends back what came from it.
#[test]
fn convergence_peer_lacking_what_only_our_state_holds_gets_a_snapshot() {
    let (me, origin, peer) = (id(1), id(3), id(2));
    let mut store = MemStore::new(4);
    let mut core = Core::open(origin, "dc", &store).unwrap();
    ingest(&mut core, &mut store, 6);
    let ours = store.marks().unwrap();
    let mut peer_mark = Mark::default();
    for o in 1..=4 {
        peer_mark.insert(o);
    }
    let theirs = hello(peer, "dc", 5, None, &[(origin, peer_mark.clone())]);
    let mut s = Session::open(
        me,
        4,
        &theirs,
        &PeerProgress::default(),
        &Mark::default(),
        6,
        LinkLimits::default(),
        0,
    );
    assert!(
        !s.check_peer_marks(&store, &ours).unwrap(),
        "5 and 6 go by frames"
    );
    assert!(!s.poll_snapshot());
    // Retention trims 1..=5: the peer lacks 5, which only our state holds now.
    store.trim_log(5);
    assert!(s.check_peer_marks(&store, &ours).unwrap());
    assert!(s.poll_snapshot());
    // Once a snapshot between us ended, the peer holds what it reflected.
    let wire: Vec<_> = ours.iter().map(|(o, m)| m.to_wire(*o)).collect();
    s.on_snapshot_end(&wire);
    assert!(!s.check_peer_marks(&store, &ours).unwrap());
    assert!(!s.poll_snapshot());
    // A peer that holds every sequence needs nothing, trimmed or not.
    let full = hello(peer, "dc", 5, None, &ours);
    let mut s = Session::open(
        me,
        4,
        &full,
        &PeerProgress::default(),
        &Mark::default(),
        6,
        LinkLimits::default(),
        0,
    );
    assert!(!s.check_peer_marks(&store, &ours).unwrap());
}

/// Invariant 2 (convergence), found by the soak (default seed 1592590725 once the checks above
/// changed its path): a snapshot is merged whole or not at all. Chunks before the end are
/// staged; if the connection is lost and the sender comes back restored (another epoch), what
/// was staged is dropped rather than left in the state table where no mark accounts for it.
#[test]
fn convergence_snapshot_is_merged_whole_or_not_at_all() {
    let (me, sender) = (id(1), id(2));
    let mut src = MemStore::new(4);
    let mut core_src = Core::open(sender, "dc", &src).unwrap();
    ingest(&mut core_src, &mut src, 3);
    let entries: Vec<SnapshotEntry> = src
        .entries_after(None, 100)
        .unwrap()
        .into_iter()
        .map(|(account, etype, e)| SnapshotEntry {
            account,
            etype,
            version: e.version,
            origin: e.origin,
            msg_id: e.msg_id,
            element: e.element,
        })
        .collect();
    let chunk = |epoch: u64, entries: &[SnapshotEntry], end: bool| SnapshotChunk {
        epoch,
        entries: entries.to_vec(),
        end: end.then(|| SnapshotEnd {
            marks: src
                .marks()
                .unwrap()
                .iter()
                .map(|(o, m)| m.to_wire(*o))
                .collect(),
            resume_after: 3,
        }),
    };
    let mut dst = MemStore::new(9);
    let mut core = Core::open(me, "dc", &dst).unwrap();
    let apply = |core: &mut Core, dst: &mut MemStore, c: &SnapshotChunk| {
        let els = Core::check_snapshot(c).unwrap();
        core.apply_snapshot(dst, 0, sender, c, &els).unwrap()
    };
    // Two chunks of epoch 4, then the connection is lost: nothing merged, no mark raised.
    apply(&mut core, &mut dst, &chunk(4, &entries[..1], false));
    apply(&mut core, &mut dst, &chunk(4, &entries[1..2], false));
    assert!(dst.entries.is_empty());
    assert_eq!(dst.mark(sender).unwrap(), Mark::default());
    // The sender was restored (epoch 5) and its snapshot holds only the third entry.
    let got = apply(&mut core, &mut dst, &chunk(5, &entries[2..], true));
    assert_eq!(
        dst.entries.len(),
        1,
        "the staged part of epoch 4 is dropped"
    );
    assert_eq!(got.ack, 3);
    assert!(dst.staged.is_empty());
    // A whole snapshot in three chunks is merged at its end, every entry.
    let mut dst = MemStore::new(9);
    apply(&mut core, &mut dst, &chunk(4, &entries[..1], false));
    apply(&mut core, &mut dst, &chunk(4, &entries[1..2], false));
    let got = apply(&mut core, &mut dst, &chunk(4, &entries[2..], true));
    assert_eq!(got.first, 3);
    assert_eq!(dst.entries.len(), 3);
    assert_eq!(dst.mark(sender).unwrap().contiguous, 3);
    assert!(dst.staged.is_empty());
}
