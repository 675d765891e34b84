//! The controller's storage seam: what its core and its deployments load and commit, as a
//! trait ([`ClusterStore`]) with two implementations: the redb [`crate::store::Store`]
//! (production, `store::cluster`) and [`MemClusterStore`] (the cluster simulation and unit
//! tests), which keeps the same records through the same encodings and can be told to fail a
//! commit or to make one slow.
//!
//! A commit is atomic in both: every record of the batch is applied, or (an error) none is.
//! This module must never decide anything or perform an output; it only keeps records.

use std::collections::BTreeMap;

use super::configdata::ConfigChange;
use super::core::{Dirty, MachineRecord};
use super::deployment::DeploymentRecord;
use crate::ids::NodeId;
use crate::limits::CONFIG_HISTORY_KEPT;
use crate::replication::StoreError;
use crate::wire::Publication;

/// What the controller rebuilds its core from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    pub machines: Vec<MachineRecord>,
    /// Stored, unacknowledged publications, by machine then sequence.
    pub publications: Vec<Publication>,
    /// The newest configuration change of every scope.
    pub config: Vec<ConfigChange>,
}

/// The controller's records, durable.
pub trait ClusterStore {
    /// Everything the core is rebuilt from.
    fn load(&self) -> Result<Loaded, StoreError>;
    /// What one batch changed, the core's records and the deployment records written by the
    /// batch (whole, replacing any under the same id), in one atomic, durable transaction.
    fn commit(&mut self, dirty: &Dirty, deployments: &[DeploymentRecord])
        -> Result<(), StoreError>;
    /// One deployment record.
    fn deployment(&self, id: u64) -> Result<Option<DeploymentRecord>, StoreError>;
    /// The `limit` newest deployment records, newest first.
    fn deployments_newest(&self, limit: usize) -> Result<Vec<DeploymentRecord>, StoreError>;
    /// The highest deployment id stored (0: none yet).
    fn deployment_last_id(&self) -> Result<u64, StoreError>;
}

impl ClusterStore for crate::store::Store {
    fn load(&self) -> Result<Loaded, StoreError> {
        let (machines, publications) = self.controller_load()?;
        let config = self.config_newest()?;
        Ok(Loaded {
            machines,
            publications,
            config,
        })
    }
    fn commit(
        &mut self,
        dirty: &Dirty,
        deployments: &[DeploymentRecord],
    ) -> Result<(), StoreError> {
        self.controller_commit_with(dirty, deployments)
    }
    fn deployment(&self, id: u64) -> Result<Option<DeploymentRecord>, StoreError> {
        crate::store::Store::deployment(self, id)
    }
    fn deployments_newest(&self, limit: usize) -> Result<Vec<DeploymentRecord>, StoreError> {
        crate::store::Store::deployments_newest(self, limit)
    }
    fn deployment_last_id(&self) -> Result<u64, StoreError> {
        crate::store::Store::deployment_last_id(self)
    }
}

/// A fault the next commit of a [`MemClusterStore`] meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitFault {
    /// The transaction aborts: nothing is applied, the commit returns an error.
    Fail,
    /// The commit succeeds after this long ([`MemClusterStore::take_latency_ms`] says how
    /// long the driver must have been stuck in it).
    LatencyMs(u64),
}

/// The controller's records in memory, kept as `store::cluster` keeps them: each record through
/// its stored bytes, publications deleted up to an ack and with their machine, the newest
/// [`CONFIG_HISTORY_KEPT`] configuration changes of a scope.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemClusterStore {
    pub machines: BTreeMap<NodeId, MachineRecord>,
    pub publications: BTreeMap<(NodeId, u64), Publication>,
    /// By (scope, version).
    pub config: BTreeMap<(String, u64), ConfigChange>,
    pub deployments: BTreeMap<u64, DeploymentRecord>,
    fault: Option<CommitFault>,
    latency_ms: u64,
    /// Commits that applied something, and commits that failed.
    pub commits: u64,
    pub failed_commits: u64,
}

impl MemClusterStore {
    /// The next commit that has something to apply meets `fault`.
    pub fn inject(&mut self, fault: CommitFault) {
        self.fault = Some(fault);
    }

    /// How long the last commits took, since last asked (0: at once).
    pub fn take_latency_ms(&mut self) -> u64 {
        std::mem::take(&mut self.latency_ms)
    }

    fn apply(&mut self, d: &Dirty, deployments: &[DeploymentRecord]) {
        for rec in deployments {
            let stored = DeploymentRecord::decode(&rec.encode()).expect("a record decodes");
            self.deployments.insert(rec.id, stored);
        }
        for m in &d.machines {
            let stored = MachineRecord::decode(&m.encode()).expect("a record decodes");
            self.machines.insert(m.node_id, stored);
        }
        for node in &d.removed {
            self.machines.remove(node);
        }
        for p in &d.publications {
            self.publications.insert((p.machine, p.seq), p.clone());
        }
        for (node, upto) in &d.acked {
            self.publications
                .retain(|(m, seq), _| !(m == node && seq <= upto));
        }
        for node in &d.removed {
            self.publications.retain(|(m, _), _| m != node);
        }
        for c in &d.config {
            self.config.insert((c.scope.clone(), c.version), c.clone());
            let versions: Vec<u64> = self
                .config
                .range((c.scope.clone(), 0)..=(c.scope.clone(), u64::MAX))
                .map(|((_, v), _)| *v)
                .collect();
            if versions.len() > CONFIG_HISTORY_KEPT {
                for v in &versions[..versions.len() - CONFIG_HISTORY_KEPT] {
                    self.config.remove(&(c.scope.clone(), *v));
                }
            }
        }
    }
}

