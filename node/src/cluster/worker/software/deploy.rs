//! The deployment half of the software task, as the shell of the lifecycle core
//! ([`crate::cluster::worker::lifecycle`]): it performs what the core decides (an order's
//! fetch started or cancelled, the fetched bundle opened with this machine's key straight into
//! the installer, the switch to it, the roll back to the previous software, a restart) and
//! feeds each result back; the outcome goes to the driver (`core.deployed`). Runs inside the
//! software task, whose state it shares.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::time::Instant;

use super::super::driver::Input;
use super::super::fetch;
use super::super::lifecycle::{Command, RolledBack, Switched};
use super::{blocking, software_of, stop_child, DeployingView, Fetching, OutcomeView, Task};
use crate::bundle::{BundleError, Installed, Installer, CURRENT_LINK};
use crate::cluster::body::DeployOrder;
use crate::cluster::keys::SealKey;
use crate::limits::SOFTWARE_ORDERS_KEPT;
use crate::wire::{MachineReport, Software};

impl Task {
    /// Deployment orders handed over by the driver: to the lifecycle, which picks the newest.
    pub(super) async fn take_orders(&mut self, orders: Vec<DeployOrder>) {
        for o in &orders {
            self.orders.insert(o.deployment, o.clone());
        }
        while self.orders.len() > SOFTWARE_ORDERS_KEPT {
            self.orders.pop_first();
        }
        let now = self.now_ms();
        self.life.orders(orders, now);
        self.drive().await;
    }

    /// Performs what the lifecycle asks, until it asks nothing more.
    pub(super) async fn drive(&mut self) {
        loop {
            let cmds = self.life.take();
            if cmds.is_empty() {
                return;
            }
            for c in cmds {
                self.perform(c).await;
            }
        }
    }

    async fn perform(&mut self, c: Command) {
        match c {
            Command::Fetch(order) => self.start_fetch(order).await,
            Command::CancelFetch(d) => {
                if let Some(f) = self.fetching.take_if(|f| f.order.deployment == d) {
                    f.handle.abort();
                    let _ = f.handle.await;
                    tracing::info!(deployment = d, "fetch cancelled: a newer deployment came");
                }
            }
            Command::Install(order) => self.install(order).await,
            Command::Discard(id) => {
                let inst = self.installer.clone();
                let _ = blocking(move || remove_unused(&inst, &id)).await;
            }
            Command::Switch {
                deployment,
                software,
            } => self.switch(deployment, software).await,
            Command::RollBack { deployment } => self.roll_back(deployment).await,
            Command::Restart(_) => self.restart().await,
            Command::Report(r) => {
                if r.deployment.is_none() && r.state == "running" {
                    self.show("running", None);
                }
                self.send(r).await
            }
            Command::Deployed(d, r) => self.finish(d, r).await,
        }
    }

    async fn start_fetch(&mut self, order: DeployOrder) {
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
        let handle = tokio::spawn(fetch::fetch(
            self.shared.clone(),
            order.clone(),
            path.clone(),
            fetched,
        ));
        self.fetching = Some(Fetching {
            order,
            started: Instant::now(),
            handle,
        });
    }

    pub(super) async fn fetched(
        &mut self,
        r: Result<Result<(), fetch::FetchError>, tokio::task::JoinError>,
    ) {
        let Some(f) = self.fetching.take() else {
            return;
        };
        let d = f.order.deployment;
        let result = match r {
            Ok(Ok(())) => {
                tracing::info!(
                    deployment = d,
                    elapsed = ?f.started.elapsed(),
                    "sealed bundle fetched and its hash checked; opening and installing it"
                );
                Ok(())
            }
            // The lifecycle keeps the reason as the deployment's (reported) text.
            Ok(Err(reason)) => Err(reason.to_string()),
            Err(e) => Err(format!("the fetch failed: {e}")),
        };
        if let Err(reason) = &result {
            tracing::warn!(deployment = d, "deployment failed: {reason}");
        }
        let now = self.now_ms();
        self.life.fetched(d, result, now);
        self.drive().await;
    }

    async fn install(&mut self, order: DeployOrder) {
        let installing = Instant::now();
        self.set_stage("installing");
        let path = fetch::incoming_path(&self.incoming_dir, order.deployment);
        let (inst, seal, id) = (
            self.installer.clone(),
            self.seal.clone(),
            order.bundle_id.clone(),
        );
        let installed = blocking(move || open_and_install(&inst, &seal, &path, &id))
            .await
            .and_then(|r| r.map_err(|e| e.to_string()));
        let result = match installed {
            Ok(i) => {
                tracing::info!(
                    deployment = order.deployment,
                    elapsed = ?installing.elapsed(),
                    "bundle {} opened and installed",
                    i.bundle_id
                );
                let sw = software_of(&i);
                self.installed = Some(i);
                Ok(sw)
            }
            Err(reason) => {
                tracing::warn!(
                    deployment = order.deployment,
                    "deployment refused: {reason}"
                );
                Err(reason)
            }
        };
        let now = self.now_ms();
        self.life.installed(order.deployment, result, now);
    }

