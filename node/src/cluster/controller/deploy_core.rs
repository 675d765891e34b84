//! Deployments as a state machine: the next id, the records a batch writes, the rollouts not
//! over, and the seal jobs to queue once a batch committed. It decides targets, ids,
//! failures, supersession and each rollout's steps over a [`ClusterStore`] and the
//! [`ControllerCore`], with `now` passed in; no tokio, no channel, no clock, no logging (what
//! happened is returned as [`DeployEvent`]s for the driver to log).
//!
//! Driven the same way by the core thread's [`super::deploy::DeployBook`] (which answers the
//! API's oneshots and feeds the seal worker) and by the cluster simulation:
//!
//! 1. [`DeployCore::reload`] after the store was (re)opened and the core rebuilt; the seal
//!    jobs it returns (targets neither sent nor failed) are queued at once;
//! 2. within a batch: [`DeployCore::create`], [`DeployCore::tick`], [`DeployCore::control`],
//!    and each seal result ([`DeployCore::sealed`], [`DeployCore::seal_failed`]);
//! 3. commit [`DeployCore::take_writes`] with the core's records, in one transaction;
//! 4. [`DeployCore::after_commit`]: the new seal jobs (none when the commit failed: the
//!    driver then rebuilds everything from the store and reloads).
//!
//! Every step can be repeated: an order already published to a machine (or superseded there
//! by a newer deployment) is skipped, a failure already recorded is not recorded twice.

use std::collections::BTreeMap;

use super::core::{ControllerCore, KeyStatus, MachineRecord};
use super::deploy_view::target_view;
use super::deployment::{settled, short};
pub use super::deployment::{
    DeployError, DeploymentRecord, DeploymentView, NewDeployment, TargetView,
};
use super::rollout::{self, Action, Control, Observed, PlanTarget, Rollout};
use super::storage::ClusterStore;
use crate::cluster::body::{Body, DeployOrder};
use crate::ids::NodeId;
use crate::limits::DEPLOY_RESUME_MAX;
use crate::wire::ReportState;

/// Seal these targets of one deployment, in order.
#[derive(Clone, Debug)]
pub struct SealJob {
    pub deployment: u64,
    pub bundle_id: String,
    pub service: String,
    pub version: String,
    pub targets: Vec<SealTarget>,
}

#[derive(Clone, Debug)]
pub struct SealTarget {
    pub node: NodeId,
    pub name: String,
    /// The machine's age recipient; None when it cannot be sent anything (not admitted).
    pub recipient: Option<String>,
}

/// What a [`DeployCore`] did that an operator should hear of (the driver logs it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeployEvent {
    /// After a restart: `targets` of `deployment` queued again for sealing.
    Resumed { deployment: u64, targets: usize },
    /// A rollout changed state (`running`, `paused`, `done`, `halted`, `aborted`).
    RolloutState {
        deployment: u64,
        state: &'static str,
        reason: Option<String>,
    },
    /// A rollout's next wave started (`wave` counted from 1).
    NextWave {
        deployment: u64,
        wave: u32,
        waves: usize,
    },
    /// An operator paused, resumed or aborted a rollout.
    Controlled {
        deployment: u64,
        control: &'static str,
        state: &'static str,
    },
    /// `machine` could not be sent `deployment`.
    TargetFailed {
        deployment: u64,
        machine: NodeId,
        reason: String,
    },
    /// A seal result for a deployment not stored (ignored).
    UnknownDeployment { deployment: u64 },
    /// The store could not be read; `what` was skipped.
    StoreError { what: &'static str, error: String },
}

/// The deployments' state machine (see the module's doc).
#[derive(Debug, Default)]
pub struct DeployCore {
    next_id: u64,
    /// Records changed by this batch: committed with it.
    writes: BTreeMap<u64, DeploymentRecord>,
    /// Jobs of the targets sent by this batch: queued once it committed.
    jobs: Vec<SealJob>,
    /// The deployments whose rollout is not over (running or paused), as last written:
    /// stepped on every tick. Rebuilt from the store by [`DeployCore::reload`].
    active: BTreeMap<u64, DeploymentRecord>,
    events: Vec<DeployEvent>,
}

impl DeployCore {
    pub fn new() -> DeployCore {
        DeployCore {
            next_id: 1,
            ..DeployCore::default()
        }
    }

    /// Forgets what only lived in memory (the store is unavailable).
    pub fn clear(&mut self) {
        self.writes.clear();
        self.jobs.clear();
        self.active.clear();
    }

