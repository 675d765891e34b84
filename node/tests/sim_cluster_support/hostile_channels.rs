//! Hostile and edge cases of the publication channels in a settled simulated cluster and
//! against the controller core: replays, altered relays, rejected, removed and full channels,
//! and the sealer the core is given.

use super::hostile_joins::*;
use super::*;

/// A calm cluster (a load balancer, two dependents), settled: every dependent has its route
/// and has applied at least one publication.
pub(crate) fn settled_cluster() -> Sim {
    let mut sim = Sim::with_plan(11, Rng(11), Plan::calm(2, false));
    sim.heal(false);
    sim.check_ok().unwrap();
    sim.check_end().unwrap();
    sim
}

pub(crate) fn dependent_parts(sim: &Sim, d: usize) -> (NodeId, ConnId, u64) {
    let w = &sim.workers[d];
    (
        w.id(),
        w.conn.expect("connected"),
        w.core.as_ref().unwrap().record().applied,
    )
}

#[test]
fn hostile_replayed_publication_is_ignored_and_reacked() {
    let mut sim = settled_cluster();
    let d = 1;
    let (id, _, applied) = dependent_parts(&sim, d);
    assert!(applied >= 1);
    let core = sim.workers[d].core.as_mut().unwrap();
    let rec = core.record().clone();
    for seq in 1..=applied {
        let old = sim.published[&(id, seq)].clone();
        core.from_controller(Message::Publication(old.clone()))
            .unwrap_or_else(|e| panic!("replayed {seq}: {e}"));
        let (r, out) = core.take();
        assert_eq!(r, None, "a replay changed the record");
        assert_eq!(core.record(), &rec);
        assert!(
            out.contains(&WorkerOutput::ToController(Message::PublicationAck {
                upto: applied
            })),
            "a replay is acknowledged again: {out:?}"
        );
        assert!(!out.iter().any(|o| matches!(o, WorkerOutput::Apply(_))));
        let _ = core.from_relay(old);
        let (r, out) = core.take();
        assert_eq!(r, None);
        assert!(!out.iter().any(|o| matches!(o, WorkerOutput::Apply(_))));
        assert_eq!(core.record(), &rec);
    }
    // The controller takes the repeated ack as nothing new.
    let conn = sim.workers[d].conn.unwrap();
    let now = sim.now;
    let ctrl = sim.ctrl.core.as_mut().unwrap();
    ctrl.frame(conn, Message::PublicationAck { upto: applied }, now);
    let (dirty, out) = ctrl.take();
    assert!(dirty.is_empty() && out.is_empty(), "{dirty:?} {out:?}");
}

/// The controller publishes to the dependent; returns the publication, checked to go out as
/// a Relay on the load balancer's connection.
pub(crate) fn publish_through_lb(sim: &mut Sim, d: usize) -> Publication {
    let (id, _, _) = dependent_parts(sim, d);
    let lb_conn = sim.workers[0].conn.expect("LB connected");
    let now = sim.now;
    let ctrl = sim.ctrl.core.as_mut().unwrap();
    // A route goes directly; anything else through the load balancer.
    let _ = ctrl.publish(id, &Body::Pool(Pool::default()), now);
    let (dirty, out) = ctrl.take();
    sim.ctrl.disk.commit(&dirty, &[]).expect("commit");
    assert_eq!(dirty.publications.len(), 1);
    let p = dirty.publications[0].clone();
    sim.published.insert((p.machine, p.seq), p.clone());
    let relayed: Vec<&Message> = sends_to(&out, lb_conn);
    assert!(
        relayed
            .iter()
            .any(|m| matches!(m, Message::Relay(r) if r.to == id && r.publication == p)),
        "a dependent's publication goes through its load balancer: {out:?}"
    );
    p
}

