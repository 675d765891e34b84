//! Deterministic simulation of a cluster in one process: one controller core, one load
//! balancer's worker core, 2 to 4 dependents behind it and sometimes a worker without a load
//! balancer, over simulated connections (reliable, ordered, cut at any moment with everything
//! in flight lost), with the load balancer's relay path, crash-restarts of any node from what it
//! committed, frozen machines, operators accepting keys, and a load balancer that sometimes
//! alters what it relays. Time is simulated; every collection is ordered, so a seed replays
//! exactly (the controller core's sealer, age, draws its own randomness from the OS, but
//! nothing here depends on the ciphertext).
//!
//! The harness drives the cores the way their runtimes must: feed an input, `take`, commit the
//! records to the simulated disk (exactly as `store::cluster` does), and only then perform the
//! outputs; a crash may come between the commit and the last output.
//!
//! Checked while running: (a) every worker applies its channel exactly once and in order (a
//! publication is accepted only as `applied + 1`, only if it is the one the controller
//! committed under that sequence, and the committed `applied` never goes back); (e) nothing is
//! published to, relayed for, or accepted from a machine before it is admitted, and an ack
//! never runs ahead of the committed record. Checked after healing and letting time pass: (b)
//! every running worker applied its whole channel and the controller holds nothing unacked for
//! it; (c) the load balancer's pool is exactly the running dependents, as the controller last
//! published it, and its pool file says the same; (d) every worker's last report is the one the
//! controller recorded, under the same sequence; (f) configuration data: an operator sets
//! and deletes documents of random scopes while all of the above happens; a worker is handed
//! configuration versions in order (never an older one than it applied), and once healed every
//! running worker applied exactly its effective configuration as computed here from what the
//! operator set, under the version the controller last sent it, and the controller recorded it
//! applied; (g) coupling: in half the seeds with a call router, it names lb-1 as its dedicated
//! load balancer; once healed it holds lb-1's endpoint (up), lb-1 holds it as its router, the
//! controller recorded both, and the files their software reads say the same (a router never
//! coupled holds nothing); (h) rollouts: in two thirds of the seeds an operator deploys to
//! every admitted machine once or twice while the faults run, in waves (counts, percentages or
//! `max_parallel`), with a random healthy-for gate and drain, stepped by the production
//! decision (`deploy::step_rollout`, `rollout::plan`) and persisted with the commits; once
//! healed the newest rollout is done (unless a stopped machine holds its wave), every target
//! not stopped ran it, an older one is done or halted as superseded, waves started in order,
//! and no machine is left drained out of its pool.
//!
//! `OUTPOST_SIM_CLUSTER_SEEDS=N` runs N seeds (default 800, about 10 s);
//! `OUTPOST_SIM_CLUSTER_SEED=S` replays one. A failure prints its seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use outpost::cluster::body::{
    Body, ConfigOrder, DeployOrder, LbEndpoint, LbRoute, Pool, RouterPeer,
};
use outpost::cluster::controller::configdata::{self, Scope};
use outpost::cluster::controller::core::{
    ConnId, ControllerCore, CoreEvent, Dirty, KeyActionError, KeyStatus, MachineRecord,
    NotPublished, Output, Peer, Settings,
};
use outpost::cluster::controller::deploy::{DeployCore, DeployEvent, NewDeployment, SealJob};
use outpost::cluster::controller::rollout::{RolloutSpec, RolloutState, WaveSize};
use outpost::cluster::controller::storage::{ClusterStore, CommitFault, MemClusterStore};
use outpost::cluster::keys::{
    publication_digest, token_proof, AgeSealer, ControllerKey, ControllerVerifier, KeyError,
    SealKey, Sealer,
};
use outpost::cluster::worker::core::{
    Effect, JoinInfo, Standing, WorkerCore, WorkerOutput, WorkerRecord, WorkerRefusal,
};
use outpost::cluster::worker::lifecycle::{
    Boot, Command as LifeCommand, Lifecycle, RolledBack, Switched,
};
use outpost::cluster::worker::pool_file;
use outpost::ids::{Fingerprint, NodeId};
use outpost::wire::{
    Admission, ConfigReport, Join, JoinRefusal, MachineReport, Message, Notify, Publication,
    Software,
};
use serde_json::{json, Value};

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
        self.next() % n.max(1)
    }
    /// In `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn bytes32(&mut self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for chunk in b.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        b
    }
}

const T0_MS: u64 = 1_700_000_000_000;
const TOKEN: &[u8] = b"sim join token";
const DEPENDENT_COMPONENTS: [&str; 5] = [
    "media-processor",
    "routing",
    "call-queue",
    "resource-db",
    "proxy",
];
const STATES: [&str; 5] = ["idle", "starting", "running", "rolled_back", "failed"];

struct Ctrl {
    settings: Settings,
    key_secret: Vec<u8>,
    core: Option<ControllerCore>,
    /// The production storage trait's in-memory implementation: what `store::cluster` keeps.
    disk: MemClusterStore,
    restart_at: u64,
    next_tick: u64,
    /// The production deployments core (`DeployCore`), rebuilt from the store at a restart.
    deploy: DeployCore,
    /// The seal worker's queue: jobs handed over after their commit, sealed one target after
    /// another (in memory: lost in a crash, queued again by `DeployCore::reload`).
    sealing: VecDeque<(u64, SealJob)>,
    /// Deployments created (committed) by the operator.
    deployments_made: u64,
    /// A slow commit holds the core thread until then: it takes no input and performs the
    /// batch's outputs (these) only once it is over.
    stalled_until: u64,
    stalled_outputs: Vec<Output>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    LoadBalancer,
    Dependent,
    /// No load balancer in front of it.
    Standalone,
}

struct Worker {
    kind: Kind,
    info: JoinInfo,
    fingerprint: Fingerprint,
    /// Stored at first boot; survives crashes.
    seal_secret: Vec<u8>,
    recipient: String,
    core: Option<WorkerCore>,
    /// The last committed record.
    disk: WorkerRecord,
    conn: Option<ConnId>,
    reconnect_at: u64,
    next_heartbeat: u64,
    restart_at: u64,
    /// Frozen (SIGSTOP) until then: receives nothing, sends nothing.
    frozen_until: u64,
    /// Down for good (the final phase).
    stopped: bool,
    /// Effects as performed: where it dials its load balancer (in memory), its pool file (on
    /// disk).
    route: Option<LbRoute>,
    pool_file: Option<Pool>,
    /// The file its software reads (`pool_file::document`), as last written.
    doc_file: Option<Value>,
    relay_retry_at: u64,
    /// A configuration being applied by its software (in memory: lost in a crash), and when
    /// it is done.
    config_due: Option<(u64, ConfigOrder)>,
    /// The production software lifecycle core (in memory: rebuilt at a restart from what is
    /// installed), the results of its commands in flight (lost in a crash), and what the
    /// simulated installer keeps on disk (the `current` and `previous` software).
    life: Option<Lifecycle>,
    life_due: Vec<(u64, LifeDone)>,
    installed: Installed,
    /// The newest configuration version handed to its software.
    config_seen: u64,
}

impl Worker {
    fn id(&self) -> NodeId {
        self.info.node_id
    }
    fn name(&self) -> &str {
        &self.info.name
    }
}

/// The simulated installer's disk: what `current` and `previous` point at.
#[derive(Clone, Debug, Default)]
struct Installed {
    current: Option<Software>,
    previous: Option<Software>,
}

/// A lifecycle command's result, due at a time.
#[derive(Clone, Debug)]
enum LifeDone {
    Fetched(u64, Result<(), String>),
    Installed(u64, Result<Software, String>),
    Switched(u64, Switched),
    RolledBack(u64, RolledBack),
    Restarted(Result<(), String>),
}

enum ToCtrl {
    Join(Join),
    Frame(Message),
}

enum ToWorker {
    Frame(Box<Message>),
    Close,
}

/// One QUIC connection from a worker to the controller: a stream each way.
struct Conn {
    worker: usize,
    /// The controller still reads it (false after it closed it).
    ctrl_open: bool,
    to_ctrl: VecDeque<(u64, ToCtrl)>,
    to_worker: VecDeque<(u64, ToWorker)>,
    due_ctrl: u64,
    due_worker: u64,
    /// The worker gave up on it (and dialled again) while the controller still holds it
    /// open, until an idle timeout at this time: what it sent is still delivered.
    abandoned_until: Option<u64>,
}

/// A dependent's connection to its load balancer, carrying relayed publications.
struct RelayLink {
    lb: usize,
    /// (due, publication, altered by the load balancer)
    queue: VecDeque<(u64, Publication, bool)>,
    due: u64,
}

#[derive(Clone, Debug)]
struct Faults {
    cut: u64,
    cut_relay: u64,
    crash_ctrl: u64,
    crash_worker: u64,
    freeze: u64,
    /// Crash between the commit and the last output.
    crash_mid: u64,
    /// The load balancer alters a relayed publication.
    tamper: u64,
    /// A worker gives up on a connection the controller still holds.
    abandon: u64,
    /// An operator rejects an admitted key (and accepts it again a little later; the
    /// controller once stranded such a machine at a gap in its channel: seed 3238330371).
    reject: u64,
    /// A worker restarts with another service (or relay) address.
    readdress: u64,
    latency_max: u64,
    /// A commit fails (the transaction aborts) / is slow (per mille of commits).
    commit_fail: u64,
    commit_slow: u64,
    /// Sealing a bundle for a target fails (per mille of targets).
    seal_fail: u64,
    /// Per mille of deployments on a worker: the fetch fails, the bundle is refused at
    /// install, the new software is not healthy (rolled back); per mille of steps: the
    /// running software dies.
    fetch_fail: u64,
    install_fail: u64,
    unhealthy: u64,
    death: u64,
}

#[derive(Debug, Default)]
struct Stats {
    applied: u64,
    applied_relayed: u64,
    hostile_refused: u64,
    crashes: u64,
    ctrl_crashes: u64,
    cuts: u64,
    accepts: u64,
    rejects: u64,
    pools: u64,
    downs: u64,
    stopped: u64,
    /// Configuration versions applied by workers, and their replays after a crash.
    configs_applied: u64,
    configs_replayed: u64,
    /// Deployment orders run by workers, and waves started.
    deploys_run: u64,
    waves: u64,
    /// Commits that failed (nothing applied, the controller rebuilt), commits that stalled the
    /// controller, targets whose sealing failed.
    failed_commits: u64,
    slow_commits: u64,
    seal_failures: u64,
    /// Deployment outcomes on workers, by final state, and software deaths.
    deploys_rolled_back: u64,
    deploys_failed: u64,
    deaths: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    faults: Faults,
    faults_on: bool,
    /// Deployments the operator creates in this seed.
    plan_rollouts: u64,
    ctrl: Ctrl,
    workers: Vec<Worker>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    relays: BTreeMap<usize, RelayLink>,
    /// Every publication the controller ever committed, by (machine, seq).
    published: BTreeMap<(NodeId, u64), Publication>,
    /// Machines the controller ever committed as admitted.
    ever_admitted: BTreeSet<NodeId>,
    /// Rejected by an operator, to be accepted again at that time.
    reaccept: BTreeMap<NodeId, u64>,
    /// What the operator set, by scope key (`None`: deleted), once committed.
    config_set: BTreeMap<String, Option<Value>>,
    config_changes: u64,
    violations: Vec<String>,
    stats: Stats,
}

