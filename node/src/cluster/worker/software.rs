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
//! checks) runs on the blocking pool.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::driver::Input;
use super::fetch;
use super::WorkerShared;
use crate::bundle::{BundleError, Installed, Installer, Supervisor, CURRENT_LINK};
use crate::cluster::body::DeployOrder;
use crate::cluster::keys::SealKey;
use crate::wire::{MachineReport, Software};

/// `DATA_DIR/software`: installed bundles and the `current`/`previous` links.
pub(crate) const SOFTWARE_DIR: &str = "software";
/// `DATA_DIR/bundles/incoming`: sealed bundles being fetched, one file per deployment.
pub(crate) const INCOMING_DIR: &str = "bundles/incoming";
/// `DATA_DIR/software.log`: the software's stdout and stderr, appended.
pub(crate) const SOFTWARE_LOG: &str = "software.log";
/// How often the running software is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// The controller refuses a report whose detail is over 2048 bytes.
const DETAIL_BYTES_MAX: usize = 2000;
/// Orders waiting for the task; beyond it the oldest is dropped (a newer one supersedes it).
const ORDERS_MAX: usize = 16;

/// What the driver and the API share with the software task.
#[derive(Default)]
pub(crate) struct SoftwareShared {
    orders: Mutex<VecDeque<DeployOrder>>,
    reload: AtomicBool,
    wake: Notify,
    view: Mutex<SoftwareView>,
}

impl SoftwareShared {
    /// A deployment to carry out (from the driver, after its commit). Never blocks.
    pub(crate) fn order(&self, order: DeployOrder) {
        {
            let mut q = self.orders.lock().expect("orders lock");
            if q.len() == ORDERS_MAX {
                q.pop_front();
            }
            q.push_back(order);
        }
        self.wake.notify_one();
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
        let sw = |s: &Software| json!({ "service": s.service, "bundle_id": s.bundle_id, "version": s.version });
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
    restart_at: Option<Instant>,
}

struct Fetching {
    order: DeployOrder,
    path: PathBuf,
    handle: tokio::task::JoinHandle<Result<(), String>>,
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
    /// The highest deployment taken up by this task.
    handled: u64,
    fetching: Option<Fetching>,
    /// A deployment reported `failed` while the old software kept running: once the
    /// controller has acknowledged that, the machine reports `running` again, so that a refused
    /// delivery does not keep it out of its load balancer's pool.
    restore_after: Option<u64>,
}

enum Event {
    Stop,
    Wake,
    Fetched(Result<Result<(), String>, tokio::task::JoinError>),
    Restart,
    Tick,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a blocking task failed: {e}"))
}

/// At most [`DETAIL_BYTES_MAX`] bytes, cut on a character boundary.
fn clip(mut s: String) -> String {
    if s.len() > DETAIL_BYTES_MAX {
        let mut at = DETAIL_BYTES_MAX - 3;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
    s
}

fn report(
    state: &str,
    software: Option<Software>,
    detail: Option<String>,
    deployment: Option<u64>,
) -> MachineReport {
    MachineReport {
        state: state.into(),
        software,
        detail: detail.map(clip),
        deployment,
    }
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
    let mut t = Task {
        shared,
        seal: Arc::new(seal),
        installer: Arc::new(Mutex::new(installer)),
        software_dir,
        incoming_dir: data_dir.join(INCOMING_DIR),
        log_path: data_dir.join(SOFTWARE_LOG),
        extra_env,
        child: None,
        handled: 0,
        fetching: None,
        restore_after: None,
    };
    t.boot().await;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let restart_at = t.child.as_ref().and_then(|c| c.restart_at);
        let fetching = t.fetching.as_mut().map(|f| &mut f.handle);
        let wake = &t.shared.software.wake;
        let ev = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Event::Stop,
            _ = wake.notified() => Event::Wake,
            r = async { fetching.expect("guarded").await }, if fetching.is_some() => Event::Fetched(r),
            _ = tokio::time::sleep_until(restart_at.unwrap_or_else(Instant::now)), if restart_at.is_some() => Event::Restart,
            _ = tick.tick() => Event::Tick,
        };
        match ev {
            Event::Stop => {
                t.shutdown().await;
                return;
            }
            Event::Wake => t.wake().await,
            Event::Fetched(r) => t.fetched(r).await,
            Event::Restart => t.restart().await,
            Event::Tick => {
                t.watch_child().await;
                t.restore().await;
            }
        }
    }
}

