//! `outpost-cluster-bench`: what one controller sustains. A real `outpost` controller process;
//! this process simulates its workers (one load balancer and N-1 dependents behind it), each with
//! its own key, QUIC endpoint and connection, and a real worker state machine that verifies and
//! opens every publication. Measures:
//!
//! - joins: all workers connected and admitted (join token), and how long that took;
//! - broadcast: a change that gives every dependent new state in one commit (the load balancer
//!   comes back at a new relay address, so every dependent gets a new route), from the change to
//!   the last dependent having applied it;
//! - pool latency: a dependent reports `failed` (then `running`), until the load balancer has
//!   applied its new pool;
//! - configuration data: one document for the whole service, from the `PUT` to every worker
//!   having applied it, and to the controller having recorded every worker's report;
//! - a phased rollout to every worker (`--rollout-waves`, each wave healthy for 1 s before the
//!   next, dependents drained out of the pool first): when each wave started and when all of
//!   it ran, as the controller records it (the simulated software reports running as soon as
//!   it is sent the order; the bundle is really sealed to every worker's key);
//! - the controller's resident memory and CPU.
//!
//! Everything runs on this machine's cores together; the figures include that contention.

#[path = "procstat.rs"]
#[allow(dead_code)]
mod procstat;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use outpost::cluster::keys::{token_proof, SealKey};
use outpost::cluster::worker::core::{Effect, JoinInfo, WorkerCore, WorkerOutput, WorkerRecord};
use outpost::ids::{Fingerprint, NodeId};
use outpost::net::{self, Identity, PinSet, TransportLimits};
use outpost::testkit::{outpost_binary_near_current_exe, Cluster, NodeInfo};
use outpost::wire::{read_frame, write_frame, ConfigReport, MachineReport, Message};
use tokio::sync::{mpsc, Mutex};

const TOKEN: &str = "bench-join-token";
const TARGET_BROADCAST_MS: f64 = 1000.0;
const TARGET_POOL_MS: f64 = 100.0;

#[derive(Parser, Debug)]
#[command(
    name = "outpost-cluster-bench",
    about = "What one outpost controller sustains"
)]
struct Args {
    /// Simulated workers (one load balancer, the rest its dependents).
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Pool-latency rounds (each: a dependent fails, then recovers).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Workers joining at once (100 at once on 2 busy cores let some miss the controller's
    /// 2 s first-frame deadline; a real worker would retry, this bench does not).
    #[arg(long, default_value_t = 25)]
    wave: usize,
    /// The controller's `[log] level`.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// The rollout's waves (cumulative machine counts or percentages).
    #[arg(long, default_value = "1,10%,50%,100%")]
    rollout_waves: String,
}

/// What a simulated worker saw, with when.
#[derive(Debug)]
enum Seen {
    Admitted,
    Route(Instant, String),
    Pool(usize, Instant, Vec<String>),
    Config(Instant, u64),
}

struct Sim {
    i: usize,
    core: WorkerCore,
    send: quinn::SendStream,
}

impl Sim {
    async fn perform(&mut self, seen: &mpsc::UnboundedSender<Seen>) -> anyhow::Result<()> {
        // The bench keeps no database: applied state is "committed" at once.
        loop {
            let (_rec, outs) = self.core.take();
            if outs.is_empty() {
                return Ok(());
            }
            self.perform_outputs(outs, seen).await?;
        }
    }

