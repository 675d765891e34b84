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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::bundles;
use super::core::{ControllerCore, KeyStatus, MachineRecord};
use super::rollout::{self, Action, Control, Observed, PlanTarget, Rollout, RolloutSpec};
use super::run::ControllerShared;
use super::thread::Cmd;
use crate::cluster::body::{Body, DeployOrder};
use crate::ids::{Fingerprint, NodeId};
use crate::store::Store;

/// How many of the newest deployments are looked at for unfinished targets after a restart.
const RESUME_MAX: usize = 64;
/// How often sealed files are checked for deletion.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How long a background task waits for the core thread.
const CORE_WAIT: Duration = Duration::from_secs(30);

/// One deployment, as persisted (postcard) in the controller's `deployments` table. The
/// targets are fixed at creation; where each stands is read from its machine record's
/// `deploys` (kept up to date by the core from publication acks and reports), except for the
/// targets in `failures`, which were never sent anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: u64,
    pub service: String,
    pub bundle_id: String,
    pub version: String,
    pub created_ms: u64,
    /// Sorted by name.
    pub targets: Vec<(NodeId, String)>,
    /// Targets that could not be sent the order, and why.
    pub failures: Vec<(NodeId, String)>,
    /// Its waves and where they stand. Not in the record's postcard encoding: stored after it
    /// ([`DeploymentRecord::encode`]), so records from before rollouts still decode.
    #[serde(skip)]
    pub rollout: Rollout,
}

impl DeploymentRecord {
    /// The stored bytes: the record, then its [`Rollout`] (both postcard).
    pub fn encode(&self) -> Vec<u8> {
        crate::wire::encode_with_tail(self, &self.rollout)
    }

    /// From [`DeploymentRecord::encode`]'s bytes, or a record stored before rollouts existed
    /// (nothing after it: every target was sent at creation).
    pub fn decode(bytes: &[u8]) -> Result<DeploymentRecord, postcard::Error> {
        let (mut rec, rollout) = crate::wire::decode_with_tail::<DeploymentRecord, _>(bytes)?;
        rec.rollout = rollout;
        Ok(rec)
    }
}

/// What the API asks for, already checked against the bundle store.
#[derive(Clone, Debug)]
pub struct NewDeployment {
    pub service: String,
    pub bundle_id: String,
    pub version: String,
    /// None: every admitted machine.
    pub machines: Option<Vec<String>>,
    /// The uploaded bundle's file: checked again on the core thread, where the sweep of
    /// unused bundles runs, so that no deployment is created for a bundle just deleted.
    pub bundle_path: std::path::PathBuf,
    /// Waves, gating and draining.
    pub rollout: RolloutSpec,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The request names something wrong (400); the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The database cannot be written or read now (503).
    #[error("{0}")]
    Unavailable(String),
    /// No such deployment (404).
    #[error("{0}")]
    NotFound(String),
    /// Not possible in its state (409).
    #[error("{0}")]
    Conflict(String),
}

/// Where a deployment stands on one target, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetView {
    pub node_id: NodeId,
    pub name: String,
    /// `waiting` (its wave has not started), `draining` (leaving its pool before the order),
    /// `pending`, `delivering`, `installed`, `running`, `rolled_back`, `failed`, or `skipped`
    /// (never sent: the rollout halted or was aborted first).
    pub status: &'static str,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentView {
    pub record: DeploymentRecord,
    /// In the record's target order (by name).
    pub machines: Vec<TargetView>,
}

/// Seal these targets of one deployment, in order.
#[derive(Clone, Debug)]
pub(crate) struct SealJob {
    pub deployment: u64,
    pub bundle_id: String,
    pub service: String,
    pub version: String,
    pub targets: Vec<SealTarget>,
}

