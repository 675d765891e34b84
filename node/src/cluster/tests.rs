//! The two cores together, by hand: one controller, one load balancer, two dependents, messages
//! passed directly (the simulation in `tests/sim_cluster.rs` adds faults and seeds).

use std::collections::BTreeMap;

use super::body::Pool;
use super::controller::core::{ControllerCore, KeyStatus, Output, Peer, Settings};
use super::keys::{token_proof, AgeSealer, ControllerKey, SealKey};
use super::worker::core::{Effect, JoinInfo, Standing, WorkerCore, WorkerOutput, WorkerRecord};
use crate::ids::{Fingerprint, NodeId};
use crate::wire::{MachineReport, Message};

const TOKEN: &[u8] = b"join-token";

struct W {
    core: WorkerCore,
    fp: Fingerprint,
    conn: u64,
    pool: Option<Pool>,
}

struct Net {
    ctl: ControllerCore,
    workers: BTreeMap<NodeId, W>,
    now: u64,
}

impl Net {
    fn new() -> Net {
        let mut settings = Settings::new(1000);
        settings.join_token = Some(TOKEN.to_vec());
        let ctl = ControllerCore::open(
            settings,
            ControllerKey::generate(),
            Box::new(AgeSealer),
            vec![],
            vec![],
            0,
        );
        Net {
            ctl,
            workers: BTreeMap::new(),
            now: 0,
        }
    }

    fn add(
        &mut self,
        n: u128,
        name: &str,
        component: &str,
        lb: Option<&str>,
        token: bool,
    ) -> NodeId {
        let id = NodeId(n);
        let fp = Fingerprint([n as u8; 32]);
        let info = JoinInfo {
            node_id: id,
            name: name.into(),
            service: "voice".into(),
            component: component.into(),
            load_balancer: lb.map(String::from),
            service_addr: Some(format!("127.0.0.1:{}", 5000 + n)),
            relay_addr: (component == "load-balancer").then(|| "127.0.0.1:7401".into()),
            token_proof: token.then(|| token_proof(TOKEN, &fp)),
        };
        let core = WorkerCore::open(info, SealKey::generate(), WorkerRecord::default()).unwrap();
        self.workers.insert(
            id,
            W {
                core,
                fp,
                conn: n as u64,
                pool: None,
            },
        );
        self.connect(id);
        id
    }

    fn connect(&mut self, id: NodeId) {
        let w = self.workers.get_mut(&id).unwrap();
        let join = w.core.join();
        w.core.connected();
        let (conn, fp) = (w.conn, w.fp);
        self.ctl.joined(conn, Peer::new(fp, id), join, self.now);
        self.pump();
    }

    /// Delivers everything until quiet; relays go through the LB's "runtime" (forwarded as is).
    fn pump(&mut self) {
        for _ in 0..100 {
            let (_dirty, outs) = self.ctl.take();
            let mut to_ctl = Vec::new();
            let mut any = !outs.is_empty();
            for o in outs {
                match o {
                    Output::Send { conn, msg } => {
                        let (id, p) = match msg {
                            Message::Relay(r) => (r.to, Message::Publication(r.publication)),
                            m => (self.by_conn(conn), m),
                        };
                        let w = self.workers.get_mut(&id).unwrap();
                        let _ = w.core.from_controller(p);
                    }
                    Output::Close { .. } => {}
                }
            }
            for (id, w) in self.workers.iter_mut() {
                let (_rec, outs) = w.core.take();
                any |= !outs.is_empty();
                for o in outs {
                    match o {
                        WorkerOutput::ToController(m) => to_ctl.push((w.conn, *id, m)),
                        WorkerOutput::Apply(Effect::Pool(p)) => w.pool = Some(p),
                        WorkerOutput::Apply(
                            Effect::Route(_)
                            | Effect::Deploy(_)
                            | Effect::Config(_)
                            | Effect::Coupling,
                        ) => {}
                    }
                }
            }
            for (conn, _, m) in to_ctl {
                self.ctl.frame(conn, m, self.now);
            }
            if !any {
                return;
            }
        }
        panic!("no quiet after 100 rounds");
    }

    fn by_conn(&self, conn: u64) -> NodeId {
        *self.workers.iter().find(|(_, w)| w.conn == conn).unwrap().0
    }

    fn pool_names(&self, lb: NodeId) -> Vec<String> {
        let w = &self.workers[&lb];
        w.pool
            .as_ref()
            .map(|p| p.members.iter().map(|m| m.name.clone()).collect())
            .unwrap_or_default()
    }

    fn heartbeat(&mut self, ids: &[NodeId]) {
        for id in ids {
            let conn = self.workers[id].conn;
            self.ctl.frame(conn, Message::Heartbeat, self.now);
        }
        self.ctl.tick(self.now);
        self.pump();
    }
}

