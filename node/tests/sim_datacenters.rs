//! Deterministic simulation of 3 to 5 datacenters' replication state machines in one process,
//! over a seeded network that loses, duplicates, delays (so reorders) and partitions, with
//! crash-restarts, against the in-memory storage model. After each run every link is healed,
//! every node restarted, and the network drained; then invariants 1-4 of design.md are checked.
//!
//! `OUTPOST_SIM_SEEDS=N` runs N seeds (default 500); `OUTPOST_SIM_SEED=S` replays one seed.
//! A failure prints its seed.

use std::collections::{BTreeMap, BTreeSet};

use outpost::ids::{MsgId, NodeId};
use outpost::model::{Event, RawEvent};
use outpost::replication::core::{goes_to, resume_point};
use outpost::replication::link::{LinkLimits, Outbound};
use outpost::replication::mem::MemStore;
use outpost::replication::{digest, Core, LogRead, MsgKey, MsgRecord, Tables};
use outpost::wire::{CatchUpRequest, Elements, Message};
use serde_json::json;

/// splitmix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

struct SimNode {
    id: NodeId,
    store: MemStore,
    /// Volatile: lost on crash.
    core: Option<Core>,
    links: BTreeMap<NodeId, Outbound>,
    /// Each peer's log epoch, from its last Hello.
    peer_epochs: BTreeMap<NodeId, u64>,
    /// Peers whose Hello has not reached us since we started (we keep saying Hello to them).
    hello_pending: BTreeSet<NodeId>,
    /// An earlier copy of the store, taken while running, to restore from.
    backup: Option<MemStore>,
    /// Restored and not yet caught up with its own log: per peer, the catch-up request in
    /// progress (None once that peer said it has no more). Durable, like the store's flag.
    restoring: Option<BTreeMap<NodeId, Option<CatchUpRequest>>>,
}

struct Packet {
    from: NodeId,
    to: NodeId,
    msg: Message,
    /// A Hello that asks for the receiver's Hello back.
    want_reply: bool,
}

struct Faults {
    loss: u64,
    dup: u64,
    delay_max_ms: u64,
    crash: u64,
    partition: u64,
    backup: u64,
    restore: u64,
}

struct Sim {
    rng: Rng,
    now_ms: u64,
    nodes: Vec<SimNode>,
    net: BTreeMap<(u64, u64), Packet>,
    packet_seq: u64,
    cut: BTreeSet<(NodeId, NodeId)>,
    limits: LinkLimits,
    /// Every acknowledged event: message id -> origin.
    /// Acknowledged messages, and where their records are.
    acked: BTreeMap<MsgId, MsgKey>,
    faults: Faults,
    restores: u64,
    /// Acknowledged events that a restore may have lost.
    maybe_lost: BTreeSet<MsgId>,
}