impl ClusterStore for MemClusterStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let mut newest: BTreeMap<&str, &ConfigChange> = BTreeMap::new();
        for ((scope, _), c) in &self.config {
            newest.insert(scope, c);
        }
        Ok(Loaded {
            machines: self.machines.values().cloned().collect(),
            publications: self.publications.values().cloned().collect(),
            config: newest.into_values().cloned().collect(),
        })
    }

    fn commit(
        &mut self,
        dirty: &Dirty,
        deployments: &[DeploymentRecord],
    ) -> Result<(), StoreError> {
        if dirty.is_empty() && deployments.is_empty() {
            return Ok(());
        }
        match self.fault.take() {
            Some(CommitFault::Fail) => {
                self.failed_commits += 1;
                return Err(StoreError::Io("injected commit failure".into()));
            }
            Some(CommitFault::LatencyMs(ms)) => self.latency_ms += ms,
            None => {}
        }
        self.apply(dirty, deployments);
        self.commits += 1;
        Ok(())
    }

    fn deployment(&self, id: u64) -> Result<Option<DeploymentRecord>, StoreError> {
        Ok(self.deployments.get(&id).cloned())
    }

    fn deployments_newest(&self, limit: usize) -> Result<Vec<DeploymentRecord>, StoreError> {
        Ok(self
            .deployments
            .values()
            .rev()
            .take(limit)
            .cloned()
            .collect())
    }

    fn deployment_last_id(&self) -> Result<u64, StoreError> {
        Ok(self.deployments.keys().next_back().copied().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(machine: u128, seq: u64) -> Publication {
        Publication {
            machine: NodeId(machine),
            seq,
            sealed: vec![seq as u8],
            signature: vec![0; 64],
        }
    }

    /// A failed commit aborts the transaction: nothing of the batch is applied.
    #[test]
    fn failed_commit_applies_nothing() {
        let mut s = MemClusterStore::default();
        let dirty = Dirty {
            publications: vec![publication(1, 1)],
            ..Dirty::default()
        };
        s.commit(&dirty, &[]).unwrap();
        let before = s.clone();
        s.inject(CommitFault::Fail);
        let dirty = Dirty {
            publications: vec![publication(1, 2)],
            acked: vec![(NodeId(1), 1)],
            ..Dirty::default()
        };
        assert!(s.commit(&dirty, &[]).is_err());
        assert_eq!(s.load().unwrap(), before.load().unwrap());
        assert_eq!(s.failed_commits, 1);
        // The fault is spent: the same batch commits now, whole.
        s.commit(&dirty, &[]).unwrap();
        assert_eq!(s.load().unwrap().publications, vec![publication(1, 2)]);
    }

    /// A slow commit is still applied whole, and says how long it took once.
    #[test]
    fn slow_commit_applies_and_reports_its_latency_once() {
        let mut s = MemClusterStore::default();
        s.inject(CommitFault::LatencyMs(250));
        let dirty = Dirty {
            publications: vec![publication(2, 1)],
            removed: vec![NodeId(3)],
            ..Dirty::default()
        };
        s.commit(&dirty, &[]).unwrap();
        assert_eq!(s.take_latency_ms(), 250);
        assert_eq!(s.take_latency_ms(), 0);
        assert_eq!(s.publications.len(), 1);
    }

    /// The in-memory store keeps what the redb store keeps for the same commits.
    #[test]
    fn mem_store_matches_the_redb_store_for_the_same_commits() {
        let dir =
            std::env::temp_dir().join(format!("outpost-cluster-storage-{}", rand::random::<u64>()));
        let mut redb = crate::store::Store::open(&dir).unwrap();
        let mut mem = MemClusterStore::default();
        let batches = vec![
            Dirty {
                publications: vec![publication(1, 1), publication(1, 2), publication(2, 1)],
                ..Dirty::default()
            },
            Dirty {
                acked: vec![(NodeId(1), 1)],
                ..Dirty::default()
            },
            Dirty {
                removed: vec![NodeId(2)],
                ..Dirty::default()
            },
        ];
        for d in &batches {
            ClusterStore::commit(&mut redb, d, &[]).unwrap();
            mem.commit(d, &[]).unwrap();
        }
        assert_eq!(ClusterStore::load(&redb).unwrap(), mem.load().unwrap());
        assert_eq!(
            ClusterStore::deployment_last_id(&redb).unwrap(),
            mem.deployment_last_id().unwrap()
        );
        drop(redb);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
