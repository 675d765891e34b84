//! How deployments are shown and what they still need, from what is committed: the status of
//! each target (`/v1/deployments`), who may fetch a sealed bundle, which sealed files and
//! uploaded bundles no deployment needs any more. Pure reads over the [`ControllerCore`] and a
//! [`ClusterStore`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::core::{ControllerCore, DeployPhase, KeyStatus};
use super::deployment::{settled, DeploymentRecord, DeploymentView, TargetView};
use super::storage::ClusterStore;
use crate::ids::{Fingerprint, NodeId};
use crate::wire::ReportState;

/// The API's status for a state the core recorded (`pending`, `delivering`) or a worker
/// reported.
pub(crate) fn status_of(state: &DeployPhase) -> &'static str {
    use ReportState as R;
    match state {
        DeployPhase::Pending => "pending",
        DeployPhase::Reported(r) => match r {
            R::Delivering | R::Fetching | R::Installing => "delivering",
            R::Installed | R::Starting => "installed",
            R::Running => "running",
            R::RolledBack => "rolled_back",
            R::Failed => "failed",
            // Not a deployment's stage: it is still on its way.
            R::Idle | R::Stopped => "delivering",
        },
    }
}

/// Where `rec` stands on `node`.
pub(crate) fn target_view(
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
            (None, "delivering") if d.state.as_str() != "delivering" => {
                Some(format!("the machine says {:?}", d.state.as_str()))
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
pub(crate) fn view_of(
    core: &ControllerCore,
    store: &dyn ClusterStore,
    id: u64,
) -> Option<DeploymentView> {
    store.deployment(id).ok().flatten().map(|r| view(core, r))
}

pub(crate) fn view(core: &ControllerCore, rec: DeploymentRecord) -> DeploymentView {
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

/// Why a machine may not fetch the bundles sealed to another (the transfer stream is
/// refused with it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchRefused {
    #[error("this machine is not admitted")]
    NotAdmitted,
    #[error("no machine {0}")]
    NoMachine(NodeId),
    /// The target's name.
    #[error("the bundles of {0} go only to it or to its load balancer")]
    NotItsBundles(String),
    #[error("the controller's database is unavailable; retry shortly")]
    Unavailable,
}

pub(crate) fn authorize(
    core: &ControllerCore,
    requester: NodeId,
    fingerprint: Fingerprint,
    machine: NodeId,
) -> Result<(), FetchRefused> {
    let me = core
        .machine(requester)
        .filter(|m| m.fingerprint == fingerprint && m.key_status == KeyStatus::Admitted)
        .ok_or(FetchRefused::NotAdmitted)?;
    if requester == machine {
        return Ok(());
    }
    let target = core
        .machine(machine)
        .ok_or(FetchRefused::NoMachine(machine))?;
    if me.is_load_balancer() && target.load_balancer.as_deref() == Some(me.name.as_str()) {
        return Ok(());
    }
    Err(FetchRefused::NotItsBundles(target.name.clone()))
}

/// The sealed files whose machine is done with them: it reported a final state for that
/// deployment, got a newer one, could not be sent it, or is gone.
pub(crate) fn sweepable(
    core: &ControllerCore,
    store: &dyn ClusterStore,
    files: &[(u64, NodeId)],
) -> Vec<(u64, NodeId)> {
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
    store: &dyn ClusterStore,
) -> Result<BTreeSet<String>, crate::replication::StoreError> {
    let mut needed = BTreeSet::new();
    let mut services = BTreeSet::new();
    for rec in store.deployments_newest(crate::limits::DEPLOY_RESUME_MAX)? {
        let unfinished = rec.targets.iter().any(|(n, _)| !settled(core, &rec, *n));
        if services.insert(rec.service.clone()) || unfinished {
            needed.insert(rec.bundle_id);
        }
    }
    Ok(needed)
}
