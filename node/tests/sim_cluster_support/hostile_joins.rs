//! Hostile and edge cases of admission against the controller core, outside any simulation:
//! joins, refusals, squatters, the pending table, notifications for another machine.

use super::*;

/// A worker's identity, outside any simulation.
pub(crate) struct Machine {
    pub(crate) info: JoinInfo,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) seal: SealKey,
}

impl Machine {
    pub(crate) fn new(
        n: u128,
        name: &str,
        component: &str,
        lb: Option<&str>,
        token: bool,
    ) -> Machine {
        Machine::keyed(n, name, component, lb, token, name)
    }

    /// With the certificate named by `key` (two machines claiming one name have two keys).
    pub(crate) fn keyed(
        n: u128,
        name: &str,
        component: &str,
        lb: Option<&str>,
        token: bool,
        key: &str,
    ) -> Machine {
        let fingerprint = Fingerprint(*blake3::hash(key.as_bytes()).as_bytes());
        Machine {
            info: JoinInfo {
                node_id: NodeId(0xabc0_0000_0000_0000_0000_0000_0000_0000 | n),
                name: name.into(),
                service: "voice".into(),
                component: component.into(),
                load_balancer: lb.map(str::to_string),
                service_addr: Some(format!("10.1.0.{n}:5060")),
                relay_addr: (component == "load-balancer").then(|| "10.1.0.1:7443".into()),
                token_proof: token.then(|| token_proof(TOKEN, &fingerprint)),
            },
            fingerprint,
            seal: SealKey::generate(),
        }
    }

    pub(crate) fn core(&self) -> WorkerCore {
        let seal = SealKey::from_secret(&self.seal.secret_bytes()).unwrap();
        WorkerCore::open(self.info.clone(), seal, WorkerRecord::default()).unwrap()
    }

    pub(crate) fn id(&self) -> NodeId {
        self.info.node_id
    }

    /// What its certificate proves: its key and its node id.
    pub(crate) fn peer(&self) -> Peer {
        Peer::new(self.fingerprint, self.id())
    }
}

pub(crate) fn controller(pending_max: usize, token: bool) -> (ControllerCore, Vec<u8>) {
    let mut s = Settings::new(2000);
    s.pending_max = pending_max;
    s.join_token = token.then(|| TOKEN.to_vec());
    let secret = vec![0x5a; 32];
    let key = ControllerKey::from_secret(&secret).unwrap();
    (
        ControllerCore::open(s, key, Box::new(AgeSealer), vec![], vec![], T0_MS),
        secret,
    )
}

pub(crate) fn records(c: &ControllerCore) -> Vec<MachineRecord> {
    c.machines().cloned().collect()
}

pub(crate) fn closes(out: &[Output], conn: ConnId) -> bool {
    out.iter()
        .any(|o| matches!(o, Output::Close { conn: c, .. } if *c == conn))
}

pub(crate) fn sends_to(out: &[Output], conn: ConnId) -> Vec<&Message> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { conn: c, msg } if *c == conn => Some(msg),
            _ => None,
        })
        .collect()
}

