//! Deployments: a bundle, a service and a fixed set of target machines, persisted in the
//! `deployments` table; then, in the background and one target after another, the bundle
//! sealed to each target (`bundles::seal`) and a `Body::Deploy` published to it by the core.
//!
//! Who does what:
//! - the API checks the request against the bundle store and asks the core thread to create
//!   the deployment ([`DeployCmd::Create`]); the core thread picks the id (one above the highest
//!   ever), fixes the targets and commits the record with its batch, then queues a [`SealJob`];
//! - the seal worker ([`seal_worker`], one task, so memory stays flat and deployments are
//!   published in the order they were created) seals target after target and hands each result
//!   back ([`DeployCmd::Sealed`] or [`DeployCmd::SealFailed`]);
//! - the core thread publishes the order (`ControllerCore::publish`, committed with its batch
//!   like any publication) or records the failure in the record;
//! - the sweeper ([`sweep_loop`]) deletes a sealed file once its machine is done with it.
//!
//! Every step can be repeated: the core thread skips an order already published to a machine
//! (or superseded there by a newer deployment) and a failure already recorded, and a sealed
//! file already on disk is only hashed. So after a restart, or a failed commit that rebuilt
//! the core, the targets of recent deployments that were neither published nor failed are
//! simply queued again ([`DeployBook::reload`]).
//!
//! The decisions live in [`DeployCore`] (`deploy_core`), the reads in `deploy_view`; this file
//! is the shell that feeds them the core thread's commands and the seal worker's results.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::bundles;
use super::cmd::Cmd;
use super::core::ControllerCore;
use super::shared::ControllerShared;
use crate::cluster::body::DeployOrder;
use crate::limits::CORE_WAIT;
use crate::store::Store;

use super::cmd::*;
pub use super::deploy_core::{
    step_rollout, DeployCore, DeployError, DeployEvent, DeploymentRecord, DeploymentView,
    NewDeployment, SealJob, SealTarget, TargetView,
};
use super::deploy_view::{authorize, sweepable, view, FetchRefused};
pub(crate) use super::deploy_view::{bundles_needed, status_of, view_of};
use crate::limits::BUNDLE_SWEEP_EVERY;

enum Deferred {
    Created(Reply<u64>, u64),
    Controlled(Reply<()>),
    Read(DeployCmd),
}

/// The core thread's side of deployments: a thin shell around [`DeployCore`] that checks
/// the bundle file, answers the API's oneshots once the batch committed, hands seal jobs to
/// the seal worker and logs what the core reports.
pub(crate) struct DeployBook {
    core: DeployCore,
    /// Answered once the batch committed (or failed to).
    deferred: Vec<Deferred>,
    seal_tx: mpsc::UnboundedSender<SealJob>,
}

impl DeployBook {
    pub(crate) fn new(seal_tx: mpsc::UnboundedSender<SealJob>) -> DeployBook {
        DeployBook {
            core: DeployCore::new(),
            deferred: Vec::new(),
            seal_tx,
        }
    }

    /// After the database was (re)opened and the core rebuilt from it: the next id, and every
    /// unfinished target of the newest deployments queued again.
    pub(crate) fn reload(&mut self, core: Option<&ControllerCore>, store: Option<&Store>) {
        let (Some(core), Some(store)) = (core, store) else {
            self.core.clear();
            return;
        };
        for job in self.core.reload(core, store) {
            let _ = self.seal_tx.send(job);
        }
        self.log();
    }

    /// Every tick: steps each rollout that is not over and performs what it decides.
    pub(crate) fn tick(&mut self, core: &mut ControllerCore, now_ms: u64) {
        self.core.tick(core, now_ms);
        self.log();
    }