#[test]
fn hostile_lb_altering_a_relayed_publication_is_refused_and_the_direct_resend_delivers() {
    let mut sim = settled_cluster();
    let d = 1;
    let (id, conn, applied) = dependent_parts(&sim, d);
    let p = publish_through_lb(&mut sim, d);
    assert_eq!(p.seq, applied + 1);
    let mut altered = Vec::new();
    for at in [0, p.sealed.len() / 2, p.sealed.len() - 1] {
        let mut q = p.clone();
        q.sealed[at] ^= 0x01;
        altered.push(("sealed", q));
    }
    for at in [0, 31, 63] {
        let mut q = p.clone();
        q.signature[at] ^= 0x80;
        altered.push(("signature", q));
    }
    let mut q = p.clone();
    q.signature.truncate(63);
    altered.push(("short signature", q));
    for seq in [p.seq + 1, p.seq - 1, p.seq + 1000] {
        let mut q = p.clone();
        q.seq = seq;
        altered.push(("seq", q));
    }
    let mut q = p.clone();
    q.sealed.push(0);
    altered.push(("sealed, longer", q));
    let core = sim.workers[d].core.as_mut().unwrap();
    let rec = core.record().clone();
    for (what, q) in altered {
        match core.from_relay(q) {
            Err(WorkerRefusal::Hostile(_)) => {}
            other => panic!("{what} altered: {other:?}"),
        }
        let (r, out) = core.take();
        assert_eq!(r, None, "{what} altered changed the record");
        assert!(
            !out.iter().any(|o| matches!(o, WorkerOutput::Apply(_))),
            "{what}: {out:?}"
        );
        assert_eq!(core.record(), &rec);
    }
    // The controller resends directly once it is overdue.
    let later = sim.now + sim.ctrl.settings.resend_after_ms + 1;
    let ctrl = sim.ctrl.core.as_mut().unwrap();
    ctrl.tick(later);
    let (_, out) = ctrl.take();
    assert!(
        sends_to(&out, conn).contains(&&Message::Publication(p.clone())),
        "no direct resend: {out:?}"
    );
    let core = sim.workers[d].core.as_mut().unwrap();
    core.from_controller(Message::Publication(p.clone()))
        .unwrap();
    let (r, out) = core.take();
    assert_eq!(r.map(|r| r.applied), Some(p.seq));
    assert!(
        out.contains(&WorkerOutput::ToController(Message::PublicationAck {
            upto: p.seq
        }))
    );
    let ctrl = sim.ctrl.core.as_mut().unwrap();
    ctrl.frame(conn, Message::PublicationAck { upto: p.seq }, later);
    let (dirty, _) = ctrl.take();
    assert_eq!(dirty.acked, vec![(id, p.seq)]);
    assert_eq!(ctrl.unacked_len(), 0);
}

#[test]
fn hostile_publication_for_another_machine_or_by_another_key_is_refused() {
    let mut sim = settled_cluster();
    let d = 1;
    let (id, _, applied) = dependent_parts(&sim, d);
    let other = sim.workers[2].id();
    let other_recipient = sim.workers[2].recipient.clone();
    let mine = sim.workers[d].recipient.clone();
    let key = ControllerKey::from_secret(&sim.ctrl.key_secret).unwrap();
    let forger = ControllerKey::from_secret(&[0xee; 32]).unwrap();
    let body = Body::LoadBalancer(None).encode();
    let next = applied + 1;
    let mut cases = vec![
        (
            "sealed to another machine",
            key.publication(id, next, &other_recipient, &body).unwrap(),
        ),
        (
            "signed by another key",
            forger.publication(id, next, &mine, &body).unwrap(),
        ),
        (
            "another machine's channel",
            key.publication(other, next, &other_recipient, &body)
                .unwrap(),
        ),
        (
            "another machine's channel, sealed to this one",
            key.publication(other, next, &mine, &body).unwrap(),
        ),
        (
            "not a body",
            key.publication(id, next, &mine, b"\xff\xff not a body")
                .unwrap(),
        ),
    ];
    // Validly signed sealed bytes that are not age at all.
    let sealed = b"not age".to_vec();
    cases.push((
        "signed garbage",
        Publication {
            machine: id,
            seq: next,
            signature: key.sign_digest(&publication_digest(id, next, &sealed)),
            sealed,
        },
    ));
    let core = sim.workers[d].core.as_mut().unwrap();
    let rec = core.record().clone();
    for (what, p) in cases {
        for relayed in [false, true] {
            let r = if relayed {
                core.from_relay(p.clone())
            } else {
                core.from_controller(Message::Publication(p.clone()))
            };
            assert!(r.is_err(), "{what} (relayed {relayed}) accepted");
            let (rec2, out) = core.take();
            assert_eq!(rec2, None, "{what} (relayed {relayed}) changed the record");
            assert!(!out.iter().any(|o| matches!(o, WorkerOutput::Apply(_))));
            assert_eq!(core.record(), &rec);
        }
    }
    // The real one still applies.
    let p = key.publication(id, next, &mine, &body).unwrap();
    core.from_controller(Message::Publication(p)).unwrap();
    assert_eq!(core.record().applied, next);
}

