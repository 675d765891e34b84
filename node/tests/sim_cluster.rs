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
//! `OUTPOST_SIM_CLUSTER_SEED=S` replays one; `OUTPOST_SIM_CLUSTER_KEEP_GOING=1` runs on past a
//! failing seed (a soak) and lists every failure at the end. A failure prints its seed.
//!
//! The simulation's parts live in `sim_cluster_support/`: the controller (`controller.rs`),
//! connections and workers (`workers.rs`), time, faults and operators (`time.rs`), the checks
//! once healed (`check.rs`), and the hostile cases (`hostile_joins.rs`,
//! `hostile_channels.rs`).

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
    ReportState, Software,
};
use serde_json::{json, Value};

#[path = "sim_cluster_support/check.rs"]
mod check;
#[path = "sim_cluster_support/controller.rs"]
mod controller;
#[path = "sim_cluster_support/hostile_channels.rs"]
mod hostile_channels;
#[path = "sim_cluster_support/hostile_joins.rs"]
mod hostile_joins;
#[path = "sim_cluster_support/time.rs"]
mod time;
#[path = "sim_cluster_support/workers.rs"]
mod workers;

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
    // A soak: run every seed, print each failure as it happens, fail at the end.
    let keep_going = std::env::var("OUTPOST_SIM_CLUSTER_KEEP_GOING").is_ok();
    let mut failed = Vec::new();
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
            Err(why) if keep_going => {
                eprintln!("seed {seed} failed:\n{why}");
                failed.push(seed);
            }
            Err(why) => panic!(
                "seed {seed} failed:\n{why}\nreplay: OUTPOST_SIM_CLUSTER_SEED={seed} cargo nextest run --release -p outpost --test sim_cluster"
            ),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed: {failed:?}\nreplay one: OUTPOST_SIM_CLUSTER_SEED=S cargo nextest run --release -p outpost --test sim_cluster",
        failed.len(),
        seeds.len()
    );
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