#[test]
fn hostile_pending_worker_may_not_notify_or_ack() {
    let (mut ctrl, _) = controller(100, false);
    let m = Machine::new(1, "dep-1", "media-processor", Some("lb-1"), false);
    let mut w = m.core();
    ctrl.joined(1, Peer::new(m.fingerprint, m.id()), w.join(), T0_MS);
    w.connected();
    let (d, out) = ctrl.take();
    assert_eq!(d.machines.len(), 1, "one pending record");
    assert_eq!(d.machines[0].key_status, KeyStatus::Pending);
    assert!(d.publications.is_empty());
    assert_eq!(
        sends_to(&out, 1),
        vec![&Message::Admission(Admission::Pending)]
    );
    w.from_controller(Message::Admission(Admission::Pending))
        .unwrap();
    assert_eq!(w.standing(), Standing::Pending);
    // A pending worker keeps its report to itself.
    w.report(running_report());
    let (_, wout) = w.take();
    assert!(
        !wout
            .iter()
            .any(|o| matches!(o, WorkerOutput::ToController(Message::Notify(_)))),
        "a pending worker sent its report: {wout:?}"
    );
    let before = records(&ctrl);
    let hostile = vec![
        Message::Notify(Notify {
            machine: m.id(),
            seq: 1,
            report: running_report(),
        }),
        Message::PublicationAck { upto: 0 },
        Message::PublicationAck { upto: 1 },
        Message::NotifyAck { upto: 1 },
        Message::Join(w.join()),
    ];
    for (k, msg) in hostile.into_iter().enumerate() {
        let conn = 10 + k as u64;
        ctrl.joined(conn, Peer::new(m.fingerprint, m.id()), w.join(), T0_MS);
        let (d, _) = ctrl.take();
        assert!(d.is_empty(), "a pending machine's rejoin stored {d:?}");
        let kind = msg.kind();
        ctrl.frame(conn, msg, T0_MS);
        let (d, out) = ctrl.take();
        assert!(d.is_empty(), "{kind} from a pending machine stored {d:?}");
        assert!(closes(&out, conn), "{kind} from a pending machine: {out:?}");
        assert!(
            sends_to(&out, conn).is_empty(),
            "{kind}: answered with {out:?}"
        );
        assert_eq!(records(&ctrl), before, "{kind} changed the records");
    }
    assert_eq!(ctrl.unacked_len(), 0);
}

#[test]
fn hostile_flood_of_unknown_joins_is_bounded() {
    let (mut ctrl, _) = controller(100, true);
    let seal = SealKey::generate().recipient();
    let mut stored = MemClusterStore::default();
    let mut refused = 0;
    for n in 0..10_000u64 {
        let conn = n + 1;
        let fp = Fingerprint(*blake3::hash(&n.to_be_bytes()).as_bytes());
        let join = Join {
            protocol: outpost::wire::CLUSTER_PROTOCOL_VERSION,
            node_id: NodeId(0x000f_100d_0000_0000_0000_0000 | n as u128),
            name: format!("flood-{n}"),
            service: "voice".into(),
            component: "proxy".into(),
            load_balancer: Some("lb-1".into()),
            service_addr: None,
            relay_addr: None,
            seal_key: seal.clone(),
            // A proof of the wrong token is no proof.
            token_proof: (n % 2 == 0).then(|| token_proof(b"guess", &fp)),
            resume: 0,
        };
        let id = join.node_id;
        ctrl.joined(conn, Peer::new(fp, id), join, T0_MS + n);
        let (d, out) = ctrl.take();
        stored.commit(&d, &[]).expect("commit");
        assert!(d.publications.is_empty());
        if n < 100 {
            assert_eq!(d.machines.len(), 1, "join {n} is recorded as pending");
            assert!(!closes(&out, conn));
        } else {
            assert!(d.is_empty(), "join {n} beyond the bound stored {d:?}");
            assert!(closes(&out, conn), "join {n} beyond the bound: {out:?}");
            assert_eq!(
                refused_with(&out, conn),
                Some(JoinRefusal::TooManyWaiting),
                "join {n}"
            );
            assert!(!sends_to(&out, conn)
                .iter()
                .any(|m| matches!(m, Message::Admission(Admission::Admitted { .. }))),);
            refused += 1;
            ctrl.closed(conn, T0_MS + n);
        }
    }
    assert_eq!(refused, 9_900);
    assert_eq!(stored.machines.len(), 100);
    assert!(stored
        .machines
        .values()
        .all(|m| m.key_status == KeyStatus::Pending));
    assert_eq!(ctrl.machines().count(), 100);
    // A machine with the real token still gets in.
    let m = Machine::new(1, "lb-1", "load-balancer", None, true);
    let w = m.core();
    ctrl.joined(
        20_000,
        Peer::new(m.fingerprint, m.id()),
        w.join(),
        T0_MS + 20_000,
    );
    let (d, out) = ctrl.take();
    stored.commit(&d, &[]).expect("commit");
    assert!(
        sends_to(&out, 20_000)
            .iter()
            .any(|m| matches!(m, Message::Admission(Admission::Admitted { .. }))),
        "a machine with the token is refused after a flood: {out:?}"
    );
    assert_eq!(
        stored
            .machines
            .values()
            .filter(|m| m.key_status == KeyStatus::Pending)
            .count(),
        100
    );
}

