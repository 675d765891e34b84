//! A cluster of real `outpost` datacenter processes on 127.0.0.1: identities from `outpost init`,
//! free ports, configs (chosen links routed through fault proxies), children with their logs in
//! one temporary directory, and waits on observable state.
//!
//! The directory is removed by [`Cluster::finish`] (the success path); a cluster dropped without
//! it (a failed test, a panic) kills its children, keeps the directory and prints its path with
//! the tail of every node's log. `OUTPOST_TEST_KEEP=1` keeps it after a success too.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};

use super::api::{Api, Status};
use super::proxy::{FaultProxy, Mode, ModeSwitch, ProxyStats};
use super::{wait_for, Check};

/// Default deadline of the waits: generous, as the machine may be shared and loaded.
pub const WAIT_DEFAULT: Duration = Duration::from_secs(120);
/// How long a node may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Lines of each node's log shown when a cluster is kept after a failure.
const LOG_LINES_SHOWN: usize = 40;

/// What to start.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Part of the temporary directory's name.
    pub label: String,
    /// One datacenter per name; every datacenter lists every other as a peer.
    pub names: Vec<String>,
    /// Links (pairs of indices into `names`) routed through a fault proxy, initially in the given
    /// mode.
    pub faulty_links: Vec<(usize, usize, Mode)>,
    /// `[log] level` (the environment variable `OUTPOST_TEST_LOG` overrides it).
    pub log_level: String,
    /// TOML appended to every node's config (e.g. a `[limits]` table).
    pub extra_config: String,
    /// Where the cluster's directory is created (default: `std::env::temp_dir()`).
    pub base_dir: Option<PathBuf>,
    /// Seed of the fault proxies' loss patterns.
    pub seed: u64,
}

impl ClusterSpec {
    pub fn new(label: &str, names: &[&str]) -> ClusterSpec {
        ClusterSpec {
            label: label.to_owned(),
            names: names.iter().map(|s| (*s).to_owned()).collect(),
            faulty_links: Vec::new(),
            log_level: "info".to_owned(),
            extra_config: String::new(),
            base_dir: None,
            seed: 1,
        }
    }

    /// Routes the link between `a` and `b` through fault proxies, starting in `mode`.
    pub fn fault(mut self, a: usize, b: usize, mode: Mode) -> ClusterSpec {
        self.faulty_links.push((a, b, mode));
        self
    }
}

/// What a node is and where it lives.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    /// `datacenter`, `controller` or `worker`.
    pub role: String,
    pub node_id: String,
    pub fingerprint: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    /// The child's stdout and stderr, across restarts.
    pub log: PathBuf,
    /// QUIC (UDP).
    pub listen: SocketAddr,
    /// HTTP API (TCP).
    pub api_addr: SocketAddr,
    pub token: String,
}

struct Slot {
    info: NodeInfo,
    /// Extra environment of the next start (test hooks).
    env: Vec<(String, String)>,
    /// `None` while the node is deliberately down.
    child: Mutex<Option<Child>>,
    api: Api,
    starts: u32,
}

/// The fault on one link: a proxy in front of each end, both obeying one switch, so the link is
/// cut or lossy whichever of the two dials (only one does; see [`Cluster::dials`]).
pub struct LinkFault {
    pub a: usize,
    pub b: usize,
    switch: ModeSwitch,
    /// `[0]` forwards to `a` (used when `b` dials), `[1]` forwards to `b` (used when `a` dials).
    proxies: [FaultProxy; 2],
}

impl LinkFault {
    pub fn set(&self, mode: Mode) {
        self.switch.set(mode);
    }

    pub fn mode(&self) -> Mode {
        self.switch.get()
    }

    /// Both proxies' counters added up.
    pub fn stats(&self) -> ProxyStats {
        let (x, y) = (self.proxies[0].stats(), self.proxies[1].stats());
        ProxyStats {
            forwarded: x.forwarded + y.forwarded,
            dropped: x.dropped + y.dropped,
        }
    }
}

