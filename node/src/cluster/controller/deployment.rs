//! A deployment as the controller keeps it and shows it: the persisted record, what the API asks
//! for, the views, and whether a target is settled. Plain data over the core's machine records;
//! the deployments core (`deploy_core`), its views (`deploy_view`) and the storage
//! (`storage`) all build on it.

use serde::{Deserialize, Serialize};

use super::core::ControllerCore;
use super::rollout::{Rollout, RolloutSpec};
use crate::ids::NodeId;

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

pub(crate) fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Whether nothing more is to be done to send `rec` to `node`: it failed, the machine got it
/// (or a newer deployment), or the machine is gone.
pub(crate) fn settled(core: &ControllerCore, rec: &DeploymentRecord, node: NodeId) -> bool {
    if rec.failures.iter().any(|(n, _)| *n == node) {
        return true;
    }
    match core.machine(node) {
        None => true,
        Some(m) => m.deploys.iter().any(|d| d.deployment >= rec.id),
    }
}