#[test]
fn hostile_rejected_key_is_refused_on_every_later_attempt() {
    let (mut ctrl, _) = controller(100, true);
    let m = Machine::new(2, "dep-2", "routing", Some("lb-1"), false);
    let w = m.core();
    ctrl.joined(1, Peer::new(m.fingerprint, m.id()), w.join(), T0_MS);
    let _ = ctrl.take();
    assert_eq!(ctrl.reject("dep-2", T0_MS), Ok(m.id()));
    let (d, out) = ctrl.take();
    assert_eq!(d.machines.len(), 1);
    assert_eq!(d.machines[0].key_status, KeyStatus::Rejected);
    assert!(closes(&out, 1));
    ctrl.closed(1, T0_MS);
    assert_eq!(ctrl.rejected_fingerprints(), vec![m.fingerprint]);
    let before = records(&ctrl);
    // Again, again with a valid token proof, and another certificate claiming the node id.
    let mut with_token = w.join();
    with_token.token_proof = Some(token_proof(TOKEN, &m.fingerprint));
    let other_fp = Fingerprint([9; 32]);
    let mut other = w.join();
    other.token_proof = Some(token_proof(TOKEN, &other_fp));
    for (conn, fp, join) in [
        (2, m.fingerprint, w.join()),
        (3, m.fingerprint, with_token),
        (4, other_fp, other),
    ] {
        ctrl.joined(conn, Peer::new(fp, m.id()), join, T0_MS + 10);
        let (d, out) = ctrl.take();
        assert!(d.is_empty(), "conn {conn}: stored {d:?}");
        assert!(closes(&out, conn), "conn {conn}: {out:?}");
        assert!(!sends_to(&out, conn)
            .iter()
            .any(|m| matches!(m, Message::Admission(Admission::Admitted { .. }))));
        assert_eq!(records(&ctrl), before);
        ctrl.closed(conn, T0_MS + 10);
    }
    // The worker learns it is refused.
    let mut w = m.core();
    let _ = w.from_controller(Message::Admission(Admission::Rejected {
        reason: "rejected".into(),
    }));
    assert_eq!(w.standing(), Standing::Rejected);
    assert_eq!(w.take().0, None);
}

pub(crate) fn refused_with(out: &[Output], conn: ConnId) -> Option<JoinRefusal> {
    sends_to(out, conn).iter().find_map(|m| match m {
        Message::Admission(Admission::Refused(why)) => Some(*why),
        _ => None,
    })
}

pub(crate) fn admitted(out: &[Output], conn: ConnId) -> bool {
    sends_to(out, conn)
        .iter()
        .any(|m| matches!(m, Message::Admission(Admission::Admitted { .. })))
}

#[test]
fn hostile_join_with_another_machines_node_id_is_refused_and_stores_nothing() {
    let (mut ctrl, _) = controller(100, true);
    let a = Machine::new(5, "router-a", "call-router", None, true);
    ctrl.joined(1, a.peer(), a.core().join(), T0_MS);
    let (_, out) = ctrl.take();
    assert!(admitted(&out, 1));
    let before = records(&ctrl);
    // Another machine, with the join token even, speaking for a: its own certificate (which
    // proves its own id), a certificate proving no node id, and one of its own claiming a's id.
    let b = Machine::new(6, "router-b", "call-router", None, true);
    let mut as_a = b.core().join();
    as_a.node_id = a.id();
    for (conn, peer, want) in [
        (2, b.peer(), JoinRefusal::NodeIdNotProven),
        (
            3,
            Peer {
                fingerprint: b.fingerprint,
                node_id: None,
            },
            JoinRefusal::NodeIdNotProven,
        ),
        (
            4,
            Peer::new(b.fingerprint, a.id()),
            JoinRefusal::NodeIdTaken,
        ),
    ] {
        ctrl.joined(conn, peer, as_a.clone(), T0_MS + 1);
        let (d, out) = ctrl.take();
        assert!(d.is_empty(), "conn {conn}: stored {d:?}");
        assert!(closes(&out, conn), "conn {conn}: {out:?}");
        assert_eq!(refused_with(&out, conn), Some(want), "conn {conn}: {out:?}");
        assert!(!admitted(&out, conn));
        assert!(!closes(&out, 1), "a's own connection was touched: {out:?}");
        assert_eq!(records(&ctrl), before);
        ctrl.closed(conn, T0_MS + 1);
    }
    assert!(ctrl.connected(a.id()));
}