    async fn perform_outputs(
        &mut self,
        outs: Vec<WorkerOutput>,
        seen: &mpsc::UnboundedSender<Seen>,
    ) -> anyhow::Result<()> {
        for o in outs {
            match o {
                WorkerOutput::ToController(m) => write_frame(&mut self.send, &m).await?,
                WorkerOutput::Apply(Effect::Route(r)) => {
                    let addr = r.map(|r| r.addr).unwrap_or_default();
                    let _ = seen.send(Seen::Route(Instant::now(), addr));
                }
                WorkerOutput::Apply(Effect::Pool(p)) => {
                    let names = p.members.into_iter().map(|m| m.name).collect();
                    let _ = seen.send(Seen::Pool(self.i, Instant::now(), names));
                }
                // Its software takes a configuration at once.
                WorkerOutput::Apply(Effect::Config(order)) => {
                    let _ = seen.send(Seen::Config(Instant::now(), order.version));
                    self.core.configured(
                        order.version,
                        ConfigReport {
                            version: order.version,
                            state: "applied".into(),
                            detail: None,
                        },
                    );
                }
                // Its software runs at once (the bench fetches no bundle: it measures the
                // controller's rollout).
                WorkerOutput::Apply(Effect::Deploy(order)) => {
                    self.core.deployed(
                        order.deployment,
                        MachineReport {
                            state: "running".into(),
                            software: Some(outpost::wire::Software {
                                service: order.service.clone(),
                                bundle_id: order.bundle_id.clone(),
                                version: order.version.clone(),
                            }),
                            detail: None,
                            deployment: Some(order.deployment),
                        },
                    );
                }
                // The bench couples no router.
                WorkerOutput::Apply(Effect::Coupling) => {}
            }
        }
        Ok(())
    }
}

struct Worker {
    name: String,
    id: Identity,
    node_id: NodeId,
    seal_secret: Vec<u8>,
    ep: quinn::Endpoint,
}

type Shared = Arc<Mutex<Sim>>;

/// Every simulated worker by node id: the load balancer hands relayed publications to its
/// dependents' state machines through it, as its relay would over their connections.
type Registry = Arc<std::sync::Mutex<BTreeMap<NodeId, Shared>>>;

static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();

fn registry() -> &'static Registry {
    REGISTRY.get_or_init(Default::default)
}