#[test]
fn admission_pool_and_a_dependent_going_down_and_up() {
    let mut net = Net::new();
    let lb = net.add(1, "lb-1", "load-balancer", None, true);
    assert_eq!(net.workers[&lb].core.standing(), Standing::Admitted);
    let a = net.add(2, "media-a", "media-processor", Some("lb-1"), true);
    let b = net.add(3, "media-b", "media-processor", Some("lb-1"), false);
    assert_eq!(net.workers[&b].core.standing(), Standing::Pending);
    assert_eq!(net.pool_names(lb), vec!["media-a"]);
    net.ctl.accept("media-b", net.now).unwrap();
    net.pump();
    assert_eq!(net.workers[&b].core.standing(), Standing::Admitted);
    assert_eq!(net.pool_names(lb), vec!["media-a", "media-b"]);
    // Both dependents know the route to their load balancer.
    for d in [a, b] {
        let route = net.workers[&d].core.record().route.clone().unwrap();
        assert_eq!(route.name, "lb-1");
        assert_eq!(route.fingerprint, net.workers[&lb].fp);
    }
    // media-b goes silent: down after down_after, out of the pool.
    for t in 1..=5 {
        net.now = t * 300;
        net.heartbeat(&[lb, a]);
    }
    assert_eq!(net.pool_names(lb), vec!["media-a"]);
    let rec = net.ctl.machine_by_name("media-b").unwrap();
    assert!(!rec.up);
    // Back: in the pool again.
    net.heartbeat(&[lb, a, b]);
    assert_eq!(net.pool_names(lb), vec!["media-a", "media-b"]);
    // Reports reach the controller once; a failed one leaves the pool.
    net.workers.get_mut(&a).unwrap().core.report(MachineReport {
        state: "failed".into(),
        software: None,
        detail: Some("health check".into()),
        deployment: None,
    });
    net.pump();
    assert_eq!(net.pool_names(lb), vec!["media-b"]);
    let rec = net.ctl.machine_by_name("media-a").unwrap();
    assert_eq!(rec.report.as_ref().unwrap().state, "failed");
    assert_eq!(rec.notify_seq, net.workers[&a].core.record().report_seq);
    // Every channel fully acknowledged, every worker applied all of it.
    assert_eq!(net.ctl.unacked_len(), 0);
    for (id, w) in &net.workers {
        let m = net.ctl.machines().find(|m| m.node_id == *id).unwrap();
        assert_eq!(m.key_status, KeyStatus::Admitted);
        assert_eq!(w.core.record().applied, m.pub_seq, "{}", m.name);
    }
}

/// The call router's load balancer as the router last applied it: (name, fingerprint, up).
fn coupled(net: &Net, router: NodeId) -> Option<(String, Fingerprint, bool)> {
    let e = net.workers[&router]
        .core
        .record()
        .coupling
        .endpoint
        .clone()?;
    Some((e.name, e.fingerprint, e.up))
}

fn router_of(net: &Net, lb: NodeId) -> Option<String> {
    let r = net.workers[&lb].core.record().coupling.router.clone()?;
    Some(r.name)
}

/// Invariant: a call router is coupled with one dedicated load balancer, the one it names,
/// and always knows where it is and whether it is up; the load balancer knows its router and
/// never takes the router for one of its backends; a second router naming the same load
/// balancer gets none until the first leaves; a replaced load balancer is published anew.
#[test]
fn a_call_router_is_coupled_with_its_own_load_balancer_through_down_up_and_replacement() {
    let mut net = Net::new();
    let lb = net.add(1, "lb-1", "load-balancer", None, true);
    let _mp = net.add(2, "media-a", "media-processor", Some("lb-1"), true);
    let cr1 = net.add(3, "cr-1", "call-router", Some("lb-1"), true);
    net.now = 10;
    let cr2 = net.add(4, "cr-2", "call-router", Some("lb-1"), true);
    let lb_fp = net.workers[&lb].fp;
    assert_eq!(coupled(&net, cr1), Some(("lb-1".into(), lb_fp, true)));
    assert_eq!(coupled(&net, cr2), None, "lb-1 is dedicated to cr-1");
    assert_eq!(router_of(&net, lb), Some("cr-1".into()));
    // The router is the load balancer's client: never a backend, but allowed to dial it.
    assert_eq!(net.pool_names(lb), vec!["media-a"]);
    let pool = net.workers[&lb].core.record().pool.clone().unwrap();
    assert!(pool.dependents.iter().any(|d| d.name == "cr-1"));
    let rec = net.ctl.machine_by_name("cr-1").unwrap();
    assert_eq!(
        rec.balancing.endpoint.clone().flatten().map(|e| e.name),
        Some("lb-1".into())
    );

    // lb-1 goes silent: cr-1 is told it is down, then that it is back.
    for t in 1..=5 {
        net.now = 10 + t * 300;
        net.heartbeat(&[cr1, cr2, _mp]);
    }
    assert_eq!(coupled(&net, cr1), Some(("lb-1".into(), lb_fp, false)));
    net.heartbeat(&[lb, cr1, cr2, _mp]);
    assert_eq!(coupled(&net, cr1), Some(("lb-1".into(), lb_fp, true)));

    // lb-1 is replaced: removed (cr-1 told it has none), and a new machine under the same
    // name (another key) is published to cr-1 in its place, and told its router.
    net.ctl.remove("lb-1", net.now).unwrap();
    net.pump();
    assert_eq!(coupled(&net, cr1), None);
    let lb_new = net.add(9, "lb-1", "load-balancer", None, true);
    let new_fp = net.workers[&lb_new].fp;
    assert_ne!(new_fp, lb_fp);
    assert_eq!(coupled(&net, cr1), Some(("lb-1".into(), new_fp, true)));
    assert_eq!(router_of(&net, lb_new), Some("cr-1".into()));
    assert_eq!(net.pool_names(lb_new), vec!["media-a"]);

    // cr-1 leaves: lb-1 now serves cr-2, which is told where it is.
    net.ctl.remove("cr-1", net.now).unwrap();
    net.pump();
    assert_eq!(router_of(&net, lb_new), Some("cr-2".into()));
    assert_eq!(coupled(&net, cr2), Some(("lb-1".into(), new_fp, true)));
    assert_eq!(net.ctl.unacked_len(), 0);
    for (id, w) in &net.workers {
        let m = net.ctl.machines().find(|m| m.node_id == *id).unwrap();
        if m.key_status == KeyStatus::Admitted {
            assert_eq!(w.core.record().applied, m.pub_seq, "{}", m.name);
        }
    }
}