const T0_MS: u64 = 1_700_000_000_000;

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let n = 3 + rng.below(3) as usize;
        let nodes = (0..n)
            .map(|i| {
                let id = NodeId(((rng.next() as u128) << 64) | rng.next() as u128);
                let store = MemStore::new(1 + i as u64 * 1000 + rng.below(1000));
                SimNode {
                    id,
                    store,
                    core: None,
                    links: BTreeMap::new(),
                    peer_epochs: BTreeMap::new(),
                    hello_pending: BTreeSet::new(),
                    backup: None,
                    restoring: None,
                }
            })
            .collect();
        let faults = Faults {
            loss: rng.below(150),
            dup: rng.below(150),
            delay_max_ms: 1 + rng.below(40),
            crash: rng.below(8),
            partition: rng.below(10),
            // A third of the seeds back up and restore nodes.
            backup: if seed % 3 == 0 { 2 + rng.below(6) } else { 0 },
            restore: if seed % 3 == 0 { 1 + rng.below(3) } else { 0 },
        };
        let limits = LinkLimits {
            batch_max: 1 + rng.below(16) as usize,
            in_flight_max: 4 + rng.below(64),
            retransmit_ms: 50 + rng.below(200),
        };
        let mut sim = Sim {
            rng,
            now_ms: T0_MS,
            nodes,
            net: BTreeMap::new(),
            packet_seq: 0,
            cut: BTreeSet::new(),
            limits,
            acked: BTreeMap::new(),
            faults,
            restores: 0,
            maybe_lost: BTreeSet::new(),
        };
        for i in 0..n {
            sim.start(i);
        }
        sim
    }

    fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn index(&self, id: NodeId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .expect("known node")
    }

    /// Boot (or reboot) node i from what its storage holds, and say Hello to every peer.
    fn start(&mut self, i: usize) {
        let ids = self.ids();
        let node = &mut self.nodes[i];
        let core = Core::open(node.id, "dc", &node.store).unwrap();
        // Links start when the peer's Hello arrives, as a QUIC session does.
        node.links.clear();
        node.core = Some(core);
        node.hello_pending = ids.iter().copied().filter(|&p| p != node.id).collect();
        self.say_hello(i);
    }

    /// Hello to every peer we have not heard from since starting. Over QUIC a connection begins
    /// with this exchange; here it is repeated until answered, since packets get lost.
    fn say_hello(&mut self, i: usize) {
        let node = &self.nodes[i];
        let Some(core) = node.core.as_ref() else {
            return;
        };
        let hellos: Vec<(NodeId, Message)> = node
            .hello_pending
            .iter()
            .map(|&p| (p, Message::Hello(core.hello(&node.store, Some(p)).unwrap())))
            .collect();
        let from = node.id;
        for (to, msg) in hellos {
            self.send_packet(from, to, msg, true);
        }
    }

    /// Keeps asking every peer for our own log while restoring.
    fn ask_own_log(&mut self, i: usize) {
        let node = &self.nodes[i];
        if node.core.is_none() {
            return;
        }
        let asks: Vec<(NodeId, CatchUpRequest)> = node
            .restoring
            .iter()
            .flatten()
            .filter_map(|(p, r)| r.clone().map(|r| (*p, r)))
            .collect();
        let from = node.id;
        for (to, req) in asks {
            self.send(from, to, Message::CatchUpRequest(req));
        }
    }

    /// Takes a backup of node i, as `outpost backup` would: a consistent copy of its store.
    fn backup(&mut self, i: usize) {
        if self.nodes[i].core.is_some() && self.nodes[i].restoring.is_none() {
            self.nodes[i].backup = Some(self.nodes[i].store.clone());
        }
    }

    /// Replaces node i's store with its backup (a new log epoch, marked restored) and boots it.
    fn restore(&mut self, i: usize) {
        let Some(mut b) = self.nodes[i].backup.clone() else {
            return;
        };
        b.epoch = self.rng.next() | 1;
        // Events that only this node held (acknowledged here after the backup and never sent,
        // or whose other holders were themselves restored) are lost by the restore itself: the
        // operator went back in time. Everything else must survive it.
        let me = self.nodes[i].id;
        let lost: Vec<MsgId> = self
            .acked
            .iter()
            .filter(|(id, key)| {
                held(&b, **key, id).is_none()
                    && self
                        .nodes
                        .iter()
                        .all(|n| n.id == me || held(&n.store, **key, id).is_none())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.acked.remove(&id);
            // It may come back: another node's backup can still hold it.
            self.maybe_lost.insert(id);
        }
        // A restore happens on a stopped node: what its old process had in flight is gone by
        // the time the restored one starts (a dead QUIC connection delivers nothing later).
        self.net.retain(|_, p| p.from != me);
        let ids = self.ids();
        let node = &mut self.nodes[i];
        let me = node.id;
        node.store = b;
        node.restoring = Some(
            ids.into_iter()
                .filter(|&p| p != me)
                .map(|p| (p, None))
                .collect(),
        );
        // Until a peer's Hello says what it holds of our log, that peer is not done.
        for v in node.restoring.as_mut().unwrap().values_mut() {
            *v = Some(CatchUpRequest {
                origin: me,
                after_oseq: u64::MAX,
                max: 0,
            });
        }
        self.restores += 1;
        self.crash(i);
        self.start(i);
    }

    fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.core = None;
        node.links.clear();
        node.peer_epochs.clear();
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Message) {
        self.send_packet(from, to, msg, false);
    }

    fn send_packet(&mut self, from: NodeId, to: NodeId, msg: Message, want_reply: bool) {
        if self.rng.chance(self.faults.loss) {
            return;
        }
        let copies = if self.rng.chance(self.faults.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now_ms + 1 + self.rng.below(self.faults.delay_max_ms);
            self.packet_seq += 1;
            self.net.insert(
                (at, self.packet_seq),
                Packet {
                    from,
                    to,
                    msg: msg.clone(),
                    want_reply,
                },
            );
        }
    }

    fn ingest_random(&mut self) {
        let i = self.rng.below(self.nodes.len() as u64) as usize;
        let account = format!("acct-{}", self.rng.below(6));
        let k = self.rng.below(4);
        let (t, data) = match self.rng.below(5) {
            0 => (
                "register",
                json!({"contact": format!("sip:{k}@10.0.0.{k}"), "expires_s": self.rng.below(3) * 3600}),
            ),
            1 => (
                "call",
                json!({"call_id": format!("c{k}"), "action": if self.rng.chance(500) {"start"} else {"end"}}),
            ),
            2 => ("presence", json!({"status": format!("s{k}")})),
            3 => (
                "setting",
                json!({"key": format!("k{k}"), "value": if self.rng.chance(200) { serde_json::Value::Null } else { json!(k) }}),
            ),
            _ => ("element", json!({"n": self.rng.below(100)})),
        };
        let ev = Event::from_raw(RawEvent {
            account,
            etype: t.into(),
            data,
        })
        .unwrap();
        let now = self.now_ms;
        let node = &mut self.nodes[i];
        let Some(core) = node.core.as_mut() else {
            return; // down: the client's request fails, nothing is acknowledged
        };
        if node.restoring.is_some() {
            return; // restored, own log not recovered yet: ingest answers 503
        }
        let got = core.ingest(&mut node.store, now, &ev).unwrap();
        // Commit is instant in the model, so this is the acknowledgement.
        self.acked
            .insert(got.msg_id, MsgKey::new(node.id, got.oseq, &got.msg_id));
    }

    fn pump_senders(&mut self) {
        let now = self.now_ms;
        let mut out = Vec::new();
        for node in &mut self.nodes {
            if node.core.is_none() {
                continue;
            }
            let tail = LogRead::log_tail(&node.store).unwrap();
            let epoch = LogRead::log_epoch(&node.store).unwrap();
            for (&peer, link) in node.links.iter_mut() {
                link.on_tick(now);
                while let Some((after, upto)) = link.next_range(tail) {
                    let items: Vec<_> = node
                        .store
                        .log_range(after, (upto - after) as usize)
                        .unwrap()
                        .into_iter()
                        .filter(|(_, r)| {
                            let senders = held(&node.store, MsgKey::of(r), &r.msg_id);
                            goes_to(peer, r, senders.map(|m| m.senders.as_slice()))
                        })
                        .collect();
                    out.push((
                        node.id,
                        peer,
                        Message::Elements(Elements {
                            epoch,
                            after,
                            upto,
                            items,
                        }),
                    ));
                    link.on_sent(upto, now);
                }
            }
        }
        for (from, to, msg) in out {
            self.send(from, to, msg);
        }
    }

    fn deliver(&mut self, p: Packet) {
        if self.cut.contains(&(p.from, p.to)) || self.cut.contains(&(p.to, p.from)) {
            return;
        }
        let now = self.now_ms;
        let i = self.index(p.to);
        let node = &mut self.nodes[i];
        let Some(core) = node.core.as_mut() else {
            return;
        };
        let reply = match p.msg {
            Message::Hello(h) => {
                let tail = Tables::log_tail(&node.store).unwrap();
                let epoch = Tables::log_epoch(&node.store).unwrap();
                let stored = node.store.peer(p.from).unwrap();
                let from = resume_point(&stored, epoch, &h, tail);
                node.links
                    .insert(p.from, Outbound::new(self.limits, from, now));
                node.hello_pending.remove(&p.from);
                node.peer_epochs.insert(p.from, h.log_epoch);
                let mut out = Vec::new();
                if let Some(pending) = node.restoring.as_mut() {
                    let own = node.store.mark(node.id).unwrap();
                    let ask = core.own_log_request(&own, &h);
                    if pending
                        .get(&p.from)
                        .is_some_and(|r| r.as_ref().is_some_and(|r| r.max == 0))
                    {
                        pending.insert(p.from, ask.clone());
                    }
                    if let Some(req) = ask {
                        out.push(Message::CatchUpRequest(req));
                    }
                    if pending.values().all(Option::is_none) {
                        node.restoring = None;
                    }
                }
                if p.want_reply {
                    out.push(Message::Hello(
                        core.hello(&node.store, Some(p.from)).unwrap(),
                    ));
                }
                let me = node.id;
                for m in out {
                    self.send(me, p.from, m);
                }
                return;
            }
            Message::CatchUpRequest(req) => Some(Message::CatchUpBatch(
                Core::answer_catch_up(&node.store, &req).unwrap(),
            )),
            Message::CatchUpBatch(batch) => {
                let els = Core::check_catch_up(&batch).expect("honest peers send valid batches");
                let next = core
                    .apply_catch_up(&mut node.store, now, p.from, &batch, &els)
                    .unwrap();
                if let Some(pending) = node.restoring.as_mut() {
                    if pending
                        .get(&p.from)
                        .is_some_and(|r| r.as_ref().is_some_and(|r| r.max != 0))
                    {
                        pending.insert(p.from, next.clone());
                    }
                    if pending.values().all(Option::is_none) {
                        node.restoring = None;
                    }
                }
                next.map(Message::CatchUpRequest)
            }
            Message::Elements(frame) => {
                let els = Core::check_elements(&frame).expect("honest peers send valid frames");
                let got = core
                    .receive(&mut node.store, now, p.from, &frame, &els)
                    .unwrap();
                Some(Message::Ack {
                    epoch: frame.epoch,
                    upto: got.ack,
                })
            }
            Message::Ack { epoch, upto } => {
                let peer_epoch = node.peer_epochs.get(&p.from).copied().unwrap_or(0);
                core.acked(&mut node.store, p.from, epoch, upto, peer_epoch)
                    .unwrap();
                if epoch == Tables::log_epoch(&node.store).unwrap() {
                    if let Some(l) = node.links.get_mut(&p.from) {
                        l.on_ack(upto, now);
                    }
                }
                None
            }
            other => panic!("unexpected message in simulation: {other:?}"),
        };
        if let Some(r) = reply {
            let from = node.id;
            self.send(from, p.from, r);
        }
    }

    fn step(&mut self, faults_on: bool, events_on: bool) {
        self.now_ms += 1 + self.rng.below(5);
        if events_on && self.rng.chance(300) {
            self.ingest_random();
        }
        if faults_on {
            let n = self.nodes.len() as u64;
            if self.rng.chance(self.faults.crash) {
                let i = self.rng.below(n) as usize;
                if self.nodes[i].core.is_some() {
                    self.crash(i);
                } else {
                    self.start(i);
                }
            }
            if self.rng.chance(self.faults.backup) {
                let i = self.rng.below(n) as usize;
                self.backup(i);
            }
            if self.rng.chance(self.faults.restore) {
                let i = self.rng.below(n) as usize;
                self.restore(i);
            }
            if self.rng.chance(self.faults.partition) {
                let a = self.nodes[self.rng.below(n) as usize].id;
                let b = self.nodes[self.rng.below(n) as usize].id;
                if a != b {
                    let key = (a.min(b), a.max(b));
                    if !self.cut.remove(&key) {
                        self.cut.insert(key);
                    }
                }
            }
        }
        if self.now_ms % 100 < 5 {
            for i in 0..self.nodes.len() {
                self.say_hello(i);
                self.ask_own_log(i);
            }
        }
        self.pump_senders();
        let due: Vec<(u64, u64)> = self
            .net
            .range(..(self.now_ms + 1, 0))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            let p = self.net.remove(&k).unwrap();
            self.deliver(p);
        }
    }

    fn quiescent(&self) -> bool {
        self.net.is_empty()
            && self
                .nodes
                .iter()
                .all(|n| n.restoring.is_none() && n.hello_pending.is_empty())
            && self.nodes.iter().all(|n| {
                let tail = LogRead::log_tail(&n.store).unwrap();
                n.links.len() == self.nodes.len() - 1 && n.links.values().all(|l| l.acked() == tail)
            })
    }

    fn heal(&mut self) {
        self.cut.clear();
        self.faults.loss = 0;
        self.faults.dup = 0;
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                self.start(i);
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        let n = self.nodes.len();
        // Invariant 2: convergence.
        let digests: Vec<(String, u64)> =
            self.nodes.iter().map(|x| digest(x.store.state())).collect();
        if digests.iter().any(|d| *d != digests[0]) {
            let mut diff = String::new();
            for (k, e) in &self.nodes[0].store.entries {
                for n in &self.nodes[1..] {
                    if n.store.entries.get(k) != Some(e) {
                        diff += &format!(
                            "\n  {k:?}: {:?} {:?} {} | {:?} {:?} {}",
                            self.nodes[0].id,
                            e.version,
                            String::from_utf8_lossy(&e.element),
                            n.id,
                            n.store.entries.get(k).map(|x| x.version),
                            n.store
                                .entries
                                .get(k)
                                .map(|x| String::from_utf8_lossy(&x.element).into_owned())
                                .unwrap_or_default()
                        );
                    }
                }
            }
            return Err(format!("digests differ: {digests:?}{diff}"));
        }
        for node in &self.nodes {
            // Invariant 1: every acknowledged event is everywhere.
            for (id, key) in &self.acked {
                let origin = &key.origin;
                let Some(m) = held(&node.store, *key, id) else {
                    let holders: Vec<_> = self
                        .nodes
                        .iter()
                        .filter(|n| held(&n.store, *key, id).is_some())
                        .map(|n| n.id)
                        .collect();
                    let oseqs: Vec<_> = self
                        .nodes
                        .iter()
                        .map(|n| {
                            (
                                n.id,
                                n.store
                                    .marks
                                    .get(origin)
                                    .map(|m| (m.contiguous, m.above.len())),
                            )
                        })
                        .collect();
                    return Err(format!(
                        "{:?} lacks acknowledged {id:?} from {origin:?}; held by {holders:?}; marks of origin {oseqs:?}",
                        node.id
                    ));
                };
                // Invariant 4: counted once per distinct sender; n-1 away from the origin.
                let distinct: BTreeSet<_> = m.senders.iter().collect();
                if distinct.len() != m.senders.len() {
                    return Err(format!("{:?} counted a sender twice for {id:?}", node.id));
                }
                let want = if *origin == node.id { 0 } else { n - 1 };
                if m.senders.len() != want {
                    return Err(format!(
                        "{:?}: {id:?} from {origin:?} has count {} (senders {:?}), want {want}",
                        node.id,
                        m.senders.len(),
                        m.senders
                    ));
                }
            }
            // Invariant 3 and "a later copy never re-applies or re-relays": each message is
            // logged (applied and relayed) exactly once at every node, with the origin's bytes.
            let mut seen = BTreeSet::new();
            for rec in node.store.log.values() {
                if !seen.insert(rec.msg_id) {
                    return Err(format!("{:?} logged {:?} twice", node.id, rec.msg_id));
                }
                if rec.expected_id() != rec.msg_id {
                    return Err(format!("{:?} holds an altered element", node.id));
                }
            }
            if let Some(extra) = seen
                .iter()
                .find(|id| !self.acked.contains_key(id) && !self.maybe_lost.contains(id))
            {
                return Err(format!(
                    "{:?} logged {extra:?}, never acknowledged",
                    node.id
                ));
            }
        }
        Ok(())
    }
}