#[derive(Clone, Debug)]
pub(crate) struct SealTarget {
    pub node: NodeId,
    pub name: String,
    /// The machine's age recipient; None when it cannot be sent anything (not admitted).
    pub recipient: Option<String>,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, DeployError>>;

/// The core thread's deployment commands.
pub(crate) enum DeployCmd {
    Create {
        req: NewDeployment,
        reply: Reply<u64>,
    },
    /// The bundle is sealed to `node`: publish the order.
    Sealed {
        deployment: u64,
        node: NodeId,
        order: DeployOrder,
    },
    SealFailed {
        deployment: u64,
        node: NodeId,
        reason: String,
    },
    Get {
        id: u64,
        reply: Reply<Option<DeploymentView>>,
    },
    /// `pause`, `resume` or `abort` its rollout.
    Control {
        id: u64,
        control: Control,
        reply: Reply<()>,
    },
    /// The newest `limit`, newest first.
    List {
        limit: usize,
        reply: Reply<Vec<DeploymentView>>,
    },
    /// May the machine `requester` (its connection's certificate: `fingerprint`) fetch the
    /// bundles sealed to `machine`? Itself, or its admitted load balancer.
    Authorize {
        requester: NodeId,
        fingerprint: Fingerprint,
        machine: NodeId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Which of these sealed files are no longer needed.
    Sweep {
        files: Vec<(u64, NodeId)>,
        reply: oneshot::Sender<Vec<(u64, NodeId)>>,
    },
    /// Deletes the uploaded bundles no deployment needs that were uploaded longer than
    /// `keep_unused` ago (on the core thread, so that no deployment is created meanwhile);
    /// answers the ids deleted.
    SweepBundles {
        bundles: bundles::BundleStore,
        keep_unused: Duration,
        reply: oneshot::Sender<Vec<String>>,
    },
}

enum Deferred {
    Created(Reply<u64>, u64),
    Controlled(Reply<()>),
    Read(DeployCmd),
}

/// The core thread's side of deployments: the next id, and what the current batch wrote.
pub(crate) struct DeployBook {
    next_id: u64,
    /// Records changed by this batch: committed with it.
    writes: BTreeMap<u64, DeploymentRecord>,
    /// Jobs of the deployments created by this batch: queued once it committed.
    jobs: Vec<SealJob>,
    /// Answered once the batch committed (or failed to).
    deferred: Vec<Deferred>,
    seal_tx: mpsc::UnboundedSender<SealJob>,
    /// The deployments whose rollout is not over (running or paused), as last written: stepped
    /// on every tick. Rebuilt from the database by [`DeployBook::reload`].
    active: BTreeMap<u64, DeploymentRecord>,
}

impl DeployBook {
    pub(crate) fn new(seal_tx: mpsc::UnboundedSender<SealJob>) -> DeployBook {
        DeployBook {
            next_id: 1,
            writes: BTreeMap::new(),
            jobs: Vec::new(),
            deferred: Vec::new(),
            seal_tx,
            active: BTreeMap::new(),
        }
    }

    /// After the database was (re)opened and the core rebuilt from it: the next id, and every
    /// unfinished target of the newest deployments queued again.
    pub(crate) fn reload(&mut self, core: Option<&ControllerCore>, store: Option<&Store>) {
        self.writes.clear();
        self.jobs.clear();
        self.active.clear();
        let (Some(core), Some(store)) = (core, store) else {
            return;
        };
        let stored = match store.deployment_last_id() {
            Ok(id) => id,
            Err(e) => {
                tracing::error!("cannot read the deployments table: {e}");
                return;
            }
        };
        // Also above anything a machine knows of (a database restored from an older backup
        // must not reuse ids the workers have seen).
        let seen = core
            .machines()
            .flat_map(|m| {
                m.deploys
                    .iter()
                    .map(|d| d.deployment)
                    .chain(m.report.as_ref().and_then(|r| r.deployment))
            })
            .max()
            .unwrap_or(0);
        self.next_id = stored.max(seen) + 1;
        let recent = match store.deployments_newest(RESUME_MAX) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot read the deployments table: {e}");
                return;
            }
        };
        for rec in recent.into_iter().rev() {
            let targets: Vec<SealTarget> = rec
                .targets
                .iter()
                .filter(|(node, _)| rec.rollout.is_legacy() || rec.rollout.is_sent(*node))
                .filter(|(node, _)| !settled(core, &rec, *node))
                .map(|(node, name)| seal_target(core, *node, name))
                .collect();
            if !targets.is_empty() {
                tracing::info!(
                    deployment = rec.id,
                    targets = targets.len(),
                    "resuming a deployment: sealing and publishing to the targets not yet sent"
                );
                let _ = self.seal_tx.send(job_of(&rec, targets));
            }
            if !rec.rollout.is_legacy() && !rec.rollout.state.is_final() {
                self.active.insert(rec.id, rec);
            }
        }
    }

