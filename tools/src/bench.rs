//! `outpost-bench`: durable ingest on one datacenter, replication across three, and the nodes'
//! resident memory, each on fresh nodes (real `outpost` processes started by the testkit's
//! `Cluster`) in a temporary directory on the real disk. Prints a table; `--json FILE` writes the
//! same figures.
//!
//! The load generator runs in this process on the same machine as the nodes, so it competes with
//! them for the cores; each run shows how much CPU the benchmark itself used.
//!
//! `--compare nats` also runs NATS JetStream (bench/nats.rs) and prints each figure as a ratio of
//! its own; `--growth` adds the long runs over a million accounts or entries (bench/growth.rs).

#[path = "bench/growth.rs"]
mod growth;
mod load;
#[path = "bench/nats.rs"]
mod nats;
mod nodes;
mod procstat;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use outpost::testkit::{self, Api, Cluster, ClusterSpec};
use serde::Serialize;
use serde_json::json;

use load::{Kind, Target};

/// Targets the figures are compared with.
const TARGET_BATCH_EPS: f64 = 100_000.0;
const TARGET_SINGLE256_EPS: f64 = 20_000.0;
const TARGET_3DC_EPS: f64 = 25_000.0;
const TARGET_3DC_P99_MS: f64 = 100.0;
const TARGET_RSS_MIB: f64 = 128.0;
/// Catch-up into a datacenter that was down, elements per second.
const TARGET_CATCHUP_EPS: f64 = 200_000.0;
/// How far events/s over 1,000,000 accounts may fall below the 10,000-account run.
const TARGET_GROWTH_EPS_RATIO: f64 = 0.8;
/// How much more peak RSS the 1,000,000-account run may use than the 10,000-account one
/// ("unchanged", with room for sampling noise).
const TARGET_GROWTH_RSS_RATIO: f64 = 1.1;
/// Accounts of the growth ingest run, and entries written in the recovery runs.
const GROWTH_ACCOUNTS: u64 = 1_000_000;
/// Records written before `batch1000-log3m` measures (the log and message records it retains).
const GROWTH_LOG_RECORDS: u64 = 3_000_000;
/// The run a growth ingest run is compared with.
const GROWTH_BASELINE: &str = "batch1000";
/// How often the nodes' VmRSS is sampled.
const RSS_EVERY: Duration = Duration::from_millis(200);
/// How long the three datacenters may take to converge after the load stops.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
/// How often convergence is polled (it bounds the precision of the convergence time).
const CONVERGE_POLL: Duration = Duration::from_millis(20);
/// The node's thread that owns write transactions.
const WRITER_THREAD: &str = "outpost-writer";
/// How often the writer thread's scheduler state is sampled.
const STATE_EVERY: Duration = Duration::from_millis(5);
/// How long the nodes may take to exit after SIGTERM at the end of a run.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Message ids kept for the ingest-to-everywhere latency, at most.
const SAMPLES_MAX: usize = 3000;