    /// After the store was (re)opened and the core rebuilt from it: the next id, the rollouts
    /// not over, and (returned) a seal job for every unfinished target of the newest
    /// deployments.
    pub fn reload(&mut self, core: &ControllerCore, store: &dyn ClusterStore) -> Vec<SealJob> {
        self.clear();
        let stored = match store.deployment_last_id() {
            Ok(id) => id,
            Err(e) => {
                self.store_error("the deployments table", e);
                return Vec::new();
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
        let recent = match store.deployments_newest(DEPLOY_RESUME_MAX) {
            Ok(r) => r,
            Err(e) => {
                self.store_error("the deployments table", e);
                return Vec::new();
            }
        };
        let mut jobs = Vec::new();
        for rec in recent.into_iter().rev() {
            let targets: Vec<SealTarget> = rec
                .targets
                .iter()
                .filter(|(node, _)| rec.rollout.is_legacy() || rec.rollout.is_sent(*node))
                .filter(|(node, _)| !settled(core, &rec, *node))
                .map(|(node, name)| seal_target(core, *node, name))
                .collect();
            if !targets.is_empty() {
                self.events.push(DeployEvent::Resumed {
                    deployment: rec.id,
                    targets: targets.len(),
                });
                jobs.push(job_of(&rec, targets));
            }
            if !rec.rollout.is_legacy() && !rec.rollout.state.is_final() {
                self.active.insert(rec.id, rec);
            }
        }
        jobs
    }

    /// The id the next deployment gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The deployments whose rollout is not over.
    pub fn active(&self) -> impl Iterator<Item = &DeploymentRecord> {
        self.active.values()
    }

    /// Every tick: steps each rollout that is not over and performs what it decides.
    pub fn tick(&mut self, core: &mut ControllerCore, now_ms: u64) {
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
                    self.events.push(DeployEvent::RolloutState {
                        deployment: id,
                        state: rec.rollout.state.as_str(),
                        reason: rec.rollout.reason.clone(),
                    });
                } else if rec.rollout.wave != before.wave {
                    self.events.push(DeployEvent::NextWave {
                        deployment: id,
                        wave: rec.rollout.wave + 1,
                        waves: rec.rollout.waves.len(),
                    });
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

    /// An operator's `pause`, `resume` or `abort` of deployment `id`'s rollout.
    pub fn control(
        &mut self,
        core: &mut ControllerCore,
        store: &dyn ClusterStore,
        id: u64,
        control: Control,
        now_ms: u64,
    ) -> Result<(), DeployError> {
        let Some(mut rec) = self.active.remove(&id) else {
            let stored = store.deployment(id).map_err(|e| {
                DeployError::Unavailable(format!("cannot read the deployment: {e}"))
            })?;
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
            self.events.push(DeployEvent::Controlled {
                deployment: id,
                control: control.as_str(),
                state: rec.rollout.state.as_str(),
            });
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

    /// Creates a deployment (the targets fixed, the id one above the highest ever) and takes
    /// its first step. The caller checked that the bundle is stored.
    pub fn create(
        &mut self,
        core: &mut ControllerCore,
        req: NewDeployment,
        now_ms: u64,
    ) -> Result<u64, DeployError> {
        let mut rec = self.record(core, req, now_ms)?;
        // The first wave starts at once.
        let actions = step_rollout(core, &mut rec, now_ms);
        self.perform(core, &rec, actions, now_ms);
        let id = rec.id;
        self.writes.insert(id, rec.clone());
        if !rec.rollout.state.is_final() {
            self.active.insert(id, rec);
        }
        Ok(id)
    }

    fn record(
        &mut self,
        core: &ControllerCore,
        req: NewDeployment,
        now_ms: u64,
    ) -> Result<DeploymentRecord, DeployError> {
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
                let mut seen = std::collections::BTreeSet::new();
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
        Ok(DeploymentRecord {
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
        })
    }

    /// The bundle is sealed to `node`: publishes the order (committed with the batch), unless
    /// it was already published or superseded there, or the machine cannot be sent it.
    pub fn sealed(
        &mut self,
        core: &mut ControllerCore,
        store: &dyn ClusterStore,
        deployment: u64,
        node: NodeId,
        order: DeployOrder,
        now_ms: u64,
    ) {
        let Some(m) = core.machine(node) else {
            return self.seal_failed(
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
            return self.seal_failed(store, deployment, node, reason);
        }
        if let Err(e) = core.publish(node, &Body::Deploy(order), now_ms) {
            self.seal_failed(
                store,
                deployment,
                node,
                format!("the order could not be published: {e}"),
            );
        }
    }

    /// Records that `node` could not be sent `deployment`, and why.
    pub fn seal_failed(
        &mut self,
        store: &dyn ClusterStore,
        deployment: u64,
        node: NodeId,
        reason: String,
    ) {
        if let Some(active) = self.active.get_mut(&deployment) {
            if !active.failures.iter().any(|(n, _)| *n == node) {
                active.failures.push((node, reason.clone()));
                self.writes.insert(deployment, active.clone());
            }
        }
        let rec = match self.writes.get_mut(&deployment) {
            Some(r) => r,
            None => match store.deployment(deployment) {
                Ok(Some(r)) => self.writes.entry(deployment).or_insert(r),
                Ok(None) => {
                    self.events
                        .push(DeployEvent::UnknownDeployment { deployment });
                    return;
                }
                Err(e) => {
                    self.store_error("a deployment", e);
                    return;
                }
            },
        };
        if rec.failures.iter().any(|(n, _)| *n == node) {
            return;
        }
        rec.failures.push((node, reason.clone()));
        self.events.push(DeployEvent::TargetFailed {
            deployment,
            machine: node,
            reason,
        });
    }

    /// The records this batch changed, to commit with it.
    pub fn take_writes(&mut self) -> Vec<DeploymentRecord> {
        std::mem::take(&mut self.writes).into_values().collect()
    }

    /// After the batch's commit: the seal jobs to queue (none when it did not commit).
    pub fn after_commit(&mut self, committed: bool) -> Vec<SealJob> {
        self.writes.clear();
        let jobs = std::mem::take(&mut self.jobs);
        if committed {
            jobs
        } else {
            Vec::new()
        }
    }

    /// What happened since last asked, for the driver to log.
    pub fn take_events(&mut self) -> Vec<DeployEvent> {
        std::mem::take(&mut self.events)
    }

    fn store_error(&mut self, what: &'static str, e: crate::replication::StoreError) {
        self.events.push(DeployEvent::StoreError {
            what,
            error: e.to_string(),
        });
    }
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
                && m.report
                    .as_ref()
                    .is_some_and(|r| r.is(ReportState::Running))
        }),
        in_pool: core.in_pool(node),
        drained: core.drained(node),
    }
}
