//! The software this machine runs, and the deployments that change it. One task owns the
//! installer (`DATA_DIR/software`) and the supervisor of the running software:
//!
//! - at boot it kills what a predecessor killed with -9 left running, then starts the current
//!   bundle (if any) and reports it `running` once healthy (or `failed`, and tries again with
//!   the supervisor's backoff);
//! - software that dies after it was healthy is reported `failed` and restarted with backoff,
//!   and reported `running` again once healthy; a new pool is a SIGHUP to its process group;
//! - a deployment order (an `Effect::Deploy` the driver hands over after its commit) is fetched
//!   (`fetch`: resumable, checked against the signed hash), decrypted with this machine's key
//!   straight into the installer (which checks the bundle id and refuses hostile archives), and
//!   then switched to: the old software stopped, the new one activated, started and checked;
//!   unhealthy, it is stopped and the previous software comes back. Each step is reported with
//!   the deployment's id; the last one goes through `core.deployed`.
//!
//! One deployment at a time; a newer order cancels an older one still fetching (reported
//! `failed`, superseded). The task never touches the core or the database: it feeds its
//! reports to the driver like any other input. Blocking work (install, fsync, stop, health
//! checks) runs on the blocking pool. The deployments themselves are in `software/deploy.rs`.

mod config;
mod deploy;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::driver::Input;
// Details are clipped to what the controller accepts (`controller::core::DETAIL_MAX`).
use super::lifecycle::{clip, Boot, Lifecycle};
use super::WorkerShared;
use crate::bundle::{ConfigSpec, Installed, Installer, Supervisor, CURRENT_LINK};
use crate::cluster::body::{ConfigOrder, DeployOrder};
use crate::cluster::keys::SealKey;
use crate::limits::{SOFTWARE_ORDERS_MAX, SOFTWARE_WATCH_EVERY};
use crate::wire::{MachineReport, Software};

/// `DATA_DIR/software`: installed bundles and the `current`/`previous` links.
pub(crate) const SOFTWARE_DIR: &str = "software";
/// `DATA_DIR/bundles/incoming`: sealed bundles being fetched, one file per deployment.
pub(crate) const INCOMING_DIR: &str = "bundles/incoming";
/// `DATA_DIR/software.log`: the software's stdout and stderr, appended.
pub(crate) const SOFTWARE_LOG: &str = "software.log";

/// What the driver and the API share with the software task.
#[derive(Default)]
pub(crate) struct SoftwareShared {
    orders: Mutex<VecDeque<DeployOrder>>,
    /// The newest configuration order not yet taken up (a newer one replaces it).
    config: Mutex<Option<ConfigOrder>>,
    reload: AtomicBool,
    wake: Notify,
    view: Mutex<SoftwareView>,
}

impl SoftwareShared {
    /// A deployment to carry out (from the driver, after its commit). Never blocks.
    pub(crate) fn order(&self, order: DeployOrder) {
        {
            let mut q = self.orders.lock().expect("orders lock");
            if q.len() == SOFTWARE_ORDERS_MAX {
                q.pop_front();
            }
            q.push_back(order);
        }
        self.wake.notify_one();
    }

    /// A configuration to apply (from the driver, after its commit). Never blocks; an older
    /// one not yet taken up is replaced (its report says superseded nowhere: only the newest
    /// version matters, and it is reported).
    pub(crate) fn configure(&self, order: ConfigOrder) {
        *self.config.lock().expect("config lock") = Some(order);
        self.wake.notify_one();
    }

    fn take_config(&self) -> Option<ConfigOrder> {
        self.config.lock().expect("config lock").take()
    }

