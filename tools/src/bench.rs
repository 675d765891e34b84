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
#[path = "bench/measure.rs"]
mod measure;
#[path = "bench/nats.rs"]
mod nats;
mod nodes;
mod procstat;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/runs.rs"]
mod runs;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use outpost::testkit::{self, Api, Cluster, ClusterSpec};
use serde::Serialize;
use serde_json::json;

use load::{Kind, Target};
use measure::*;
use report::*;
use runs::*;

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