impl Task {
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
        let installed = match current {
            Ok(Some(i)) => i,
            Ok(None) => {
                self.show("idle", None);
                return;
            }
            Err(e) => {
                let e = format!("the installed software cannot be started: {e}");
                self.shared.note_error(e.clone());
                self.show("failed", Some(e.clone()));
                self.send(report("failed", None, Some(e), None)).await;
                return;
            }
        };
        self.show("starting", None);
        match self.launch(&installed).await {
            Ok(child) => {
                self.child = Some(child);
                self.show("running", None);
                let sw = self.running_software();
                self.send(report("running", sw, None, None)).await;
            }
            Err((child, reason)) => {
                tracing::warn!("the installed software is not healthy: {reason}");
                // It was current, so it ran healthy once: tried again with backoff.
                self.child = child.map(|mut c| {
                    c.restart_at = Some(Instant::now() + c.sup.restart_delay());
                    c
                });
                self.show("failed", Some(reason.clone()));
                let sw = Some(software_of(&installed));
                self.send(report("failed", sw, Some(reason), None)).await;
            }
        }
    }

    /// Starts `installed` and checks its health. Unhealthy, it is stopped and returned (if it
    /// could be started at all) with the reason.
    async fn launch(&self, installed: &Installed) -> Result<Child, (Option<Child>, String)> {
        let software = software_of(installed);
        let (dir, manifest) = (installed.dir.clone(), installed.manifest.clone());
        let (log, env) = (self.log_path.clone(), self.extra_env.clone());
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
            let h = sup.check_health();
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
            restart_at: None,
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
        let orders: Vec<DeployOrder> = self
            .shared
            .software
            .orders
            .lock()
            .expect("orders lock")
            .drain(..)
            .collect();
        let Some(newest) = orders.iter().map(|o| o.deployment).max() else {
            return;
        };
        for order in orders {
            if order.deployment == newest {
                self.take_order(order).await;
            } else if order.deployment > self.handled {
                // Queued behind a newer one: never started.
                self.handled = order.deployment;
                self.superseded(&order, newest).await;
            }
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

    async fn superseded(&mut self, order: &DeployOrder, by: u64) {
        let why = format!("superseded by deployment {by} before it was installed");
        tracing::info!(deployment = order.deployment, "{why}");
        let r = report(
            "failed",
            self.running_software(),
            Some(why),
            Some(order.deployment),
        );
        self.finish(order, r).await;
    }

    async fn take_order(&mut self, order: DeployOrder) {
        if order.deployment <= self.handled {
            tracing::debug!(deployment = order.deployment, "deployment already taken up");
            return;
        }
        self.handled = order.deployment;
        if let Some(old) = self.fetching.take() {
            old.handle.abort();
            let _ = old.handle.await;
            self.superseded(&old.order, order.deployment).await;
        }
        self.restore_after = None;
        let path = fetch::incoming_path(&self.incoming_dir, order.deployment);
        // Leftovers of older deployments (cancelled, or finished before a crash).
        let (dir, keep) = (self.incoming_dir.clone(), path.clone());
        let _ = blocking(move || remove_incoming_except(&dir, Some(&keep))).await;
        tracing::info!(
            deployment = order.deployment,
            service = %order.service,
            version = %order.version,
            bundle_id = %order.bundle_id,
            bytes = order.sealed_bytes,
            "deployment received; fetching the sealed bundle"
        );
        let fetched = Arc::new(AtomicU64::new(0));
        self.shared.software.set_view(|v| {
            v.deploying = Some(DeployingView {
                deployment: order.deployment,
                software: Software {
                    service: order.service.clone(),
                    bundle_id: order.bundle_id.clone(),
                    version: order.version.clone(),
                },
                stage: "fetching",
                fetched: fetched.clone(),
                total: order.sealed_bytes,
            })
        });
        let sw = self.running_software();
        self.send(report("delivering", sw, None, Some(order.deployment)))
            .await;
        let handle = tokio::spawn(fetch::fetch(
            self.shared.clone(),
            order.clone(),
            path.clone(),
            fetched,
        ));
        self.fetching = Some(Fetching {
            order,
            path,
            handle,
        });
    }

    async fn fetched(&mut self, r: Result<Result<(), String>, tokio::task::JoinError>) {
        let Some(f) = self.fetching.take() else {
            return;
        };
        let order = f.order;
        let failed = |reason: String| report("failed", None, Some(reason), Some(order.deployment));
        let reason = match r {
            Ok(Ok(())) => None,
            Ok(Err(reason)) => Some(reason),
            Err(e) => Some(format!("the fetch failed: {e}")),
        };
        if let Some(reason) = reason {
            tracing::warn!(deployment = order.deployment, "deployment failed: {reason}");
            let mut r = failed(reason);
            r.software = self.running_software();
            return self.finish(&order, r).await;
        }
        tracing::info!(
            deployment = order.deployment,
            "sealed bundle fetched and its hash checked; opening and installing it"
        );
        self.set_stage("installing");
        let (inst, seal, path, id) = (
            self.installer.clone(),
            self.seal.clone(),
            f.path.clone(),
            order.bundle_id.clone(),
        );
        let installed = blocking(move || open_and_install(&inst, &seal, &path, &id))
            .await
            .and_then(|r| r);
        let installed = match installed {
            Ok(i) => i,
            Err(reason) => {
                tracing::warn!(
                    deployment = order.deployment,
                    "deployment refused: {reason}"
                );
                let mut r = failed(reason);
                r.software = self.running_software();
                return self.finish(&order, r).await;
            }
        };
        if installed.manifest.service != order.service {
            let reason = format!(
                "the bundle's manifest is for service {}, the deployment for {}; not run",
                installed.manifest.service, order.service
            );
            let inst = self.installer.clone();
            let id = installed.bundle_id.clone();
            let _ = blocking(move || remove_unused(&inst, &id)).await;
            let mut r = failed(reason);
            r.software = self.running_software();
            return self.finish(&order, r).await;
        }
        let sw = self.running_software();
        self.send(report("installed", sw, None, Some(order.deployment)))
            .await;
        self.set_stage("starting");
        let r = self.switch(&order, &installed).await;
        self.finish(&order, r).await;
    }

    /// Stops what runs, activates `installed`, starts it and checks it; rolls back when it is
    /// not healthy. Returns the deployment's final report.
    async fn switch(&mut self, order: &DeployOrder, installed: &Installed) -> MachineReport {
        let d = Some(order.deployment);
        let new = software_of(installed);
        if let Some(old) = self.child.take() {
            tracing::info!(
                "stopping {} {} for deployment {}",
                old.software.service,
                old.software.version,
                order.deployment
            );
            drop(stop_child(old).await);
        }
        self.show("starting", None);
        let inst = self.installer.clone();
        let id = installed.bundle_id.clone();
        let activated = blocking(move || {
            inst.lock()
                .unwrap_or_else(|p| p.into_inner())
                .activate(&id)
                .map_err(|e| e.to_string())
        })
        .await
        .and_then(|r| r);
        if let Err(e) = activated {
            // Nothing switched: what was current runs again.
            let reason = format!("switching to bundle {}: {e}", installed.bundle_id);
            self.boot_current_again().await;
            return report("failed", self.running_software(), Some(reason), d);
        }
        let reason = match self.launch(installed).await {
            Ok(child) => {
                self.child = Some(child);
                self.show("running", None);
                self.pending_reload();
                tracing::info!(
                    deployment = order.deployment,
                    "{} {} is running",
                    new.service,
                    new.version
                );
                return report("running", Some(new), None, d);
            }
            Err((_stopped, reason)) => reason,
        };
        tracing::warn!(
            deployment = order.deployment,
            "{} {} is not healthy, rolling back: {reason}",
            new.service,
            new.version
        );
        let inst = self.installer.clone();
        let back = blocking(move || {
            let mut i = inst.lock().unwrap_or_else(|p| p.into_inner());
            match i.rollback() {
                Ok(id) => i.installed(&id).map(Some).map_err(|e| e.to_string()),
                Err(BundleError::NoPrevious) => {
                    // Nothing to go back to: nothing is current, so a restart starts nothing.
                    let link = i.software_dir().join(CURRENT_LINK);
                    std::fs::remove_file(&link)
                        .and_then(|()| std::fs::File::open(i.software_dir())?.sync_all())
                        .map_err(|e| format!("removing {}: {e}", link.display()))?;
                    Ok(None)
                }
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .and_then(|r| r);
        let previous = match back {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.show("failed", Some(reason.clone()));
                return report(
                    "failed",
                    None,
                    Some(format!("{reason}; no previous software to roll back to")),
                    d,
                );
            }
            Err(e) => {
                let why = format!("{reason}; rolling back: {e}");
                self.show("failed", Some(why.clone()));
                return report("failed", None, Some(why), d);
            }
        };
        let prev = software_of(&previous);
        match self.launch(&previous).await {
            Ok(child) => {
                self.child = Some(child);
                self.show("running", None);
                self.pending_reload();
                tracing::info!(
                    deployment = order.deployment,
                    "rolled back to {} {}",
                    prev.service,
                    prev.version
                );
                report("rolled_back", Some(prev), Some(reason), d)
            }
            Err((child, r2)) => {
                // The previous software ran before: tried again with backoff.
                self.child = child.map(|mut c| {
                    c.restart_at = Some(Instant::now() + c.sup.restart_delay());
                    c
                });
                let why = format!(
                    "{reason}; rolled back to {} {}, which is not healthy either: {r2}",
                    prev.service, prev.version
                );
                self.show("failed", Some(why.clone()));
                report("failed", Some(prev), Some(why), d)
            }
        }
    }

    /// After a failed switch: starts what is current again (as at boot).
    async fn boot_current_again(&mut self) {
        let inst = self.installer.clone();
        let cur = blocking(move || {
            let i = inst.lock().unwrap_or_else(|p| p.into_inner());
            i.current()
                .ok()
                .flatten()
                .and_then(|id| i.installed(&id).ok())
        })
        .await
        .ok()
        .flatten();
        let Some(cur) = cur else { return };
        match self.launch(&cur).await {
            Ok(child) => {
                self.child = Some(child);
                self.show("running", None);
            }
            Err((child, reason)) => {
                self.child = child.map(|mut c| {
                    c.restart_at = Some(Instant::now() + c.sup.restart_delay());
                    c
                });
                self.show("failed", Some(reason));
            }
        }
    }

    /// The deployment is over: its file goes, old versions are pruned, the outcome is counted
    /// and handed to the driver (`core.deployed`).
    async fn finish(&mut self, order: &DeployOrder, r: MachineReport) {
        let dir = self.incoming_dir.clone();
        let _ = blocking(move || remove_incoming_except(&dir, None)).await;
        if r.state == "running" || r.state == "rolled_back" {
            let inst = self.installer.clone();
            match blocking(move || inst.lock().unwrap_or_else(|p| p.into_inner()).prune(0)).await {
                Ok(Ok(gone)) if !gone.is_empty() => {
                    tracing::info!(removed = ?gone, "old software versions pruned")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("pruning old software versions: {e}"),
                Err(e) => tracing::warn!("pruning old software versions: {e}"),
            }
        }
        let m = &self.shared.metrics;
        match r.state.as_str() {
            "running" => &m.deployments_running,
            "rolled_back" => &m.deployments_rolled_back,
            _ => &m.deployments_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.shared.software.set_view(|v| {
            if v.deploying
                .as_ref()
                .is_some_and(|x| x.deployment == order.deployment)
            {
                v.deploying = None;
            }
            v.last = Some(OutcomeView {
                deployment: order.deployment,
                bundle_id: order.bundle_id.clone(),
                state: r.state.clone(),
                detail: r.detail.clone(),
                at: SystemTime::now(),
            });
        });
        if r.state == "failed" && self.child.as_ref().is_some_and(|c| c.healthy) {
            self.restore_after = Some(order.deployment);
        }
        let _ = self
            .shared
            .input(Input::Deployed(order.deployment, r))
            .await;
    }

    /// Once the controller acknowledged a failed deployment's report while the old software
    /// kept running: says it runs.
    async fn restore(&mut self) {
        let Some(d) = self.restore_after else { return };
        let rec = self.shared.record();
        let last = rec.report.as_ref().and_then(|r| r.deployment);
        if last != Some(d) || rec.last_deployment < d {
            if rec.last_deployment >= d {
                // Another report came after it.
                self.restore_after = None;
            }
            return;
        }
        if rec.report_acked < rec.report_seq {
            return;
        }
        self.restore_after = None;
        if let Some(sw) = self.running_software() {
            self.send(report("running", Some(sw), None, None)).await;
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
            let delay = c.sup.restart_delay();
            c.healthy = false;
            c.restart_at = Some(Instant::now() + delay);
            let why = format!(
                "{} {} exited ({status}); restarting it in {}",
                c.software.service,
                c.software.version,
                humantime::format_duration(delay)
            );
            self.shared.note_error(format!("software: {why}"));
            let sw = c.software.clone();
            self.child = Some(c);
            self.show("failed", Some(why.clone()));
            self.send(report("failed", Some(sw), Some(why), None)).await;
        } else {
            self.child = Some(c);
        }
    }

    /// The backoff after a death has passed: starts the software again.
    async fn restart(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        c.restart_at = None;
        self.shared
            .metrics
            .software_restarts
            .fetch_add(1, Ordering::Relaxed);
        let r = blocking(move || {
            let h = c
                .sup
                .restart()
                .map_err(|e| e.to_string())
                .and_then(|()| c.sup.check_health());
            if h.is_err() {
                let _ = c.sup.stop();
            }
            (c, h)
        })
        .await;
        let (mut c, health) = match r {
            Ok(x) => x,
            Err(e) => {
                self.shared.note_error(e);
                self.show("failed", Some("lost track of the software".into()));
                return;
            }
        };
        match health {
            Ok(()) => {
                c.healthy = true;
                c.since = SystemTime::now();
                let sw = c.software.clone();
                tracing::info!("{} {} is running again", sw.service, sw.version);
                self.child = Some(c);
                self.show("running", None);
                self.pending_reload();
                self.send(report("running", Some(sw), None, None)).await;
            }
            Err(reason) => {
                let delay = c.sup.restart_delay();
                c.restart_at = Some(Instant::now() + delay);
                tracing::warn!(
                    "restarting {} failed: {reason}; next attempt in {}",
                    c.software.service,
                    humantime::format_duration(delay)
                );
                self.child = Some(c);
                self.show("failed", Some(reason));
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

/// Opens the sealed bundle at `path` with this machine's key, streaming the plaintext into
/// the installer (which checks the bundle id and refuses a hostile archive, leaving nothing
/// behind). Blocking.
fn open_and_install(
    installer: &Mutex<Installer>,
    seal: &SealKey,
    path: &Path,
    bundle_id: &str,
) -> Result<Installed, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let reader = std::io::BufReader::with_capacity(256 * 1024, file);
    let decryptor = age::Decryptor::new_buffered(reader)
        .map_err(|e| format!("the sealed bundle is not an age file: {e}"))?;
    let plain = decryptor
        .decrypt(std::iter::once(seal.identity() as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => {
                "the bundle is not sealed to this machine: its key does not open it".to_owned()
            }
            e => format!("cannot open the sealed bundle: {e}"),
        })?;
    installer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .install(bundle_id, plain)
        .map_err(|e| format!("install refused: {e}"))
}

/// Removes an installed bundle that is neither current nor previous.
fn remove_unused(installer: &Mutex<Installer>, bundle_id: &str) {
    let i = installer.lock().unwrap_or_else(|p| p.into_inner());
    let used = [i.current(), i.previous()]
        .into_iter()
        .any(|l| l.ok().flatten().as_deref() == Some(bundle_id));
    if !used {
        let _ = std::fs::remove_dir_all(i.bundle_dir(bundle_id));
    }
}

/// Removes the incoming files, but `keep`.
fn remove_incoming_except(dir: &Path, keep: Option<&Path>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if Some(p.as_path()) != keep && p.extension().is_some_and(|x| x == "age") {
            if let Err(err) = std::fs::remove_file(&p) {
                tracing::warn!("removing {}: {err}", p.display());
            }
        }
    }
}