/// A node of the cluster that should be running is not.
#[derive(Debug, thiserror::Error)]
pub enum NodeDown {
    /// It exited; the end of its log says why.
    #[error("{name} exited unexpectedly ({status}); its log ends:\n{log_tail}")]
    Exited {
        name: String,
        status: ExitStatus,
        log_tail: String,
    },
    #[error("{name}: try_wait: {source}")]
    Wait {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    nodes: Vec<Slot>,
    links: Vec<LinkFault>,
    finished: bool,
    /// Deadline of every wait of this cluster.
    pub timeout: Duration,
}

impl Cluster {
    /// Initialises and starts every node of `spec` with the `outpost` binary at `bin`. Does not
    /// wait for readiness: see [`Cluster::wait_all_ready`].
    pub async fn start(bin: &Path, spec: ClusterSpec) -> anyhow::Result<Cluster> {
        if spec.names.is_empty() {
            bail!("a cluster needs at least one node");
        }
        let base = spec.base_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = unique_dir(&base, &spec.label)?;
        // From here on, a failure drops a Cluster, which keeps the directory and reports it.
        let mut cluster = Cluster {
            dir: dir.clone(),
            bin: bin.to_owned(),
            nodes: Vec::new(),
            links: Vec::new(),
            finished: false,
            timeout: WAIT_DEFAULT,
        };
        let log_level = std::env::var("OUTPOST_TEST_LOG").unwrap_or(spec.log_level.clone());

        let mut ids = Vec::new();
        for name in &spec.names {
            let data_dir = dir.join(name);
            let (node_id, fingerprint) = init(bin, &data_dir, name, "datacenter").await?;
            let token = fs::read_to_string(data_dir.join("token"))
                .with_context(|| format!("reading {}/token", data_dir.display()))?
                .trim()
                .to_owned();
            ids.push((data_dir, node_id, fingerprint, token));
        }

        let (listens, apis) = free_ports(spec.names.len())?;

        // Fault proxies, bound before any node is given its peers' addresses.
        for (k, &(a, b, mode)) in spec.faulty_links.iter().enumerate() {
            let n = spec.names.len();
            if a >= n || b >= n || a == b {
                bail!("faulty link ({a}, {b}): not two distinct nodes of {n}");
            }
            let switch = ModeSwitch::new(mode);
            let seed = spec.seed.wrapping_mul(1000).wrapping_add(2 * k as u64);
            let to_a = FaultProxy::start_with(listens[a], switch.clone(), seed).await?;
            let to_b = FaultProxy::start_with(listens[b], switch.clone(), seed + 1).await?;
            cluster.links.push(LinkFault {
                a,
                b,
                switch,
                proxies: [to_a, to_b],
            });
        }

        for (i, (data_dir, node_id, fingerprint, token)) in ids.into_iter().enumerate() {
            let name = spec.names[i].clone();
            let info = NodeInfo {
                config: dir.join(format!("{name}.toml")),
                log: dir.join(format!("{name}.log")),
                name,
                role: "datacenter".into(),
                node_id,
                fingerprint,
                data_dir,
                listen: listens[i],
                api_addr: apis[i],
                token,
            };
            let api = Api::new(format!("http://{}", info.api_addr), info.token.clone());
            cluster.nodes.push(Slot {
                info,
                env: Vec::new(),
                child: Mutex::new(None),
                api,
                starts: 0,
            });
        }
        for i in 0..cluster.nodes.len() {
            let text = cluster.config_text(i, &log_level, &spec.extra_config);
            fs::write(&cluster.nodes[i].info.config, text)
                .with_context(|| format!("writing {}", cluster.nodes[i].info.config.display()))?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    /// Initialises nodes of any role (`(name, role)`), writes each one's config with
    /// `configure(all, i)` (every node's identity, ports and token are known by then) and starts
    /// them in order. The fleet of a controller and its workers is built on this.
    pub async fn start_nodes(
        bin: &Path,
        label: &str,
        nodes: &[(String, String)],
        configure: &dyn Fn(&[NodeInfo], usize) -> String,
    ) -> anyhow::Result<Cluster> {
        let dir = unique_dir(&std::env::temp_dir(), label)?;
        let mut cluster = Cluster {
            dir: dir.clone(),
            bin: bin.to_owned(),
            nodes: Vec::new(),
            links: Vec::new(),
            finished: false,
            timeout: WAIT_DEFAULT,
        };
        let (listens, apis) = free_ports(nodes.len())?;
        for (i, (name, role)) in nodes.iter().enumerate() {
            let data_dir = dir.join(name);
            let (node_id, fingerprint) = init(bin, &data_dir, name, role).await?;
            let token = fs::read_to_string(data_dir.join("token"))
                .with_context(|| format!("reading {}/token", data_dir.display()))?
                .trim()
                .to_owned();
            let info = NodeInfo {
                config: dir.join(format!("{name}.toml")),
                log: dir.join(format!("{name}.log")),
                name: name.clone(),
                role: role.clone(),
                node_id,
                fingerprint,
                data_dir,
                listen: listens[i],
                api_addr: apis[i],
                token,
            };
            let api = Api::new(format!("http://{}", info.api_addr), info.token.clone());
            cluster.nodes.push(Slot {
                info,
                env: Vec::new(),
                child: Mutex::new(None),
                api,
                starts: 0,
            });
        }
        let infos: Vec<NodeInfo> = cluster.nodes.iter().map(|s| s.info.clone()).collect();
        for (i, info) in infos.iter().enumerate() {
            fs::write(&info.config, configure(&infos, i))
                .with_context(|| format!("writing {}", info.config.display()))?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    /// Sets (or with `None` removes) an environment variable for node `i`'s next start.
    pub fn set_env(&mut self, i: usize, key: &str, value: Option<&str>) {
        let env = &mut self.nodes[i].env;
        env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Rewrites node `i`'s config file (takes effect at its next start or SIGHUP).
    pub fn write_config(&self, i: usize, text: &str) -> anyhow::Result<()> {
        let path = &self.nodes[i].info.config;
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Node `i`'s config: every other node as a peer, at its proxy when the link is faulty.
    fn config_text(&self, i: usize, log_level: &str, extra: &str) -> String {
        let me = &self.nodes[i].info;
        let mut doc = toml::Table::new();
        doc.insert("role".into(), "datacenter".into());
        doc.insert("name".into(), me.name.clone().into());
        doc.insert(
            "data_dir".into(),
            me.data_dir.to_string_lossy().into_owned().into(),
        );
        doc.insert("listen".into(), me.listen.to_string().into());
        doc.insert("api".into(), me.api_addr.to_string().into());
        let mut log = toml::Table::new();
        log.insert("level".into(), log_level.into());
        doc.insert("log".into(), toml::Value::Table(log));
        let mut peers = Vec::new();
        for (j, peer) in self.nodes.iter().enumerate() {
            if j == i {
                continue;
            }
            let mut p = toml::Table::new();
            p.insert("name".into(), peer.info.name.clone().into());
            p.insert("addr".into(), self.peer_addr(i, j).to_string().into());
            p.insert("fingerprint".into(), peer.info.fingerprint.clone().into());
            peers.push(toml::Value::Table(p));
        }
        doc.insert("peers".into(), toml::Value::Array(peers));
        let mut text = toml::to_string(&doc).expect("a config table serializes");
        if !extra.is_empty() {
            text.push('\n');
            text.push_str(extra);
            text.push('\n');
        }
        text
    }

    /// The address node `i` has for peer `j`.
    fn peer_addr(&self, i: usize, j: usize) -> SocketAddr {
        for l in &self.links {
            if (l.a, l.b) == (i, j) {
                return l.proxies[1].addr();
            }
            if (l.a, l.b) == (j, i) {
                return l.proxies[0].addr();
            }
        }
        self.nodes[j].info.listen
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = &mut self.nodes[i];
        let mut guard = slot.child.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_some() {
            bail!("{} is already running", slot.info.name);
        }
        slot.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.info.log)
            .with_context(|| format!("opening {}", slot.info.log.display()))?;
        writeln!(
            log,
            "=== testkit: start #{} of {} at {:?} ===",
            slot.starts,
            slot.info.name,
            SystemTime::now()
        )?;
        let err = log.try_clone()?;
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("--role")
            .arg(&slot.info.role)
            .arg("--config")
            .arg(&slot.info.config)
            .env_remove("OUTPOST_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .envs(slot.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {} for {}", self.bin.display(), slot.info.name))?;
        *guard = Some(child);
        Ok(())
    }

    fn mark_log(&self, i: usize, what: &str) {
        if let Ok(mut f) = OpenOptions::new()
            .append(true)
            .open(&self.nodes[i].info.log)
        {
            let _ = writeln!(f, "=== testkit: {what} at {:?} ===", SystemTime::now());
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn node(&self, i: usize) -> &NodeInfo {
        &self.nodes[i].info
    }

    /// The index of the node called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|s| s.info.name == name)
    }

    /// A client of node `i`'s API (a fresh connection pool after each restart).
    pub fn api(&self, i: usize) -> Api {
        self.nodes[i].api.clone()
    }

    /// Whether `a` dials `b` (the runtime's rule: the lower fingerprint, as a hex string, dials).
    pub fn dials(&self, a: usize, b: usize) -> bool {
        self.nodes[a].info.fingerprint < self.nodes[b].info.fingerprint
    }

    /// The fault on the link between `a` and `b` (either order); panics if it was not made faulty.
    pub fn link(&self, a: usize, b: usize) -> &LinkFault {
        self.links
            .iter()
            .find(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a))
            .unwrap_or_else(|| panic!("link ({a}, {b}) has no fault proxy"))
    }

    /// Whether node `i` should be running (it was not killed or stopped since its last start).
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i]
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The process id of node `i` while it runs (it changes with each restart).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i]
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// SIGKILL to node `i`, then reaps it.
    pub fn kill9(&mut self, i: usize) -> anyhow::Result<()> {
        let taken = self.nodes[i]
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut child) = taken else {
            bail!("{} is not running", self.nodes[i].info.name);
        };
        let exited_before = child.try_wait()?;
        child.kill().context("SIGKILL")?;
        child.wait()?;
        self.mark_log(i, "SIGKILL");
        if let Some(status) = exited_before {
            bail!(
                "{} had already exited ({status}) before the SIGKILL",
                self.nodes[i].info.name
            );
        }
        Ok(())
    }

    /// Starts node `i` again with the same config, ports and data directory.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i)?;
        let info = &self.nodes[i].info;
        self.nodes[i].api = Api::new(format!("http://{}", info.api_addr), info.token.clone());
        Ok(())
    }