    /// Every tick: steps each rollout that is not over and performs what it decides.
    pub(crate) fn tick(&mut self, core: &mut ControllerCore, now_ms: u64) {
        let ids: Vec<u64> = self.active.keys().copied().collect();
        for id in ids {
            let Some(mut rec) = self.active.remove(&id) else {
                continue;
            };
            let before = rec.rollout.clone();
            let actions = step_rollout(core, &mut rec, now_ms);
            self.perform(core, &rec, actions, now_ms);
            if rec.rollout != before {
                if rec.rollout.state != before.state {
                    tracing::info!(
                        deployment = id,
                        state = rec.rollout.state.as_str(),
                        reason = rec.rollout.reason.as_deref().unwrap_or(""),
                        "rollout"
                    );
                } else if rec.rollout.wave != before.wave {
                    tracing::info!(
                        deployment = id,
                        wave = rec.rollout.wave + 1,
                        waves = rec.rollout.waves.len(),
                        "rollout: the next wave starts"
                    );
                }
                self.writes.insert(id, rec.clone());
            }
            if !rec.rollout.state.is_final() {
                self.active.insert(id, rec);
            }
        }
    }

    /// Performs a rollout's actions: drains and returns in the core (committed with the
    /// batch), orders queued for the sealer once the batch committed.
    fn perform(
        &mut self,
        core: &mut ControllerCore,
        rec: &DeploymentRecord,
        actions: Vec<Action>,
        now_ms: u64,
    ) {
        let mut send = Vec::new();
        let (mut drains, mut undrains) = (Vec::new(), Vec::new());
        for a in actions {
            match a {
                Action::Drain(n) => drains.push(n),
                Action::Undrain(n) => undrains.push(n),
                Action::Send(n) => {
                    if let Some((_, name)) = rec.targets.iter().find(|(t, _)| *t == n) {
                        send.push(seal_target(core, n, name));
                    }
                }
            }
        }
        core.drain(rec.id, &drains, &undrains, now_ms);
        if !send.is_empty() {
            self.jobs.push(job_of(rec, send));
        }
    }