/// The record of message `id` at `store`, found where its key says.
fn held<'a>(store: &'a MemStore, key: MsgKey, id: &MsgId) -> Option<&'a MsgRecord> {
    store.messages.get(&key).filter(|m| m.msg_id == *id)
}

fn run_seed(seed: u64) -> Result<(u64, u64), String> {
    let mut sim = Sim::new(seed);
    let steps = 1500 + sim.rng.below(1500);
    for _ in 0..steps {
        sim.step(true, true);
    }
    sim.heal();
    let mut drain = 0;
    while !sim.quiescent() {
        sim.step(false, false);
        drain += 1;
        if drain > 200_000 {
            let mut why = String::new();
            for n in &sim.nodes {
                let tail = LogRead::log_tail(&n.store).unwrap();
                why += &format!(
                    "\n  {:?}: up {} tail {tail} restoring {:?} hello_pending {:?} links {:?}",
                    n.id,
                    n.core.is_some(),
                    n.restoring,
                    n.hello_pending,
                    n.links
                        .iter()
                        .map(|(p, l)| (*p, l.acked(), l.sent()))
                        .collect::<Vec<_>>()
                );
            }
            return Err(format!(
                "did not converge after healing; in flight {}{why}",
                sim.net.len()
            ));
        }
    }
    sim.check()?;
    Ok((sim.acked.len() as u64, sim.restores))
}