    /// SIGHUP to node `i`: it reloads its config file.
    pub fn sighup(&self, i: usize) -> anyhow::Result<()> {
        let pid = self
            .pid(i)
            .ok_or_else(|| anyhow::anyhow!("{} is not running", self.node(i).name))?;
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -HUP {pid} failed");
        Ok(())
    }

    /// SIGTERM to node `i`; waits for it to exit, and fails unless it exits cleanly (status 0)
    /// within the grace period (after which it is killed).
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<ExitStatus> {
        let mut r = self.stop_some(&[i]).await;
        r.pop().expect("one node stopped")
    }

    /// Stops every running node with SIGTERM, all at once (see [`Cluster::stop`]); reports every
    /// failure.
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.is_up(i)).collect();
        let errors: Vec<String> = self
            .stop_some(&up)
            .await
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("; "))
        }
    }

    /// SIGTERM to each of `which`, then waits for all of them (one grace period in all).
    async fn stop_some(&mut self, which: &[usize]) -> Vec<anyhow::Result<ExitStatus>> {
        let mut out: Vec<Option<anyhow::Result<ExitStatus>>> = Vec::new();
        let mut waiting: Vec<(usize, Child)> = Vec::new();
        for &i in which {
            let name = self.nodes[i].info.name.clone();
            let taken = self.nodes[i]
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let Some(mut child) = taken else {
                out.push(Some(Err(anyhow!("{name} is not running"))));
                continue;
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    out.push(Some(Err(anyhow!("{name} had already exited ({status})"))));
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    out.push(Some(Err(anyhow!("{name}: try_wait: {e}"))));
                    continue;
                }
            }
            let sent = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            if !matches!(&sent, Ok(s) if s.success()) {
                let _ = child.kill();
                let _ = child.wait();
                out.push(Some(Err(anyhow!(
                    "kill -TERM {} failed: {sent:?}",
                    child.id()
                ))));
                continue;
            }
            self.mark_log(i, "SIGTERM");
            out.push(None);
            waiting.push((out.len() - 1, child));
        }
        let start = Instant::now();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for (k, mut child) in waiting {
                let name = &self.nodes[which[k]].info.name;
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => out[k] = Some(Ok(status)),
                    Ok(Some(status)) => {
                        out[k] = Some(Err(anyhow!("{name} exited with {status} after SIGTERM")))
                    }
                    Ok(None) if start.elapsed() > STOP_GRACE => {
                        let _ = child.kill();
                        let _ = child.wait();
                        self.mark_log(which[k], "SIGKILL after the SIGTERM grace period");
                        out[k] = Some(Err(anyhow!(
                            "{name} did not exit within {STOP_GRACE:?} of SIGTERM; killed"
                        )));
                    }
                    Ok(None) => still.push((k, child)),
                    Err(e) => out[k] = Some(Err(anyhow!("{name}: try_wait: {e}"))),
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        out.into_iter()
            .map(|r| r.expect("every node has an outcome"))
            .collect()
    }

    /// The success path: stops every node cleanly and removes the directory. On any failure the
    /// directory is kept (and reported) and the error returned.
    /// With `OUTPOST_TEST_KEEP=1` in the environment the directory is kept (and printed) anyway.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.stop_all().await?;
        self.finished = true;
        if std::env::var_os("OUTPOST_TEST_KEEP").is_some_and(|v| v == "1") {
            eprintln!(
                "testkit: cluster kept (OUTPOST_TEST_KEEP=1): {}",
                self.dir.display()
            );
            return Ok(());
        }
        fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))?;
        Ok(())
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = fs::read_to_string(&self.nodes[i].info.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails when a node that should be running has exited.
    pub fn check_alive(&self) -> Result<(), NodeDown> {
        for (i, slot) in self.nodes.iter().enumerate() {
            let mut guard = slot.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(child) = guard.as_mut() {
                match child.try_wait() {
                    Ok(None) => {}
                    Ok(Some(status)) => {
                        return Err(NodeDown::Exited {
                            name: slot.info.name.clone(),
                            status,
                            log_tail: self.log_tail(i, LOG_LINES_SHOWN),
                        })
                    }
                    Err(source) => {
                        return Err(NodeDown::Wait {
                            name: slot.info.name.clone(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits until node `i` answers its status with `ready: true`.
    pub async fn wait_ready(&self, i: usize) -> anyhow::Result<Status> {
        let api = self.api(i);
        let what = format!("{} to be ready", self.nodes[i].info.name);
        let api = &api;
        let r = wait_for(&what, self.timeout, move || async move {
            if let Err(e) = self.check_alive() {
                return Check::Failed(e.to_string());
            }
            match api.status().await {
                Ok(s) if s.ready => Check::Done(s),
                Ok(s) => Check::NotYet(format!("status answered ready=false: {s:?}")),
                Err(e) => Check::NotYet(e.to_string()),
            }
        })
        .await;
        self.annotate(r)
    }

    pub async fn wait_all_ready(&self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.wait_ready(i).await?;
        }
        Ok(())
    }

    /// Waits until nothing is in flight: every node's every peer connected with lag 0, and every
    /// digest (and entry count) equal; see [`Cluster::wait_settled`].
    pub async fn wait_quiet(&self) -> anyhow::Result<Vec<Status>> {
        self.wait_settled(&[]).await
    }

    /// Like [`Cluster::wait_quiet`], but the links listed in `cut` (pairs of indices, either
    /// order) are exempt: their ends may be disconnected and lag behind each other.
    ///
    /// The condition must hold in two consecutive rounds of polls with every node's log tail
    /// unchanged between them: the nodes are polled one after another, and only a log that has
    /// stopped growing makes "every peer acknowledged all of it" mean nothing is in flight.
    pub async fn wait_settled(&self, cut: &[(usize, usize)]) -> anyhow::Result<Vec<Status>> {
        let what = if cut.is_empty() {
            "the cluster to be quiet (all connected, lag 0, digests equal)".to_owned()
        } else {
            format!("the cluster to settle with links {cut:?} exempt")
        };
        let previous: Mutex<Option<Vec<u64>>> = Mutex::new(None);
        let previous = &previous;
        let r = wait_for(&what, self.timeout, move || async move {
            if let Err(e) = self.check_alive() {
                return Check::Failed(e.to_string());
            }
            let mut statuses = Vec::new();
            for i in 0..self.nodes.len() {
                match self.api(i).status().await {
                    Ok(s) => statuses.push(s),
                    Err(e) => {
                        *previous.lock().unwrap() = None;
                        return Check::NotYet(format!("{}: {e}", self.nodes[i].info.name));
                    }
                }
            }
            let problems = self.settle_problems(&statuses, cut);
            let tails: Vec<u64> = statuses.iter().map(|s| s.log_tail).collect();
            let mut prev = previous.lock().unwrap();
            if !problems.is_empty() {
                *prev = None;
                return Check::NotYet(format!("{}\n{}", problems.join("; "), summarize(&statuses)));
            }
            if prev.as_ref() == Some(&tails) {
                return Check::Done(statuses);
            }
            *prev = Some(tails);
            Check::NotYet(format!(
                "settled once, confirming\n{}",
                summarize(&statuses)
            ))
        })
        .await;
        self.annotate(r)
    }

    fn settle_problems(&self, statuses: &[Status], cut: &[(usize, usize)]) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, s) in statuses.iter().enumerate() {
            if !s.ready {
                problems.push(format!("{} not ready", s.name));
            }
            for p in &s.peers {
                let Some(j) = self.index(&p.name) else {
                    problems.push(format!("{} lists an unknown peer {}", s.name, p.name));
                    continue;
                };
                if cut.contains(&(i, j)) || cut.contains(&(j, i)) {
                    continue;
                }
                if !p.connected {
                    problems.push(format!("{} -> {} not connected", s.name, p.name));
                } else if p.lag != 0 {
                    problems.push(format!("{} -> {} lag {}", s.name, p.name, p.lag));
                }
            }
        }
        let first = &statuses[0];
        if statuses
            .iter()
            .any(|s| s.digest != first.digest || s.entries != first.entries)
        {
            problems.push("digests differ".to_owned());
        }
        problems
    }

    /// Adds the cluster's directory to a wait's error.
    fn annotate<T>(&self, r: anyhow::Result<T>) -> anyhow::Result<T> {
        r.map_err(|e| anyhow!("{e:#}\n(cluster directory: {})", self.dir.display()))
    }
}

/// One line per node: the numbers the waits look at.
pub fn summarize(statuses: &[Status]) -> String {
    let mut out = String::new();
    for s in statuses {
        let _ = write!(
            out,
            "  {} ready={} log_tail={} entries={} digest={}:",
            s.name,
            s.ready,
            s.log_tail,
            s.entries,
            s.digest.get(..12).unwrap_or(&s.digest)
        );
        for p in &s.peers {
            let _ = write!(
                out,
                " [{} connected={} lag={} acked={} received={}{}]",
                p.name,
                p.connected,
                p.lag,
                p.acked,
                p.received,
                p.last_error
                    .as_ref()
                    .map(|e| format!(" last_error={e:?}"))
                    .unwrap_or_default()
            );
        }
        out.push('\n');
    }
    out
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for slot in &self.nodes {
            let mut guard = slot.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut child) = guard.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.finished {
            return;
        }
        let mut report = format!(
            "testkit: cluster KEPT for inspection: {}\n",
            self.dir.display()
        );
        for (i, slot) in self.nodes.iter().enumerate() {
            let _ = writeln!(
                report,
                "---- {} ({}), last {LOG_LINES_SHOWN} lines ----\n{}",
                slot.info.name,
                slot.info.log.display(),
                self.log_tail(i, LOG_LINES_SHOWN)
            );
        }
        eprintln!("{report}");
    }
}

/// A new directory under `base`, unique across processes and runs.
fn unique_dir(base: &Path, label: &str) -> anyhow::Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let dir = base.join(format!(
            "outpost-{label}-{}-{nanos}-{attempt}",
            std::process::id()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no unique directory under {}", base.display())
}

/// `outpost init`: returns the node id and fingerprint it prints.
async fn init(
    bin: &Path,
    data_dir: &Path,
    name: &str,
    role: &str,
) -> anyhow::Result<(String, String)> {
    let out = tokio::process::Command::new(bin)
        .arg("init")
        .arg("--role")
        .arg(role)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--name")
        .arg(name)
        .env_remove("OUTPOST_TOKEN")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} init", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "outpost init for {name} failed ({}): {stderr}{stdout}",
            out.status
        );
    }
    parse_init(&stdout).with_context(|| format!("outpost init for {name} printed {stdout:?}"))
}

fn parse_init(stdout: &str) -> anyhow::Result<(String, String)> {
    let field = |key: &str, len: usize| -> anyhow::Result<String> {
        let v = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(str::trim)
            .ok_or_else(|| anyhow!("no `{key}` line"))?;
        if v.len() != len || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("`{key}` is not {len} hex characters: {v:?}");
        }
        Ok(v.to_owned())
    };
    Ok((field("node-id:", 32)?, field("fingerprint:", 64)?))
}

/// `n` free UDP ports and `n` free TCP ports on 127.0.0.1, all distinct: each is bound (port 0)
/// and held until all are chosen, then released for the nodes to bind.
fn free_ports(n: usize) -> anyhow::Result<(Vec<SocketAddr>, Vec<SocketAddr>)> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    while udp.len() < n {
        let s = UdpSocket::bind("127.0.0.1:0").context("binding a UDP port")?;
        let a = s.local_addr()?;
        if used.insert(a.port()) {
            udp.push(s);
        }
    }
    while tcp.len() < n {
        let s = TcpListener::bind("127.0.0.1:0").context("binding a TCP port")?;
        let a = s.local_addr()?;
        if used.insert(a.port()) {
            tcp.push(s);
        }
    }
    let udp_addrs = udp
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<_, _>>()?;
    let tcp_addrs = tcp
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<_, _>>()?;
    Ok((udp_addrs, tcp_addrs))
}