#[test]
fn hostile_join_with_the_controllers_own_node_id_is_refused() {
    let own = NodeId(0xc0ff_ee00_0000_0000_0000_0000_0000_0001);
    let mut s = Settings::new(2000);
    s.join_token = Some(TOKEN.to_vec());
    s.controller_node_id = Some(own);
    let key = ControllerKey::from_secret(&[0x5a; 32]).unwrap();
    let mut ctrl = ControllerCore::open(s.clone(), key, Box::new(AgeSealer), vec![], vec![], T0_MS);
    // Its certificate carries the controller's id, and it has the token.
    let mut m = Machine::new(7, "ctl", "call-router", None, true);
    m.info.node_id = own;
    ctrl.joined(1, m.peer(), m.core().join(), T0_MS);
    let (d, out) = ctrl.take();
    assert!(d.is_empty(), "stored {d:?}");
    assert_eq!(
        refused_with(&out, 1),
        Some(JoinRefusal::NodeIdNotProven),
        "{out:?}"
    );
    assert!(closes(&out, 1));
    assert_eq!(ctrl.machines().count(), 0);
    // A record of the controller's own id stored before this check is dropped on open.
    let mut old = MemClusterStore::default();
    let other = Machine::new(8, "router-8", "call-router", None, true);
    let mut c2 = ControllerCore::open(
        Settings {
            controller_node_id: None,
            ..s.clone()
        },
        ControllerKey::from_secret(&[0x5a; 32]).unwrap(),
        Box::new(AgeSealer),
        vec![],
        vec![],
        T0_MS,
    );
    for (conn, x) in [(1, &m), (2, &other)] {
        c2.joined(conn, x.peer(), x.core().join(), T0_MS);
        old.commit(&c2.take().0, &[]).expect("commit");
    }
    assert_eq!(old.machines.len(), 2);
    let mut c3 = ControllerCore::open(
        s,
        ControllerKey::from_secret(&[0x5a; 32]).unwrap(),
        Box::new(AgeSealer),
        old.machines.values().cloned().collect(),
        vec![],
        T0_MS,
    );
    assert!(c3.machine(own).is_none());
    assert!(c3.accept(&own.to_string(), T0_MS).is_err());
    let (d, _) = c3.take();
    assert_eq!(d.removed, vec![own]);
    old.commit(&d, &[]).expect("commit");
    assert_eq!(
        old.machines.keys().copied().collect::<Vec<_>>(),
        vec![other.id()]
    );
}