/// The shape of a cluster.
struct Plan {
    dependents: usize,
    standalone: bool,
    /// The standalone call router names lb-1 as its dedicated load balancer.
    coupled: bool,
    /// How many deployments an operator creates while the faults run (0 to 2).
    rollouts: u64,
    /// Per worker: presents a valid join token (otherwise an operator accepts it).
    token: Vec<bool>,
    controller_has_token: bool,
    faults: Faults,
    down_after_ms: u64,
    resend_after_ms: u64,
}

impl Plan {
    fn random(rng: &mut Rng) -> Plan {
        let dependents = rng.between(2, 4) as usize;
        let standalone = rng.chance(500);
        let coupled = standalone && rng.chance(500);
        let rollouts = rng.below(3);
        let n = 1 + dependents + standalone as usize;
        // A third of the seeds admit by token only, a third by operator only, a third mixed.
        let mode = rng.below(3);
        let token: Vec<bool> = (0..n)
            .map(|_| match mode {
                0 => true,
                1 => false,
                _ => rng.chance(500),
            })
            .collect();
        let controller_has_token = mode != 1 || rng.chance(500);
        let faults = Faults {
            cut: rng.below(8),
            cut_relay: rng.below(10),
            crash_ctrl: rng.below(3),
            crash_worker: rng.below(6),
            freeze: rng.below(4),
            crash_mid: rng.below(40),
            tamper: if rng.chance(300) {
                rng.between(20, 200)
            } else {
                0
            },
            abandon: rng.below(5),
            reject: if rng.chance(300) {
                rng.between(1, 3)
            } else {
                0
            },
            readdress: rng.below(300),
            latency_max: rng.between(1, 40),
            commit_fail: rng.below(8),
            commit_slow: rng.below(60),
            seal_fail: if rng.chance(300) {
                rng.between(50, 300)
            } else {
                0
            },
            fetch_fail: rng.below(150),
            install_fail: rng.below(150),
            unhealthy: if rng.chance(500) {
                rng.between(100, 600)
            } else {
                0
            },
            death: rng.below(3),
        };
        let down_after_ms = rng.between(800, 3000);
        let resend_after_ms = rng.between(200, 1500);
        Plan {
            dependents,
            standalone,
            coupled,
            rollouts,
            token,
            controller_has_token,
            faults,
            down_after_ms,
            resend_after_ms,
        }
    }

    /// No faults, every worker with a token.
    fn calm(dependents: usize, standalone: bool) -> Plan {
        let n = 1 + dependents + standalone as usize;
        Plan {
            dependents,
            standalone,
            coupled: standalone,
            rollouts: 0,
            token: vec![true; n],
            controller_has_token: true,
            faults: Faults {
                cut: 0,
                cut_relay: 0,
                crash_ctrl: 0,
                crash_worker: 0,
                freeze: 0,
                crash_mid: 0,
                tamper: 0,
                abandon: 0,
                reject: 0,
                readdress: 0,
                latency_max: 5,
                commit_fail: 0,
                commit_slow: 0,
                seal_fail: 0,
                fetch_fail: 0,
                install_fail: 0,
                unhealthy: 0,
                death: 0,
            },
            down_after_ms: 2000,
            resend_after_ms: 500,
        }
    }
}

fn report(rng: &mut Rng) -> MachineReport {
    let state = STATES[rng.below(STATES.len() as u64) as usize];
    MachineReport {
        state: state.to_string(),
        software: rng.chance(600).then(|| Software {
            service: "voice".into(),
            bundle_id: format!("{:016x}", rng.next()),
            version: format!("1.{}.{}", rng.below(10), rng.below(10)),
        }),
        detail: (state != "running").then(|| format!("detail {}", rng.below(1000))),
        deployment: None,
    }
}