#[derive(Parser, Debug)]
#[command(
    name = "outpost-bench",
    about = "Benchmarks outpost datacenter nodes: durable ingest, replication across three, memory"
)]
struct Args {
    /// Short runs (3 s each instead of 10 s).
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Seconds of load per run (overrides the 10 s / 3 s default).
    #[arg(long, value_name = "SECS")]
    seconds: Option<f64>,
    /// Where the nodes' temporary directories go (default: the system temp dir, unless that is
    /// tmpfs, then the current directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Only these runs (comma-separated names, e.g. `batch1000,single256,3dc-single`).
    #[arg(long, value_name = "NAMES")]
    only: Option<String>,
    /// The nodes' `[log] level`.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Also run the long growth runs (batch1000-1m, catchup-1m, snapshot-1m; minutes each).
    /// `--only` can name them without this.
    #[arg(long)]
    growth: bool,
    /// Also measure another system in the same sitting and print each figure as a ratio of its.
    #[arg(long, value_enum, value_name = "SYSTEM")]
    compare: Option<Compare>,
    /// The `nats-server` binary for `--compare nats` (default: the one on PATH).
    #[arg(long, value_name = "PATH")]
    nats_server: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Compare {
    /// A 3-node NATS JetStream cluster on 127.0.0.1: file storage, R3, `sync_interval: always`.
    Nats,
}

struct Ctx {
    bin: PathBuf,
    base: PathBuf,
    duration: Duration,
    warmup: Duration,
    log_level: String,
}

#[derive(Clone, Debug, Default, Serialize)]
struct ThreadCpu {
    thread: String,
    cores: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct NodeFigures {
    name: String,
    pid: u32,
    rss_max_mib: f64,
    /// CPU used by the node over the measured window, in cores (1.0 = one core busy).
    cpu_cores: f64,
    /// The busiest threads (by name, same-named threads added up), in cores.
    top_threads: Vec<ThreadCpu>,
    /// Scheduler states of the writer thread over the load (sampled every 5 ms).
    writer_states: Option<procstat::StateShares>,
    events_ingested: u64,
    elements_applied: u64,
    commits: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Replication {
    total_events: u64,
    /// From the start of the load to its last answer.
    load_secs: f64,
    /// From the start of the load until every node held every event.
    converged_secs: Option<f64>,
    /// From the last answer until every node held every event.
    tail_secs: Option<f64>,
    events_per_sec_everywhere: Option<f64>,
    samples: usize,
    /// Per (message, peer): first_seen at the peer minus first_seen at the origin.
    peer_p50_ms: Option<f64>,
    peer_p99_ms: Option<f64>,
    /// Per message: the largest of its peers' delays (ingest to everywhere).
    everywhere_p50_ms: Option<f64>,
    everywhere_p99_ms: Option<f64>,
    everywhere_max_ms: Option<f64>,
    /// Samples whose every peer reports message_count n-1.
    full_count_samples: usize,
    /// Samples some node did not know (404) or could not answer.
    missing_samples: usize,
    digests_equal: Option<bool>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct RunFigures {
    name: String,
    section: String,
    description: String,
    nodes: usize,
    clients: usize,
    events_per_request: usize,
    loadavg_before: String,
    loadavg_after: String,
    window_secs: f64,
    events: u64,
    requests: u64,
    events_per_sec: f64,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_max_ms: Option<f64>,
    errors: u64,
    error_examples: Vec<String>,
    commits_per_sec: f64,
    events_per_commit: f64,
    commit_mean_ms: Option<f64>,
    /// CPU used by this benchmark process over the window, in cores.
    bench_cpu_cores: f64,
    /// CPU used by everything else on the machine over the window (other engineers' builds and
    /// tests: noise), in cores: machine-wide busy time minus the nodes' and the benchmark's.
    other_cpu_cores: f64,
    node: Vec<NodeFigures>,
    replication: Option<Replication>,
    /// Accounts the load was spread over.
    accounts: u64,
    /// Records written before the measured load (`batch1000-log3m`), 0 for the others.
    prefilled_records: u64,
    /// Entries the (first) node holds at the end of the run.
    entries_end: u64,
    /// The recovery runs' figures (catchup-1m, snapshot-1m).
    growth: Option<growth::GrowthFigures>,
    /// events/s of this run over NATS JetStream's msg/s (with `--compare nats`).
    vs_nats: Option<f64>,
    /// p99 (ingest to everywhere for 3 DC runs, client-side otherwise) over NATS's publish-to-ack p99.
    p99_vs_nats: Option<f64>,
    /// For a growth ingest run: its figures over those of [`GROWTH_BASELINE`] in the same sitting.
    vs_baseline: Option<BaselineRatios>,
    target: String,
    target_met: Option<bool>,
    problem: Option<String>,
    /// Observations that do not invalidate the figures (e.g. a slow shutdown).
    notes: Vec<String>,
    kept_dir: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct BaselineRatios {
    baseline: String,
    events_per_sec: f64,
    p99: Option<f64>,
    rss: Option<f64>,
}

struct RunDef {
    name: &'static str,
    section: &'static str,
    description: &'static str,
    nodes: usize,
    clients_per_node: usize,
    kind: Kind,
    /// Accounts the load is spread over.
    accounts: u64,
    shape: Shape,
    /// Only with `--growth` (or named by `--only`).
    growth: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Closed-loop load for the run's duration (load.rs).
    Load,
    /// The same, after this many records were written (over the run's accounts) to make the
    /// log and the message records that long first.
    LoadOnLog(u64),
    /// The last node stopped, this many entries written at the others, the node restarted and
    /// timed until it holds them (growth.rs).
    Recover(growth::Recovery, u64),
}

const RUNS: &[RunDef] = &[
    RunDef {
        name: "batch1000",
        section: "1a",
        description: "1 DC, batches of 1,000",
        nodes: 1,
        clients_per_node: 4,
        kind: Kind::Batch(1000),
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "batch10000",
        section: "1a",
        description: "1 DC, batches of 10,000",
        nodes: 1,
        clients_per_node: 4,
        kind: Kind::Batch(10_000),
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "single1",
        section: "1b",
        description: "1 DC, single POSTs",
        nodes: 1,
        clients_per_node: 1,
        kind: Kind::Single,
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "single16",
        section: "1b",
        description: "1 DC, single POSTs",
        nodes: 1,
        clients_per_node: 16,
        kind: Kind::Single,
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "single256",
        section: "1b",
        description: "1 DC, single POSTs",
        nodes: 1,
        clients_per_node: 256,
        kind: Kind::Single,
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "3dc-single",
        section: "2",
        description: "3 DCs, single POSTs at each",
        nodes: 3,
        clients_per_node: 64,
        kind: Kind::Single,
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "3dc-batch",
        section: "2",
        description: "3 DCs, batches of 1,000 at each",
        nodes: 3,
        clients_per_node: 2,
        kind: Kind::Batch(1000),
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "batch1000-1m",
        section: "5",
        description: "1 DC, batches of 1,000 over 1,000,000 accounts",
        nodes: 1,
        clients_per_node: 4,
        kind: Kind::Batch(1000),
        accounts: GROWTH_ACCOUNTS,
        shape: Shape::Load,
        growth: true,
    },
    RunDef {
        name: "catchup-1m",
        section: "5",
        description: "3 DCs, one down while 1,000,000 entries are written, then restarted",
        nodes: 3,
        clients_per_node: 2,
        kind: Kind::Batch(growth::FILL_BATCH as usize),
        accounts: GROWTH_ACCOUNTS,
        shape: Shape::Recover(growth::Recovery::Log, GROWTH_ACCOUNTS),
        growth: true,
    },
    RunDef {
        name: "batch1000-log3m",
        section: "5",
        description: "1 DC, batches of 1,000 onto a retained log of 3,000,000 records",
        nodes: 1,
        clients_per_node: 4,
        kind: Kind::Batch(1000),
        accounts: load::ACCOUNTS,
        shape: Shape::LoadOnLog(GROWTH_LOG_RECORDS),
        growth: true,
    },
    RunDef {
        name: "snapshot-1m",
        section: "5",
        description: "2 DCs, one down while 1,000,000 entries are written past log retention",
        nodes: 2,
        clients_per_node: 2,
        kind: Kind::Batch(growth::FILL_BATCH as usize),
        accounts: GROWTH_ACCOUNTS,
        shape: Shape::Recover(growth::Recovery::Snapshot, GROWTH_ACCOUNTS),
        growth: true,
    },
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // A multi-thread runtime with one worker per core: the clients are tasks on it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-client")
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = testkit::outpost_binary_near_current_exe()
        .context("build it with `cargo build --release -p outpost -p outpost-tools`")?;
    let (base, base_note) = choose_base(args.dir.as_deref())?;
    let secs = args.seconds.unwrap_or(if args.quick { 3.0 } else { 10.0 });
    if !(secs > 0.0 && secs <= 3600.0) {
        bail!("--seconds must lie in (0, 3600]");
    }
    let only: Option<Vec<String>> = args
        .only
        .as_ref()
        .map(|s| s.split(',').map(|x| x.trim().to_owned()).collect());
    if let Some(o) = &only {
        for n in o {
            if !RUNS.iter().any(|r| r.name == n) {
                let names: Vec<&str> = RUNS.iter().map(|r| r.name).collect();
                bail!("--only: unknown run {n:?}; runs: {}", names.join(", "));
            }
        }
    }
    let selected = select_runs(only.as_deref(), args.growth);
    // Find the comparison's server before anything runs: without it the bench says how to get it
    // and goes on without the comparison.
    let nats_bin = match args.compare {
        Some(Compare::Nats) => match nats::find_server(args.nats_server.as_deref()) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("outpost-bench: skipping --compare nats: {e}");
                None
            }
        },
        None => None,
    };
    let ctx = Ctx {
        bin,
        base: base.clone(),
        duration: Duration::from_secs_f64(secs),
        warmup: Duration::from_secs_f64((secs / 10.0).min(1.0)),
        log_level: args.log_level.clone(),
    };
    let machine = procstat::machine();
    let mount = procstat::mount_of(&base);
    // How busy the machine is before anything starts (other engineers' builds and tests).
    let busy0 = procstat::machine_busy_secs();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_check = procstat::machine_busy_secs() - busy0;
    let header = header_text(&machine, &ctx, &base, &base_note, mount.as_ref());
    println!("{header}");
    println!(
        "busy:     {idle_check:.2} cores in use on the machine in the second before the first run (others' work)"
    );

    let mut runs = Vec::new();
    for def in selected {
        eprintln!(
            "outpost-bench: running {} ({}, {} client(s) per node) ...",
            def.name, def.description, def.clients_per_node
        );
        let fig = match run_one(&ctx, def).await {
            Ok(f) => f,
            Err(e) => RunFigures {
                name: def.name.to_owned(),
                section: def.section.to_owned(),
                description: def.description.to_owned(),
                nodes: def.nodes,
                clients: def.clients_per_node * def.nodes,
                accounts: def.accounts,
                problem: Some(format!("{e:#}")),
                loadavg_before: procstat::loadavg(),
                ..RunFigures::default()
            },
        };
        eprintln!("{}", one_line(&fig));
        runs.push(fig);
    }

    let mut nats_fig: Option<nats::NatsFigures> = None;
    let mut nats_problem: Option<String> = None;
    if let Some(bin) = &nats_bin {
        eprintln!(
            "outpost-bench: running nats ({} servers, R{}, {} publishes in flight, {} s + {} s warm-up) ...",
            nats::SERVERS,
            nats::SERVERS,
            nats::IN_FLIGHT,
            ctx.duration.as_secs_f64(),
            ctx.warmup.as_secs_f64()
        );
        match nats::run(bin, &ctx.base, ctx.warmup, ctx.duration).await {
            Ok(f) => {
                eprintln!(
                    "  nats: {} msg/s, ack p50 {} ms, p99 {} ms",
                    thousands(f.msgs_per_sec),
                    opt_ms(f.ack_p50_ms),
                    opt_ms(f.ack_p99_ms)
                );
                nats_fig = Some(f);
            }
            Err(e) => {
                eprintln!("  nats: PROBLEM: {e:#}");
                nats_problem = Some(format!("{e:#}"));
            }
        }
    }
    compare_growth(&mut runs);
    if let Some(n) = &nats_fig {
        compare_nats(&mut runs, n);
    }

    let table = table_text(&runs, nats_fig.as_ref(), nats_problem.as_deref());
    println!("{table}");

    if let Some(path) = &args.json {
        let doc = json!({
            "machine": {
                "nproc": machine.nproc,
                "model": machine.model,
                "mem_total_mib": machine.mem_total_mib,
                "kernel": machine.kernel,
            },
            "disk": {
                "path": base.display().to_string(),
                "mount": mount.as_ref().map(|m| m.0.clone()),
                "fstype": mount.as_ref().map(|m| m.1.clone()),
                "device": mount.as_ref().map(|m| m.2.clone()),
                "note": base_note,
            },
            "busy_cores_before_start": idle_check,
            "seconds_per_run": secs,
            "warmup_seconds": ctx.warmup.as_secs_f64(),
            "note": "the load generator shares the machine's cores with the nodes; bench_cpu_cores is its share",
            "targets": {
                "batch_events_per_sec": TARGET_BATCH_EPS,
                "single256_events_per_sec": TARGET_SINGLE256_EPS,
                "three_dc_events_per_sec_everywhere": TARGET_3DC_EPS,
                "three_dc_everywhere_p99_ms": TARGET_3DC_P99_MS,
                "rss_mib_per_node": TARGET_RSS_MIB,
            },
            "runs": runs,
            "nats": nats_fig,
            "nats_problem": nats_problem,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("outpost-bench: wrote {}", path.display());
    }
    if runs.iter().any(|r| r.problem.is_some()) || nats_problem.is_some() {
        eprintln!("outpost-bench: some runs had problems (see the table)");
        std::process::exit(1);
    }
    Ok(())
}

/// The runs to make: those named by `--only` (growth runs too), else the default set, with the
/// growth runs when `--growth` is given. A growth ingest run brings its baseline along.
fn select_runs(only: Option<&[String]>, growth: bool) -> Vec<&'static RunDef> {
    let mut chosen: Vec<&'static RunDef> = RUNS
        .iter()
        .filter(|d| match only {
            Some(o) => o.iter().any(|n| n == d.name),
            None => !d.growth || growth,
        })
        .collect();
    let needs_baseline = chosen
        .iter()
        .any(|d| d.growth && matches!(d.shape, Shape::Load | Shape::LoadOnLog(_)));
    if needs_baseline && !chosen.iter().any(|d| d.name == GROWTH_BASELINE) {
        eprintln!("outpost-bench: running {GROWTH_BASELINE} too, as the baseline of batch1000-1m");
        chosen.insert(
            0,
            RUNS.iter()
                .find(|d| d.name == GROWTH_BASELINE)
                .expect("the baseline is a run"),
        );
    }
    chosen
}

/// Each growth ingest run over its baseline's figures, and its target judged on them.
fn compare_growth(runs: &mut [RunFigures]) {
    let Some(base) = runs
        .iter()
        .find(|r| r.name == GROWTH_BASELINE && r.problem.is_none())
        .cloned()
    else {
        return;
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let rss = |f: &RunFigures| f.node.iter().map(|n| n.rss_max_mib).reduce(f64::max);
    for r in runs.iter_mut() {
        if (r.accounts <= base.accounts && r.prefilled_records == 0)
            || r.growth.is_some()
            || r.events_per_request != base.events_per_request
        {
            continue;
        }
        let v = BaselineRatios {
            baseline: base.name.clone(),
            events_per_sec: r.events_per_sec / base.events_per_sec.max(1e-9),
            p99: ratio(r.latency_p99_ms, base.latency_p99_ms),
            rss: ratio(rss(r), rss(&base)),
        };
        r.target = format!(
            "ev/s >= {TARGET_GROWTH_EPS_RATIO}x {b}, RSS <= {TARGET_GROWTH_RSS_RATIO}x {b}",
            b = base.name
        );
        r.target_met = Some(
            r.target_met.unwrap_or(true)
                && v.events_per_sec >= TARGET_GROWTH_EPS_RATIO
                && v.rss.is_some_and(|x| x <= TARGET_GROWTH_RSS_RATIO),
        );
        r.vs_baseline = Some(v);
    }
}

/// Every run's events/s and p99 over NATS's msg/s and publish-to-ack p99.
fn compare_nats(runs: &mut [RunFigures], n: &nats::NatsFigures) {
    for r in runs.iter_mut() {
        // A recovery run's rate (entries into a restarted node) is not a publish rate.
        if r.problem.is_some() || r.growth.is_some() || n.msgs_per_sec <= 0.0 {
            continue;
        }
        r.vs_nats = Some(r.events_per_sec / n.msgs_per_sec);
        let p99 = match &r.replication {
            Some(rep) => rep.everywhere_p99_ms,
            None => r.latency_p99_ms,
        };
        r.p99_vs_nats = match (p99, n.ack_p99_ms) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
    }
}

/// The directory the clusters go in: the system temp dir unless it is tmpfs (a RAM disk says
/// nothing about durable commits), then the current directory.
fn choose_base(dir: Option<&Path>) -> anyhow::Result<(PathBuf, String)> {
    let is_ram =
        |p: &Path| procstat::mount_of(p).is_some_and(|(_, fs, _)| fs == "tmpfs" || fs == "ramfs");
    if let Some(d) = dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        let d = std::fs::canonicalize(d)?;
        let note = if is_ram(&d) {
            "WARNING: --dir is on tmpfs; commits do not reach a disk".to_owned()
        } else {
            "given with --dir".to_owned()
        };
        return Ok((d, note));
    }
    let tmp = std::env::temp_dir();
    if !is_ram(&tmp) {
        return Ok((
            std::fs::canonicalize(&tmp)?,
            "system temp dir (not tmpfs)".into(),
        ));
    }
    let cwd = std::env::current_dir()?;
    let d = cwd.join("outpost-bench-tmp");
    std::fs::create_dir_all(&d)?;
    let note = format!(
        "{} is tmpfs, so the nodes run under the current directory instead",
        tmp.display()
    );
    Ok((d, note))
}

fn header_text(
    m: &procstat::Machine,
    ctx: &Ctx,
    base: &Path,
    base_note: &str,
    mount: Option<&(String, String, String)>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "outpost-bench");
    let _ = writeln!(
        s,
        "machine:  {} cores, {}, {} MiB RAM, Linux {}",
        m.nproc, m.model, m.mem_total_mib, m.kernel
    );
    let _ = writeln!(
        s,
        "disk:     {} ({}) on {}",
        base.display(),
        base_note,
        mount
            .map(|(mp, fs, dev)| format!("{mp} {fs} {dev}"))
            .unwrap_or_else(|| "?".into())
    );
    let _ = writeln!(
        s,
        "load:     loadavg {} at start; {:.1} s per run after a {:.1} s warm-up (1 DC runs), each run on fresh nodes",
        procstat::loadavg(),
        ctx.duration.as_secs_f64(),
        ctx.warmup.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "note:     the load generator runs on the same {} cores as the nodes (its CPU share is shown as `bench cpu`);",
        m.nproc
    );
    let _ = write!(
        s,
        "          figures taken while other work runs on the machine (see loadavg) are noisy"
    );
    s
}

async fn run_one(ctx: &Ctx, def: &RunDef) -> anyhow::Result<RunFigures> {
    if let Shape::Recover(recovery, elements) = def.shape {
        return growth::run(ctx, def, recovery, elements).await;
    }
    let names: Vec<String> = (1..=def.nodes).map(|i| format!("dc{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut spec = ClusterSpec::new(&format!("bench-{}", def.name), &name_refs);
    spec.base_dir = Some(ctx.base.clone());
    spec.log_level = ctx.log_level.clone();
    let mut cluster = Cluster::start(&ctx.bin, spec).await?;
    cluster.wait_all_ready().await?;
    if def.nodes > 1 {
        cluster.wait_quiet().await?;
    }
    let apis: Vec<Api> = (0..def.nodes).map(|i| cluster.api(i)).collect();
    let targets: Vec<Target> = (0..def.nodes)
        .map(|i| Target {
            node: i,
            base: format!("http://{}", cluster.node(i).api_addr),
            token: cluster.node(i).token.clone(),
        })
        .collect();
    if let Shape::LoadOnLog(records) = def.shape {
        growth::fill_over(def.name, &targets, records, def.accounts).await?;
    }
    let mut pids = Vec::new();
    for i in 0..def.nodes {
        pids.push(nodes::pid_of_config(&cluster.node(i).config)?);
    }
    let per = match def.kind {
        Kind::Single => 1,
        Kind::Batch(n) => n,
    };
    let mut fig = RunFigures {
        name: def.name.to_owned(),
        section: def.section.to_owned(),
        description: def.description.to_owned(),
        nodes: def.nodes,
        clients: def.clients_per_node * def.nodes,
        events_per_request: per,
        accounts: def.accounts,
        prefilled_records: match def.shape {
            Shape::LoadOnLog(n) => n,
            _ => 0,
        },
        loadavg_before: procstat::loadavg(),
        ..RunFigures::default()
    };
    let replicated = def.nodes > 1;
    let load_spec = load::Spec {
        targets,
        clients_per_target: def.clients_per_node,
        kind: def.kind,
        // The replication runs count everything from the first request: what matters there is
        // the time until every node holds every event.
        warmup: if replicated {
            Duration::ZERO
        } else {
            ctx.warmup
        },
        duration: ctx.duration,
        sample_every: if replicated {
            match def.kind {
                Kind::Single => 40,
                Kind::Batch(n) => n as u64,
            }
        } else {
            0
        },
        accounts: def.accounts,
    };

    // A fresh client per run: its pooled connections go with it.
    let http = load::client(def.clients_per_node * def.nodes);
    let rss = procstat::RssSampler::start(pids.clone(), RSS_EVERY);
    let writers = pids
        .iter()
        .map(|p| {
            procstat::thread_ids(*p, WRITER_THREAD)
                .first()
                .map(|t| (*p, *t))
        })
        .collect();
    let states = procstat::StateSampler::start(writers, STATE_EVERY);
    let base_snap = nodes::snapshot(&apis, &pids).await?;
    let warmup = load_spec.warmup;
    let (outcome, before) = tokio::join!(load::run(&http, &load_spec), async {
        tokio::time::sleep(warmup).await;
        nodes::snapshot(&apis, &pids).await
    });
    let before = before?;
    let load_end = outcome.finished.unwrap_or_else(Instant::now);

    // Replication: wait until every node holds every event.
    let mut repl = None;
    let mut problem = None;
    if replicated {
        let mut r = Replication {
            load_secs: load_end.duration_since(base_snap.at).as_secs_f64(),
            ..Replication::default()
        };
        match converge(&apis, &base_snap, &cluster).await {
            Ok((total, at)) => {
                r.total_events = total;
                let from_start = at.duration_since(base_snap.at).as_secs_f64();
                r.converged_secs = Some(from_start);
                r.tail_secs = Some(at.saturating_duration_since(load_end).as_secs_f64());
                r.events_per_sec_everywhere = Some(total as f64 / from_start);
            }
            Err(e) => problem = Some(format!("no convergence: {e:#}")),
        }
        repl = Some(r);
    }
    let after = nodes::snapshot(&apis, &pids).await?;
    fig.entries_end = after.counters[0].entries;
    let rss_max = rss.finish();
    let writer_states = states.finish();

    // Window figures.
    let (from, window) = if replicated {
        (
            &base_snap,
            after.at.duration_since(base_snap.at).as_secs_f64(),
        )
    } else {
        (&before, outcome.window.as_secs_f64())
    };
    let cpu_window = after.at.duration_since(from.at).as_secs_f64().max(1e-9);
    fig.window_secs = if replicated {
        repl.as_ref()
            .and_then(|r| r.converged_secs)
            .unwrap_or(window)
    } else {
        window
    };
    fig.events = outcome.events;
    fig.requests = outcome.requests;
    fig.events_per_sec = if replicated {
        repl.as_ref()
            .and_then(|r| r.events_per_sec_everywhere)
            .unwrap_or(0.0)
    } else {
        outcome.events_per_sec()
    };
    let lat = &outcome.latencies_us;
    let ms = |v: Option<u32>| v.map(|us| us as f64 / 1000.0);
    fig.latency_p50_ms = ms(load::quantile(lat, 0.5));
    fig.latency_p99_ms = ms(load::quantile(lat, 0.99));
    fig.latency_max_ms = ms(lat.last().copied());
    fig.errors = outcome.errors;
    fig.error_examples = outcome.error_examples.clone();
    let mut commits = 0u64;
    let mut ingested = 0u64;
    let mut commit_sum = 0.0;
    let mut commit_count = 0u64;
    for i in 0..def.nodes {
        let (a, b) = (&after.counters[i], &from.counters[i]);
        commits += a.commits - b.commits;
        ingested += a.ingested - b.ingested;
        commit_sum += a.commit_seconds_sum - b.commit_seconds_sum;
        commit_count += a.commit_seconds_count - b.commit_seconds_count;
        let top = procstat::threads_delta(&from.threads[i], &after.threads[i])
            .into_iter()
            .take(6)
            .map(|(thread, secs)| ThreadCpu {
                thread,
                cores: secs / cpu_window,
            })
            .collect();
        fig.node.push(NodeFigures {
            name: names[i].clone(),
            pid: pids[i],
            rss_max_mib: rss_max[i] as f64 / 1024.0,
            cpu_cores: (after.node_cpu[i] - from.node_cpu[i]) / cpu_window,
            top_threads: top,
            writer_states: writer_states.get(i).copied().filter(|w| w.samples > 0),
            events_ingested: a.ingested - b.ingested,
            elements_applied: a.applied - b.applied,
            commits: a.commits - b.commits,
        });
    }
    // Commits over the load window (for replication runs: until convergence; every node's
    // commits, applying included).
    fig.commits_per_sec = commits as f64 / window.max(1e-9);
    fig.events_per_commit = if commits > 0 {
        (ingested as f64
            + fig
                .node
                .iter()
                .map(|n| n.elements_applied as f64)
                .sum::<f64>())
            / commits as f64
    } else {
        0.0
    };
    fig.commit_mean_ms = (commit_count > 0).then(|| commit_sum * 1000.0 / commit_count as f64);
    fig.bench_cpu_cores = (after.bench_cpu - from.bench_cpu) / cpu_window;
    let machine = (after.machine_busy - from.machine_busy) / cpu_window;
    let nodes_cpu: f64 = fig.node.iter().map(|n| n.cpu_cores).sum();
    fig.other_cpu_cores = (machine - nodes_cpu - fig.bench_cpu_cores).max(0.0);

    // Replication latency from the sampled message ids, fetched after the run.
    if let Some(r) = repl.as_mut() {
        if problem.is_none() {
            match cluster.wait_quiet().await {
                Ok(st) => r.digests_equal = Some(st.iter().all(|s| s.digest == st[0].digest)),
                Err(e) => problem = Some(format!("not quiet after convergence: {e:#}")),
            }
            let mut samples = outcome.samples.clone();
            if samples.len() > SAMPLES_MAX {
                let step = samples.len() as f64 / SAMPLES_MAX as f64;
                samples = (0..SAMPLES_MAX)
                    .map(|k| samples[(k as f64 * step) as usize].clone())
                    .collect();
            }
            sample_latencies(&apis, &samples, r).await;
        }
    }
    fig.replication = repl;

    if outcome.errors > 0 {
        problem.get_or_insert_with(|| {
            format!(
                "{} request(s) failed, e.g. {}",
                outcome.errors,
                outcome.error_examples.first().cloned().unwrap_or_default()
            )
        });
    }
    if let Err(e) = cluster.check_alive() {
        problem.get_or_insert(e);
    }
    fig.loadavg_after = procstat::loadavg();
    judge(&mut fig);
    fig.problem = problem;
    if fig.problem.is_some() {
        // Dropping the cluster kills the nodes and keeps the directory with their logs.
        fig.kept_dir = Some(cluster.dir().display().to_string());
        drop(cluster);
    } else {
        fig.notes.extend(stop_nodes(&mut cluster, &pids).await);
        if let Err(e) = cluster.finish().await {
            fig.problem = Some(format!("removing the cluster: {e:#}"));
        }
    }
    Ok(fig)
}

/// Stops the nodes: SIGTERM to each, then up to [`STOP_GRACE`] for all to exit; a node still
/// running then is killed (SIGKILL). Returns what did not go as it should. (The testkit's
/// `Cluster::finish` waits 30 s per node, which would stretch every run when nodes do not exit.)
async fn stop_nodes(cluster: &mut Cluster, pids: &[u32]) -> Vec<String> {
    let mut notes = Vec::new();
    let start = Instant::now();
    for pid in pids {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    let mut exited = vec![false; pids.len()];
    while start.elapsed() < STOP_GRACE {
        for (i, pid) in pids.iter().enumerate() {
            exited[i] = procstat::has_exited(*pid);
        }
        if exited.iter().all(|e| *e) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, done) in exited.iter().enumerate() {
        let name = cluster.node(i).name.clone();
        if !done {
            notes.push(format!(
                "{name} did not exit within {STOP_GRACE:?} of SIGTERM; killed"
            ));
        }
        // Reaps the child (a node that exited is only reaped here; kill9 then says it had
        // exited already, which is what we want).
        let _ = cluster.kill9(i);
    }
    notes
}

/// Polls every node's counters until each holds every event ingested anywhere (its own ingested
/// plus remote elements applied equals the sum of everyone's ingested); returns that total and
/// when it was first seen.
async fn converge(
    apis: &[Api],
    base: &nodes::Snapshot,
    cluster: &Cluster,
) -> anyhow::Result<(u64, Instant)> {
    let start = Instant::now();
    let mut last;
    loop {
        let at = Instant::now();
        let mut cs = Vec::new();
        for a in apis {
            cs.push(nodes::counters(a).await?);
        }
        let total: u64 = cs
            .iter()
            .zip(&base.counters)
            .map(|(c, b)| c.ingested - b.ingested)
            .sum();
        let held: Vec<u64> = cs
            .iter()
            .zip(&base.counters)
            .map(|(c, b)| (c.ingested - b.ingested) + (c.applied - b.applied))
            .collect();
        if held.iter().all(|h| *h == total) {
            return Ok((total, at));
        }
        if held.iter().any(|h| *h > total) {
            bail!("a node holds more events than were ingested: held {held:?}, total {total}");
        }
        last = format!("total ingested {total}, held per node {held:?}");
        if let Err(e) = cluster.check_alive() {
            bail!("{e}");
        }
        if start.elapsed() > CONVERGE_TIMEOUT {
            let mut detail = String::new();
            for a in apis {
                match a.status().await {
                    Ok(s) => detail.push_str(&testkit::summarize(&[s])),
                    Err(e) => {
                        let _ = writeln!(detail, "  {}: {e}", a.base);
                    }
                }
            }
            bail!("after {CONVERGE_TIMEOUT:?}: {last}\n{detail}");
        }
        tokio::time::sleep(CONVERGE_POLL).await;
    }
}

/// Fetches every sampled message at every node and fills in the latency figures.
async fn sample_latencies(apis: &[Api], samples: &[load::Sample], r: &mut Replication) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut set = tokio::task::JoinSet::new();
    for (k, s) in samples.iter().enumerate() {
        for (i, api) in apis.iter().enumerate() {
            let api = api.clone();
            let id = s.message_id.clone();
            let locator = s.locator.clone();
            let sem = sem.clone();
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let info = match locator {
                    Some((origin, oseq)) => api.message_at(&id, &origin, oseq).await,
                    None => api.message(&id).await,
                };
                (k, i, info)
            });
        }
    }
    let n = apis.len();
    let mut infos: Vec<Vec<Option<testkit::MessageInfo>>> = vec![vec![None; n]; samples.len()];
    while let Some(res) = set.join_next().await {
        if let Ok((k, i, Ok(Some(m)))) = res {
            infos[k][i] = Some(m);
        }
    }
    let mut peer = Vec::new();
    let mut everywhere = Vec::new();
    for (k, s) in samples.iter().enumerate() {
        let Some(origin) = infos[k][s.node].as_ref() else {
            r.missing_samples += 1;
            continue;
        };
        let mut worst: Option<i64> = None;
        let mut complete = true;
        let mut full = true;
        for (i, info) in infos[k].iter().enumerate() {
            if i == s.node {
                continue;
            }
            match info {
                Some(m) => {
                    let d = m.first_seen_ms as i64 - origin.first_seen_ms as i64;
                    peer.push(d);
                    worst = Some(worst.map_or(d, |w| w.max(d)));
                    if m.message_count != (n - 1) as u64 {
                        full = false;
                    }
                }
                None => complete = false,
            }
        }
        if !complete {
            r.missing_samples += 1;
            continue;
        }
        if full {
            r.full_count_samples += 1;
        }
        if let Some(w) = worst {
            everywhere.push(w);
        }
    }
    peer.sort_unstable();
    everywhere.sort_unstable();
    let f = |v: Option<i64>| v.map(|x| x as f64);
    r.samples = samples.len();
    r.peer_p50_ms = f(load::quantile(&peer, 0.5));
    r.peer_p99_ms = f(load::quantile(&peer, 0.99));
    r.everywhere_p50_ms = f(load::quantile(&everywhere, 0.5));
    r.everywhere_p99_ms = f(load::quantile(&everywhere, 0.99));
    r.everywhere_max_ms = f(everywhere.last().copied());
}

/// The growth section: the many-account ingest run beside its baseline, and the recovery runs.
fn growth_text(runs: &[RunFigures]) -> String {
    let mut s = String::new();
    let rss = |f: &RunFigures| f.node.iter().map(|n| n.rss_max_mib).reduce(f64::max);
    let x = |v: Option<f64>| v.map_or("-".to_owned(), |r| format!("{r:.2}x"));
    let ingest: Vec<&RunFigures> = runs.iter().filter(|f| f.vs_baseline.is_some()).collect();
    if !ingest.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "growth: the same load over more accounts or onto a longer log (ratio: this run over the baseline in the same sitting)"
        );
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "run",
            "accounts",
            "entries",
            "events/s",
            "ratio",
            "p99 ms",
            "ratio",
            "RSS MiB",
            "ratio"
        );
        for f in ingest {
            let v = f.vs_baseline.as_ref().expect("filtered");
            if let Some(b) = runs.iter().find(|r| r.name == v.baseline) {
                let _ = writeln!(
                    s,
                    "{:<16} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
                    b.name,
                    thousands(b.accounts as f64),
                    thousands(b.entries_end as f64),
                    thousands(b.events_per_sec),
                    "1.00x",
                    opt_ms(b.latency_p99_ms),
                    "1.00x",
                    rss(b).map_or("-".into(), |m| format!("{m:.0}")),
                    "1.00x",
                );
            }
            let _ = writeln!(
                s,
                "{:<16} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
                f.name,
                thousands(f.accounts as f64),
                thousands(f.entries_end as f64),
                thousands(f.events_per_sec),
                x(Some(v.events_per_sec)),
                opt_ms(f.latency_p99_ms),
                x(v.p99),
                rss(f).map_or("-".into(), |m| format!("{m:.0}")),
                x(v.rss),
            );
        }
    }
    let rec: Vec<&RunFigures> = runs.iter().filter(|f| f.growth.is_some()).collect();
    if !rec.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "recovery: the last node stopped, entries written at the others, the node restarted and timed until it holds them"
        );
        let _ = writeln!(
            s,
            "{:<12} {:>10} {:>8} {:>10} {:>9} {:>12} {:>9} {:>8} {:>13}",
            "run",
            "entries",
            "write s",
            "written/s",
            "recover s",
            "recovered/s",
            "snapshots",
            "digests",
            "RSS MiB"
        );
        for f in rec {
            let g = f.growth.as_ref().expect("filtered");
            let rss = f
                .node
                .iter()
                .map(|n| format!("{:.0}", n.rss_max_mib))
                .collect::<Vec<_>>()
                .join("/");
            let _ = writeln!(
                s,
                "{:<12} {:>10} {:>8.1} {:>10} {:>9} {:>12} {:>9} {:>8} {:>13}",
                f.name,
                thousands(g.elements as f64),
                g.write_secs,
                thousands(g.write_per_sec),
                g.recover_secs.map_or("-".into(), |v| format!("{v:.1}")),
                g.recover_per_sec.map_or("-".into(), thousands),
                g.snapshots_sent,
                match g.digests_equal {
                    Some(true) => "equal",
                    Some(false) => "DIFFER",
                    None => "-",
                },
                rss,
            );
        }
        let _ = writeln!(
            s,
            "recover s: from the restart (process start included) until the node holds every entry; RSS: each node's peak"
        );
        let _ = writeln!(
            s,
            "(the writers' over the whole run, the restarted node's while it recovers)."
        );
    }
    s
}