#[test]
fn simulated_datacenters_keep_invariants_1_to_4() {
    let seeds: Vec<u64> = match std::env::var("OUTPOST_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("OUTPOST_SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("OUTPOST_SIM_SEEDS")
                .ok()
                .map(|s| s.parse().expect("OUTPOST_SIM_SEEDS is a number"))
                .unwrap_or(500);
            (0..n).map(|i| 0x5eed_0000 + i).collect()
        }
    };
    let mut events = 0;
    let mut restores = 0;
    for &seed in &seeds {
        match run_seed(seed) {
            Ok((e, r)) => {
                events += e;
                restores += r;
            }
            Err(why) => panic!(
                "seed {seed} failed: {why}\nreplay: OUTPOST_SIM_SEED={seed} cargo test -p outpost --test sim_datacenters"
            ),
        }
    }
    assert!(
        events > seeds.len() as u64,
        "the simulation ingested almost nothing"
    );
    eprintln!(
        "{} seeds, {events} acknowledged events, {restores} restores",
        seeds.len()
    );
}

/// The simulation must be able to fail: a node that applies without counting breaks it.
#[test]
fn simulation_detects_a_lost_element() {
    let mut sim = Sim::new(42);
    for _ in 0..500 {
        sim.step(false, true);
    }
    sim.heal();
    while !sim.quiescent() {
        sim.step(false, false);
    }
    sim.check().unwrap();
    // Lose one message at one node behind the protocol's back.
    let key = *sim.acked.values().next().unwrap();
    sim.nodes[1].store.messages.remove(&key);
    assert!(sim.check().is_err());
}