fn running_report() -> MachineReport {
    MachineReport {
        state: "running".into(),
        software: Some(Software {
            service: "voice".into(),
            bundle_id: "final".into(),
            version: "9.9.9".into(),
        }),
        detail: None,
        deployment: None,
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let plan = Plan::random(&mut rng);
        Sim::with_plan(seed, rng, plan)
    }

    fn with_plan(seed: u64, mut rng: Rng, plan: Plan) -> Sim {
        let mut settings = Settings::new(plan.down_after_ms);
        settings.resend_after_ms = plan.resend_after_ms;
        settings.pending_max = 16;
        settings.join_token = plan.controller_has_token.then(|| TOKEN.to_vec());
        let key_secret = rng.bytes32().to_vec();
        let mut workers = Vec::new();
        let lb_name = "lb-1".to_string();
        let n = 1 + plan.dependents + plan.standalone as usize;
        for i in 0..n {
            let kind = if i == 0 {
                Kind::LoadBalancer
            } else if i <= plan.dependents {
                Kind::Dependent
            } else {
                Kind::Standalone
            };
            let node_id = NodeId(((rng.next() as u128) << 64) | rng.next() as u128);
            let fingerprint = Fingerprint(rng.bytes32());
            let seal = SealKey::generate();
            let (name, component, load_balancer, relay_addr) = match kind {
                Kind::LoadBalancer => (
                    lb_name.clone(),
                    "load-balancer".to_string(),
                    None,
                    Some("10.0.0.1:7443".to_string()),
                ),
                Kind::Dependent => (
                    format!("dep-{i}"),
                    DEPENDENT_COMPONENTS[rng.below(5) as usize].to_string(),
                    Some(lb_name.clone()),
                    None,
                ),
                // Half the seeds couple it with lb-1.
                Kind::Standalone => (
                    "router-1".into(),
                    "call-router".into(),
                    plan.coupled.then(|| lb_name.clone()),
                    None,
                ),
            };
            let info = JoinInfo {
                node_id,
                name,
                service: "voice".into(),
                component,
                load_balancer,
                service_addr: Some(format!("10.0.0.{}:5060", i + 1)),
                relay_addr,
                token_proof: plan.token[i].then(|| token_proof(TOKEN, &fingerprint)),
            };
            workers.push(Worker {
                kind,
                info,
                fingerprint,
                seal_secret: seal.secret_bytes(),
                recipient: seal.recipient(),
                core: None,
                disk: WorkerRecord::default(),
                conn: None,
                reconnect_at: 0,
                next_heartbeat: 0,
                restart_at: 0,
                frozen_until: 0,
                stopped: false,
                route: None,
                pool_file: None,
                doc_file: None,
                relay_retry_at: 0,
                config_due: None,
                life: None,
                life_due: Vec::new(),
                installed: Installed::default(),
                config_seen: 0,
            });
        }
        let mut sim = Sim {
            seed,
            rng,
            now: T0_MS,
            faults: plan.faults,
            faults_on: true,
            plan_rollouts: plan.rollouts,
            ctrl: Ctrl {
                settings,
                key_secret,
                core: None,
                disk: MemClusterStore::default(),
                restart_at: 0,
                next_tick: 0,
                deploy: DeployCore::new(),
                sealing: VecDeque::new(),
                deployments_made: 0,
                stalled_until: 0,
                stalled_outputs: Vec::new(),
            },
            workers,
            conns: BTreeMap::new(),
            next_conn: 1,
            relays: BTreeMap::new(),
            published: BTreeMap::new(),
            ever_admitted: BTreeSet::new(),
            reaccept: BTreeMap::new(),
            config_set: BTreeMap::new(),
            config_changes: 0,
            violations: Vec::new(),
            stats: Stats::default(),
        };
        sim.start_ctrl();
        for i in 0..sim.workers.len() {
            // Workers boot at different moments.
            sim.workers[i].restart_at = T0_MS + sim.rng.below(500);
        }
        sim
    }

    fn fail(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations
                .push(format!("t={} ms: {what}", self.now - T0_MS));
        }
    }

    fn check_ok(&self) -> Result<(), String> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(self.violations.join("\n"))
        }
    }

    fn latency(&mut self) -> u64 {
        1 + self.rng.below(self.faults.latency_max)
    }

    fn worker_by_id(&self, id: NodeId) -> Option<usize> {
        self.workers.iter().position(|w| w.id() == id)
    }

    fn running(&self, i: usize) -> bool {
        let w = &self.workers[i];
        w.core.is_some() && w.frozen_until <= self.now
    }

    fn ctrl_record(&self, id: NodeId) -> Option<&MachineRecord> {
        self.ctrl
            .core
            .as_ref()
            .and_then(|c| c.machines().find(|m| m.node_id == id))
    }

    fn admitted_in_ctrl(&self, id: NodeId) -> bool {
        self.ctrl_record(id)
            .is_some_and(|m| m.key_status == KeyStatus::Admitted)
    }

    // ---- the controller ----

    fn start_ctrl(&mut self) {
        let key = ControllerKey::from_secret(&self.ctrl.key_secret).expect("32 bytes");
        let disk = &self.ctrl.disk;
        let loaded = disk.load().expect("the in-memory store loads");
        let core = ControllerCore::open(
            self.ctrl.settings.clone(),
            key,
            Box::new(AgeSealer),
            loaded.machines,
            loaded.publications,
            self.now,
        )
        .with_config(loaded.config);
        // What it rebuilt is what was committed (up to the fresh `last_seen`).
        let mut rebuilt: Vec<MachineRecord> = core.machines().cloned().collect();
        for m in &mut rebuilt {
            if let Some(d) = disk.machines.get(&m.node_id) {
                m.last_seen_ms = d.last_seen_ms;
            }
        }
        let stored: Vec<MachineRecord> = disk.machines.values().cloned().collect();
        let same = rebuilt == stored;
        let (n, m) = (core.unacked_len(), disk.publications.len());
        if !same {
            self.fail("the controller rebuilt other records than it committed".into());
        }
        if n != m {
            self.fail(format!(
                "the controller rebuilt {n} unacked publications from {m} stored"
            ));
        }
        // As `DeployBook::reload`: the rollouts not over and the targets neither sent nor
        // failed, from what was committed.
        self.ctrl.deploy = DeployCore::new();
        let jobs = self.ctrl.deploy.reload(&core, &self.ctrl.disk);
        self.ctrl.core = Some(core);
        self.ctrl.next_tick = self.now;
        self.ctrl.sealing.clear();
        self.queue_seal_jobs(jobs);
        self.deploy_events();
    }

    fn crash_ctrl(&mut self) {
        self.stats.ctrl_crashes += 1;
        self.ctrl.core = None;
        self.ctrl.deploy = DeployCore::new();
        self.ctrl.sealing.clear();
        // A crash between a (slow) commit and its outputs: the outputs are lost.
        self.ctrl.stalled_outputs.clear();
        self.ctrl.stalled_until = 0;
        self.ctrl.restart_at = self.now + self.rng.between(50, 3000);
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in ids {
            self.cut(c);
        }
    }

    /// take, commit, perform (a crash may come in between). A failed commit applies nothing
    /// and performs nothing: as the core thread does, every connection is closed and the core
    /// and the deployments are rebuilt from the store. A slow commit stalls the controller;
    /// its outputs wait for the end of the stall.
    fn ctrl_flush(&mut self) {
        loop {
            if self.ctrl_stalled() {
                return;
            }
            let Some(core) = self.ctrl.core.as_mut() else {
                return;
            };
            let (dirty, outs) = core.take();
            let deployments = self.ctrl.deploy.take_writes();
            if dirty.is_empty() && outs.is_empty() && deployments.is_empty() {
                let jobs = self.ctrl.deploy.after_commit(true);
                self.queue_seal_jobs(jobs);
                self.deploy_events();
                return;
            }
            self.check_dirty(&dirty);
            if self.faults_on && self.rng.chance(self.faults.commit_fail) {
                self.ctrl.disk.inject(CommitFault::Fail);
            } else if self.faults_on && self.rng.chance(self.faults.commit_slow) {
                let ms = self.rng.between(1, 400);
                self.ctrl.disk.inject(CommitFault::LatencyMs(ms));
            }
            if self.ctrl.disk.commit(&dirty, &deployments).is_err() {
                self.stats.failed_commits += 1;
                let nothing = self.ctrl.deploy.after_commit(false);
                assert!(nothing.is_empty(), "seal jobs after a failed commit");
                self.deploy_events();
                self.rebuild_ctrl();
                return;
            }
            for p in &dirty.publications {
                match self.published.get(&(p.machine, p.seq)) {
                    Some(q) if q != p => {
                        let what = format!(
                            "the controller committed a second, different publication {} of {:?}",
                            p.seq, p.machine
                        );
                        self.fail(what);
                    }
                    _ => {
                        self.published.insert((p.machine, p.seq), p.clone());
                    }
                }
            }
            let jobs = self.ctrl.deploy.after_commit(true);
            self.queue_seal_jobs(jobs);
            self.deploy_events();
            let latency = self.ctrl.disk.take_latency_ms();
            if latency > 0 {
                self.stats.slow_commits += 1;
                self.ctrl.stalled_until = self.now + latency;
                self.ctrl.stalled_outputs = outs;
                return;
            }
            if !self.ctrl_perform_all(outs) {
                return;
            }
        }
    }

    /// Performs a committed batch's outputs; a crash may come before any of them (false).
    fn ctrl_perform_all(&mut self, outs: Vec<Output>) -> bool {
        let crash_at =
            (self.faults_on && !outs.is_empty() && self.rng.chance(self.faults.crash_mid))
                .then(|| self.rng.below(outs.len() as u64) as usize);
        for (k, o) in outs.into_iter().enumerate() {
            if Some(k) == crash_at {
                self.crash_ctrl();
                return false;
            }
            self.ctrl_perform(o);
        }
        true
    }

    /// Inside a slow commit: the controller takes no input.
    fn ctrl_stalled(&self) -> bool {
        self.ctrl.stalled_until > self.now
    }

    /// The end of a slow commit: its outputs are performed, then what came meanwhile.
    fn ctrl_unstall(&mut self) {
        if self.ctrl_stalled() || self.ctrl.core.is_none() {
            return;
        }
        let outs = std::mem::take(&mut self.ctrl.stalled_outputs);
        if !outs.is_empty() && self.ctrl_perform_all(outs) {
            self.ctrl_flush();
        }
    }

    /// After a failed commit, as `CoreThread::rebuild`: every connection closed, the core and
    /// the deployments rebuilt from the store at once.
    fn rebuild_ctrl(&mut self) {
        self.crash_ctrl();
        self.stats.ctrl_crashes -= 1;
        self.ctrl.restart_at = self.now;
        self.start_ctrl();
    }

    /// Seal jobs handed to the (simulated) seal worker once their batch committed.
    fn queue_seal_jobs(&mut self, jobs: Vec<SealJob>) {
        for job in jobs {
            let last = self.ctrl.sealing.back().map_or(self.now, |(due, _)| *due);
            let due = last.max(self.now) + self.rng.between(1, 60);
            self.ctrl.sealing.push_back((due, job));
        }
    }

    /// The seal worker: the next target of the first job, sealed (or not) and handed to the
    /// deployments core as `DeployCmd::Sealed` / `SealFailed` are.
    fn seal_next(&mut self) {
        let now = self.now;
        match self.ctrl.sealing.front() {
            Some((due, _)) if *due <= now => {}
            _ => return,
        }
        let (_, mut job) = self.ctrl.sealing.pop_front().expect("front");
        if job.targets.is_empty() {
            return;
        }
        let t = job.targets.remove(0);
        let fails = self.faults_on && self.rng.chance(self.faults.seal_fail);
        let Some(core) = self.ctrl.core.as_mut() else {
            return;
        };
        let store = &self.ctrl.disk;
        if t.recipient.is_none() {
            self.ctrl.deploy.seal_failed(
                store,
                job.deployment,
                t.node,
                "the machine is not admitted; nothing was sealed for it".into(),
            );
        } else if fails {
            self.stats.seal_failures += 1;
            self.ctrl.deploy.seal_failed(
                store,
                job.deployment,
                t.node,
                "sealing the bundle failed: simulated I/O error".into(),
            );
        } else {
            let order = DeployOrder {
                deployment: job.deployment,
                bundle_id: job.bundle_id.clone(),
                service: job.service.clone(),
                version: job.version.clone(),
                sealed_bytes: 1,
                sealed_hash: [job.deployment as u8; 32],
            };
            self.ctrl
                .deploy
                .sealed(core, store, job.deployment, t.node, order, now);
        }
        if !job.targets.is_empty() {
            let due = now + self.rng.between(1, 60);
            self.ctrl.sealing.push_front((due, job));
        }
        self.ctrl_flush();
    }

    /// What the deployments core reported (the core thread logs it).
    fn deploy_events(&mut self) {
        for e in self.ctrl.deploy.take_events() {
            match e {
                DeployEvent::NextWave { .. } => self.stats.waves += 1,
                DeployEvent::StoreError { what, error } => {
                    self.fail(format!("deployments: cannot read {what}: {error}"))
                }
                _ => {}
            }
        }
    }

    /// (e) on what the controller commits.
    fn check_dirty(&mut self, d: &Dirty) {
        let mut bad = Vec::new();
        for p in &d.publications {
            if !self.admitted_in_ctrl(p.machine) {
                bad.push(format!(
                    "publication {} committed for {:?}, not admitted",
                    p.seq, p.machine
                ));
            }
        }
        for m in &d.machines {
            if m.key_status == KeyStatus::Admitted {
                self.ever_admitted.insert(m.node_id);
            }
            if !m.up
                && self
                    .ctrl
                    .disk
                    .machines
                    .get(&m.node_id)
                    .is_some_and(|o| o.up)
            {
                self.stats.downs += 1;
            }
            if !self.ever_admitted.contains(&m.node_id)
                && (m.report.is_some() || m.notify_seq != 0 || m.pub_seq != 0)
            {
                bad.push(format!(
                    "{} is {:?} yet has a report or a channel: notify {} pub {}",
                    m.name, m.key_status, m.notify_seq, m.pub_seq
                ));
            }
            if m.pub_acked > m.pub_seq {
                bad.push(format!(
                    "{}: acked {} > published {}",
                    m.name, m.pub_acked, m.pub_seq
                ));
            }
        }
        for b in bad {
            self.fail(b);
        }
    }

    fn ctrl_perform(&mut self, o: Output) {
        match o {
            Output::Send { conn, msg } => {
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                if !c.ctrl_open {
                    return;
                }
                let w = c.worker;
                self.check_send(w, &msg);
                let lat = self.latency();
                let c = self.conns.get_mut(&conn).expect("exists");
                c.due_worker = c.due_worker.max(self.now + lat);
                c.to_worker
                    .push_back((c.due_worker, ToWorker::Frame(Box::new(msg))));
            }
            Output::Close { conn, .. } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if c.ctrl_open {
                        c.ctrl_open = false;
                        c.to_ctrl.clear();
                        c.due_worker = c.due_worker.max(self.now + 1);
                        c.to_worker.push_back((c.due_worker, ToWorker::Close));
                    }
                }
                // The runtime learns the connection is gone.
                if let Some(core) = self.ctrl.core.as_mut() {
                    core.closed(conn, self.now);
                }
            }
        }
    }

    /// (e) on what the controller sends.
    fn check_send(&mut self, w: usize, msg: &Message) {
        let id = self.workers[w].id();
        let name = self.workers[w].name().to_string();
        match msg {
            Message::Publication(p) => {
                if p.machine != id {
                    self.fail(format!(
                        "{:?}'s publication {} sent to {name}",
                        p.machine, p.seq
                    ));
                }
                if !self.admitted_in_ctrl(id) {
                    self.fail(format!(
                        "publication {} sent to {name}, not admitted",
                        p.seq
                    ));
                }
            }
            Message::Relay(r) => {
                if self.workers[w].kind != Kind::LoadBalancer || !self.admitted_in_ctrl(id) {
                    self.fail(format!(
                        "a Relay sent to {name}, not an admitted load balancer"
                    ));
                }
                let ok = self.worker_by_id(r.to).is_some_and(|d| {
                    self.workers[d].info.load_balancer.as_deref() == Some(name.as_str())
                });
                if !ok || r.publication.machine != r.to || !self.admitted_in_ctrl(r.to) {
                    self.fail(format!(
                        "a Relay to {:?} of {:?}'s publication through {name}",
                        r.to, r.publication.machine
                    ));
                }
            }
            Message::Admission(Admission::Admitted { .. }) | Message::NotifyAck { .. }
                if !self.admitted_in_ctrl(id) =>
            {
                self.fail(format!("{msg:?} sent to {name}, not admitted"));
            }
            _ => {}
        }
    }

    fn deliver_to_ctrl(&mut self, conn: ConnId, item: ToCtrl) {
        let w = self.conns[&conn].worker;
        let fp = self.workers[w].fingerprint;
        let now = self.now;
        let Some(core) = self.ctrl.core.as_mut() else {
            return;
        };
        match item {
            // The simulated certificate carries the node id the worker joins with.
            ToCtrl::Join(j) => {
                let id = j.node_id;
                core.joined(conn, Peer::new(fp, id), j, now)
            }
            ToCtrl::Frame(m) => core.frame(conn, m, now),
        }
        self.ctrl_flush();
    }

    // ---- connections ----

    /// Cuts a connection: both ends learn it is gone, everything in flight is lost.
    fn cut(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if c.ctrl_open {
            if let Some(core) = self.ctrl.core.as_mut() {
                core.closed(conn, self.now);
            }
        }
        let w = c.worker;
        if self.workers[w].conn == Some(conn) {
            self.workers[w].conn = None;
            self.workers[w].reconnect_at = self.now + self.rng.between(10, 800);
        }
        self.ctrl_flush();
    }

    fn cut_relay(&mut self, dep: usize) {
        self.relays.remove(&dep);
        self.workers[dep].relay_retry_at = self.now + self.rng.between(10, 500);
    }

    fn connect(&mut self, i: usize) {
        let id = self.next_conn;
        self.next_conn += 1;
        let lat = self.latency();
        let w = &mut self.workers[i];
        let core = w.core.as_mut().expect("running");
        let join = core.join();
        let mut bad = Vec::new();
        if join.resume != core.record().applied || join.node_id != w.info.node_id {
            bad.push(format!(
                "{}'s Join resumes at {} with {} applied",
                w.info.name,
                join.resume,
                core.record().applied
            ));
        }
        self.conns.insert(
            id,
            Conn {
                worker: i,
                ctrl_open: true,
                to_ctrl: VecDeque::from([(self.now + lat, ToCtrl::Join(join))]),
                to_worker: VecDeque::new(),
                due_ctrl: self.now + lat,
                due_worker: 0,
                abandoned_until: None,
            },
        );
        w.conn = Some(id);
        core.connected();
        for b in bad {
            self.fail(b);
        }
        self.worker_flush(i);
    }

    // ---- workers ----

    fn start_worker(&mut self, i: usize) {
        if self.faults_on && self.rng.chance(self.faults.readdress) {
            let port = 5000 + self.rng.below(1000);
            let w = &mut self.workers[i];
            if w.kind == Kind::LoadBalancer && self.rng.chance(500) {
                w.info.relay_addr = Some(format!("10.0.0.1:{}", port + 2000));
            } else {
                w.info.service_addr = Some(format!("10.0.0.{}:{port}", i + 1));
            }
        }
        let w = &mut self.workers[i];
        let seal = SealKey::from_secret(&w.seal_secret).expect("own secret");
        match WorkerCore::open(w.info.clone(), seal, w.disk.clone()) {
            Ok(core) => {
                let same = core.record() == &w.disk;
                w.core = Some(core);
                w.reconnect_at = self.now;
                w.next_heartbeat = self.now;
                w.relay_retry_at = self.now;
                let boot = match &w.installed.current {
                    None => Boot::Nothing,
                    Some(sw) => Boot::Healthy(sw.clone()),
                };
                // The software task boots what is installed (always healthy here; an unhealthy
                // boot's report waits behind an unacknowledged deployment outcome: the
                // lifecycle's unit tests).
                let mut life = Lifecycle::new();
                life.booted(boot, &w.disk, self.now);
                w.life = Some(life);
                if !same {
                    let name = w.info.name.clone();
                    self.fail(format!(
                        "{name} reopened with another record than committed"
                    ));
                }
                self.life_perform(i);
                // The first take re-applies the stored state's effects.
                self.worker_flush(i);
            }
            Err(e) => {
                let name = w.info.name.clone();
                w.restart_at = u64::MAX;
                self.fail(format!("{name} cannot reopen its record: {e}"));
            }
        }
    }

    fn crash_worker(&mut self, i: usize, downtime: u64) {
        self.stats.crashes += 1;
        let w = &mut self.workers[i];
        w.core = None;
        w.route = None;
        w.config_due = None;
        w.life = None;
        w.life_due.clear();
        w.frozen_until = 0;
        w.restart_at = self.now + downtime;
        if let Some(c) = w.conn.take() {
            self.cut(c);
        }
        self.cut_relay(i);
        if self.workers[i].kind == Kind::LoadBalancer {
            let deps: Vec<usize> = self
                .relays
                .iter()
                .filter(|(_, l)| l.lb == i)
                .map(|(d, _)| *d)
                .collect();
            for d in deps {
                self.cut_relay(d);
            }
        }
    }

    /// Performs what worker `i`'s lifecycle core asks, as the software task does: installer
    /// steps answered later (failing by seed), reports and outcomes into the worker core.
    fn life_perform(&mut self, i: usize) {
        let Some(life) = self.workers[i].life.as_mut() else {
            return;
        };
        let cmds = life.take();
        let f = self.faults.clone();
        let on = self.faults_on;
        for c in cmds {
            let now = self.now;
            let later = now + self.rng.between(1, 150);
            let w = &mut self.workers[i];
            match c {
                LifeCommand::Fetch(o) => {
                    let r = if on && self.rng.chance(f.fetch_fail) {
                        Err(
                            "the sealed bundle's hash does not match the signed one (simulated)"
                                .into(),
                        )
                    } else {
                        Ok(())
                    };
                    w.life_due.push((later, LifeDone::Fetched(o.deployment, r)));
                }
                LifeCommand::CancelFetch(d) => w
                    .life_due
                    .retain(|(_, x)| !matches!(x, LifeDone::Fetched(e, _) if *e == d)),
                LifeCommand::Install(o) => {
                    let r = if on && self.rng.chance(f.install_fail) {
                        Err("the bundle is not sealed to this machine (simulated)".into())
                    } else {
                        Ok(Software {
                            service: o.service.clone(),
                            bundle_id: o.bundle_id.clone(),
                            version: o.version.clone(),
                        })
                    };
                    w.life_due
                        .push((later, LifeDone::Installed(o.deployment, r)));
                }
                LifeCommand::Discard(_) => {}
                LifeCommand::Switch {
                    deployment,
                    software,
                } => {
                    // Activated at once (the link switch is atomic); then started and checked.
                    if w.installed.current.as_ref() != Some(&software) {
                        w.installed.previous = w.installed.current.replace(software);
                    }
                    let r = if on && self.rng.chance(f.unhealthy) {
                        Switched::Unhealthy("the health check failed (simulated)".into())
                    } else {
                        Switched::Healthy
                    };
                    w.life_due.push((later, LifeDone::Switched(deployment, r)));
                }
                LifeCommand::RollBack { deployment } => {
                    let r = match w.installed.previous.take() {
                        Some(prev) => {
                            w.installed.current = Some(prev.clone());
                            RolledBack::Healthy(prev)
                        }
                        None => {
                            w.installed.current = None;
                            RolledBack::NoPrevious
                        }
                    };
                    w.life_due
                        .push((later, LifeDone::RolledBack(deployment, r)));
                }
                LifeCommand::Restart(_) => w.life_due.push((later, LifeDone::Restarted(Ok(())))),
                LifeCommand::Report(r) => {
                    if let Some(core) = w.core.as_mut() {
                        core.report(r);
                    }
                }
                LifeCommand::Deployed(d, r) => {
                    match r.state.as_str() {
                        "running" => self.stats.deploys_run += 1,
                        "rolled_back" => self.stats.deploys_rolled_back += 1,
                        _ => self.stats.deploys_failed += 1,
                    }
                    if let Some(core) = w.core.as_mut() {
                        core.deployed(d, r);
                    }
                }
            }
        }
    }

    /// Worker `i`'s software task: results that are due, the restart timer, and a death now
    /// and then (also right after a deployment's outcome, before the controller heard it:
    /// the lifecycle holds what the death says until then; seed 3238338651).
    fn life_step(&mut self, i: usize) {
        let now = self.now;
        let w = &mut self.workers[i];
        let Some(life) = w.life.as_mut() else {
            return;
        };
        let (due, rest): (Vec<_>, Vec<_>) = w.life_due.drain(..).partition(|(t, _)| *t <= now);
        w.life_due = rest;
        for (_, done) in due {
            match done {
                LifeDone::Fetched(d, r) => life.fetched(d, r, now),
                LifeDone::Installed(d, r) => life.installed(d, r, now),
                LifeDone::Switched(d, r) => life.switched(d, r, now),
                LifeDone::RolledBack(d, r) => life.rolled_back(d, r, now),
                LifeDone::Restarted(r) => life.restarted(r, now),
            }
        }
        if life.poll_timeout().is_some_and(|t| t <= now) {
            life.timeout(now);
        }
        if self.faults_on && life.running().is_some() && self.rng.chance(self.faults.death) {
            self.stats.deaths += 1;
            life.exited("signal 9 (simulated)", now);
        }
        self.life_perform(i);
        self.worker_flush(i);
    }

    fn worker_flush(&mut self, i: usize) {
        loop {
            let Some(core) = self.workers[i].core.as_mut() else {
                return;
            };
            let (rec, outs) = core.take();
            if rec.is_none() && outs.is_empty() {
                return;
            }
            if let Some(rec) = rec {
                let old = &self.workers[i].disk;
                let name = self.workers[i].name().to_string();
                let mut bad = Vec::new();
                if rec.applied < old.applied {
                    bad.push(format!(
                        "{name} committed applied {} after {}",
                        rec.applied, old.applied
                    ));
                }
                if rec.report_seq < old.report_seq || rec.report_acked > rec.report_seq {
                    bad.push(format!(
                        "{name} committed report seq {} acked {} after {}",
                        rec.report_seq, rec.report_acked, old.report_seq
                    ));
                }
                if rec.applied > 0 && rec.controller_key.is_none() {
                    bad.push(format!("{name} applied publications before admission"));
                }
                if let Some(life) = self.workers[i].life.as_mut() {
                    life.record(&rec);
                }
                self.workers[i].disk = rec;
                for b in bad {
                    self.fail(b);
                }
                self.life_perform(i);
            }
            let crash_at =
                (self.faults_on && !outs.is_empty() && self.rng.chance(self.faults.crash_mid))
                    .then(|| self.rng.below(outs.len() as u64) as usize);
            for (k, o) in outs.into_iter().enumerate() {
                if Some(k) == crash_at {
                    let downtime = self.rng.between(10, 2000);
                    self.crash_worker(i, downtime);
                    return;
                }
                self.worker_perform(i, o);
            }
        }
    }

    fn worker_perform(&mut self, i: usize, o: WorkerOutput) {
        let name = self.workers[i].name().to_string();
        match o {
            WorkerOutput::ToController(msg) => {
                let standing = self.workers[i].core.as_ref().map(|c| c.standing());
                match &msg {
                    Message::PublicationAck { upto } => {
                        if *upto > self.workers[i].disk.applied {
                            let committed = self.workers[i].disk.applied;
                            self.fail(format!(
                                "{name} acks {upto} with only {committed} committed"
                            ));
                        }
                        // A relayed publication may arrive between a reconnect and the
                        // Admission; it was still admitted to get the controller's key.
                        if self.workers[i].disk.controller_key.is_none() {
                            self.fail(format!("{name} acks while {standing:?}"));
                        }
                    }
                    Message::ConfigNotify(n) if n.seq > self.workers[i].disk.config.report_seq => {
                        let committed = self.workers[i].disk.config.report_seq;
                        self.fail(format!(
                            "{name} sends configuration report {} with only {committed} committed",
                            n.seq
                        ));
                    }
                    Message::Notify(n) => {
                        if n.machine != self.workers[i].id() {
                            self.fail(format!("{name} notifies for {:?}", n.machine));
                        }
                        if standing != Some(Standing::Admitted) {
                            self.fail(format!("{name} notifies while {standing:?}"));
                        }
                        if n.seq > self.workers[i].disk.report_seq {
                            let committed = self.workers[i].disk.report_seq;
                            self.fail(format!(
                                "{name} sends report {} with only {committed} committed",
                                n.seq
                            ));
                        }
                    }
                    _ => {}
                }
                self.worker_send(i, msg);
            }
            // Also on a worker that is not a load balancer: see `publish_again`.
            WorkerOutput::Apply(Effect::Pool(p)) => {
                if self.workers[i].kind == Kind::LoadBalancer {
                    self.stats.pools += 1;
                }
                self.workers[i].pool_file = Some(p);
                self.write_doc(i);
            }
            WorkerOutput::Apply(Effect::Coupling) => self.write_doc(i),
            WorkerOutput::Apply(Effect::Config(order)) => {
                // (f) in order: a replay after a crash is the version it had, never older.
                let w = &mut self.workers[i];
                if order.version < w.config_seen {
                    let seen = w.config_seen;
                    self.fail(format!(
                        "{name} handed configuration {} after {seen}",
                        order.version
                    ));
                }
                let w = &mut self.workers[i];
                if order.version == w.config_seen {
                    self.stats.configs_replayed += 1;
                }
                let w = &mut self.workers[i];
                w.config_seen = order.version;
                let due = self.now + self.rng.between(1, 300);
                self.workers[i].config_due = Some((due, order));
            }
            // Its software runs the order after a while (and says so).
            WorkerOutput::Apply(Effect::Deploy(order)) => {
                let now = self.now;
                if let Some(life) = self.workers[i].life.as_mut() {
                    life.orders(vec![order], now);
                }
                self.life_perform(i);
            }
            WorkerOutput::Apply(Effect::Route(r)) => {
                let lb = self.relays.get(&i).map(|l| self.workers[l.lb].id());
                if lb.is_some() && r.as_ref().map(|r| r.node_id) != lb {
                    self.cut_relay(i);
                }
                self.workers[i].route = r;
            }
        }
    }

    /// What the driver does for a pool or a coupling: the file written from the committed
    /// record.
    fn write_doc(&mut self, i: usize) {
        let w = &mut self.workers[i];
        let doc = pool_file::document(&w.info.name, &w.info.component, &w.disk);
        if doc.is_some() {
            w.doc_file = doc;
        }
    }

    fn worker_send(&mut self, i: usize, msg: Message) {
        let Some(conn) = self.workers[i].conn else {
            return;
        };
        let lat = self.latency();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.ctrl_open {
            return;
        }
        c.due_ctrl = c.due_ctrl.max(self.now + lat);
        c.to_ctrl.push_back((c.due_ctrl, ToCtrl::Frame(msg)));
    }

    fn deliver_to_worker(&mut self, i: usize, conn: ConnId, item: ToWorker) {
        match item {
            ToWorker::Close => {
                self.conns.remove(&conn);
                if self.workers[i].conn == Some(conn) {
                    let rejected = self.workers[i]
                        .core
                        .as_ref()
                        .is_some_and(|c| c.standing() == Standing::Rejected);
                    // A rejected worker keeps asking, slowly (it may be accepted again).
                    let delay = if rejected {
                        self.rng.between(500, 3000)
                    } else {
                        self.rng.between(10, 800)
                    };
                    self.workers[i].conn = None;
                    self.workers[i].reconnect_at = self.now + delay;
                }
            }
            ToWorker::Frame(msg) if matches!(*msg, Message::Relay(_)) => {
                let Message::Relay(r) = *msg else {
                    unreachable!()
                };
                self.forward(i, r.to, r.publication)
            }
            ToWorker::Frame(msg) => {
                let msg = *msg;
                let core = self.workers[i].core.as_mut().expect("running");
                let before = core.record().clone();
                let r = core.from_controller(msg.clone());
                if let Message::Publication(p) = &msg {
                    self.check_apply(i, p, &before, &r, false, false);
                } else if let Err(e) = &r {
                    let name = self.workers[i].name().to_string();
                    if matches!(e, WorkerRefusal::Hostile(_)) {
                        self.fail(format!("{name} refused {} as hostile: {e}", msg.kind()));
                    }
                }
                self.worker_flush(i);
            }
        }
    }

    /// The load balancer's runtime: forwards to the dependent if its link is up.
    fn forward(&mut self, lb: usize, to: NodeId, mut p: Publication) {
        let Some(d) = self.worker_by_id(to) else {
            self.fail(format!("a Relay for unknown {to:?}"));
            return;
        };
        let lat = self.latency();
        let tamper = self.faults_on && self.rng.chance(self.faults.tamper);
        if tamper {
            match self.rng.below(4) {
                0 if !p.sealed.is_empty() => {
                    let at = self.rng.below(p.sealed.len() as u64) as usize;
                    p.sealed[at] ^= 1 << self.rng.below(8);
                }
                1 if !p.signature.is_empty() => {
                    let at = self.rng.below(p.signature.len() as u64) as usize;
                    p.signature[at] ^= 1 << self.rng.below(8);
                }
                2 => p.seq = p.seq.wrapping_add(1 + self.rng.below(3)),
                _ => p.seq = p.seq.saturating_sub(1 + self.rng.below(3)),
            }
        }
        let Some(link) = self.relays.get_mut(&d) else {
            return;
        };
        if link.lb != lb {
            return;
        }
        link.due = link.due.max(self.now + lat);
        link.queue.push_back((link.due, p, tamper));
    }

    /// (a): a publication offered to worker `i` moved its `applied` by one, in order, and only
    /// for what the controller committed under that sequence.
    fn check_apply(
        &mut self,
        i: usize,
        p: &Publication,
        before: &WorkerRecord,
        r: &Result<(), WorkerRefusal>,
        relayed: bool,
        tampered: bool,
    ) {
        let name = self.workers[i].name().to_string();
        let id = self.workers[i].id();
        let after = self.workers[i]
            .core
            .as_ref()
            .expect("running")
            .record()
            .clone();
        let path = if relayed { "relayed" } else { "direct" };
        if after.applied != before.applied {
            if tampered {
                self.fail(format!(
                    "{name} applied an altered publication (seq {})",
                    p.seq
                ));
            }
            if after.applied != before.applied + 1 || p.seq != after.applied {
                self.fail(format!(
                    "{name} applied {path} publication {} moving applied {} -> {}",
                    p.seq, before.applied, after.applied
                ));
            }
            if p.machine != id {
                self.fail(format!("{name} applied {:?}'s publication", p.machine));
            }
            match self.published.get(&(p.machine, p.seq)) {
                Some(q) if q == p => {}
                Some(_) => self.fail(format!(
                    "{name} applied a publication {} that is not the committed one",
                    p.seq
                )),
                None => self.fail(format!(
                    "{name} applied publication {} that was never committed",
                    p.seq
                )),
            }
            if !self.ever_admitted.contains(&id) {
                self.fail(format!("{name} applied a publication before admission"));
            }
            self.stats.applied += 1;
            if relayed {
                self.stats.applied_relayed += 1;
            }
        } else if &after != before {
            self.fail(format!(
                "{name}'s record changed on {path} publication {} without applying it",
                p.seq
            ));
        }
        match r {
            Err(WorkerRefusal::Hostile(e)) if !tampered => {
                self.fail(format!(
                    "{name} refused an honest {path} publication {} as hostile: {e} (applied {})",
                    p.seq, before.applied
                ));
            }
            Err(WorkerRefusal::Hostile(_)) => self.stats.hostile_refused += 1,
            Err(e) => self.fail(format!("{name}: {path} publication {}: {e}", p.seq)),
            // The signature is checked first, and covers everything altered.
            Ok(()) if tampered => {
                self.fail(format!(
                    "{name} took an altered publication {} without refusing it",
                    p.seq
                ));
            }
            Ok(()) => {}
        }
    }

    fn deliver_relay(&mut self, d: usize, p: Publication, tampered: bool) {
        let core = self.workers[d].core.as_mut().expect("running");
        let before = core.record().clone();
        let r = core.from_relay(p.clone());
        self.check_apply(d, &p, &before, &r, true, tampered);
        if matches!(r, Err(WorkerRefusal::Hostile(_))) {
            // The dependent closes its load balancer's connection.
            self.cut_relay(d);
        }
        self.worker_flush(d);
    }

    // ---- time ----

    fn step(&mut self) {
        self.now += self.rng.between(1, 20);
        let now = self.now;
        if self.ctrl.core.is_none() && now >= self.ctrl.restart_at {
            self.start_ctrl();
        }
        self.ctrl_unstall();
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            if w.core.is_none() && !w.stopped && now >= w.restart_at {
                self.start_worker(i);
            }
        }
        // Deliveries, connection by connection, in order.
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in ids {
            while let Some(c) = self.conns.get_mut(&conn) {
                if !c.ctrl_open || self.ctrl.core.is_none() || self.ctrl.stalled_until > now {
                    break;
                }
                match c.to_ctrl.front() {
                    Some((due, _)) if *due <= now => {}
                    _ => break,
                }
                let (_, item) = c.to_ctrl.pop_front().expect("front");
                self.deliver_to_ctrl(conn, item);
            }
            while let Some(c) = self.conns.get_mut(&conn) {
                let w = c.worker;
                if self.workers[w].core.is_none() || self.workers[w].frozen_until > now {
                    break;
                }
                match c.to_worker.front() {
                    Some((due, _)) if *due <= now => {}
                    _ => break,
                }
                let (_, item) = c.to_worker.pop_front().expect("front");
                if c.abandoned_until.is_some() {
                    // Nobody reads it at the worker.
                    if matches!(item, ToWorker::Close) {
                        self.conns.remove(&conn);
                    }
                    continue;
                }
                self.deliver_to_worker(w, conn, item);
            }
        }
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.abandoned_until.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for c in expired {
            self.cut(c);
        }
        let deps: Vec<usize> = self.relays.keys().copied().collect();
        for d in deps {
            loop {
                if !self.running(d) {
                    break;
                }
                let Some(link) = self.relays.get_mut(&d) else {
                    break;
                };
                match link.queue.front() {
                    Some((due, _, _)) if *due <= now => {}
                    _ => break,
                }
                let (_, p, tampered) = link.queue.pop_front().expect("front");
                self.deliver_relay(d, p, tampered);
            }
        }
        // The workers' runtimes: connect, heartbeat, dial the load balancer.
        for i in 0..self.workers.len() {
            if !self.running(i) {
                continue;
            }
            if self.workers[i].conn.is_none()
                && self.ctrl.core.is_some()
                && now >= self.workers[i].reconnect_at
            {
                self.connect(i);
            }
            if !self.running(i) {
                continue;
            }
            let core = self.workers[i].core.as_ref().expect("running");
            if self.workers[i].conn.is_some()
                && core.standing() == Standing::Admitted
                && now >= self.workers[i].next_heartbeat
            {
                let hb = match core.record().heartbeat_ms {
                    0 => self.ctrl.settings.heartbeat_ms,
                    hb => hb,
                };
                self.workers[i].next_heartbeat = now + hb;
                self.worker_send(i, Message::Heartbeat);
            }
            self.dial_lb(i);
            if self.workers[i]
                .config_due
                .as_ref()
                .is_some_and(|(due, _)| *due <= now)
            {
                let (_, order) = self.workers[i].config_due.take().expect("due");
                let report = ConfigReport {
                    version: order.version,
                    state: "applied".into(),
                    detail: None,
                };
                let core = self.workers[i].core.as_mut().expect("running");
                core.configured(order.version, report);
                self.stats.configs_applied += 1;
                self.worker_flush(i);
            }
            self.life_step(i);
        }
        if let Some(core) = self.ctrl.core.as_mut() {
            if now >= self.ctrl.next_tick && self.ctrl.stalled_until <= now {
                core.tick(now);
                self.ctrl.deploy.tick(core, now);
                self.ctrl.next_tick = now + self.rng.between(100, 300);
                self.ctrl_flush();
            }
        }
        if self.ctrl.core.is_some() && !self.ctrl_stalled() {
            self.seal_next();
        }
    }

    /// A dependent with a route dials its load balancer, which accepts only its own
    /// dependents (by its pool's list).
    fn dial_lb(&mut self, d: usize) {
        let w = &self.workers[d];
        if w.info.load_balancer.is_none()
            || self.relays.contains_key(&d)
            || self.now < w.relay_retry_at
        {
            return;
        }
        let Some(route) = w.route.clone() else {
            return;
        };
        let Some(lb) = self.worker_by_id(route.node_id) else {
            self.fail(format!(
                "{} routed to unknown {:?}",
                w.info.name, route.node_id
            ));
            return;
        };
        let (id, fp) = (w.id(), w.fingerprint);
        let accepted = self.running(lb)
            && route.fingerprint == self.workers[lb].fingerprint
            && self.workers[lb]
                .core
                .as_ref()
                .and_then(|c| c.record().pool.as_ref())
                .is_some_and(|p| {
                    p.dependents
                        .iter()
                        .any(|x| x.node_id == id && x.fingerprint == fp)
                });
        if accepted {
            self.relays.insert(
                d,
                RelayLink {
                    lb,
                    queue: VecDeque::new(),
                    due: 0,
                },
            );
        } else {
            self.workers[d].relay_retry_at = self.now + self.rng.between(50, 500);
        }
    }

    /// Operators, reports, extra publications, and faults.
    fn act(&mut self) {
        let n = self.workers.len() as u64;
        if self.rng.chance(30) {
            let i = self.rng.below(n) as usize;
            // Not over a deployment's report the controller has not acknowledged: reports are
            // the latest state, not a log, so it would never learn that deployment's outcome.
            // These random reports go straight into the worker core; the production reports
            // (the lifecycle's) wait for that acknowledgement the same way.
            let deploy_unacked = self.workers[i].core.as_ref().is_some_and(|c| {
                let r = c.record();
                r.report_seq > r.report_acked
                    && r.report.as_ref().is_some_and(|p| p.deployment.is_some())
            });
            if self.running(i) && !deploy_unacked {
                let r = report(&mut self.rng);
                let core = self.workers[i].core.as_mut().expect("running");
                core.report(r);
                self.worker_flush(i);
            }
        }
        if self.rng.chance(20) {
            self.accept_one();
        }
        let due: Vec<NodeId> = self
            .reaccept
            .iter()
            .filter(|(_, t)| **t <= self.now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.accept_again(id);
        }
        if self.rng.chance(10) {
            self.publish_again();
        }
        if self.rng.chance(12) {
            self.set_config_random();
        }
        if self.plan_rollouts > self.ctrl.deployments_made && self.rng.chance(3) {
            self.create_deployment();
        }
        if !self.faults_on {
            return;
        }
        let f = self.faults.clone();
        if self.rng.chance(f.cut) && !self.conns.is_empty() {
            let k = self.rng.below(self.conns.len() as u64) as usize;
            let conn = *self.conns.keys().nth(k).expect("k < len");
            self.stats.cuts += 1;
            self.cut(conn);
        }
        if self.rng.chance(f.cut_relay) && !self.relays.is_empty() {
            let k = self.rng.below(self.relays.len() as u64) as usize;
            let d = *self.relays.keys().nth(k).expect("k < len");
            self.cut_relay(d);
        }
        if self.rng.chance(f.crash_ctrl) && self.ctrl.core.is_some() {
            self.crash_ctrl();
        }
        if self.rng.chance(f.crash_worker) {
            let i = self.rng.below(n) as usize;
            if self.workers[i].core.is_some() {
                // Sometimes longer than down_after: it leaves its pool and comes back.
                let down = self.ctrl.settings.down_after_ms;
                let downtime = self.rng.between(10, down * 3);
                self.crash_worker(i, downtime);
            }
        }
        if self.rng.chance(f.abandon) {
            let i = self.rng.below(n) as usize;
            if let Some(conn) = self.workers[i].conn.take() {
                let until = self.now + self.rng.between(50, 3000);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.abandoned_until = Some(until);
                }
                self.workers[i].reconnect_at = self.now + self.rng.between(0, 300);
            }
        }
        if self.rng.chance(f.reject) {
            self.reject_one();
        }
        if self.rng.chance(f.freeze) {
            let i = self.rng.below(n) as usize;
            if self.running(i) {
                let down = self.ctrl.settings.down_after_ms;
                self.workers[i].frozen_until = self.now + self.rng.between(100, down * 3);
            }
        }
    }

    /// An operator rejects an admitted key, to accept it again later.
    fn reject_one(&mut self) {
        // An operator's request waits behind a slow commit.
        if self.ctrl_stalled() {
            return;
        }
        let Some(core) = self.ctrl.core.as_ref() else {
            return;
        };
        let admitted: Vec<(NodeId, String)> = core
            .machines()
            .filter(|m| m.key_status == KeyStatus::Admitted)
            .map(|m| (m.node_id, m.name.clone()))
            .collect();
        if admitted.is_empty() {
            return;
        }
        let (id, name) = admitted[self.rng.below(admitted.len() as u64) as usize].clone();
        let now = self.now;
        match self.ctrl.core.as_mut().expect("up").reject(&name, now) {
            Ok(got) if got == id => self.stats.rejects += 1,
            other => self.fail(format!("reject {name:?}: {other:?}")),
        }
        self.ctrl_flush();
        let later = self.now + self.rng.between(200, 5000);
        self.reaccept.insert(id, later);
    }

    fn accept_again(&mut self, id: NodeId) {
        // An operator's request waits behind a slow commit.
        if self.ctrl_stalled() {
            return;
        }
        if self.ctrl.core.is_none() {
            return;
        }
        self.reaccept.remove(&id);
        let now = self.now;
        let key = id.to_string();
        match self.ctrl.core.as_mut().expect("up").accept(&key, now) {
            Ok(got) if got == id => self.stats.accepts += 1,
            other => self.fail(format!("accept again {key}: {other:?}")),
        }
        self.ctrl_flush();
        // A failed commit answered the operator an error: asked again later.
        let committed = self
            .ctrl
            .disk
            .machines
            .get(&id)
            .is_some_and(|m| m.key_status == KeyStatus::Admitted);
        if !committed {
            let later = self.now + self.rng.between(200, 2000);
            self.reaccept.insert(id, later);
        }
    }

    /// An operator accepts a pending key, by name, full id or id prefix.
    fn accept_one(&mut self) {
        // An operator's request waits behind a slow commit.
        if self.ctrl_stalled() {
            return;
        }
        let Some(core) = self.ctrl.core.as_ref() else {
            return;
        };
        let pending: Vec<(NodeId, String)> = core
            .machines()
            .filter(|m| m.key_status == KeyStatus::Pending)
            .map(|m| (m.node_id, m.name.clone()))
            .collect();
        if pending.is_empty() {
            return;
        }
        let (id, name) = pending[self.rng.below(pending.len() as u64) as usize].clone();
        let key = match self.rng.below(3) {
            0 => name,
            1 => id.to_string(),
            _ => id.to_string()[..12].to_string(),
        };
        let now = self.now;
        let r = self.ctrl.core.as_mut().expect("up").accept(&key, now);
        match r {
            Ok(got) if got == id => self.stats.accepts += 1,
            other => self.fail(format!("accept {key:?} of {id:?}: {other:?}")),
        }
        self.ctrl_flush();
    }

    /// The same state published once more (a new sequence, nothing new to apply).
    fn publish_again(&mut self) {
        // An operator's request waits behind a slow commit.
        if self.ctrl_stalled() {
            return;
        }
        let Some(core) = self.ctrl.core.as_ref() else {
            return;
        };
        let admitted: Vec<MachineRecord> = core
            .machines()
            .filter(|m| m.key_status == KeyStatus::Admitted)
            .cloned()
            .collect();
        if admitted.is_empty() {
            return;
        }
        let m = &admitted[self.rng.below(admitted.len() as u64) as usize];
        let body = if m.is_load_balancer() {
            match &m.pool {
                Some(p) => Body::Pool(p.clone()),
                None => return,
            }
        } else {
            // Today a dependent is only ever sent its route, and a route is always sent
            // directly (the dependent may not reach that load balancer yet). So that the
            // relay path carries something, a dependent also gets bodies it does not act on:
            // a (meaningless) pool, relayed when its route is applied and the LB is up.
            if self.rng.chance(500) {
                Body::LoadBalancer(m.route.clone())
            } else {
                Body::Pool(Pool::default())
            }
        };
        let now = self.now;
        let published = self
            .ctrl
            .core
            .as_mut()
            .expect("up")
            .publish(m.node_id, &body, now);
        // A machine away for long may have a full channel: a defined outcome, nothing stored.
        if let Err(e) = published {
            assert!(matches!(e, NotPublished::ChannelFull(_)), "{}: {e}", m.name);
        }
        self.ctrl_flush();
    }

    /// An operator deploys software to every admitted machine, in waves with a random gate and
    /// drain, as `POST /v1/deployments` does (`DeployBook::create`, then its first step).
    fn create_deployment(&mut self) {
        if self.ctrl_stalled() {
            return;
        }
        let Some(core) = self.ctrl.core.as_ref() else {
            return;
        };
        if !core.machines().any(|m| m.key_status == KeyStatus::Admitted) {
            return;
        }
        let spec = RolloutSpec {
            waves: if self.rng.chance(500) {
                vec![
                    WaveSize::Count(1),
                    WaveSize::Percent(50),
                    WaveSize::Percent(100),
                ]
            } else {
                Vec::new()
            },
            max_parallel: self
                .rng
                .chance(500)
                .then(|| self.rng.between(1, 3) as usize),
            healthy_for_ms: Some(self.rng.below(500)),
            failure_threshold: Some(0),
            drain_ms: self.rng.chance(700).then(|| self.rng.below(300)),
        };
        let spec = if !spec.waves.is_empty() && spec.max_parallel.is_some() {
            RolloutSpec {
                max_parallel: None,
                ..spec
            }
        } else {
            spec
        };
        let id = self.ctrl.deploy.next_id();
        let req = NewDeployment {
            service: "voice".into(),
            bundle_id: format!("{id:064x}"),
            version: format!("{id}.0"),
            machines: None,
            bundle_path: std::path::PathBuf::new(),
            rollout: spec,
        };
        let now = self.now;
        let core = self.ctrl.core.as_mut().expect("up");
        match self.ctrl.deploy.create(core, req, now) {
            Ok(made) => assert_eq!(made, id),
            Err(e) => return self.fail(format!("deployment refused: {e}")),
        }
        self.ctrl_flush();
        // Created once its record committed (a failed commit created nothing: the operator
        // asks again later).
        if self.ctrl.disk.deployments.contains_key(&id) {
            self.ctrl.deployments_made += 1;
        }
    }

    /// An operator sets (or deletes) the document of a random scope.
    fn set_config_random(&mut self) {
        // The operator's request waits behind a slow commit.
        if self.ctrl.core.is_none() || self.ctrl_stalled() {
            return;
        }
        let w = &self.workers[self.rng.below(self.workers.len() as u64) as usize];
        let scope = match self.rng.below(3) {
            0 => Scope::Service("voice".into()),
            1 => Scope::Component {
                service: "voice".into(),
                component: w.info.component.clone(),
            },
            _ => Scope::Machine(w.info.name.clone()),
        };
        self.config_changes += 1;
        let n = self.config_changes;
        let doc = (!self.rng.chance(200)).then(|| {
            let mut d = json!({ "n": n, "limits": { scope.key(): n } });
            if self.rng.chance(300) {
                // Removes what a wider scope set.
                d["log"] = Value::Null;
            } else {
                d["log"] = json!(format!("level-{n}"));
            }
            d
        });
        let now = self.now;
        let core = self.ctrl.core.as_mut().expect("up");
        let change = match core.set_config(&scope, doc.clone(), None, now) {
            Ok(set) => Some(set.change),
            // Deleting what is not there: nothing changed.
            Err(_) => {
                assert!(doc.is_none());
                None
            }
        };
        // The change is committed before anything it caused is sent.
        self.ctrl_flush();
        // What the operator set is what committed (a failed commit answered an error).
        if let Some(c) = change {
            let key = (c.scope.clone(), c.version);
            if self.ctrl.disk.config.get(&key) == Some(&c) {
                self.config_set.insert(scope.key(), doc);
            }
        }
    }

    /// The effective configuration of worker `i` from what the operator set.
    fn expected_config(&self, i: usize) -> Option<Value> {
        let info = &self.workers[i].info;
        let layers = [
            format!("service/{}", info.service),
            format!("component/{}/{}", info.service, info.component),
            format!("machine/{}", info.name),
        ];
        let mut out: Option<Value> = None;
        for l in layers {
            if let Some(Some(doc)) = self.config_set.get(&l) {
                configdata::merge(out.get_or_insert_with(|| json!({})), doc);
            }
        }
        out
    }

    /// Stops the faults, stops some dependents for good, wakes everything else, accepts
    /// every pending key, gives each running worker a last report, and lets time pass.
    fn heal(&mut self, stop_some: bool) {
        self.faults_on = false;
        for i in 0..self.workers.len() {
            if stop_some && self.workers[i].kind == Kind::Dependent && self.rng.chance(300) {
                self.workers[i].stopped = true;
                if self.workers[i].core.is_some() {
                    self.crash_worker(i, 0);
                }
            }
        }
        for w in &mut self.workers {
            w.frozen_until = 0;
            if !w.stopped {
                w.restart_at = w.restart_at.min(self.now);
            }
        }
        self.ctrl.restart_at = self.ctrl.restart_at.min(self.now);
        for t in self.reaccept.values_mut() {
            *t = self.now;
        }
        for w in &self.workers {
            self.stats.stopped += w.stopped as u64;
        }
        // Every running worker admitted, then its last report.
        let deadline = self.now + 120_000;
        let mut reported = false;
        while self.now < deadline && self.violations.is_empty() {
            self.step();
            self.accept_one();
            let due: Vec<NodeId> = self.reaccept.keys().copied().collect();
            for id in due {
                self.accept_again(id);
            }
            if !reported && self.all_running_admitted() {
                for i in 0..self.workers.len() {
                    if let Some(core) = self.workers[i].core.as_mut() {
                        // After a deployment, its outcome said once more, as it was (running,
                        // rolled back or failed, and why).
                        let r = match core
                            .record()
                            .report
                            .as_ref()
                            .filter(|p| p.deployment.is_some())
                        {
                            Some(p) => p.clone(),
                            None => running_report(),
                        };
                        core.report(r);
                        self.worker_flush(i);
                    }
                }
                reported = true;
            }
            if reported {
                break;
            }
        }
        if !reported {
            self.fail("the running workers were not all admitted within 120 s".into());
            return;
        }
        let s = &self.ctrl.settings;
        let settle = 3 * s.down_after_ms + 4 * s.resend_after_ms + 5_000;
        // Software waiting for its restart (backoff up to a minute) is started first.
        let restart = self
            .workers
            .iter()
            .filter_map(|w| w.life.as_ref().and_then(|l| l.poll_timeout()))
            .max()
            .unwrap_or(0);
        let until = (self.now + settle).max(restart + settle);
        while self.now < until {
            self.step();
        }
    }

    fn all_running_admitted(&self) -> bool {
        self.ctrl.core.is_some()
            && self.workers.iter().all(|w| {
                w.stopped
                    || w.core
                        .as_ref()
                        .is_some_and(|c| c.standing() == Standing::Admitted)
            })
    }

    /// (b), (c), (d) once healed, and the controller's disk against its memory.
    fn check_end(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        let core = self.ctrl.core.as_ref().ok_or("the controller is down")?;
        let by_id: BTreeMap<NodeId, &MachineRecord> =
            core.machines().map(|m| (m.node_id, m)).collect();
        let disk = &self.ctrl.disk;
        // Memory and disk agree (the controller committed everything it changed).
        let mem: Vec<&MachineRecord> = by_id.values().copied().collect();
        let stored: Vec<&MachineRecord> = disk.machines.values().collect();
        let strip = |m: &MachineRecord| {
            let mut m = m.clone();
            m.last_seen_ms = 0;
            m
        };
        if mem.iter().map(|m| strip(m)).collect::<Vec<_>>()
            != stored.iter().map(|m| strip(m)).collect::<Vec<_>>()
        {
            bad.push("the controller's records differ from what it committed".to_string());
        }
        if core.unacked_len() != disk.publications.len() {
            bad.push(format!(
                "{} unacked in memory, {} stored",
                core.unacked_len(),
                disk.publications.len()
            ));
        }
        for (m, seq) in disk.publications.keys() {
            if let Some(r) = by_id.get(m) {
                if *seq <= r.pub_acked || *seq > r.pub_seq {
                    bad.push(format!(
                        "{}: stored publication {seq} outside ({}, {}]",
                        r.name, r.pub_acked, r.pub_seq
                    ));
                }
            }
        }
        let lb = &self.workers[0];
        let lb_name = lb.name().to_string();
        let mut running_deps = BTreeSet::new();
        let mut all_deps = BTreeSet::new();
        for w in &self.workers {
            let name = w.name();
            let Some(m) = by_id.get(&w.id()) else {
                bad.push(format!("{name}: unknown to the controller"));
                continue;
            };
            // A coupled call router is among the dependents (it may dial the load balancer)
            // but never a member.
            if w.info.load_balancer.is_some() && m.key_status == KeyStatus::Admitted {
                all_deps.insert(w.id());
            }
            if w.stopped {
                if w.disk.applied > m.pub_seq || m.pub_acked > w.disk.applied {
                    bad.push(format!(
                        "{name} (stopped): applied {} against published {} acked {}",
                        w.disk.applied, m.pub_seq, m.pub_acked
                    ));
                }
                if m.up {
                    bad.push(format!("{name} stopped but the controller says up"));
                }
                if m.notify_seq > w.disk.report_seq {
                    bad.push(format!(
                        "{name} (stopped): notify {} > report {}",
                        m.notify_seq, w.disk.report_seq
                    ));
                }
                continue;
            }
            let Some(c) = w.core.as_ref() else {
                bad.push(format!("{name} is not running"));
                continue;
            };
            // Its software said it failed (a deployment without previous software to roll
            // back to): out of the pool.
            let failed = c
                .record()
                .report
                .as_ref()
                .is_some_and(|r| r.state == "failed");
            if w.kind == Kind::Dependent && !failed {
                running_deps.insert(w.id());
            }
            let rec = c.record();
            if m.key_status != KeyStatus::Admitted || c.standing() != Standing::Admitted {
                bad.push(format!(
                    "{name}: {:?} at the controller, {:?} at the worker",
                    m.key_status,
                    c.standing()
                ));
            }
            if !m.up {
                bad.push(format!("{name} runs but the controller says down"));
            }
            // (b)
            if rec.applied != m.pub_seq || m.pub_acked != m.pub_seq {
                bad.push(format!(
                    "(b) {name}: applied {} published {} acked {}",
                    rec.applied, m.pub_seq, m.pub_acked
                ));
            }
            if rec != &w.disk {
                bad.push(format!("{name}: its record is not all committed"));
            }
            if disk.publications.keys().any(|(n, _)| *n == w.id()) {
                bad.push(format!("(b) {name}: publications left unacked"));
            }
            // (d)
            if rec.report != m.report
                || rec.report_seq != m.notify_seq
                || rec.report_acked != rec.report_seq
                || c.unacked_report().is_some()
            {
                bad.push(format!(
                    "(d) {name}: report {:?} seq {} acked {} at the worker, {:?} seq {} at the controller",
                    rec.report.as_ref().map(|r| &r.state),
                    rec.report_seq,
                    rec.report_acked,
                    m.report.as_ref().map(|r| &r.state),
                    m.notify_seq
                ));
            }
            // The final report, or a deployment's outcome (running, rolled back or failed).
            let outcome = rec.report.as_ref().is_some_and(|r| {
                r.deployment.is_some() && matches!(r.state.as_str(), "rolled_back" | "failed")
            });
            if rec.report.as_ref().map(|r| r.state.as_str()) != Some("running") && !outcome {
                bad.push(format!("(d) {name}: its last report is not the final one"));
            }
            // Routes.
            if w.info.load_balancer.is_some() {
                let want = Some(LbRoute {
                    name: lb_name.clone(),
                    node_id: lb.id(),
                    addr: lb.info.relay_addr.clone().expect("an LB has one"),
                    fingerprint: lb.fingerprint,
                });
                if rec.route != want || m.route != want || w.route != want {
                    bad.push(format!(
                        "{name}: route {:?} (record), {:?} (dialled), {:?} (controller), want {want:?}",
                        rec.route, w.route, m.route
                    ));
                }
            } else if rec.route.is_some() {
                bad.push(format!("{name} has a route: {:?}", rec.route));
            }
        }
        for w in &self.workers {
            if let Some(c) = w.core.as_ref() {
                if w.pool_file.as_ref() != c.record().pool.as_ref() {
                    bad.push(format!(
                        "{}: the pool file is not the recorded pool",
                        w.name()
                    ));
                }
            }
        }
        // (c)
        if let (Some(c), Some(m)) = (lb.core.as_ref(), by_id.get(&lb.id())) {
            let pool = c.record().pool.clone().unwrap_or_default();
            let members: BTreeSet<NodeId> = pool.members.iter().map(|p| p.node_id).collect();
            let dependents: BTreeSet<NodeId> = pool.dependents.iter().map(|p| p.node_id).collect();
            for member in &pool.members {
                let addr = self
                    .worker_by_id(member.node_id)
                    .map(|d| self.workers[d].info.service_addr.clone());
                if addr != Some(member.service_addr.clone()) || member.node_id == lb.id() {
                    bad.push(format!(
                        "(c) pool member {} at {:?}, its address is {addr:?}",
                        member.name, member.service_addr
                    ));
                }
            }
            if members != running_deps {
                bad.push(format!(
                    "(c) the pool holds {members:?}, the running dependents are {running_deps:?}"
                ));
            }
            if dependents != all_deps {
                bad.push(format!(
                    "(c) the pool lists dependents {dependents:?}, admitted are {all_deps:?}"
                ));
            }
            if m.pool.as_ref() != c.record().pool.as_ref() {
                bad.push("(c) the load balancer's pool is not the controller's".to_string());
            }
        }
        // (g) coupling: the call router knows its load balancer (up, as it is at the end) and
        // the load balancer its router, at the controller, in the record and in the file.
        for w in &self.workers {
            let (Some(c), Some(m)) = (w.core.as_ref(), by_id.get(&w.id())) else {
                continue;
            };
            if let Some(doc) = pool_file::document(w.name(), &w.info.component, c.record()) {
                if w.doc_file.as_ref() != Some(&doc) {
                    bad.push(format!(
                        "(g) {}: its file holds {:?}, its record says {doc}",
                        w.name(),
                        w.doc_file
                    ));
                }
            }
            let coupled = self.workers.iter().find(|r| {
                r.kind == Kind::Standalone && r.info.load_balancer.as_deref() == Some(&lb_name)
            });
            let (want, sent) = match w.kind {
                Kind::Standalone => {
                    let want = coupled.map(|_| LbEndpoint {
                        name: lb_name.clone(),
                        node_id: lb.id(),
                        service_addr: lb.info.service_addr.clone(),
                        relay_addr: lb.info.relay_addr.clone(),
                        fingerprint: lb.fingerprint,
                        up: true,
                    });
                    (
                        format!("{want:?}"),
                        (
                            format!("{:?}", c.record().coupling.endpoint),
                            format!("{:?}", m.balancing.endpoint.clone().flatten()),
                        ),
                    )
                }
                Kind::LoadBalancer => {
                    let want = coupled.map(|r| RouterPeer {
                        name: r.info.name.clone(),
                        node_id: r.id(),
                        service_addr: r.info.service_addr.clone(),
                        fingerprint: r.fingerprint,
                    });
                    (
                        format!("{want:?}"),
                        (
                            format!("{:?}", c.record().coupling.router),
                            format!("{:?}", m.balancing.router.clone().flatten()),
                        ),
                    )
                }
                Kind::Dependent => continue,
            };
            if sent.0 != want || sent.1 != want {
                bad.push(format!(
                    "(g) {}: coupling {} (record), {} (controller), want {want}",
                    w.name(),
                    sent.0,
                    sent.1
                ));
            }
        }
        // (h) rollouts: the newest deployment ran on every target not stopped (or says why not),
        // its rollout is done unless a stopped machine holds a wave, an older one is done or
        // halted as superseded, and no machine is left out of its pool.
        if let Some((&newest, d)) = disk.deployments.iter().next_back() {
            let stopped: BTreeSet<NodeId> = self
                .workers
                .iter()
                .filter(|w| w.stopped)
                .map(|w| w.id())
                .collect();
            let blocked = d.targets.iter().any(|(n, _)| stopped.contains(n));
            if !blocked && d.rollout.state != RolloutState::Done {
                bad.push(format!(
                    "(h) deployment {newest}: rollout {} at wave {} of {} ({:?})",
                    d.rollout.state.as_str(),
                    d.rollout.wave + 1,
                    d.rollout.waves.len(),
                    d.rollout.reason
                ));
            }
            if d.rollout.wave_started_ms.windows(2).any(|w| w[1] < w[0]) {
                bad.push(format!(
                    "(h) deployment {newest}: waves started out of order"
                ));
            }
            for (n, name) in &d.targets {
                if stopped.contains(n) || d.failures.iter().any(|(f, _)| f == n) {
                    continue;
                }
                let Some(w) = self.worker_by_id(*n).map(|i| &self.workers[i]) else {
                    continue;
                };
                let ran = w.core.as_ref().map(|c| c.record().last_deployment);
                if !blocked && ran != Some(newest) {
                    bad.push(format!(
                        "(h) {name}: last ran deployment {ran:?}, the newest is {newest}"
                    ));
                }
                // (i) software lifecycle: it runs the newest deployment's bundle, or the
                // controller recorded that it rolled back or failed, and why.
                let recorded = by_id
                    .get(n)
                    .and_then(|m| m.deploys.iter().find(|x| x.deployment == newest));
                let running = w.life.as_ref().and_then(|l| l.running());
                let runs_new = running.is_some_and(|s| s.bundle_id == d.bundle_id);
                let problem = match recorded.map(|x| (x.state.as_str(), x.detail.as_deref())) {
                    Some(("running", _)) => (!runs_new || w.installed.current.as_ref() != running)
                        .then(|| {
                            format!(
                                "(i) {name}: deployment {newest} recorded running, yet it runs {running:?} (installed {:?})",
                                w.installed.current
                            )
                        }),
                    Some(("rolled_back" | "failed", Some(why))) if !why.is_empty() => runs_new
                        .then(|| {
                            format!(
                                "(i) {name}: deployment {newest} recorded as not run, yet it runs"
                            )
                        }),
                    other => (!blocked).then(|| {
                        format!(
                            "(i) {name}: deployment {newest} ends as {other:?}, neither running nor rolled back or failed with a reason"
                        )
                    }),
                };
                bad.extend(problem);
            }
            for (id, old) in disk.deployments.range(..newest) {
                let superseded = old.rollout.state == RolloutState::Halted
                    && old
                        .rollout
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.starts_with("superseded"));
                if !blocked && old.rollout.state != RolloutState::Done && !superseded {
                    bad.push(format!(
                        "(h) deployment {id}: rollout {} ({:?}), neither done nor superseded",
                        old.rollout.state.as_str(),
                        old.rollout.reason
                    ));
                }
            }
        }
        for m in core.machines() {
            let stopped = self
                .worker_by_id(m.node_id)
                .is_some_and(|i| self.workers[i].stopped);
            if m.balancing.draining.is_some() && !stopped {
                bad.push(format!(
                    "(h) {} is still drained by deployment {:?}",
                    m.name, m.balancing.draining
                ));
            }
        }
        // (f) configuration data.
        for (i, w) in self.workers.iter().enumerate() {
            let (Some(c), Some(m)) = (w.core.as_ref(), by_id.get(&w.id())) else {
                continue;
            };
            if w.stopped || m.key_status != KeyStatus::Admitted {
                continue;
            }
            let want = match self.expected_config(i) {
                Some(v) => Some(configdata::canonical(&v)),
                None if m.config.version == 0 => None,
                None => Some("{}".to_owned()),
            };
            let have = c.record().config.current.as_ref();
            if have.map(|o| &o.doc) != want.as_ref() {
                bad.push(format!(
                    "(f) {} applied configuration {:?}, its effective one is {want:?}",
                    w.name(),
                    have.map(|o| &o.doc)
                ));
            }
            let version = have.map_or(0, |o| o.version);
            if version != m.config.version
                || (version > 0 && (m.config.applied != version || m.config.state != "applied"))
            {
                bad.push(format!(
                    "(f) {} applied configuration version {version}; the controller sent {} and recorded {} {:?}",
                    w.name(),
                    m.config.version,
                    m.config.applied,
                    m.config.state
                ));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("\n"))
        }
    }

    fn summary(&self) -> String {
        format!(
            "seed {}: {} workers, {:?}, faults {:?}",
            self.seed,
            self.workers.len(),
            self.stats,
            self.faults
        )
    }
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    let mut sim = Sim::new(seed);
    let steps = 1500 + sim.rng.below(2500);
    for _ in 0..steps {
        sim.step();
        sim.act();
        if !sim.violations.is_empty() {
            break;
        }
    }
    sim.check_ok()
        .map_err(|e| format!("{e}\n{}", sim.summary()))?;
    sim.heal(true);
    sim.check_ok()
        .map_err(|e| format!("{e}\n{}", sim.summary()))?;
    // Liveness has a bound: a few more seconds may pass, not forever.
    let mut last = sim.check_end();
    let mut extra = 0;
    while last.is_err() && extra < 30 {
        for _ in 0..100 {
            sim.step();
        }
        extra += 1;
        last = sim.check_end();
    }
    last.map_err(|e| format!("{e}\n{}", sim.summary()))?;
    if extra > 0 {
        return Err(format!(
            "converged only {extra} s after the settling time\n{}",
            sim.summary()
        ));
    }
    Ok(sim.stats)
}