#[test]
fn a_pending_name_squatter_gives_way_to_the_real_machine_with_the_token() {
    let (mut ctrl, _) = controller(100, true);
    let mut disk = MemClusterStore::default();
    let squatter = Machine::keyed(9, "w7", "call-router", None, false, "squatter");
    ctrl.joined(1, squatter.peer(), squatter.core().join(), T0_MS);
    let (d, out) = ctrl.take();
    disk.commit(&d, &[]).expect("commit");
    assert_eq!(
        sends_to(&out, 1),
        vec![&Message::Admission(Admission::Pending)]
    );
    // Another token-less key for the name is refused, and told why.
    let other = Machine::keyed(10, "w7", "call-router", None, false, "other");
    ctrl.joined(2, other.peer(), other.core().join(), T0_MS + 1);
    let (d, out) = ctrl.take();
    assert!(d.is_empty());
    assert_eq!(refused_with(&out, 2), Some(JoinRefusal::NameTaken));
    ctrl.closed(2, T0_MS + 1);
    // The real w7 presents the token: admitted; the squatter's record is gone and its
    // connection told and closed.
    let real = Machine::keyed(11, "w7", "call-router", None, true, "real");
    ctrl.joined(3, real.peer(), real.core().join(), T0_MS + 2);
    let (d, out) = ctrl.take();
    disk.commit(&d, &[]).expect("commit");
    assert!(admitted(&out, 3), "{out:?}");
    assert_eq!(refused_with(&out, 1), Some(JoinRefusal::NameTaken));
    assert!(closes(&out, 1));
    assert_eq!(d.removed, vec![squatter.id()]);
    assert_eq!(
        disk.machines.keys().copied().collect::<Vec<_>>(),
        vec![real.id()]
    );
    assert!(!ctrl.connected(squatter.id()));
    // The squatter coming back finds the name taken by an admitted key, even with a token.
    let squatter_with_token = Machine::keyed(9, "w7", "call-router", None, true, "squatter");
    for (conn, m) in [(4, &squatter), (5, &squatter_with_token)] {
        ctrl.joined(conn, m.peer(), m.core().join(), T0_MS + 3);
        let (d, out) = ctrl.take();
        assert!(d.is_empty(), "stored {d:?}");
        assert_eq!(refused_with(&out, conn), Some(JoinRefusal::NameTaken));
        ctrl.closed(conn, T0_MS + 3);
    }
    assert!(ctrl.connected(real.id()));
}

#[test]
fn a_pending_node_id_squatter_gives_way_to_the_real_machine_with_the_token() {
    let (mut ctrl, _) = controller(100, true);
    let mut disk = MemClusterStore::default();
    // A key whose certificate claims the real machine's node id, under another name.
    let squatter = Machine::keyed(12, "not-w8", "call-router", None, false, "squatter");
    ctrl.joined(1, squatter.peer(), squatter.core().join(), T0_MS);
    disk.commit(&ctrl.take().0, &[]).expect("commit");
    let real = Machine::keyed(12, "w8", "call-router", None, true, "real");
    assert_eq!(real.id(), squatter.id());
    ctrl.joined(2, real.peer(), real.core().join(), T0_MS + 1);
    let (d, out) = ctrl.take();
    disk.commit(&d, &[]).expect("commit");
    assert!(admitted(&out, 2), "{out:?}");
    assert_eq!(refused_with(&out, 1), Some(JoinRefusal::NodeIdTaken));
    // Dropped and created again under the same id: written, not deleted.
    assert!(d.removed.is_empty(), "{d:?}");
    let rec = &disk.machines[&real.id()];
    assert_eq!(
        (rec.name.as_str(), rec.fingerprint, rec.key_status),
        ("w8", real.fingerprint, KeyStatus::Admitted)
    );
    assert_eq!(disk.machines.len(), 1);
}

/// Machine `n` of many: no service address (it would need `n` to be a byte).
pub(crate) fn many(n: u128, name: &str, token: bool, key: &str) -> Machine {
    let mut m = Machine::keyed(
        n,
        name,
        "call-router",
        None,
        token,
        &format!("{key}-{name}"),
    );
    m.info.service_addr = None;
    m
}