/// The `outpost` binary next to the running executable (for tools and the demo: `target/release/
/// outpost` beside `target/release/outpost-bench`; a test binary in `deps/` looks one level up).
pub fn outpost_binary_near_current_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the current executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    let name = format!("outpost{}", std::env::consts::EXE_SUFFIX);
    let mut candidates = vec![dir.join(&name)];
    if let Some(up) = dir.parent() {
        candidates.push(up.join(&name));
    }
    candidates
        .iter()
        .find(|p| p.is_file() && **p != exe)
        .cloned()
        .ok_or_else(|| anyhow!("no outpost binary at {candidates:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_output_is_parsed() {
        let out = format!(
            "node-id: {}\nfingerprint: {}\n",
            "ab".repeat(16),
            "0f".repeat(32)
        );
        let (id, fp) = parse_init(&out).unwrap();
        assert_eq!(id, "ab".repeat(16));
        assert_eq!(fp, "0f".repeat(32));
        assert!(parse_init("node-id: xyz\n").is_err());
        assert!(parse_init(&format!("node-id: {}\n", "ab".repeat(16))).is_err());
    }

    #[test]
    fn free_ports_are_distinct() {
        let (u, t) = free_ports(5).unwrap();
        let mut ports: Vec<u16> = u.iter().chain(&t).map(|a| a.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 10);
    }

    #[test]
    fn unique_dirs_do_not_collide() {
        let base = std::env::temp_dir();
        let a = unique_dir(&base, "unit").unwrap();
        let b = unique_dir(&base, "unit").unwrap();
        assert_ne!(a, b);
        fs::remove_dir_all(a).unwrap();
        fs::remove_dir_all(b).unwrap();
    }
}