#[test]
fn rejected_keys_stay_out_and_leave_the_pool() {
    let mut net = Net::new();
    let lb = net.add(1, "lb-1", "load-balancer", None, true);
    let a = net.add(2, "media-a", "media-processor", Some("lb-1"), true);
    assert_eq!(net.pool_names(lb), vec!["media-a"]);
    net.ctl.reject(&a.to_string(), net.now).unwrap();
    net.pump();
    assert_eq!(net.pool_names(lb), Vec::<String>::new());
    // Coming back, even with the join token: refused.
    net.connect(a);
    let (_, outs) = net.ctl.take();
    assert!(outs.is_empty(), "already delivered by pump");
    assert_eq!(net.workers[&a].core.standing(), Standing::Rejected);
    assert_eq!(net.ctl.rejected_fingerprints(), vec![net.workers[&a].fp]);
}

#[test]
fn a_replayed_or_older_deployment_is_never_run() {
    use super::body::{Body, DeployOrder};
    use crate::wire::Admission;
    let key = ControllerKey::generate();
    let seal = SealKey::generate();
    let recipient = seal.recipient();
    let me = NodeId(9);
    let info = JoinInfo {
        node_id: me,
        name: "media-9".into(),
        service: "voice".into(),
        component: "media-processor".into(),
        load_balancer: None,
        service_addr: None,
        relay_addr: None,
        token_proof: None,
    };
    let mut w = WorkerCore::open(info, seal, WorkerRecord::default()).unwrap();
    w.from_controller(Message::Admission(Admission::Admitted {
        controller_key: key.public(),
        heartbeat_ms: 250,
    }))
    .unwrap();
    let order = |deployment: u64| DeployOrder {
        deployment,
        bundle_id: "ab".repeat(32),
        service: "voice".into(),
        version: "1".into(),
        sealed_bytes: 10,
        sealed_hash: [7; 32],
    };
    let publish = |seq: u64, d: u64| {
        key.publication(me, seq, &recipient, &Body::Deploy(order(d)).encode())
            .unwrap()
    };
    let deploys = |outs: &[WorkerOutput]| {
        outs.iter()
            .filter(|o| matches!(o, WorkerOutput::Apply(Effect::Deploy(_))))
            .count()
    };
    let first = publish(1, 5);
    w.from_controller(Message::Publication(first.clone()))
        .unwrap();
    let (rec, outs) = w.take();
    assert_eq!(deploys(&outs), 1);
    assert_eq!(rec.unwrap().deploy, Some(order(5)));
    w.deployed(
        5,
        MachineReport {
            state: "running".into(),
            software: None,
            detail: None,
            deployment: Some(5),
        },
    );
    let _ = w.take();
    // The same publication again (a replay on the wire): acknowledged, not run.
    w.from_controller(Message::Publication(first)).unwrap();
    let (rec, outs) = w.take();
    assert!(rec.is_none(), "a replay changes nothing stored");
    assert_eq!(deploys(&outs), 0);
    assert!(
        outs.contains(&WorkerOutput::ToController(Message::PublicationAck {
            upto: 1
        }))
    );
    // An older deployment under a new sequence (a controller restored from an old backup):
    // consumed in order, never run.
    for (seq, d) in [(2, 5), (3, 4)] {
        w.from_controller(Message::Publication(publish(seq, d)))
            .unwrap();
        let (rec, outs) = w.take();
        assert_eq!(deploys(&outs), 0, "deployment {d} ran again");
        let rec = rec.unwrap();
        assert_eq!(rec.applied, seq);
        assert_eq!(rec.deploy, None);
        assert_eq!(rec.last_deployment, 5);
    }
    // A newer one runs.
    w.from_controller(Message::Publication(publish(4, 6)))
        .unwrap();
    let (_, outs) = w.take();
    assert_eq!(deploys(&outs), 1);
}