#[test]
fn a_full_pending_table_holds_no_name_from_a_key_with_the_token() {
    const PENDING: usize = 1024;
    let (mut ctrl, _) = controller(PENDING, true);
    let mut disk = MemClusterStore::default();
    for n in 0..PENDING {
        let m = many(0x1_0000 + n as u128, &format!("w{n}"), false, "squatter");
        ctrl.joined(n as u64 + 1, m.peer(), m.core().join(), T0_MS);
        disk.commit(&ctrl.take().0, &[]).expect("commit");
    }
    assert_eq!(disk.machines.len(), PENDING);
    // One more without the token: the table is full, and it is told so.
    let late = many(0x2_0000, "late", false, "late");
    ctrl.joined(9_999, late.peer(), late.core().join(), T0_MS + 1);
    let (d, out) = ctrl.take();
    assert!(d.is_empty());
    assert_eq!(refused_with(&out, 9_999), Some(JoinRefusal::TooManyWaiting));
    ctrl.closed(9_999, T0_MS + 1);
    // Every real machine, with the token, gets its name.
    for n in 0..PENDING {
        let conn = 10_000 + n as u64;
        let m = many(0x3_0000 + n as u128, &format!("w{n}"), true, "real");
        ctrl.joined(conn, m.peer(), m.core().join(), T0_MS + 2);
        let (d, out) = ctrl.take();
        disk.commit(&d, &[]).expect("commit");
        assert!(admitted(&out, conn), "w{n}: {out:?}");
    }
    assert_eq!(disk.machines.len(), PENDING);
    assert!(disk
        .machines
        .values()
        .all(|m| m.key_status == KeyStatus::Admitted && m.node_id.0 >= 0x3_0000));
}

#[test]
fn a_token_that_is_not_accepted_is_said_to_the_worker() {
    for controller_has_token in [true, false] {
        let (mut ctrl, _) = controller(100, controller_has_token);
        let m = Machine::new(13, "w13", "call-router", None, false);
        let mut wrong = m.core().join();
        wrong.token_proof = Some(token_proof(b"not the token", &m.fingerprint));
        ctrl.joined(1, m.peer(), wrong.clone(), T0_MS);
        let (d, out) = ctrl.take();
        assert_eq!(d.machines.len(), 1);
        assert_eq!(d.machines[0].key_status, KeyStatus::Pending);
        assert_eq!(
            sends_to(&out, 1),
            vec![&Message::Admission(Admission::PendingTokenNotAccepted)],
            "controller_has_token {controller_has_token}"
        );
        // Without a proof it is plain pending.
        ctrl.joined(2, m.peer(), m.core().join(), T0_MS + 1);
        let (_, out) = ctrl.take();
        assert_eq!(
            sends_to(&out, 2),
            vec![&Message::Admission(Admission::Pending)]
        );
    }
    // The worker takes it as pending, and a refusal as not answered yet.
    let m = Machine::new(13, "w13", "call-router", None, false);
    let mut w = m.core();
    w.connected();
    w.from_controller(Message::Admission(Admission::PendingTokenNotAccepted))
        .unwrap();
    assert_eq!(w.standing(), Standing::Pending);
    w.connected();
    w.from_controller(Message::Admission(Admission::Refused(
        JoinRefusal::NameTaken,
    )))
    .unwrap();
    assert_eq!(w.standing(), Standing::Waiting);
    assert_eq!(w.take().0, None);
}

#[test]
fn join_refusals_say_the_documented_words() {
    assert_eq!(
        JoinRefusal::NameTaken.to_string(),
        "name taken by another key"
    );
    assert_eq!(
        JoinRefusal::TooManyWaiting.to_string(),
        "too many machines waiting"
    );
    assert_eq!(
        outpost::wire::TOKEN_NOT_ACCEPTED,
        "join token not accepted: waiting for an operator"
    );
}

/// Two admitted machines on connections 1 and 2.
pub(crate) fn two_admitted() -> (ControllerCore, Machine, Machine) {
    let (mut ctrl, _) = controller(100, true);
    let a = Machine::new(3, "router-a", "call-router", None, true);
    let b = Machine::new(4, "router-b", "call-router", None, true);
    for (conn, m) in [(1, &a), (2, &b)] {
        ctrl.joined(
            conn,
            Peer::new(m.fingerprint, m.id()),
            m.core().join(),
            T0_MS,
        );
        let (_, out) = ctrl.take();
        assert!(sends_to(&out, conn)
            .iter()
            .any(|m| matches!(m, Message::Admission(Admission::Admitted { .. }))));
    }
    (ctrl, a, b)
}