/// A machine rejected while publications to it were unacknowledged, then accepted again,
/// resumes its channel: what the controller publishes afterwards is applied.
#[test]
fn rejected_then_accepted_machine_resumes_its_channel() {
    let mut sim = Sim::with_plan(13, Rng(13), Plan::calm(2, true));
    sim.heal(false);
    sim.check_ok().unwrap();
    sim.check_end().unwrap();
    let s = 3; // the worker without a load balancer
    let id = sim.workers[s].id();
    let applied = sim.workers[s].disk.applied;
    // It is away while two publications wait for it.
    sim.crash_worker(s, 1_000_000);
    let now = sim.now;
    for _ in 0..2 {
        sim.ctrl
            .core
            .as_mut()
            .unwrap()
            .publish(id, &Body::Pool(Pool::default()), now)
            .unwrap();
    }
    sim.ctrl_flush();
    sim.ctrl
        .core
        .as_mut()
        .unwrap()
        .reject(&id.to_string(), now)
        .unwrap();
    sim.ctrl_flush();
    sim.ctrl
        .core
        .as_mut()
        .unwrap()
        .accept(&id.to_string(), now)
        .unwrap();
    sim.ctrl_flush();
    // Back, with more published since.
    sim.workers[s].restart_at = sim.now;
    sim.ctrl
        .core
        .as_mut()
        .unwrap()
        .publish(id, &Body::Pool(Pool::default()), now)
        .unwrap();
    sim.ctrl_flush();
    let until = sim.now + 20_000;
    while sim.now < until {
        sim.step();
    }
    sim.check_ok().unwrap();
    let m = sim.ctrl_record(id).unwrap().clone();
    let got = sim.workers[s].core.as_ref().unwrap().record().applied;
    assert!(
        got == m.pub_seq,
        "applied {got} (was {applied} before the reject), published {}, acked {}",
        m.pub_seq,
        m.pub_acked
    );
}

pub(crate) fn lb_pool_names(ctrl: &ControllerCore, lb: NodeId) -> (Vec<String>, Vec<String>) {
    let pool = ctrl.machine(lb).unwrap().pool.clone().unwrap_or_default();
    (
        pool.members.iter().map(|m| m.name.clone()).collect(),
        pool.dependents.iter().map(|d| d.name.clone()).collect(),
    )
}