    /// The pool file changed: SIGHUP to the software once it runs healthy.
    pub(crate) fn reload(&self) {
        self.reload.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn set_view(&self, f: impl FnOnce(&mut SoftwareView)) {
        f(&mut self.view.lock().expect("software view lock"));
    }

    pub(crate) fn view(&self) -> SoftwareView {
        self.view.lock().expect("software view lock").clone()
    }
}

/// What `/v1/status` shows of the software and the deployments.
#[derive(Clone, Debug, Default)]
pub(crate) struct SoftwareView {
    /// `idle` (nothing installed), `starting`, `running`, `failed`.
    pub state: String,
    pub detail: Option<String>,
    pub running: Option<RunningView>,
    pub deploying: Option<DeployingView>,
    pub last: Option<OutcomeView>,
}

#[derive(Clone, Debug)]
pub(crate) struct RunningView {
    pub software: Software,
    pub pid: u32,
    pub since: SystemTime,
    pub restarts: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct DeployingView {
    pub deployment: u64,
    pub software: Software,
    /// `fetching`, `installing`, `starting`.
    pub stage: &'static str,
    pub fetched: Arc<AtomicU64>,
    pub total: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct OutcomeView {
    pub deployment: u64,
    pub bundle_id: String,
    /// `running`, `rolled_back`, `failed`.
    pub state: String,
    pub detail: Option<String>,
    pub at: SystemTime,
}

impl SoftwareView {
    pub(crate) fn json(&self) -> Value {
        let sw = |s: &Software| {
            json!({
                "service": s.service,
                "bundle_id": s.bundle_id,
                "version": s.version,
            })
        };
        json!({
            "state": self.state,
            "detail": self.detail,
            "running": self.running.as_ref().map(|r| {
                let mut v = sw(&r.software);
                v["pid"] = json!(r.pid);
                v["since"] = json!(humantime::format_rfc3339_seconds(r.since).to_string());
                v["restarts"] = json!(r.restarts);
                v
            }),
            "deployment": self.deploying.as_ref().map(|d| json!({
                "deployment": d.deployment,
                "software": sw(&d.software),
                "stage": d.stage,
                "bytes_fetched": d.fetched.load(Ordering::Relaxed),
                "bytes_total": d.total,
            })),
            "last_deployment": self.last.as_ref().map(|o| json!({
                "deployment": o.deployment,
                "bundle_id": o.bundle_id,
                "state": o.state,
                "detail": o.detail,
                "at": humantime::format_rfc3339_seconds(o.at).to_string(),
            })),
        })
    }
}

/// The running (or down, waiting for its restart) software.
struct Child {
    sup: Supervisor,
    software: Software,
    since: SystemTime,
    /// Passed its health check since it was last started.
    healthy: bool,
}

struct Fetching {
    order: DeployOrder,
    started: Instant,
    handle: tokio::task::JoinHandle<Result<(), super::fetch::FetchError>>,
}

struct Task {
    shared: Arc<WorkerShared>,
    seal: Arc<SealKey>,
    installer: Arc<Mutex<Installer>>,
    software_dir: PathBuf,
    incoming_dir: PathBuf,
    log_path: PathBuf,
    extra_env: BTreeMap<String, String>,
    child: Option<Child>,
    /// The decisions: which order runs, its stages, its outcome, the restart deadlines.
    life: Lifecycle,
    /// The lifecycle's clock: milliseconds since this instant.
    clock: Instant,
    /// Recent orders, by deployment (for their outcome's view).
    orders: BTreeMap<u64, DeployOrder>,
    /// The bundle installed for the deployment being switched to.
    installed: Option<Installed>,
    fetching: Option<Fetching>,
    data_dir: PathBuf,
    /// The configuration in effect (last applied healthy), and where the software last
    /// started reads it (`None`: no software started yet; the default path).
    config_current: Option<ConfigOrder>,
    config_spec: Option<ConfigSpec>,
}

enum Event {
    Stop,
    Wake,
    Fetched(Result<Result<(), super::fetch::FetchError>, tokio::task::JoinError>),
    Restart,
    Tick,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a blocking task failed: {e}"))
}

fn software_of(i: &Installed) -> Software {
    Software {
        service: i.manifest.service.clone(),
        bundle_id: i.bundle_id.clone(),
        version: i.manifest.version.clone(),
    }
}

/// The software task; returns once `stop` is set, with the software stopped.
pub(crate) async fn run(shared: Arc<WorkerShared>, seal: SealKey, mut stop: watch::Receiver<bool>) {
    let data_dir = shared.config.data_dir.clone();
    let software_dir = data_dir.join(SOFTWARE_DIR);
    let dir = software_dir.clone();
    let installer = match blocking(move || Installer::new(dir)).await {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => {
            shared.note_error(format!(
                "cannot open the software directory {}: {e}; no software will run",
                software_dir.display()
            ));
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
        Err(e) => {
            shared.note_error(e);
            return;
        }
    };
    let mut extra_env = BTreeMap::new();
    if shared.is_lb {
        extra_env.insert(
            "OUTPOST_POOL_FILE".to_owned(),
            shared.pool_path.display().to_string(),
        );
    }
    if let Some(a) = shared.config.machine.as_ref().and_then(|m| m.service_addr) {
        extra_env.insert("OUTPOST_SERVICE_ADDR".to_owned(), a.to_string());
    }
    let config_current = shared
        .view
        .lock()
        .expect("view lock")
        .record
        .config
        .current
        .clone();
    let mut t = Task {
        data_dir: data_dir.clone(),
        config_current,
        config_spec: None,
        shared,
        seal: Arc::new(seal),
        installer: Arc::new(Mutex::new(installer)),
        software_dir,
        incoming_dir: data_dir.join(INCOMING_DIR),
        log_path: data_dir.join(SOFTWARE_LOG),
        extra_env,
        child: None,
        life: Lifecycle::new(),
        clock: Instant::now(),
        orders: BTreeMap::new(),
        installed: None,
        fetching: None,
    };
    t.show("starting", None);
    t.boot().await;
    let mut tick = tokio::time::interval(SOFTWARE_WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let restart_at = t
            .life
            .poll_timeout()
            .map(|ms| t.clock + Duration::from_millis(ms));
        let fetching = t.fetching.as_mut().map(|f| &mut f.handle);
        let wake = &t.shared.software.wake;
        let fetching_now = fetching.is_some();
        let restart = tokio::time::sleep_until(restart_at.unwrap_or_else(Instant::now));
        let ev = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Event::Stop,
            _ = wake.notified() => Event::Wake,
            r = async { fetching.expect("guarded").await }, if fetching_now => {
                Event::Fetched(r)
            }
            _ = restart, if restart_at.is_some() => Event::Restart,
            _ = tick.tick() => Event::Tick,
        };
        match ev {
            Event::Stop => {
                t.shutdown().await;
                return;
            }
            Event::Wake => t.wake().await,
            Event::Fetched(r) => t.fetched(r).await,
            Event::Restart => {
                let now = t.now_ms();
                t.life.timeout(now);
                t.drive().await;
            }
            Event::Tick => {
                t.watch_child().await;
                // Once the controller acknowledged a failed delivery: `running` again.
                let rec = t.shared.record();
                t.life.record(&rec);
                t.drive().await;
            }
        }
    }
}

impl Task {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    async fn send(&self, r: MachineReport) {
        let _ = self.shared.input(Input::Report(r)).await;
    }

    fn running_software(&self) -> Option<Software> {
        self.child
            .as_ref()
            .filter(|c| c.healthy)
            .map(|c| c.software.clone())
    }

    /// Refreshes what the API shows of the running software.
    fn show(&self, state: &str, detail: Option<String>) {
        let running = self
            .child
            .as_ref()
            .filter(|c| c.healthy)
            .map(|c| RunningView {
                software: c.software.clone(),
                pid: c.sup.pid(),
                since: c.since,
                restarts: c.sup.restarts(),
            });
        self.shared.software.set_view(|v| {
            v.state = state.to_owned();
            v.detail = detail;
            v.running = running;
        });
    }

    fn set_stage(&self, stage: &'static str) {
        self.shared.software.set_view(|v| {
            if let Some(d) = v.deploying.as_mut() {
                d.stage = stage;
            }
        });
    }

    async fn boot(&mut self) {
        let dir = self.software_dir.clone();
        match blocking(move || Supervisor::kill_orphans(&dir)).await {
            Ok(Ok(Some(pgid))) => tracing::warn!(
                "stopped the software a previous run left behind (process group {pgid})"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => self.shared.note_error(format!(
                "looking for software a previous run left behind: {e}"
            )),
            Err(e) => self.shared.note_error(e),
        }
        let inst = self.installer.clone();
        let current = blocking(move || {
            let i = inst.lock().unwrap_or_else(|p| p.into_inner());
            let cur = i
                .current()
                .map_err(|e| format!("reading {CURRENT_LINK}: {e}"))?;
            cur.map(|id| i.installed(&id).map_err(|e| e.to_string()))
                .transpose()
        })
        .await
        .and_then(|r| r);
        let boot = match current {
            Ok(None) => {
                self.show("idle", None);
                Boot::Nothing
            }
            Err(e) => {
                let why = format!("the installed software cannot be started: {e}");
                self.shared.note_error(why.clone());
                self.show("failed", Some(why));
                Boot::Broken(e)
            }
            Ok(Some(installed)) => {
                self.show("starting", None);
                match self.launch(&installed).await {
                    Ok(child) => {
                        self.child = Some(child);
                        self.show("running", None);
                        Boot::Healthy(software_of(&installed))
                    }
                    Err((child, reason)) => {
                        tracing::warn!("the installed software is not healthy: {reason}");
                        // It was current, so it ran healthy once: the lifecycle tries again
                        // with backoff.
                        self.child = child;
                        self.show("failed", Some(reason.clone()));
                        Boot::Unhealthy(software_of(&installed), reason)
                    }
                }
            }
        };
        let rec = self.shared.record();
        let now = self.now_ms();
        self.life.booted(boot, &rec, now);
        self.drive().await;
    }

    /// Starts `installed` and checks its health. Unhealthy, it is stopped and returned (if it
    /// could be started at all) with the reason.
    async fn launch(&mut self, installed: &Installed) -> Result<Child, (Option<Child>, String)> {
        let software = software_of(installed);
        let config_file = self.prepare_config(&installed.manifest.config).await;
        let (dir, manifest) = (installed.dir.clone(), installed.manifest.clone());
        let (log, mut env) = (self.log_path.clone(), self.extra_env.clone());
        env.insert(
            config::CONFIG_FILE_ENV.to_owned(),
            config_file.display().to_string(),
        );
        let sup = match blocking(move || Supervisor::start(&dir, &manifest, &log, &env)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err((
                    None,
                    format!("starting {} {}: {e}", software.service, software.version),
                ))
            }
            Err(e) => return Err((None, e)),
        };
        let since = SystemTime::now();
        let (sup, health) = match blocking(move || {
            let h = sup.check_health().map_err(|e| e.to_string());
            (sup, h)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => return Err((None, e)),
        };
        let mut child = Child {
            sup,
            software,
            since,
            healthy: false,
        };
        match health {
            Ok(()) => {
                child.healthy = true;
                Ok(child)
            }
            Err(reason) => {
                let child = stop_child(child).await;
                Err((child, reason))
            }
        }
    }

    async fn wake(&mut self) {
        if self.shared.software.reload.swap(false, Ordering::Relaxed) {
            self.reload();
        }
        self.configure().await;
        let orders: Vec<DeployOrder> = self
            .shared
            .software
            .orders
            .lock()
            .expect("orders lock")
            .drain(..)
            .collect();
        if !orders.is_empty() {
            self.take_orders(orders).await;
        }
    }

    fn reload(&mut self) {
        match self.child.as_ref() {
            Some(c) if c.healthy => match c.sup.reload() {
                Ok(()) => tracing::info!(
                    pid = c.sup.pid(),
                    "pool file written; SIGHUP sent to the software"
                ),
                Err(e) => tracing::warn!("cannot signal the software to reload: {e}"),
            },
            Some(_) => {
                // Not healthy yet (or down): it is told once it is.
                self.shared.software.reload.store(true, Ordering::Relaxed);
            }
            None => tracing::info!(
                path = %self.shared.pool_path.display(),
                "pool file written; no software is running to reload it"
            ),
        }
    }

    /// After the software became healthy: a reload that arrived meanwhile.
    fn pending_reload(&mut self) {
        if self.shared.software.reload.swap(false, Ordering::Relaxed) {
            self.reload();
        }
    }

    /// Looks whether the software died.
    async fn watch_child(&mut self) {
        let Some(c) = self.child.take() else { return };
        if !c.healthy {
            self.child = Some(c);
            return;
        }
        let (c, status) = match blocking(move || {
            let s = c.sup.poll_exit();
            (c, s)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => {
                self.shared.note_error(e);
                self.show("failed", Some("lost track of the software".into()));
                return;
            }
        };
        let mut c = c;
        if let Some(status) = status {
            c.healthy = false;
            let now = self.now_ms();
            self.life.exited(&status.to_string(), now);
            let delay = self.life.poll_timeout().unwrap_or(now).saturating_sub(now);
            let why = format!(
                "{} {} exited ({status}); restarting it in {}",
                c.software.service,
                c.software.version,
                humantime::format_duration(Duration::from_millis(delay))
            );
            self.shared.note_error(format!("software: {why}"));
            self.child = Some(c);
            self.show("failed", Some(why));
            // The lifecycle's report says the same, and it sets the restart's deadline.
            self.drive().await;
        } else {
            self.child = Some(c);
        }
    }

    /// The backoff after a death has passed: starts the software again (the lifecycle's
    /// `Restart`) and tells the lifecycle how it went.
    pub(super) async fn restart(&mut self) {
        let Some(c) = self.child.take() else {
            let now = self.now_ms();
            self.life
                .restarted(Err("no software to restart".into()), now);
            return;
        };
        self.shared
            .metrics
            .software_restarts
            .fetch_add(1, Ordering::Relaxed);
        let r = blocking(move || {
            let mut c = c;
            let h = c
                .sup
                .restart()
                .map_err(|e| e.to_string())
                .and_then(|()| c.sup.check_health().map_err(|e| e.to_string()));
            if h.is_err() {
                let _ = c.sup.stop();
            }
            (c, h)
        })
        .await;
        let now = self.now_ms();
        let (mut c, health) = match r {
            Ok(x) => x,
            Err(e) => {
                self.shared.note_error(e.clone());
                self.show("failed", Some("lost track of the software".into()));
                self.life.restarted(Err(e), now);
                return;
            }
        };
        match health {
            Ok(()) => {
                c.healthy = true;
                c.since = SystemTime::now();
                tracing::info!(
                    "{} {} is running again",
                    c.software.service,
                    c.software.version
                );
                self.child = Some(c);
                self.show("running", None);
                self.pending_reload();
                self.life.restarted(Ok(()), now);
            }
            Err(reason) => {
                let software = format!("{} {}", c.software.service, c.software.version);
                self.child = Some(c);
                self.show("failed", Some(reason.clone()));
                self.life.restarted(Err(reason.clone()), now);
                let delay = self.life.poll_timeout().unwrap_or(now).saturating_sub(now);
                tracing::warn!(
                    "restarting {software} failed: {reason}; next attempt in {}",
                    humantime::format_duration(Duration::from_millis(delay))
                );
            }
        }
    }

    async fn shutdown(&mut self) {
        if let Some(f) = self.fetching.take() {
            f.handle.abort();
            let _ = f.handle.await;
        }
        if let Some(c) = self.child.take() {
            tracing::info!(
                "stopping {} {} (the worker stops)",
                c.software.service,
                c.software.version
            );
            drop(stop_child(c).await);
        }
    }
}

/// SIGTERM, SIGKILL after the manifest's timeout; returns the child (stopped) unless the
/// blocking pool failed, in which case it was dropped (which kills it).
async fn stop_child(mut c: Child) -> Option<Child> {
    blocking(move || {
        if let Err(e) = c.sup.stop() {
            tracing::warn!("stopping {}: {e}", c.software.service);
        }
        c
    })
    .await
    .ok()
}
