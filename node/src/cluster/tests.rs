//! The two cores together, by hand: one controller, one load balancer, two dependents, messages
//! passed directly (the simulation in `tests/sim_cluster.rs` adds faults and seeds).

use std::collections::BTreeMap;

use super::body::Pool;
use super::controller::core::{ControllerCore, KeyStatus, Output, Settings};
use super::keys::{token_proof, ControllerKey, SealKey};
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
        let ctl = ControllerCore::open(settings, ControllerKey::generate(), vec![], vec![], 0);
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
        self.ctl.joined(conn, fp, join, self.now);
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
                        WorkerOutput::Apply(Effect::Route(_) | Effect::Deploy(_)) => {}
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