/// Invariant (`outpost machines remove`): a removed machine is refused for good (with or
/// without the token, `keys accept` included), keeps no stored publication, is in no pool,
/// and its name is free for another key.
#[test]
fn a_removed_machine_is_refused_for_good_its_channel_dropped_and_its_pool_updated() {
    let (mut ctrl, _) = controller(100, true);
    let lb = Machine::new(1, "lb-1", "load-balancer", None, true);
    let dep = Machine::new(2, "dep-2", "routing", Some("lb-1"), true);
    let other = Machine::new(3, "dep-3", "routing", Some("lb-1"), true);
    for (conn, m) in [(1, &lb), (2, &dep), (3, &other)] {
        ctrl.joined(conn, m.peer(), m.core().join(), T0_MS);
        let (_, out) = ctrl.take();
        assert!(admitted(&out, conn), "{}: {out:?}", m.info.name);
    }
    assert_eq!(
        lb_pool_names(&ctrl, lb.id()).1,
        vec!["dep-2".to_string(), "dep-3".to_string()]
    );
    let rec = ctrl.machine(dep.id()).unwrap().clone();
    assert!(
        rec.pub_seq > rec.pub_acked,
        "dep-2 has unacknowledged publications"
    );
    let unacked_before = ctrl.unacked_len();
    let lb_seq = ctrl.machine(lb.id()).unwrap().pub_seq;

    assert_eq!(ctrl.remove("dep-2", T0_MS + 1), Ok(dep.id()));
    let (d, out) = ctrl.take();
    // Its channel is deleted (every seq up to what was published), in the same commit.
    assert!(d.acked.contains(&(dep.id(), rec.pub_seq)), "{:?}", d.acked);
    assert_eq!(
        ctrl.unacked_len(),
        unacked_before - (rec.pub_seq - rec.pub_acked) as usize + 1,
        "dep-2's publications dropped, one new pool for lb-1"
    );
    let tomb = d.machines.iter().find(|m| m.node_id == dep.id()).unwrap();
    assert_eq!(tomb.key_status, KeyStatus::Removed);
    assert_eq!(
        (
            &tomb.report,
            &tomb.route,
            &tomb.load_balancer,
            tomb.deploys.len()
        ),
        (&None, &None, &None, 0)
    );
    // Its load balancer is sent a pool without it, in the same commit.
    assert!(d
        .publications
        .iter()
        .any(|p| p.machine == lb.id() && p.seq == lb_seq + 1));
    assert_eq!(lb_pool_names(&ctrl, lb.id()).1, vec!["dep-3".to_string()]);
    assert_eq!(lb_pool_names(&ctrl, lb.id()).0, vec!["dep-3".to_string()]);
    // Its connection is told and closed; the handshake refuses its key from now on.
    assert!(sends_to(&out, 2).iter().any(|m| matches!(
        m,
        Message::Admission(Admission::Rejected { reason }) if reason.contains("removed")
    )));
    assert!(closes(&out, 2));
    ctrl.closed(2, T0_MS + 1);
    assert_eq!(ctrl.rejected_fingerprints(), vec![dep.fingerprint]);

    // Coming back, with the token, stores nothing and admits nothing; an operator cannot
    // accept it; rejecting or removing it again changes nothing.
    let before = records(&ctrl);
    ctrl.joined(4, dep.peer(), dep.core().join(), T0_MS + 2);
    let (d, out) = ctrl.take();
    assert!(d.is_empty(), "{d:?}");
    assert!(closes(&out, 4) && !admitted(&out, 4), "{out:?}");
    ctrl.closed(4, T0_MS + 2);
    assert_eq!(
        ctrl.accept("dep-2", T0_MS + 3),
        Err(KeyActionError::Removed("dep-2".into()))
    );
    assert_eq!(ctrl.reject("dep-2", T0_MS + 3), Ok(dep.id()));
    assert_eq!(ctrl.remove(&dep.id().to_string(), T0_MS + 3), Ok(dep.id()));
    let (d, _) = ctrl.take();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(records(&ctrl), before);

    // A new key under the same name joins with the token and is the one the name means.
    let fresh = Machine::keyed(9, "dep-2", "routing", Some("lb-1"), true, "dep-2 again");
    ctrl.joined(5, fresh.peer(), fresh.core().join(), T0_MS + 4);
    let (_, out) = ctrl.take();
    assert!(admitted(&out, 5), "{out:?}");
    assert_eq!(ctrl.machine_by_name("dep-2").unwrap().node_id, fresh.id());
    assert_eq!(
        lb_pool_names(&ctrl, lb.id()).1,
        vec!["dep-2".to_string(), "dep-3".to_string()]
    );
    // Removing a load balancer tells its dependents they have none.
    assert_eq!(ctrl.remove("lb-1", T0_MS + 5), Ok(lb.id()));
    let (d, _) = ctrl.take();
    for id in [other.id(), fresh.id()] {
        assert_eq!(ctrl.machine(id).unwrap().route, None);
        assert!(d.publications.iter().any(|p| p.machine == id));
    }
}

