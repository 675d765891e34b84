//! `outpost-deploy-bench`: delivery rate of a large bundle, from upload to installed and running,
//! to one worker and to three. Real processes (a controller and its workers, started by the
//! testkit's `Fleet`) on this machine; `outpost deploy` does the upload; the bench then follows the
//! deployment. Also samples every process's resident memory during the delivery.

#[path = "procstat.rs"]
#[allow(dead_code)]
mod procstat;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use outpost::testkit::{outpost_binary_near_current_exe, Fleet, FleetSpec, WorkerSpec};

const TARGET_ONE_MBPS: f64 = 100.0;
const TARGET_RSS_ABOVE_IDLE_MIB: f64 = 64.0;

#[derive(Parser, Debug)]
#[command(
    name = "outpost-deploy-bench",
    about = "Bundle delivery rate of outpost"
)]
struct Args {
    /// Bundle size in MiB (a sample program plus incompressible padding).
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Worker counts to measure, comma-separated.
    #[arg(long, default_value = "1,3")]
    workers: String,
    /// Where the nodes' directories and the bundle go (default: the current directory, so the
    /// disk is a real one and not tmpfs).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = outpost_binary_near_current_exe()?;
    let base = args.dir.clone().unwrap_or(std::env::current_dir()?);
    let work = base.join(format!("outpost-deploy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let bundle = work.join("big.bundle");
    let t = Instant::now();
    let bytes = make_bundle(&bin, &work, &bundle, args.mib)?;
    println!(
        "outpost-deploy-bench: a {:.0} MiB bundle (packed in {:.1?}), on {}",
        bytes as f64 / (1 << 20) as f64,
        t.elapsed(),
        work.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for n in args.workers.split(',') {
        let n: usize = n.trim().parse().context("--workers")?;
        rt.block_on(run(&bin, &bundle, bytes, n))?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn make_bundle(bin: &Path, work: &Path, out: &Path, mib: usize) -> anyhow::Result<u64> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles/voice");
    let dir = work.join("big-src");
    std::fs::create_dir_all(dir.join("bin"))?;
    for f in ["outpost-bundle.toml", "bin/start"] {
        std::fs::copy(src.join(f), dir.join(f))?;
    }
    // Incompressible, deterministic padding.
    let mut data = vec![0u8; mib << 20];
    let mut x = 0x9E3779B97F4A7C15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(dir.join("padding.bin"), &data)?;
    drop(data);
    let o = std::process::Command::new(bin)
        .args(["bundle", "pack"])
        .arg(&dir)
        .arg("-o")
        .arg(out)
        .output()?;
    if !o.status.success() {
        bail!("bundle pack: {}", String::from_utf8_lossy(&o.stderr));
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(std::fs::metadata(out)?.len())
}

async fn run(bin: &Path, bundle: &Path, bytes: u64, n: usize) -> anyhow::Result<()> {
    let workers = (1..=n)
        .map(|i| WorkerSpec {
            name: format!("w-{i}"),
            component: "media-processor".into(),
            load_balancer: None,
            join_token: true,
        })
        .collect();
    let mut spec = FleetSpec::new("deploy-bench", workers);
    spec.log_level = "warn".into();
    let f = Fleet::start(bin, spec).await?;
    let t0 = Instant::now();
    loop {
        let m = f.machines().await.unwrap_or_default();
        if m.len() == n && m.iter().all(|m| m["status"] == "up") {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("workers not up: {m:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pids: Vec<u32> = (0..=n).filter_map(|i| f.cluster.pid(i)).collect();
    let idle: Vec<u64> = pids
        .iter()
        .map(|p| procstat::rss_kib(*p).unwrap_or(0))
        .collect();
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| procstat::process_cpu_secs(*p).unwrap_or(0.0))
        .collect();
    let ctl = f.cluster.node(0).clone();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["deploy", "--service", "voice", "--bundle"])
        .arg(bundle)
        .arg("--api")
        .arg(format!("http://{}", ctl.api_addr))
        .env("OUTPOST_TOKEN", &ctl.token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let started = Instant::now();
    let child = cmd.spawn()?;
    let peaks = std::sync::Arc::new(std::sync::Mutex::new(vec![0u64; pids.len()]));
    let sampling = {
        let pids = pids.clone();
        let peaks = peaks.clone();
        tokio::spawn(async move {
            loop {
                for (k, p) in pids.iter().enumerate() {
                    let r = procstat::rss_kib(*p).unwrap_or(0);
                    let mut g = peaks.lock().unwrap();
                    g[k] = g[k].max(r);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let out = child.wait_with_output().await?;
    let uploaded = started.elapsed().as_secs_f64();
    if !out.status.success() {
        sampling.abort();
        bail!(
            "deploy failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("deployment ")?.strip_suffix(" created"))
        .context("no deployment id printed")?
        .to_owned();
    // Follows the deployment closely: when every machine has installed it (reported
    // `installed`, or already further), and when every one runs it.
    let api = f.controller();
    let (mut installed, mut running) = (None, None);
    while running.is_none() {
        let d: serde_json::Value = api.get_json(&format!("/v1/deployments/{id}")).await?;
        let st: Vec<String> = d["machines"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| m["status"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        if st.iter().any(|s| s == "failed" || s == "rolled_back") {
            bail!("deployment {id} failed: {d}");
        }
        let t = started.elapsed().as_secs_f64();
        let all = |ok: &[&str]| st.len() == n && st.iter().all(|s| ok.contains(&s.as_str()));
        if installed.is_none() && all(&["installed", "running"]) {
            installed = Some(t);
        }
        if all(&["running"]) {
            running = Some(t);
        }
        if started.elapsed() > Duration::from_secs(1200) {
            bail!("deployment {id} not done: {d}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sampling.abort();
    let (installed, secs) = (installed.unwrap_or(f64::NAN), running.unwrap_or(f64::NAN));
    let mb = bytes as f64 / 1e6;
    let peaks = peaks.lock().unwrap().clone();
    println!(
        "  {n} worker(s): {mb:.0} MB; upload {uploaded:.2} s; installed everywhere at {installed:.2} s = {:.0} MB/s per worker ({:.0} MB/s in all){}; running (after its 1 s health check) at {secs:.2} s",
        mb / installed,
        mb * n as f64 / installed,
        if n == 1 {
            format!(
                ", target >= {TARGET_ONE_MBPS:.0} MB/s upload to installed: {}",
                if mb / installed >= TARGET_ONE_MBPS { "met" } else { "missed" }
            )
        } else {
            String::new()
        }
    );
    for (k, p) in pids.iter().enumerate() {
        let who = if k == 0 {
            "controller".to_owned()
        } else {
            format!("w-{k}")
        };
        let above = (peaks[k].saturating_sub(idle[k])) as f64 / 1024.0;
        let cpu = procstat::process_cpu_secs(*p).unwrap_or(0.0) - cpu0[k];
        println!(
            "    {who:<10} RSS idle {:>4.0} MiB, peak {:>4.0} MiB (+{above:.0} MiB; limit +{TARGET_RSS_ABOVE_IDLE_MIB:.0}: {}), CPU {cpu:.1} s",
            idle[k] as f64 / 1024.0,
            peaks[k] as f64 / 1024.0,
            if above <= TARGET_RSS_ABOVE_IDLE_MIB { "met" } else { "missed" }
        );
    }
    f.finish().await?;
    Ok(())
}
