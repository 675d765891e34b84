//! The deployment half of the software task: an order taken up (its fetch started, an older
//! one still fetching cancelled), the fetched bundle opened with this machine's key straight
//! into the installer, the switch to it (the old software stopped, the new one activated,
//! started and checked, rolled back when unhealthy), and the outcome handed to the driver
//! (`core.deployed`). Runs inside the software task, whose state it shares.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::time::Instant;

use super::super::driver::Input;
use super::super::fetch;
use super::{
    blocking, report, software_of, stop_child, DeployingView, Fetching, OutcomeView, Task,
};
use crate::bundle::{BundleError, Installed, Installer, CURRENT_LINK};
use crate::cluster::body::DeployOrder;
use crate::cluster::keys::SealKey;
use crate::wire::{MachineReport, Software};

impl Task {
    pub(super) async fn superseded(&mut self, order: &DeployOrder, by: u64) {
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

    pub(super) async fn take_order(&mut self, order: DeployOrder) {
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
            started: Instant::now(),
            handle,
        });
    }

    pub(super) async fn fetched(&mut self, r: Result<Result<(), String>, tokio::task::JoinError>) {
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
            elapsed = ?f.started.elapsed(),
            "sealed bundle fetched and its hash checked; opening and installing it"
        );
        let installing = Instant::now();
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
            Ok(i) => {
                tracing::info!(
                    deployment = order.deployment,
                    elapsed = ?installing.elapsed(),
                    "bundle {} opened and installed",
                    i.bundle_id
                );
                i
            }
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
    pub(super) async fn restore(&mut self) {
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