/// Invariant (a machine's channel is bounded): a machine that stops acknowledging holds at
/// most `channel_max` stored publications; pool changes beyond it wait and only the newest is
/// sent once it acknowledges; a deployment to it is refused with the reason.
#[test]
fn a_full_channel_holds_its_bound_and_sends_only_the_newest_pool_once_acknowledged() {
    let mut s = Settings::new(2000);
    s.join_token = Some(TOKEN.to_vec());
    s.channel_max = 4;
    let key = ControllerKey::from_secret(&[0x5a; 32]).unwrap();
    let mut ctrl = ControllerCore::open(s, key, Box::new(AgeSealer), vec![], vec![], T0_MS);
    let lb = Machine::new(1, "lb-1", "load-balancer", None, true);
    ctrl.joined(1, lb.peer(), lb.core().join(), T0_MS);
    let _ = ctrl.take();
    // Ten dependents join one after another; the load balancer acknowledges nothing.
    let deps: Vec<Machine> = (0..10)
        .map(|i| {
            let name = format!("dep-{i}");
            Machine::new(10 + i, &name, "routing", Some("lb-1"), true)
        })
        .collect();
    for (i, m) in deps.iter().enumerate() {
        ctrl.joined(10 + i as u64, m.peer(), m.core().join(), T0_MS + i as u64);
        let (d, _) = ctrl.take();
        let lb_rec = ctrl.machine(lb.id()).unwrap();
        assert!(
            lb_rec.pub_seq - lb_rec.pub_acked <= 4,
            "channel over its bound: {} unacked",
            lb_rec.pub_seq - lb_rec.pub_acked
        );
        assert!(d
            .publications
            .iter()
            .all(|p| p.machine != lb.id() || p.seq <= 4));
    }
    let lb_rec = ctrl.machine(lb.id()).unwrap().clone();
    assert_eq!((lb_rec.pub_seq, lb_rec.pub_acked), (4, 0));
    // What it was last sent is what the controller remembers: three dependents in.
    assert_eq!(lb_pool_names(&ctrl, lb.id()).1.len(), 3);
    // A deployment cannot go out to it.
    let order = outpost::cluster::body::DeployOrder {
        deployment: 1,
        bundle_id: "00".repeat(32),
        service: "voice".into(),
        version: "1".into(),
        sealed_bytes: 1,
        sealed_hash: [0; 32],
    };
    assert_eq!(
        ctrl.publish(lb.id(), &Body::Deploy(order), T0_MS + 20),
        Err(NotPublished::ChannelFull(4))
    );
    let (d, _) = ctrl.take();
    assert!(d.publications.iter().all(|p| p.machine != lb.id()));
    // The core logs nothing itself: the bound is said once per episode, as an event for the
    // driver to log.
    let full: Vec<CoreEvent> = ctrl
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, CoreEvent::ChannelFull { .. }))
        .collect();
    assert_eq!(
        full,
        vec![CoreEvent::ChannelFull {
            name: "lb-1".into(),
            node: lb.id(),
            unacknowledged: 4
        }]
    );
    // It acknowledges everything: exactly one publication follows, the whole current pool.
    ctrl.frame(1, Message::PublicationAck { upto: 4 }, T0_MS + 30);
    assert!(ctrl.take_events().contains(&CoreEvent::ChannelHasRoom {
        name: "lb-1".into()
    }));
    let (d, _) = ctrl.take();
    let to_lb: Vec<&Publication> = d
        .publications
        .iter()
        .filter(|p| p.machine == lb.id())
        .collect();
    assert_eq!(to_lb.len(), 1, "{to_lb:?}");
    assert_eq!(to_lb[0].seq, 5);
    let (members, dependents) = lb_pool_names(&ctrl, lb.id());
    let all: Vec<String> = (0..10).map(|i| format!("dep-{i}")).collect();
    assert_eq!(dependents, all);
    assert_eq!(members, all);
}

/// Sealing is the driver's to give: the core draws no randomness of its own and seals every
/// publication with the sealer it was built with. A sealer that fails stores and sends
/// nothing, and says why as an event (the core does not log).
#[test]
fn the_core_seals_only_with_the_sealer_it_is_given() {
    struct Counting(std::sync::Arc<std::sync::atomic::AtomicU64>, bool);
    impl Sealer for Counting {
        fn seal(&mut self, recipient: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.1 {
                return Err(KeyError::Seal("refused by the test".into()));
            }
            AgeSealer.seal(recipient, plaintext)
        }
    }
    for fail in [false, true] {
        let seals = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut s = Settings::new(2000);
        s.join_token = Some(TOKEN.to_vec());
        let key = ControllerKey::from_secret(&[0x5a; 32]).unwrap();
        let sealer = Box::new(Counting(seals.clone(), fail));
        let mut ctrl = ControllerCore::open(s, key, sealer, vec![], vec![], T0_MS);
        let m = Machine::new(1, "lb-1", "load-balancer", None, true);
        ctrl.joined(1, m.peer(), m.core().join(), T0_MS);
        let _ = ctrl.take();
        let _ = ctrl.take_events();
        let before = seals.load(std::sync::atomic::Ordering::Relaxed);
        let r = ctrl.publish(m.id(), &Body::Pool(Pool::default()), T0_MS + 1);
        assert_eq!(seals.load(std::sync::atomic::Ordering::Relaxed), before + 1);
        let (d, out) = ctrl.take();
        if fail {
            assert!(matches!(r, Err(NotPublished::Seal(_))), "{r:?}");
            assert!(d.publications.is_empty() && out.is_empty());
            assert!(matches!(
                ctrl.take_events().as_slice(),
                [CoreEvent::SealFailed { .. }]
            ));
        } else {
            let seq = r.unwrap();
            assert_eq!(d.publications.len(), 1);
            assert_eq!(d.publications[0].seq, seq);
            let p = &d.publications[0];
            ControllerVerifier::from_bytes(&ctrl.public_key())
                .unwrap()
                .verify_publication(p)
                .unwrap();
            assert_eq!(
                Body::decode(&m.seal.open(&p.sealed).unwrap()).unwrap(),
                Body::Pool(Pool::default())
            );
        }
    }
}