    /// Steps one command within the batch.
    pub(crate) fn step(
        &mut self,
        core: Option<&mut ControllerCore>,
        store: Option<&Store>,
        cmd: DeployCmd,
        now_ms: u64,
    ) {
        match cmd {
            DeployCmd::Create { req, reply } => {
                let Some(core) = core else {
                    let _ = reply.send(Err(unavailable()));
                    return;
                };
                if !req.bundle_path.is_file() {
                    let _ = reply.send(Err(DeployError::Invalid(format!(
                        "bundle_id: no bundle {} is stored (unused bundles are deleted after \
                         cluster.bundle_keep_unused); upload it again",
                        req.bundle_id
                    ))));
                    return;
                }
                match self.core.create(core, req, now_ms) {
                    Ok(id) => self.deferred.push(Deferred::Created(reply, id)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            DeployCmd::Sealed {
                deployment,
                node,
                order,
            } => {
                // Without a core the target is queued again once it is rebuilt.
                if let (Some(core), Some(store)) = (core, store) {
                    self.core
                        .sealed(core, store, deployment, node, order, now_ms);
                }
            }
            DeployCmd::SealFailed {
                deployment,
                node,
                reason,
            } => {
                if let (Some(_), Some(store)) = (core, store) {
                    self.core.seal_failed(store, deployment, node, reason);
                }
            }
            DeployCmd::Control { id, control, reply } => {
                let (Some(core), Some(store)) = (core, store) else {
                    let _ = reply.send(Err(unavailable()));
                    return;
                };
                match self.core.control(core, store, id, control, now_ms) {
                    Ok(()) => self.deferred.push(Deferred::Controlled(reply)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            read => self.deferred.push(Deferred::Read(read)),
        }
        self.log();
    }

    /// The records this batch changed, to commit with it.
    pub(crate) fn take_writes(&mut self) -> Vec<DeploymentRecord> {
        self.core.take_writes()
    }

    /// After the batch's commit: queues the new seal jobs and answers what waited.
    pub(crate) fn after_commit(
        &mut self,
        core: Option<&ControllerCore>,
        store: Option<&Store>,
        committed: bool,
    ) {
        for job in self.core.after_commit(committed) {
            let _ = self.seal_tx.send(job);
        }
        for d in std::mem::take(&mut self.deferred) {
            match d {
                Deferred::Created(reply, id) => {
                    let _ = reply.send(if committed {
                        Ok(id)
                    } else {
                        Err(DeployError::Unavailable(
                            "the controller could not commit the deployment; nothing was created, retry"
                                .into(),
                        ))
                    });
                }
                Deferred::Controlled(reply) => {
                    let _ = reply.send(if committed {
                        Ok(())
                    } else {
                        Err(DeployError::Unavailable(
                            "the controller could not commit the change; retry".into(),
                        ))
                    });
                }
                Deferred::Read(cmd) => read(core, store, cmd),
            }
        }
    }

    /// Logs what the deployments' core reported.
    fn log(&mut self) {
        for e in self.core.take_events() {
            match e {
                DeployEvent::Resumed {
                    deployment,
                    targets,
                } => tracing::info!(
                    deployment,
                    targets,
                    "resuming a deployment: sealing and publishing to the targets not yet sent"
                ),
                DeployEvent::RolloutState {
                    deployment,
                    state,
                    reason,
                } => tracing::info!(
                    deployment,
                    state,
                    reason = reason.as_deref().unwrap_or(""),
                    "rollout"
                ),
                DeployEvent::NextWave {
                    deployment,
                    wave,
                    waves,
                } => tracing::info!(deployment, wave, waves, "rollout: the next wave starts"),
                DeployEvent::Controlled {
                    deployment,
                    control,
                    state,
                } => tracing::info!(deployment, state, "rollout: {control} by an operator"),
                DeployEvent::TargetFailed {
                    deployment,
                    machine,
                    reason,
                } => tracing::warn!(deployment, machine = %machine, "deployment failed: {reason}"),
                DeployEvent::UnknownDeployment { deployment } => {
                    tracing::warn!(deployment, "a failure for an unknown deployment")
                }
                DeployEvent::StoreError { what, error } => {
                    tracing::error!("cannot read {what}: {error}")
                }
            }
        }
    }
}

fn unavailable() -> DeployError {
    DeployError::Unavailable(
        "the controller's database is unavailable after a failed write; retry shortly".into(),
    )
}

/// Answers a read-only command from what is committed.
fn read(core: Option<&ControllerCore>, store: Option<&Store>, cmd: DeployCmd) {
    let db = |e: crate::replication::StoreError| {
        DeployError::Unavailable(format!("cannot read the deployments: {e}"))
    };
    match cmd {
        DeployCmd::Get { id, reply } => {
            let answer = match (core, store) {
                (Some(core), Some(store)) => store
                    .deployment(id)
                    .map(|r| r.map(|r| view(core, r)))
                    .map_err(db),
                _ => Err(unavailable()),
            };
            let _ = reply.send(answer);
        }
        DeployCmd::List { limit, reply } => {
            let answer = match (core, store) {
                (Some(core), Some(store)) => store
                    .deployments_newest(limit)
                    .map(|rs| rs.into_iter().map(|r| view(core, r)).collect())
                    .map_err(db),
                _ => Err(unavailable()),
            };
            let _ = reply.send(answer);
        }
        DeployCmd::Authorize {
            requester,
            fingerprint,
            machine,
            reply,
        } => {
            let answer = match core {
                None => Err(FetchRefused::Unavailable),
                Some(core) => authorize(core, requester, fingerprint, machine),
            };
            let _ = reply.send(answer);
        }
        DeployCmd::Sweep { files, reply } => {
            let answer = match (core, store) {
                (Some(core), Some(store)) => sweepable(core, store, &files),
                _ => Vec::new(),
            };
            let _ = reply.send(answer);
        }
        DeployCmd::SweepBundles {
            bundles,
            keep_unused,
            reply,
        } => {
            let deleted = match (core, store) {
                (Some(core), Some(store)) => sweep_bundles(core, store, &bundles, keep_unused),
                _ => Vec::new(),
            };
            let _ = reply.send(deleted);
        }
        DeployCmd::Create { .. }
        | DeployCmd::Sealed { .. }
        | DeployCmd::SealFailed { .. }
        | DeployCmd::Control { .. } => {}
    }
}

/// [`DeployCmd::SweepBundles`]: deletes what no deployment needs and is older than
/// `keep_unused`; any doubt (a table or a directory that cannot be read) keeps everything.
fn sweep_bundles(
    core: &ControllerCore,
    store: &Store,
    bundles: &bundles::BundleStore,
    keep_unused: Duration,
) -> Vec<String> {
    let needed = match bundles_needed(core, store) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("cannot read the deployments; no uploaded bundle is deleted: {e}");
            return Vec::new();
        }
    };
    let files = match bundles.bundle_files() {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot list the uploaded bundles: {e}");
            return Vec::new();
        }
    };
    let now = std::time::SystemTime::now();
    let mut deleted = Vec::new();
    for (id, uploaded) in files {
        let age = now.duration_since(uploaded).unwrap_or_default();
        if needed.contains(&id) || age < keep_unused {
            continue;
        }
        match std::fs::remove_file(bundles.bundle_path(&id)) {
            Ok(()) => {
                tracing::info!(
                    bundle_id = %id,
                    uploaded_ago = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                    "deleted an uploaded bundle no deployment needs"
                );
                deleted.push(id);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(bundle_id = %id, "cannot delete an unused bundle: {e}"),
        }
    }
    deleted
}

/// Sends a deployment command to the core thread and waits for its answer.
pub(crate) async fn ask_core<T>(
    shared: &ControllerShared,
    make: impl FnOnce(oneshot::Sender<T>) -> DeployCmd,
) -> Result<T, String> {
    let (tx, rx) = oneshot::channel();
    let asked = async {
        shared
            .cmd
            .send(Cmd::Deploy(Box::new(make(tx))))
            .await
            .map_err(|_| "the controller is shutting down".to_owned())?;
        rx.await
            .map_err(|_| "the controller is shutting down".to_owned())
    };
    tokio::time::timeout(CORE_WAIT, asked)
        .await
        .map_err(|_| format!("the controller's core did not answer within {CORE_WAIT:?}"))?
}

/// Seals job after job, target after target, and hands each result to the core thread.
pub(crate) async fn seal_worker(
    shared: Arc<ControllerShared>,
    mut rx: mpsc::UnboundedReceiver<SealJob>,
) {
    while let Some(mut job) = rx.recv().await {
        let bundle = shared.bundles.bundle_path(&job.bundle_id);
        for t in std::mem::take(&mut job.targets) {
            let cmd = seal_one(&shared, &bundle, &job, t).await;
            if shared.cmd.send(Cmd::Deploy(Box::new(cmd))).await.is_err() {
                return;
            }
        }
    }
}

async fn seal_one(
    shared: &Arc<ControllerShared>,
    bundle: &std::path::Path,
    job: &SealJob,
    t: SealTarget,
) -> DeployCmd {
    let deployment = job.deployment;
    let fail = |reason: String| DeployCmd::SealFailed {
        deployment,
        node: t.node,
        reason,
    };
    let Some(recipient) = t.recipient.clone() else {
        return fail("the machine is not admitted; nothing was sealed for it".into());
    };
    let out = shared.bundles.sealed_path(deployment, t.node);
    let started = Instant::now();
    let sealed = {
        let bundle = bundle.to_path_buf();
        tokio::task::spawn_blocking(move || bundles::seal(&bundle, &recipient, &out)).await
    };
    match sealed {
        Ok(Ok(s)) => {
            if s.fresh {
                let took = started.elapsed();
                shared
                    .metrics
                    .bundle_bytes_sealed
                    .fetch_add(s.bytes, Ordering::Relaxed);
                tracing::info!(
                    deployment,
                    machine = %t.name,
                    bytes = s.bytes,
                    ms = took.as_millis() as u64,
                    mb_per_s = (s.bytes as f64 / 1e6 / took.as_secs_f64().max(1e-6)) as u64,
                    "bundle sealed"
                );
            }
            DeployCmd::Sealed {
                deployment,
                node: t.node,
                order: DeployOrder {
                    deployment,
                    bundle_id: job.bundle_id.clone(),
                    service: job.service.clone(),
                    version: job.version.clone(),
                    sealed_bytes: s.bytes,
                    sealed_hash: s.hash,
                },
            }
        }
        Ok(Err(e)) => {
            shared.metrics.seal_failures.fetch_add(1, Ordering::Relaxed);
            shared.note_error(format!(
                "deployment {deployment}: cannot seal the bundle for {}: {e}",
                t.name
            ));
            fail(format!("sealing the bundle failed: {e}"))
        }
        Err(e) => {
            shared.metrics.seal_failures.fetch_add(1, Ordering::Relaxed);
            fail(format!("sealing the bundle failed: {e}"))
        }
    }
}

/// Deletes the sealed files no machine needs any more, every [`BUNDLE_SWEEP_EVERY`].
pub(crate) async fn sweep_loop(shared: Arc<ControllerShared>) {
    let mut every = tokio::time::interval(BUNDLE_SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        sweep_once(&shared).await;
    }
}

/// One sweep; returns how many files it deleted (sealed copies and uploaded bundles).
pub(crate) async fn sweep_once(shared: &Arc<ControllerShared>) -> usize {
    let keep_unused = shared.config.cluster.bundle_keep_unused;
    let bundles = shared.bundles.clone();
    let unused = ask_core(shared, |reply| DeployCmd::SweepBundles {
        bundles,
        keep_unused,
        reply,
    })
    .await
    .map_or(0, |d| d.len());
    shared
        .metrics
        .bundles_deleted
        .fetch_add(unused as u64, Ordering::Relaxed);
    unused + sweep_sealed(shared).await
}

async fn sweep_sealed(shared: &Arc<ControllerShared>) -> usize {
    let store = shared.bundles.clone();
    let files = match tokio::task::spawn_blocking(move || store.sealed_files()).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!("cannot list the sealed bundles: {e}");
            return 0;
        }
        Err(_) => return 0,
    };
    if files.is_empty() {
        return 0;
    }
    let Ok(done) = ask_core(shared, |reply| DeployCmd::Sweep { files, reply }).await else {
        return 0;
    };
    let store = shared.bundles.clone();
    tokio::task::spawn_blocking(move || {
        let mut n = 0;
        for (dep, node) in done {
            match std::fs::remove_file(store.sealed_path(dep, node)) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(deployment = dep, machine = %node, "cannot delete a sealed bundle: {e}"),
            }
        }
        if n > 0 {
            tracing::debug!(files = n, "deleted sealed bundles no machine needs any more");
        }
        n
    })
    .await
    .unwrap_or(0)
}