    /// Stops what runs, activates the installed bundle, starts it and checks it; the
    /// lifecycle rolls back when it is not healthy.
    async fn switch(&mut self, deployment: u64, new: Software) {
        self.set_stage("starting");
        let Some(installed) = self
            .installed
            .take()
            .filter(|i| i.bundle_id == new.bundle_id)
        else {
            let reason = format!("bundle {} is not installed", new.bundle_id);
            let running = self.running_software();
            let now = self.now_ms();
            return self
                .life
                .switched(deployment, Switched::NotActivated { reason, running }, now);
        };
        if let Some(old) = self.child.take() {
            tracing::info!(
                "stopping {} {} for deployment {deployment}",
                old.software.service,
                old.software.version,
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
            let running = self.running_software();
            let now = self.now_ms();
            return self
                .life
                .switched(deployment, Switched::NotActivated { reason, running }, now);
        }
        let result = match self.launch(&installed).await {
            Ok(child) => {
                self.child = Some(child);
                self.show("running", None);
                self.pending_reload();
                tracing::info!(deployment, "{} {} is running", new.service, new.version);
                Switched::Healthy
            }
            Err((_stopped, reason)) => {
                tracing::warn!(
                    deployment,
                    "{} {} is not healthy, rolling back: {reason}",
                    new.service,
                    new.version
                );
                Switched::Unhealthy(reason)
            }
        };
        let now = self.now_ms();
        self.life.switched(deployment, result, now);
    }

    /// Back to the previous software after an unhealthy switch.
    async fn roll_back(&mut self, deployment: u64) {
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
        let result = match back {
            Ok(Some(previous)) => {
                let prev = software_of(&previous);
                match self.launch(&previous).await {
                    Ok(child) => {
                        self.child = Some(child);
                        self.show("running", None);
                        self.pending_reload();
                        tracing::info!(
                            deployment,
                            "rolled back to {} {}",
                            prev.service,
                            prev.version
                        );
                        RolledBack::Healthy(prev)
                    }
                    Err((child, r2)) => {
                        // The previous software ran before: tried again with backoff.
                        self.child = child;
                        RolledBack::Unhealthy(prev, r2)
                    }
                }
            }
            Ok(None) => RolledBack::NoPrevious,
            Err(e) => RolledBack::Failed(e),
        };
        let now = self.now_ms();
        self.life.rolled_back(deployment, result, now);
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
                self.child = child;
                self.show("failed", Some(reason));
            }
        }
    }

    /// The deployment is over: its file goes, old versions are pruned, the outcome is counted
    /// and handed to the driver (`core.deployed`).
    async fn finish(&mut self, deployment: u64, r: MachineReport) {
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
        if r.state == "failed" && self.running_software().is_none() {
            self.show("failed", r.detail.clone());
        }
        let m = &self.shared.metrics;
        match r.state.as_str() {
            "running" => &m.deployments_running,
            "rolled_back" => &m.deployments_rolled_back,
            _ => &m.deployments_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        let bundle_id = self
            .orders
            .get(&deployment)
            .map(|o| o.bundle_id.clone())
            .unwrap_or_default();
        self.shared.software.set_view(|v| {
            if v.deploying
                .as_ref()
                .is_some_and(|x| x.deployment == deployment)
            {
                v.deploying = None;
            }
            v.last = Some(OutcomeView {
                deployment,
                bundle_id,
                state: r.state.clone(),
                detail: r.detail.clone(),
                at: SystemTime::now(),
            });
        });
        let _ = self.shared.input(Input::Deployed(deployment, r)).await;
    }
}

/// Why a fetched bundle was not installed; its text is the deployment's reason.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InstallError {
    #[error("opening {}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the sealed bundle is not an age file: {0}")]
    NotAge(#[source] age::DecryptError),
    /// Sealed to another machine's key.
    #[error("the bundle is not sealed to this machine: its key does not open it")]
    NotForThisMachine,
    #[error("cannot open the sealed bundle: {0}")]
    Decrypt(#[source] age::DecryptError),
    /// The installer refused the bundle (wrong id, hostile archive, invalid manifest).
    #[error("install refused: {0}")]
    Refused(#[source] BundleError),
}

/// Opens the sealed bundle at `path` with this machine's key, streaming the plaintext into
/// the installer (which checks the bundle id and refuses a hostile archive, leaving nothing
/// behind). Blocking.
fn open_and_install(
    installer: &Mutex<Installer>,
    seal: &SealKey,
    path: &Path,
    bundle_id: &str,
) -> Result<Installed, InstallError> {
    let file = std::fs::File::open(path).map_err(|source| InstallError::Open {
        path: path.to_owned(),
        source,
    })?;
    let reader = std::io::BufReader::with_capacity(256 * 1024, file);
    let decryptor = age::Decryptor::new_buffered(reader).map_err(InstallError::NotAge)?;
    let plain = decryptor
        .decrypt(std::iter::once(seal.identity() as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => InstallError::NotForThisMachine,
            e => InstallError::Decrypt(e),
        })?;
    installer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .install(bundle_id, plain)
        .map_err(InstallError::Refused)
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