#[test]
fn hostile_notify_for_another_machine_is_refused() {
    let (mut ctrl, a, b) = two_admitted();
    ctrl.frame(
        2,
        Message::Notify(Notify {
            machine: b.id(),
            seq: 1,
            report: running_report(),
        }),
        T0_MS + 1,
    );
    let (d, out) = ctrl.take();
    assert_eq!(d.machines.len(), 1, "b's own report is stored");
    assert_eq!(sends_to(&out, 2), vec![&Message::NotifyAck { upto: 1 }]);
    let b_before = ctrl.machines().find(|m| m.node_id == b.id()).cloned();
    let a_before = ctrl.machines().find(|m| m.node_id == a.id()).cloned();
    ctrl.frame(
        1,
        Message::Notify(Notify {
            machine: b.id(),
            seq: 2,
            report: MachineReport {
                state: "failed".into(),
                software: None,
                detail: Some("impersonated".into()),
                deployment: None,
            },
        }),
        T0_MS + 2,
    );
    let (d, out) = ctrl.take();
    assert!(d.is_empty(), "an impersonated notify stored {d:?}");
    assert!(closes(&out, 1));
    assert!(sends_to(&out, 1).is_empty());
    assert_eq!(
        ctrl.machines().find(|m| m.node_id == b.id()).cloned(),
        b_before
    );
    let a_after = ctrl.machines().find(|m| m.node_id == a.id()).cloned();
    assert_eq!(
        a_after.as_ref().map(|m| (m.report.clone(), m.notify_seq)),
        a_before.as_ref().map(|m| (m.report.clone(), m.notify_seq))
    );
    // Acknowledging publications never sent, or sending what only the controller sends.
    for (k, msg) in [
        Message::PublicationAck { upto: 1 },
        Message::NotifyAck { upto: 1 },
        Message::Admission(Admission::Pending),
    ]
    .into_iter()
    .enumerate()
    {
        let conn = 10 + k as u64;
        ctrl.joined(
            conn,
            Peer::new(a.fingerprint, a.id()),
            a.core().join(),
            T0_MS + 3,
        );
        let _ = ctrl.take();
        let before = records(&ctrl);
        let kind = msg.kind();
        ctrl.frame(conn, msg, T0_MS + 3);
        let (d, out) = ctrl.take();
        assert!(d.is_empty(), "{kind}: stored {d:?}");
        assert!(closes(&out, conn), "{kind}: {out:?}");
        assert_eq!(records(&ctrl), before, "{kind}");
    }
}

/// Bad input is refused, not absorbed: a report state is parsed at the wire boundary into
/// the cores' enum; a word the controller does not know closes that connection with a
/// clear reason, stores nothing, and never panics. Every known word goes through the
/// boundary both ways unchanged (the wire keeps the word).
#[test]
fn a_report_with_an_unknown_state_is_refused_and_stores_nothing() {
    for s in ReportState::ALL {
        assert_eq!(s.as_str().parse::<ReportState>(), Ok(s));
        let r = MachineReport::new(s, None, None, None);
        assert_eq!((r.state.as_str(), r.parsed_state()), (s.as_str(), Ok(s)));
    }
    let (mut ctrl, a, _) = two_admitted();
    let before = records(&ctrl);
    let word = "exploded".to_string();
    ctrl.frame(
        1,
        Message::Notify(Notify {
            machine: a.id(),
            seq: 1,
            report: MachineReport {
                state: word.clone(),
                software: None,
                detail: None,
                deployment: Some(1),
            },
        }),
        T0_MS + 1,
    );
    let (d, out) = ctrl.take();
    assert!(d.is_empty(), "stored {d:?}");
    assert!(sends_to(&out, 1).is_empty(), "acknowledged: {out:?}");
    let reason = out.iter().find_map(|o| match o {
        Output::Close {
            conn: 1, reason, ..
        } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(
        reason.as_deref(),
        Some("bad report: state: unknown state \"exploded\"")
    );
    // Nothing it said was taken (only its liveness, in memory, as for any frame).
    let said = |rs: &[MachineRecord]| -> Vec<_> {
        rs.iter()
            .map(|m| (m.report.clone(), m.notify_seq, m.deploys.clone()))
            .collect()
    };
    assert_eq!(said(&records(&ctrl)), said(&before));
}