#[test]
fn simulated_cluster_delivers_exactly_once_and_pools_follow() {
    let seeds: Vec<u64> = match std::env::var("OUTPOST_SIM_CLUSTER_SEED") {
        Ok(s) => vec![s.parse().expect("OUTPOST_SIM_CLUSTER_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("OUTPOST_SIM_CLUSTER_SEEDS")
                .ok()
                .map(|s| s.parse().expect("OUTPOST_SIM_CLUSTER_SEEDS is a number"))
                .unwrap_or(800);
            (0..n).map(|i| 0xc105_0000 + i).collect()
        }
    };
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    for &seed in &seeds {
        match run_seed(seed) {
            Ok(s) => {
                total.applied += s.applied;
                total.applied_relayed += s.applied_relayed;
                total.hostile_refused += s.hostile_refused;
                total.crashes += s.crashes;
                total.ctrl_crashes += s.ctrl_crashes;
                total.cuts += s.cuts;
                total.accepts += s.accepts;
                total.rejects += s.rejects;
                total.pools += s.pools;
                total.downs += s.downs;
                total.stopped += s.stopped;
                total.configs_applied += s.configs_applied;
                total.configs_replayed += s.configs_replayed;
                total.deploys_run += s.deploys_run;
                total.deploys_rolled_back += s.deploys_rolled_back;
                total.deploys_failed += s.deploys_failed;
                total.deaths += s.deaths;
                total.waves += s.waves;
                total.failed_commits += s.failed_commits;
                total.slow_commits += s.slow_commits;
                total.seal_failures += s.seal_failures;
            }
            Err(why) => panic!(
                "seed {seed} failed:\n{why}\nreplay: OUTPOST_SIM_CLUSTER_SEED={seed} cargo nextest run --release -p outpost --test sim_cluster"
            ),
        }
    }
    eprintln!(
        "{} seeds in {:.1} s: {total:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        total.applied > 5 * seeds.len() as u64,
        "the simulation applied almost nothing"
    );
    if seeds.len() >= 20 {
        assert!(
            total.applied_relayed > 0,
            "nothing ever went through the load balancer"
        );
        assert!(total.crashes > 0 && total.ctrl_crashes > 0 && total.accepts > 0);
        assert!(
            total.configs_applied > seeds.len() as u64 && total.configs_replayed > 0,
            "configuration data was hardly applied, or never replayed after a crash"
        );
        // The production lifecycle and deployments cores met every outcome and fault.
        assert!(
            total.deploys_run > 0
                && total.deploys_rolled_back > 0
                && total.deploys_failed > 0
                && total.deaths > 0,
            "software was never deployed, rolled back, failed or restarted: {total:?}"
        );
        assert!(
            total.failed_commits > 0 && total.slow_commits > 0 && total.seal_failures > 0,
            "a commit never failed or stalled, or sealing never failed: {total:?}"
        );
    }
}

/// The checks can fail: a worker that loses its last applied publication is caught.
#[test]
fn simulation_detects_a_lost_publication() {
    let mut sim = Sim::with_plan(7, Rng(7), Plan::calm(2, false));
    sim.heal(false);
    sim.check_ok().unwrap();
    sim.check_end().unwrap();
    let d = 1;
    assert!(sim.workers[d].disk.applied > 0);
    sim.workers[d].disk.applied -= 1;
    sim.crash_worker(d, 0);
    sim.step();
    assert!(sim.check_end().is_err());
}

// ---- hostile cases ----

/// A worker's identity, outside any simulation.
struct Machine {
    info: JoinInfo,
    fingerprint: Fingerprint,
    seal: SealKey,
}

impl Machine {
    fn new(n: u128, name: &str, component: &str, lb: Option<&str>, token: bool) -> Machine {
        Machine::keyed(n, name, component, lb, token, name)
    }

    /// With the certificate named by `key` (two machines claiming one name have two keys).
    fn keyed(
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

    fn core(&self) -> WorkerCore {
        let seal = SealKey::from_secret(&self.seal.secret_bytes()).unwrap();
        WorkerCore::open(self.info.clone(), seal, WorkerRecord::default()).unwrap()
    }

    fn id(&self) -> NodeId {
        self.info.node_id
    }

    /// What its certificate proves: its key and its node id.
    fn peer(&self) -> Peer {
        Peer::new(self.fingerprint, self.id())
    }
}

fn controller(pending_max: usize, token: bool) -> (ControllerCore, Vec<u8>) {
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

fn records(c: &ControllerCore) -> Vec<MachineRecord> {
    c.machines().cloned().collect()
}

fn closes(out: &[Output], conn: ConnId) -> bool {
    out.iter()
        .any(|o| matches!(o, Output::Close { conn: c, .. } if *c == conn))
}

fn sends_to(out: &[Output], conn: ConnId) -> Vec<&Message> {
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

fn refused_with(out: &[Output], conn: ConnId) -> Option<JoinRefusal> {
    sends_to(out, conn).iter().find_map(|m| match m {
        Message::Admission(Admission::Refused(why)) => Some(*why),
        _ => None,
    })
}

fn admitted(out: &[Output], conn: ConnId) -> bool {
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
fn many(n: u128, name: &str, token: bool, key: &str) -> Machine {
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
fn two_admitted() -> (ControllerCore, Machine, Machine) {
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

/// A calm cluster (a load balancer, two dependents), settled: every dependent has its route
/// and has applied at least one publication.
fn settled_cluster() -> Sim {
    let mut sim = Sim::with_plan(11, Rng(11), Plan::calm(2, false));
    sim.heal(false);
    sim.check_ok().unwrap();
    sim.check_end().unwrap();
    sim
}

fn dependent_parts(sim: &Sim, d: usize) -> (NodeId, ConnId, u64) {
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
fn publish_through_lb(sim: &mut Sim, d: usize) -> Publication {
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

fn lb_pool_names(ctrl: &ControllerCore, lb: NodeId) -> (Vec<String>, Vec<String>) {
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