    fn control(
        &mut self,
        core: &mut ControllerCore,
        store: Option<&Store>,
        id: u64,
        control: Control,
        now_ms: u64,
    ) -> Result<(), DeployError> {
        let Some(mut rec) = self.active.remove(&id) else {
            let stored = match store.map(|s| s.deployment(id)) {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    return Err(DeployError::Unavailable(format!(
                        "cannot read the deployment: {e}"
                    )))
                }
                None => return Err(unavailable()),
            };
            return Err(match stored {
                None => DeployError::NotFound(format!("id: no deployment {id}")),
                Some(r) if r.rollout.is_legacy() => DeployError::Conflict(format!(
                    "deployment {id} was sent to every target at once; there is no rollout to {}",
                    control.as_str()
                )),
                Some(mut r) => DeployError::Conflict(match r.rollout.control(control) {
                    Err(e) => format!("deployment {id}: {e}"),
                    Ok(_) => format!("deployment {id} is not active"),
                }),
            });
        };
        let result = rec.rollout.control(control);
        if let Ok(actions) = &result {
            tracing::info!(
                deployment = id,
                state = rec.rollout.state.as_str(),
                "rollout: {} by an operator",
                control.as_str()
            );
            self.perform(core, &rec, actions.clone(), now_ms);
            self.writes.insert(id, rec.clone());
        }
        if !rec.rollout.state.is_final() {
            self.active.insert(id, rec);
        }
        result
            .map(|_| ())
            .map_err(|e| DeployError::Conflict(format!("deployment {id}: {e}")))
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
                match self.create(core, req, now_ms) {
                    Ok(mut rec) => {
                        // The first wave starts at once.
                        let actions = step_rollout(core, &mut rec, now_ms);
                        self.perform(core, &rec, actions, now_ms);
                        self.deferred.push(Deferred::Created(reply, rec.id));
                        self.writes.insert(rec.id, rec.clone());
                        if !rec.rollout.state.is_final() {
                            self.active.insert(rec.id, rec);
                        }
                    }
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
                if let Some(core) = core {
                    self.sealed(core, store, deployment, node, order, now_ms);
                }
            }
            DeployCmd::SealFailed {
                deployment,
                node,
                reason,
            } => {
                if core.is_some() {
                    self.fail(store, deployment, node, reason);
                }
            }
            DeployCmd::Control { id, control, reply } => {
                let Some(core) = core else {
                    let _ = reply.send(Err(unavailable()));
                    return;
                };
                match self.control(core, store, id, control, now_ms) {
                    Ok(()) => self.deferred.push(Deferred::Controlled(reply)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            read => self.deferred.push(Deferred::Read(read)),
        }
    }

    /// The records this batch changed, to commit with it.
    pub(crate) fn take_writes(&mut self) -> Vec<DeploymentRecord> {
        std::mem::take(&mut self.writes).into_values().collect()
    }

    /// After the batch's commit: queues the new deployments' jobs and answers what waited.
    pub(crate) fn after_commit(
        &mut self,
        core: Option<&ControllerCore>,
        store: Option<&Store>,
        committed: bool,
    ) {
        self.writes.clear();
        for job in std::mem::take(&mut self.jobs) {
            if committed {
                let _ = self.seal_tx.send(job);
            }
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

    fn create(
        &mut self,
        core: &ControllerCore,
        req: NewDeployment,
        now_ms: u64,
    ) -> Result<DeploymentRecord, DeployError> {
        if !req.bundle_path.is_file() {
            return Err(DeployError::Invalid(format!(
                "bundle_id: no bundle {} is stored (unused bundles are deleted after \
                 cluster.bundle_keep_unused); upload it again",
                req.bundle_id
            )));
        }
        let admitted = |m: &&MachineRecord| m.key_status == KeyStatus::Admitted;
        let mut targets: Vec<&MachineRecord> = match &req.machines {
            None => core.machines().filter(admitted).collect(),
            Some(names) => {
                if names.is_empty() {
                    return Err(DeployError::Invalid(
                        "machines: the list is empty (leave it out to deploy to every admitted worker)"
                            .into(),
                    ));
                }
                let mut seen = BTreeSet::new();
                let mut out = Vec::new();
                for name in names {
                    if !seen.insert(name.as_str()) {
                        continue;
                    }
                    // A name may also belong to a rejected key; the admitted one is meant.
                    let m = core
                        .machines()
                        .filter(admitted)
                        .find(|m| &m.name == name)
                        .or_else(|| core.machine_by_name(name));
                    match m {
                        None => {
                            return Err(DeployError::Invalid(format!(
                                "machines: no machine named {:?}",
                                short(name)
                            )))
                        }
                        Some(m) if m.key_status != KeyStatus::Admitted => {
                            return Err(DeployError::Invalid(format!(
                                "machines: {:?} is not admitted (its key is {}; see /v1/keys)",
                                m.name,
                                m.key_status.as_str()
                            )))
                        }
                        Some(m) => out.push(m),
                    }
                }
                out
            }
        };
        if targets.is_empty() {
            return Err(DeployError::Invalid(
                "machines: there is no admitted worker to deploy to".into(),
            ));
        }
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        let planned: Vec<PlanTarget> = targets.iter().map(|m| PlanTarget::of(m)).collect();
        let waves = rollout::plan(&planned, &req.rollout);
        let id = self.next_id;
        self.next_id += 1;
        let rec = DeploymentRecord {
            id,
            service: req.service,
            bundle_id: req.bundle_id,
            version: req.version,
            created_ms: now_ms,
            targets: targets
                .iter()
                .map(|m| (m.node_id, m.name.clone()))
                .collect(),
            failures: Vec::new(),
            rollout: Rollout::new(waves, &req.rollout, now_ms),
        };
        Ok(rec)
    }

    fn sealed(
        &mut self,
        core: &mut ControllerCore,
        store: Option<&Store>,
        deployment: u64,
        node: NodeId,
        order: DeployOrder,
        now_ms: u64,
    ) {
        let Some(m) = core.machine(node) else {
            return self.fail(
                store,
                deployment,
                node,
                "the machine is no longer known".into(),
            );
        };
        // Already published (a resumed job), or a newer deployment went out first.
        if m.deploys.iter().any(|d| d.deployment >= deployment) {
            return;
        }
        if m.key_status != KeyStatus::Admitted {
            let reason = format!(
                "the machine's key is {}; nothing was sent to it",
                m.key_status.as_str()
            );
            return self.fail(store, deployment, node, reason);
        }
        if let Err(e) = core.publish(node, &Body::Deploy(order), now_ms) {
            self.fail(
                store,
                deployment,
                node,
                format!("the order could not be published: {e}"),
            );
        }
    }

    /// Records that `node` could not be sent `deployment`.
    fn fail(&mut self, store: Option<&Store>, deployment: u64, node: NodeId, reason: String) {
        if let Some(active) = self.active.get_mut(&deployment) {
            if !active.failures.iter().any(|(n, _)| *n == node) {
                active.failures.push((node, reason.clone()));
                self.writes.insert(deployment, active.clone());
            }
        }
        let rec = match self.writes.get_mut(&deployment) {
            Some(r) => r,
            None => {
                let loaded = store.map(|s| s.deployment(deployment));
                match loaded {
                    Some(Ok(Some(r))) => self.writes.entry(deployment).or_insert(r),
                    Some(Ok(None)) => {
                        tracing::warn!(deployment, "a failure for an unknown deployment");
                        return;
                    }
                    Some(Err(e)) => {
                        tracing::error!(deployment, "cannot read the deployment: {e}");
                        return;
                    }
                    None => return,
                }
            }
        };
        if rec.failures.iter().any(|(n, _)| *n == node) {
            return;
        }
        tracing::warn!(deployment, machine = %node, "deployment failed: {reason}");
        rec.failures.push((node, reason));
    }
}

fn unavailable() -> DeployError {
    DeployError::Unavailable(
        "the controller's database is unavailable after a failed write; retry shortly".into(),
    )
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

fn job_of(rec: &DeploymentRecord, targets: Vec<SealTarget>) -> SealJob {
    SealJob {
        deployment: rec.id,
        bundle_id: rec.bundle_id.clone(),
        service: rec.service.clone(),
        version: rec.version.clone(),
        targets,
    }
}

fn seal_target(core: &ControllerCore, node: NodeId, name: &str) -> SealTarget {
    SealTarget {
        node,
        name: name.to_owned(),
        recipient: core
            .machine(node)
            .filter(|m| m.key_status == KeyStatus::Admitted)
            .map(|m| m.seal_key.clone()),
    }
}

/// Whether nothing more is to be done to send `rec` to `node`: it failed, the machine got it
/// (or a newer deployment), or the machine is gone.
fn settled(core: &ControllerCore, rec: &DeploymentRecord, node: NodeId) -> bool {
    if rec.failures.iter().any(|(n, _)| *n == node) {
        return true;
    }
    match core.machine(node) {
        None => true,
        Some(m) => m.deploys.iter().any(|d| d.deployment >= rec.id),
    }
}

/// Steps `rec`'s rollout from what the core knows of each target now (the core thread on
/// every tick, and the cluster simulation).
pub fn step_rollout(core: &ControllerCore, rec: &mut DeploymentRecord, now_ms: u64) -> Vec<Action> {
    let names: BTreeMap<NodeId, &str> = rec.targets.iter().map(|(n, s)| (*n, s.as_str())).collect();
    let snapshot = rec.clone();
    rec.rollout.step(now_ms, |node| {
        let name = names.get(&node).copied().unwrap_or("?").to_owned();
        (name, observe(core, &snapshot, node))
    })
}

/// What [`Rollout::step`] needs of one target.
fn observe(core: &ControllerCore, rec: &DeploymentRecord, node: NodeId) -> Observed {
    let m = core.machine(node);
    let superseded_by = m.and_then(|m| {
        m.deploys
            .iter()
            .map(|d| d.deployment)
            .filter(|&d| d > rec.id)
            .min()
    });
    let (status, reason) = if rec.rollout.is_sent(node) {
        let t = target_view(core, rec, node, "");
        (t.status, t.reason)
    } else {
        ("pending", None)
    };
    Observed {
        status,
        reason,
        superseded_by,
        healthy: m.is_some_and(|m| {
            m.up && m.key_status == KeyStatus::Admitted
                && m.report.as_ref().is_some_and(|r| r.state == "running")
        }),
        in_pool: core.in_pool(node),
        drained: core.drained(node),
    }
}

/// The API's status for a state the core recorded (`pending`, `delivering`) or a worker
/// reported. A state this controller does not know counts as still delivering.
pub(crate) fn status_of(state: &str) -> &'static str {
    match state {
        "pending" => "pending",
        "delivering" | "fetching" | "installing" => "delivering",
        "installed" | "starting" => "installed",
        "running" => "running",
        "rolled_back" => "rolled_back",
        "failed" => "failed",
        _ => "delivering",
    }
}

/// Where `rec` stands on `node`.
fn target_view(
    core: &ControllerCore,
    rec: &DeploymentRecord,
    node: NodeId,
    name: &str,
) -> TargetView {
    let view = |status: &'static str, reason: Option<String>| TargetView {
        node_id: node,
        name: name.to_owned(),
        status,
        reason,
    };
    if let Some((_, reason)) = rec.failures.iter().find(|(n, _)| *n == node) {
        return view("failed", Some(reason.clone()));
    }
    let r = &rec.rollout;
    if !r.is_legacy() && !r.is_sent(node) {
        let wave = r.wave_of(node).map_or(0, |w| w + 1);
        if r.state.is_final() {
            return view(
                "skipped",
                Some(format!(
                    "not sent: the rollout {} before wave {wave} ({})",
                    r.state.as_str(),
                    r.reason.as_deref().unwrap_or("")
                )),
            );
        }
        if r.draining_since(node).is_some() {
            return view(
                "draining",
                Some(format!(
                    "out of its load balancer's pool for {} before it is replaced",
                    humantime::format_duration(Duration::from_millis(r.drain_ms.unwrap_or(0)))
                )),
            );
        }
        return view(
            "waiting",
            Some(format!("in wave {wave} of {}, not started", r.waves.len())),
        );
    }
    let Some(m) = core.machine(node) else {
        return view("failed", Some("the machine is no longer known".into()));
    };
    if let Some(d) = m.deploys.iter().find(|d| d.deployment == rec.id) {
        let status = status_of(&d.state);
        let reason = match (&d.detail, status) {
            (Some(detail), _) => Some(detail.clone()),
            (None, "pending") => Some("sent; not yet received by the machine".into()),
            (None, "delivering") if d.state != "delivering" => {
                Some(format!("the machine says {:?}", short(&d.state)))
            }
            _ => None,
        };
        return view(status, reason);
    }
    if let Some(newer) = m
        .deploys
        .iter()
        .map(|d| d.deployment)
        .filter(|&d| d > rec.id)
        .min()
    {
        return view(
            "failed",
            Some(format!(
                "superseded by deployment {newer}; this one's outcome is no longer recorded"
            )),
        );
    }
    view("pending", Some("being sealed for this machine".into()))
}

/// Deployment `id` as the API shows it, from what is committed.
pub(crate) fn view_of(core: &ControllerCore, store: &Store, id: u64) -> Option<DeploymentView> {
    store.deployment(id).ok().flatten().map(|r| view(core, r))
}

fn view(core: &ControllerCore, rec: DeploymentRecord) -> DeploymentView {
    let machines = rec
        .targets
        .iter()
        .map(|(node, name)| target_view(core, &rec, *node, name))
        .collect();
    DeploymentView {
        record: rec,
        machines,
    }
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
                None => Err("the controller's database is unavailable; retry shortly".into()),
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

fn authorize(
    core: &ControllerCore,
    requester: NodeId,
    fingerprint: Fingerprint,
    machine: NodeId,
) -> Result<(), String> {
    let me = core
        .machine(requester)
        .filter(|m| m.fingerprint == fingerprint && m.key_status == KeyStatus::Admitted)
        .ok_or_else(|| "this machine is not admitted".to_owned())?;
    if requester == machine {
        return Ok(());
    }
    let target = core
        .machine(machine)
        .ok_or_else(|| format!("no machine {machine}"))?;
    if me.is_load_balancer() && target.load_balancer.as_deref() == Some(me.name.as_str()) {
        return Ok(());
    }
    Err(format!(
        "the bundles of {} go only to it or to its load balancer",
        target.name
    ))
}

/// The sealed files whose machine is done with them: it reported a final state for that
/// deployment, got a newer one, could not be sent it, or is gone.
fn sweepable(core: &ControllerCore, store: &Store, files: &[(u64, NodeId)]) -> Vec<(u64, NodeId)> {
    let mut records: BTreeMap<u64, Option<DeploymentRecord>> = BTreeMap::new();
    let mut out = Vec::new();
    for &(dep, node) in files {
        let rec = records
            .entry(dep)
            .or_insert_with(|| store.deployment(dep).ok().flatten());
        let failed = match rec {
            // An unreadable or unknown deployment: keep the file, it costs only disk.
            None => continue,
            Some(r) => r.failures.iter().any(|(n, _)| *n == node),
        };
        let done = failed
            || match core.machine(node) {
                None => true,
                Some(m) => m.deploys.iter().any(|d| {
                    d.deployment > dep
                        || (d.deployment == dep
                            && matches!(status_of(&d.state), "running" | "rolled_back" | "failed"))
                }),
            };
        if done {
            out.push((dep, node));
        }
    }
    out
}

/// The bundles a deployment still needs: the newest deployment's of each service (so that it
/// can be sent to more machines), and every recent deployment's with a target not yet sealed
/// and sent (a restart resumes those from the plaintext bundle). Sealed copies are served on
/// their own; workers keep what they installed.
pub(crate) fn bundles_needed(
    core: &ControllerCore,
    store: &Store,
) -> Result<BTreeSet<String>, crate::replication::StoreError> {
    let mut needed = BTreeSet::new();
    let mut services = BTreeSet::new();
    for rec in store.deployments_newest(RESUME_MAX)? {
        let unfinished = rec.targets.iter().any(|(n, _)| !settled(core, &rec, *n));
        if services.insert(rec.service.clone()) || unfinished {
            needed.insert(rec.bundle_id);
        }
    }
    Ok(needed)
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

/// Deletes the sealed files no machine needs any more, every [`SWEEP_EVERY`].
pub(crate) async fn sweep_loop(shared: Arc<ControllerShared>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
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