/// Sets the run's target text and whether it was met.
fn judge(f: &mut RunFigures) {
    let rss_ok = f.node.iter().all(|n| n.rss_max_mib <= TARGET_RSS_MIB);
    let (target, met) = match f.name.as_str() {
        "batch1000" | "batch10000" => (
            format!(">= {} ev/s", thousands(TARGET_BATCH_EPS)),
            Some(f.events_per_sec >= TARGET_BATCH_EPS),
        ),
        "single256" => (
            format!(">= {} ev/s", thousands(TARGET_SINGLE256_EPS)),
            Some(f.events_per_sec >= TARGET_SINGLE256_EPS),
        ),
        "3dc-single" | "3dc-batch" => {
            let p99 = f.replication.as_ref().and_then(|r| r.everywhere_p99_ms);
            (
                format!(
                    ">= {} ev/s everywhere, p99 <= {TARGET_3DC_P99_MS} ms",
                    thousands(TARGET_3DC_EPS)
                ),
                Some(
                    f.events_per_sec >= TARGET_3DC_EPS
                        && p99.is_some_and(|p| p <= TARGET_3DC_P99_MS),
                ),
            )
        }
        "catchup-1m" => (
            format!(">= {} elements/s", thousands(TARGET_CATCHUP_EPS)),
            Some(f.events_per_sec >= TARGET_CATCHUP_EPS),
        ),
        _ => ("-".to_owned(), None),
    };
    f.target = format!("{target}; RSS <= {TARGET_RSS_MIB} MiB");
    f.target_met = Some(met.unwrap_or(true) && rss_ok);
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn opt_ms(v: Option<f64>) -> String {
    match v {
        Some(x) if x < 10.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

fn one_line(f: &RunFigures) -> String {
    match &f.problem {
        Some(p) => format!("  {}: PROBLEM: {p}", f.name),
        None => format!(
            "  {}: {} ev/s, p50 {} ms, p99 {} ms (loadavg {})",
            f.name,
            thousands(f.events_per_sec),
            opt_ms(f.latency_p50_ms),
            opt_ms(f.latency_p99_ms),
            f.loadavg_before
        ),
    }
}

fn table_text(
    runs: &[RunFigures],
    nats: Option<&nats::NatsFigures>,
    nats_problem: Option<&str>,
) -> String {
    let mut s = String::new();
    let x = |v: Option<f64>| v.map_or("-".to_owned(), |r| format!("{r:.2}x"));
    let vs_head = if nats.is_some() { " vs NATS" } else { "" };
    let mark = |m: Option<bool>| match m {
        Some(true) => "ok",
        Some(false) => "MISSED",
        None => "",
    };
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<12} {:>4} {:>5} {:>10}{} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>11} {:>5} {:>14} {:>5} {:>15}  target",
        "run", "nodes", "clnts", "events/s", vs_head, "p50 ms", "p99 ms", "max ms", "commits/s", "ev/cmt", "cmt ms", "RSS MiB", "bench", "node cpu", "other", "loadavg"
    );
    for f in runs {
        if let Some(p) = &f.problem {
            if f.events == 0 && f.node.is_empty() {
                let _ = writeln!(s, "{:<12} PROBLEM: {p}", f.name);
                continue;
            }
        }
        let rss = f
            .node
            .iter()
            .map(|n| format!("{:.0}", n.rss_max_mib))
            .collect::<Vec<_>>()
            .join("/");
        let cpu = f
            .node
            .iter()
            .map(|n| format!("{:.2}", n.cpu_cores))
            .collect::<Vec<_>>()
            .join("/");
        let _ = writeln!(
            s,
            "{:<12} {:>4} {:>5} {:>10}{} {:>8} {:>8} {:>8} {:>9} {:>8.1} {:>8} {:>11} {:>5.2} {:>14} {:>5.2} {:>15}  {} {}",
            f.name,
            f.nodes,
            f.clients,
            thousands(f.events_per_sec),
            if nats.is_some() { format!(" {:>7}", x(f.vs_nats)) } else { String::new() },
            opt_ms(f.latency_p50_ms),
            opt_ms(f.latency_p99_ms),
            opt_ms(f.latency_max_ms),
            thousands(f.commits_per_sec),
            f.events_per_commit,
            opt_ms(f.commit_mean_ms),
            rss,
            f.bench_cpu_cores,
            cpu,
            f.other_cpu_cores,
            f.loadavg_before,
            f.target,
            mark(f.target_met),
        );
        for n in &f.notes {
            let _ = writeln!(s, "    note: {n}");
        }
        if let Some(p) = &f.problem {
            let _ = writeln!(s, "    PROBLEM: {p}");
            if let Some(d) = &f.kept_dir {
                let _ = writeln!(s, "    kept for inspection: {d}");
            }
        }
    }
    if let Some(n) = nats {
        let rss = n
            .rss_max_mib
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join("/");
        let cpu = n
            .cpu_cores
            .iter()
            .map(|c| format!("{c:.2}"))
            .collect::<Vec<_>>()
            .join("/");
        let _ = writeln!(
            s,
            "{:<12} {:>4} {:>5} {:>10} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>11} {:>5.2} {:>14} {:>5} {:>15}  {} (R{}, sync_interval: always, {} in flight, {}-byte payloads)",
            "nats-r3",
            n.servers,
            n.in_flight,
            thousands(n.msgs_per_sec),
            "1.00x",
            opt_ms(n.ack_p50_ms),
            opt_ms(n.ack_p99_ms),
            opt_ms(n.ack_max_ms),
            "-",
            "-",
            "-",
            rss,
            n.bench_cpu_cores,
            cpu,
            "-",
            n.loadavg_before,
            n.server_version,
            n.replicas,
            n.in_flight,
            n.payload_bytes,
        );
        if n.errors > 0 || n.duplicates > 0 {
            let _ = writeln!(
                s,
                "    nats: {} failed publish(es), {} duplicate ack(s); e.g. {}",
                n.errors,
                n.duplicates,
                n.error_examples.first().cloned().unwrap_or_default()
            );
        }
    }
    if let Some(p) = nats_problem {
        let _ = writeln!(s, "{:<12} PROBLEM: {p}", "nats-r3");
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "events/s: 1 DC runs: acknowledged (durably committed) events per second of the window;"
    );
    let _ = writeln!(
        s,
        "          3 DC runs: events ingested at all three / time from the first request until every node held every event."
    );
    let _ = writeln!(
        s,
        "p50/p99/max: client-side, send to full answer (for batches: per request). ev/cmt: events (and applied remote"
    );
    let _ = writeln!(
        s,
        "elements) per write transaction; cmt ms: mean outpost_commit_seconds. bench/node cpu: cores used over the window;");
    let _ = writeln!(
        s,
        "other: cores used by everything else on the machine meanwhile (/proc/stat; other engineers' work = noise)."
    );
    if nats.is_some() {
        let _ = writeln!(
            s,
            "vs NATS: the run's events/s over NATS JetStream's acknowledged msg/s in the same sitting (nats-r3: one client,"
        );
        let _ = writeln!(
            s,
            "         async publishes with a unique Nats-Msg-Id each; p50/p99/max: publish to ack, i.e. stored on 2 of 3 servers)."
        );
    }

    let repl: Vec<&RunFigures> = runs.iter().filter(|f| f.replication.is_some()).collect();
    if !repl.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "replication (3 DCs): ingest at the origin to first seen at each peer (first_seen_ms, same clock), sampled ids"
        );
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>8} {:>8} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}{}",
            "run",
            "events",
            "load s",
            "conv s",
            "tail s",
            "ev/s evrywh",
            "peer p50",
            "peer p99",
            "all p50",
            "all p99",
            "all max",
            "samples",
            "count ok",
            if nats.is_some() { " p99 vs NATS" } else { "" }
        );
        for f in repl {
            let r = f.replication.as_ref().expect("filtered");
            let o = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.2}"));
            let _ = writeln!(
                s,
                "{:<12} {:>9} {:>8.2} {:>8} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}{}",
                f.name,
                thousands(r.total_events as f64),
                r.load_secs,
                o(r.converged_secs),
                o(r.tail_secs),
                r.events_per_sec_everywhere.map_or("-".into(), thousands),
                opt_ms(r.peer_p50_ms),
                opt_ms(r.peer_p99_ms),
                opt_ms(r.everywhere_p50_ms),
                opt_ms(r.everywhere_p99_ms),
                opt_ms(r.everywhere_max_ms),
                r.samples,
                format!("{}/{}", r.full_count_samples, r.samples - r.missing_samples),
                if nats.is_some() { format!(" {:>11}", x(f.p99_vs_nats)) } else { String::new() },
            );
            if r.missing_samples > 0 {
                let _ = writeln!(
                    s,
                    "    {} sampled message(s) missing at some node",
                    r.missing_samples
                );
            }
            if r.digests_equal == Some(false) {
                let _ = writeln!(s, "    DIGESTS DIFFER after convergence");
            }
        }
        let _ = writeln!(
            s,
            "all p50/p99/max: per message, the slowest peer (ingest to everywhere). count ok: samples with message_count n-1 at each peer."
        );
        if nats.is_some() {
            let _ = writeln!(
                s,
                "p99 vs NATS: all p99 over NATS's publish-to-ack p99 (NATS acks once 2 of 3 servers hold a message; Outpost's figure is all 3)."
            );
        }
    }
    s.push_str(&growth_text(runs));

    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "where the CPU went (busiest threads of each node over the window, in cores):"
    );
    for f in runs {
        // Recovery runs measure only the recovering node's CPU.
        for n in f
            .node
            .iter()
            .filter(|n| f.growth.is_none() || !n.top_threads.is_empty())
        {
            let threads = n
                .top_threads
                .iter()
                .map(|t| format!("{} {:.2}", t.thread, t.cores))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                s,
                "  {:<12} {:<4} total {:.2}: {threads}",
                f.name, n.name, n.cpu_cores
            );
            if let Some(w) = &n.writer_states {
                let _ = writeln!(
                    s,
                    "  {:<12} {:<4}   writer thread: running/runnable {:.0}%, disk wait {:.0}%, waiting for work {:.0}%",
                    "", "", w.running * 100.0, w.disk * 100.0, w.sleeping * 100.0
                );
            }
        }
    }
    let errors: Vec<&RunFigures> = runs.iter().filter(|f| f.errors > 0).collect();
    for f in errors {
        let _ = writeln!(s, "{}: {} failed request(s):", f.name, f.errors);
        for e in &f.error_examples {
            let _ = writeln!(s, "    {e}");
        }
    }
    s
}