/// Connects worker `i`, joins, and runs its reader until the connection ends.
async fn run_worker(
    w: &Worker,
    i: usize,
    ctl: std::net::SocketAddr,
    relay_addr: Option<String>,
    record: WorkerRecord,
    seen: mpsc::UnboundedSender<Seen>,
) -> anyhow::Result<Shared> {
    let (conn, _) = net::connect(&w.ep, ctl).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let lb = i != 0;
    let info = JoinInfo {
        node_id: w.node_id,
        name: w.name.clone(),
        service: "voice".into(),
        component: if lb {
            "media-processor"
        } else {
            "load-balancer"
        }
        .into(),
        load_balancer: lb.then(|| "lb-0".to_owned()),
        service_addr: Some(format!("127.0.0.1:{}", 20000 + i)),
        relay_addr,
        token_proof: Some(token_proof(TOKEN.as_bytes(), &w.id.fingerprint)),
    };
    let seal = SealKey::from_secret(&w.seal_secret)?;
    let core = WorkerCore::open(info, seal, record)?;
    write_frame(&mut send, &Message::Join(core.join())).await?;
    let sim = Arc::new(Mutex::new(Sim { i, core, send }));
    registry()
        .lock()
        .expect("registry lock")
        .insert(w.node_id, sim.clone());
    let reader = sim.clone();
    let (relay_tx, mut relay_rx) = mpsc::unbounded_channel::<outpost::wire::Relay>();
    let relay_seen = seen.clone();
    tokio::spawn(async move {
        while let Some(r) = relay_rx.recv().await {
            let to = registry()
                .lock()
                .expect("registry lock")
                .get(&r.to)
                .cloned();
            if let Some(dep) = to {
                let mut d = dep.lock().await;
                if d.core.from_relay(r.publication).is_ok() {
                    let _ = d.perform(&relay_seen).await;
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut admitted = false;
        while let Ok(Some(msg)) = read_frame(&mut recv, 1 << 20).await {
            if let Message::Relay(r) = msg {
                // Handed on in order by a task of its own, as the relay forwards on the
                // dependents' connections: this reader keeps reading (and acknowledging).
                let _ = relay_tx.send(r);
                continue;
            }
            let mut s = reader.lock().await;
            if let Err(e) = s.core.from_controller(msg) {
                eprintln!("worker {i}: {e}");
                return;
            }
            if !admitted && s.core.standing() == outpost::cluster::worker::core::Standing::Admitted
            {
                admitted = true;
                let _ = seen.send(Seen::Admitted);
            }
            if let Err(e) = s.perform(&seen).await {
                eprintln!("worker {i}: {e}");
                return;
            }
        }
        drop(conn);
    });
    Ok(sim)
}

fn controller_config(all: &[NodeInfo], token_file: &Path, log_level: &str) -> String {
    let me = &all[0];
    format!(
        "role = \"controller\"\nname = \"controller\"\ndata_dir = {:?}\nlisten = \"{}\"\napi = \"{}\"\n\
         [log]\nlevel = \"{log_level}\"\n[admission]\njoin_token_file = {:?}\n\
         [cluster]\ndown_after = \"60s\"\npending_max = 16\n",
        me.data_dir.to_string_lossy(),
        me.listen,
        me.api_addr,
        token_file.to_string_lossy(),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[k]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.workers < 2 {
        bail!("--workers must be at least 2 (a load balancer and a dependent)");
    }
    let bin = outpost_binary_near_current_exe()?;
    let token_file: PathBuf =
        std::env::temp_dir().join(format!("outpost-cluster-bench-{}", std::process::id()));
    std::fs::write(&token_file, TOKEN)?;
    let tf = token_file.clone();
    let level = args.log_level.clone();
    let configure = move |all: &[NodeInfo], _i: usize| controller_config(all, &tf, &level);
    let nodes = vec![("controller".to_owned(), "controller".to_owned())];
    let cluster = Cluster::start_nodes(&bin, "cluster-bench", &nodes, &configure).await?;
    cluster.wait_ready(0).await?;
    let ctl_info = cluster.node(0).clone();
    let ctl_fp: Fingerprint = ctl_info.fingerprint.parse()?;
    let pid = cluster.pid(0).context("controller pid")?;
    let idle_rss = procstat::rss_kib(pid).unwrap_or(0);
    let cpu0 = procstat::process_cpu_secs(pid).unwrap_or(0.0);

    println!(
        "outpost-cluster-bench: {} simulated workers against one controller",
        args.workers
    );
    let t = Instant::now();
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let name = if i == 0 {
            "lb-0".to_owned()
        } else {
            format!("w-{i}")
        };
        let node_id = NodeId::random();
        let id = Identity::generate(node_id, &name)?;
        let ep = net::endpoint(
            "127.0.0.1:0".parse()?,
            &id,
            PinSet::new([ctl_fp]),
            TransportLimits::default(),
        )?;
        workers.push(Worker {
            name,
            id,
            node_id,
            seal_secret: SealKey::generate().secret_bytes(),
            ep,
        });
    }
    println!(
        "  {} identities and endpoints in {:.1?}",
        args.workers,
        t.elapsed()
    );

    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let mut sims: BTreeMap<usize, Shared> = BTreeMap::new();
    // Joins, in waves.
    let t_join = Instant::now();
    let mut admitted = 0usize;
    let lb_relay_1 = "127.0.0.1:40001".to_owned();
    for chunk in (0..args.workers).collect::<Vec<_>>().chunks(args.wave) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let w = &workers[i];
            let relay = (i == 0).then(|| lb_relay_1.clone());
            tasks.push(run_worker(
                w,
                i,
                ctl_info.listen,
                relay,
                WorkerRecord::default(),
                seen_tx.clone(),
            ));
        }
        // Started together, so the handshakes of a wave overlap.
        for (k, r) in futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .enumerate()
        {
            sims.insert(chunk[k], r?);
        }
    }
    // Every worker admitted, and every dependent holding its route.
    let mut routed = 0usize;
    while admitted < args.workers || routed < args.workers - 1 {
        match tokio::time::timeout(Duration::from_secs(120), seen_rx.recv()).await {
            Ok(Some(Seen::Admitted)) => admitted += 1,
            Ok(Some(Seen::Route(..))) => routed += 1,
            Ok(Some(Seen::Pool(..))) => {}
            _ => bail!("joins stalled: {admitted} admitted, {routed} routed"),
        }
    }
    let join_secs = t_join.elapsed().as_secs_f64();
    println!(
        "  joins: {} workers admitted (join token) and routed in {:.2} s ({:.0} joins/s)",
        args.workers,
        join_secs,
        args.workers as f64 / join_secs
    );
    let rss_joined = procstat::rss_kib(pid).unwrap_or(0);

    // Let pools settle.
    drain(&mut seen_rx, Duration::from_millis(500)).await;

    // Broadcast: the load balancer comes back at a new relay address.
    let lb_relay_2 = "127.0.0.1:40002".to_owned();
    let t_b = Instant::now();
    // It comes back with what it had applied (its database), at a new address.
    let lb_record = sims[&0].lock().await.core.record().clone();
    let lb_sim = run_worker(
        &workers[0],
        0,
        ctl_info.listen,
        Some(lb_relay_2.clone()),
        lb_record,
        seen_tx.clone(),
    )
    .await?;
    sims.insert(0, lb_sim);
    let mut got = 0usize;
    let mut last = t_b;
    while got < args.workers - 1 {
        match tokio::time::timeout(Duration::from_secs(60), seen_rx.recv()).await {
            Ok(Some(Seen::Route(at, addr))) if addr == lb_relay_2 => {
                got += 1;
                last = at;
            }
            Ok(Some(_)) => {}
            _ => bail!(
                "broadcast stalled: {got} of {} dependents",
                args.workers - 1
            ),
        }
    }
    let broadcast_ms = last.duration_since(t_b).as_secs_f64() * 1000.0;
    println!(
        "  broadcast: new state for {} dependents, applied by all in {:.0} ms (target <= {TARGET_BROADCAST_MS:.0} ms: {})",
        args.workers - 1,
        broadcast_ms,
        if broadcast_ms <= TARGET_BROADCAST_MS { "met" } else { "missed" }
    );
    drain(&mut seen_rx, Duration::from_millis(500)).await;

    // Pool latency: a dependent fails, then recovers.
    let mut lat = Vec::new();
    for r in 0..args.rounds {
        let i = 1 + (r * 7919) % (args.workers - 1);
        let name = workers[i].name.clone();
        for (state, present) in [("failed", false), ("running", true)] {
            let t0 = Instant::now();
            {
                let mut s = sims[&i].lock().await;
                s.core.report(MachineReport {
                    state: state.into(),
                    software: None,
                    detail: None,
                    deployment: None,
                });
                s.perform(&seen_tx).await?;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(30), seen_rx.recv()).await {
                    Ok(Some(Seen::Pool(0, at, names))) if names.contains(&name) == present => {
                        lat.push(at.duration_since(t0).as_secs_f64() * 1000.0);
                        break;
                    }
                    Ok(Some(_)) => {}
                    _ => bail!("pool update for {name} ({state}) never reached the load balancer"),
                }
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    let p50 = percentile(&lat, 0.5);
    let p99 = percentile(&lat, 0.99);
    println!(
        "  pool latency ({} changes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target <= {TARGET_POOL_MS:.0} ms: {})",
        lat.len(),
        p50,
        p99,
        lat.last().copied().unwrap_or(f64::NAN),
        if p99 <= TARGET_POOL_MS { "met" } else { "missed" }
    );
    drain(&mut seen_rx, Duration::from_millis(300)).await;

    // Configuration data: one document for the service, to every worker.
    let t_c = Instant::now();
    let set: serde_json::Value = cluster
        .api(0)
        .put_json(
            "/v1/config/service/voice",
            &serde_json::json!({"log": "info", "limits": {"calls": 500, "cps": 50}}),
        )
        .await?;
    let put_ms = t_c.elapsed().as_secs_f64() * 1000.0;
    let version = set["version"].as_u64().context("the PUT's version")?;
    let mut got = 0usize;
    let mut last = t_c;
    // Bounded: a worker that never applies it is reported, not waited for.
    while got < args.workers {
        match tokio::time::timeout(Duration::from_secs(10), seen_rx.recv()).await {
            Ok(Some(Seen::Config(at, v))) if v == version => {
                got += 1;
                last = at;
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let applied_ms = last.duration_since(t_c).as_secs_f64() * 1000.0;
    let machines: serde_json::Value = cluster.api(0).get_json("/v1/machines").await?;
    let recorded = machines.as_array().map_or(0, |a| {
        a.iter()
            .filter(|m| m["config"]["applied"].as_u64() == Some(version))
            .count()
    });
    let recorded_ms = t_c.elapsed().as_secs_f64() * 1000.0;
    if let Some(a) = machines.as_array() {
        for m in a
            .iter()
            .filter(|m| m["config"]["applied"].as_u64() != Some(version))
            .take(5)
        {
            println!(
                "    not applied: {} ({}) config {} channel {}",
                m["name"], m["component"], m["config"], m["channel"]
            );
        }
    }
    println!(
        "  configuration: a service document to {} workers: PUT answered in {:.0} ms (after its commit), applied by {got} in {:.0} ms; {recorded} reports recorded by {:.0} ms",
        args.workers, put_ms, applied_ms, recorded_ms
    );
    drain(&mut seen_rx, Duration::from_millis(300)).await;

    // A phased rollout to every worker.
    rollout(&bin, &cluster, &args).await?;

    let rss_end = procstat::rss_kib(pid).unwrap_or(0);
    let cpu = procstat::process_cpu_secs(pid).unwrap_or(0.0) - cpu0;
    println!(
        "  controller: RSS idle {} MiB, with {} workers {} MiB, at the end {} MiB; CPU {:.1} s",
        idle_rss / 1024,
        args.workers,
        rss_joined / 1024,
        rss_end / 1024,
        cpu
    );
    let machines: serde_json::Value = cluster.api(0).get_json("/v1/machines").await?;
    let n = machines
        .as_array()
        .or_else(|| machines.get("machines").and_then(|m| m.as_array()))
        .map(|a| a.len())
        .unwrap_or(0);
    println!("  the controller lists {n} machines");
    drop(sims);
    let _ = std::fs::remove_file(&token_file);
    cluster.finish().await?;
    Ok(())
}

/// Deploys the sample voice bundle in waves with `outpost deploy` and follows the rollout
/// through `GET /v1/deployments/ID`, printing each wave's figures.
async fn rollout(bin: &Path, cluster: &Cluster, args: &Args) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("outpost-cluster-bench-b-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let bundle = work.join("voice.bundle");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles/voice");
    let o = std::process::Command::new(bin)
        .args(["bundle", "pack"])
        .arg(&src)
        .arg("-o")
        .arg(&bundle)
        .output()?;
    if !o.status.success() {
        bail!("bundle pack: {}", String::from_utf8_lossy(&o.stderr));
    }
    let ctl = cluster.node(0);
    let t0 = Instant::now();
    let o = std::process::Command::new(bin)
        .args(["deploy", "--service", "voice", "--bundle"])
        .arg(&bundle)
        .args(["--waves", &args.rollout_waves, "--healthy-for", "1s"])
        .arg("--api")
        .arg(format!("http://{}", ctl.api_addr))
        .env("OUTPOST_TOKEN", &ctl.token)
        .output()?;
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    if !o.status.success() {
        bail!("deploy: {out} {}", String::from_utf8_lossy(&o.stderr));
    }
    let id = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("deployment ")
                .and_then(|r| r.strip_suffix(" created"))
        })
        .context("no deployment id")?
        .to_owned();
    let created_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // Wave -> (started, all running), in ms since the deploy command started.
    let mut seen: BTreeMap<usize, (f64, Option<f64>)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let d = loop {
        let d: serde_json::Value = cluster
            .api(0)
            .get_json(&format!("/v1/deployments/{id}"))
            .await?;
        let now = t0.elapsed().as_secs_f64() * 1000.0;
        let waves = d["rollout"]["waves"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (k, w) in waves.iter().enumerate() {
            if w["state"] == "waiting" {
                continue;
            }
            let e = seen.entry(k).or_insert((now, None));
            let n = w["machines"].as_array().map_or(0, Vec::len) as u64;
            if e.1.is_none() && w["running"].as_u64() == Some(n) {
                e.1 = Some(now);
            }
        }
        let state = d["rollout"]["state"].as_str().unwrap_or("?").to_owned();
        if state != "running" || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let waves = d["rollout"]["waves"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    println!(
        "  rollout: voice to {} workers in {} waves ({}), healthy for 1 s before each next wave: {} after {:.1} s (upload and create {:.0} ms)",
        args.workers,
        waves.len(),
        args.rollout_waves,
        d["rollout"]["state"].as_str().unwrap_or("?"),
        t0.elapsed().as_secs_f64(),
        created_ms
    );
    for (k, w) in waves.iter().enumerate() {
        let n = w["machines"].as_array().map_or(0, Vec::len);
        let (start, run) = seen.get(&k).copied().unwrap_or((f64::NAN, None));
        let run = run.unwrap_or(f64::NAN);
        println!(
            "    wave {}: {n} machines, started at {:.2} s, all running {:.0} ms after it started ({:.1} ms per machine)",
            k + 1,
            start / 1000.0,
            run - start,
            (run - start) / n.max(1) as f64
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

async fn drain(rx: &mut mpsc::UnboundedReceiver<Seen>, quiet: Duration) {
    while let Ok(Some(_)) = tokio::time::timeout(quiet, rx.recv()).await {}
}
