//! The cluster roles' records in the node's database: the controller's machines, channels,
//! deployments and configuration history, the worker's own record. The tables are defined in
//! `crate::store::cluster` (the backup copies them); this is what is in them.

use redb::{ReadableDatabase, ReadableTable};

use crate::cluster::controller::configdata::ConfigChange;
use crate::cluster::controller::core::{Dirty, MachineRecord};
use crate::cluster::controller::deploy::DeploymentRecord;
use crate::cluster::worker::core::WorkerRecord;
use crate::limits::CONFIG_HISTORY_KEPT;
use crate::replication::StoreError;
use crate::store::cluster::{CHANNEL, CONFIG, DEPLOYMENTS, MACHINES};
use crate::store::{db_err, decode, Store};
use crate::wire::Publication;

type Result<T> = std::result::Result<T, StoreError>;

const META_WORKER: &str = "worker";

fn corrupt(what: &str, e: postcard::Error) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn enc(v: &impl serde::Serialize) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes plain structs")
}

impl Store {
    /// Controller: every machine record and every stored publication.
    pub fn controller_load(&self) -> Result<(Vec<MachineRecord>, Vec<Publication>)> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let mut machines = Vec::new();
        let mut pubs = Vec::new();
        match txn.open_table(MACHINES) {
            Ok(t) => {
                for row in t.iter().map_err(db_err)? {
                    let (_, v) = row.map_err(db_err)?;
                    machines.push(
                        MachineRecord::decode(v.value())
                            .map_err(|e| corrupt("machine record", e))?,
                    );
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(db_err(e)),
        }
        match txn.open_table(CHANNEL) {
            Ok(t) => {
                for row in t.iter().map_err(db_err)? {
                    let (_, v) = row.map_err(db_err)?;
                    pubs.push(decode("publication", v.value())?);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(db_err(e)),
        }
        Ok((machines, pubs))
    }

    /// Controller: commits what the core changed, in one durable transaction.
    pub fn controller_commit(&self, dirty: &Dirty) -> Result<()> {
        self.controller_commit_with(dirty, &[])
    }

    /// Controller: commits what the core changed and the deployment records written in the
    /// same batch (whole, replacing any stored under the same id), in one durable transaction.
    pub fn controller_commit_with(
        &self,
        dirty: &Dirty,
        deployments: &[DeploymentRecord],
    ) -> Result<()> {
        if dirty.is_empty() && deployments.is_empty() {
            return Ok(());
        }
        let txn = self.begin()?;
        {
            if !deployments.is_empty() {
                let mut d = txn.txn.open_table(DEPLOYMENTS).map_err(db_err)?;
                for rec in deployments {
                    d.insert(rec.id, rec.encode().as_slice()).map_err(db_err)?;
                }
            }
            let mut m = txn.txn.open_table(MACHINES).map_err(db_err)?;
            for rec in &dirty.machines {
                m.insert(rec.node_id.0, rec.encode().as_slice())
                    .map_err(db_err)?;
            }
            for node in &dirty.removed {
                m.remove(node.0).map_err(db_err)?;
            }
            let mut c = txn.txn.open_table(CHANNEL).map_err(db_err)?;
            for p in &dirty.publications {
                c.insert((p.machine.0, p.seq), enc(p).as_slice())
                    .map_err(db_err)?;
            }
            for (node, upto) in &dirty.acked {
                c.retain_in((node.0, 0)..=(node.0, *upto), |_, _| false)
                    .map_err(db_err)?;
            }
            for node in &dirty.removed {
                c.retain_in((node.0, 0)..=(node.0, u64::MAX), |_, _| false)
                    .map_err(db_err)?;
            }
            if !dirty.config.is_empty() {
                let mut t = txn.txn.open_table(CONFIG).map_err(db_err)?;
                for change in &dirty.config {
                    let scope = change.scope.as_str();
                    t.insert((scope, change.version), enc(change).as_slice())
                        .map_err(db_err)?;
                    // The scope's newest CONFIG_HISTORY_KEPT stay.
                    let range = (scope, 0)..=(scope, u64::MAX);
                    let kept: Vec<u64> = t
                        .range(range.clone())
                        .map_err(db_err)?
                        .rev()
                        .take(CONFIG_HISTORY_KEPT)
                        .map(|r| r.map(|(k, _)| k.value().1))
                        .collect::<std::result::Result<_, _>>()
                        .map_err(db_err)?;
                    if let Some(&oldest_kept) =
                        kept.last().filter(|_| kept.len() == CONFIG_HISTORY_KEPT)
                    {
                        t.retain_in((scope, 0)..(scope, oldest_kept), |_, _| false)
                            .map_err(db_err)?;
                    }
                }
            }
        }
        txn.commit()
    }

    /// Controller: the newest configuration change of every scope.
    pub fn config_newest(&self) -> Result<Vec<ConfigChange>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = match txn.open_table(CONFIG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err(e)),
        };
        let mut newest: Vec<ConfigChange> = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            let c: ConfigChange = decode("configuration change", v.value())?;
            // Keys sort by scope, then version: the last row of a scope is its newest.
            match newest.last_mut() {
                Some(last) if last.scope == c.scope => *last = c,
                _ => newest.push(c),
            }
        }
        Ok(newest)
    }

    /// Controller: the stored changes of one scope, newest first.
    pub fn config_history(&self, scope: &str) -> Result<Vec<ConfigChange>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = match txn.open_table(CONFIG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err(e)),
        };
        let mut out = Vec::new();
        for row in t
            .range((scope, 0)..=(scope, u64::MAX))
            .map_err(db_err)?
            .rev()
        {
            let (_, v) = row.map_err(db_err)?;
            out.push(decode("configuration change", v.value())?);
        }
        Ok(out)
    }

    /// Controller: one deployment record.
    pub fn deployment(&self, id: u64) -> Result<Option<DeploymentRecord>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = match txn.open_table(DEPLOYMENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        let v = t.get(id).map_err(db_err)?;
        v.map(|v| DeploymentRecord::decode(v.value()).map_err(|e| corrupt("deployment record", e)))
            .transpose()
    }

    /// Controller: the `limit` newest deployment records, newest first.
    pub fn deployments_newest(&self, limit: usize) -> Result<Vec<DeploymentRecord>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = match txn.open_table(DEPLOYMENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err(e)),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)?.rev().take(limit) {
            let (_, v) = row.map_err(db_err)?;
            out.push(
                DeploymentRecord::decode(v.value()).map_err(|e| corrupt("deployment record", e))?,
            );
        }
        Ok(out)
    }

    /// Controller: the highest deployment id stored (0: none yet).
    pub fn deployment_last_id(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = match txn.open_table(DEPLOYMENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(db_err(e)),
        };
        let last = t.last().map_err(db_err)?;
        Ok(last.map_or(0, |(k, _)| k.value()))
    }

    /// Worker: its record (default when none was stored yet).
    pub fn worker_record(&self) -> Result<WorkerRecord> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let meta = match txn.open_table(crate::store::cluster::META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(WorkerRecord::default()),
            Err(e) => return Err(db_err(e)),
        };
        let v = meta.get(META_WORKER).map_err(db_err)?;
        match v {
            Some(v) => WorkerRecord::decode(v.value()).map_err(|e| corrupt("worker record", e)),
            None => Ok(WorkerRecord::default()),
        }
    }

    /// Worker: replaces its record, durably.
    pub fn put_worker_record(&self, rec: &WorkerRecord) -> Result<()> {
        let txn = self.begin()?;
        {
            let mut meta = txn
                .txn
                .open_table(crate::store::cluster::META)
                .map_err(db_err)?;
            meta.insert(META_WORKER, rec.encode().as_slice())
                .map_err(db_err)?;
        }
        txn.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeId;

    #[test]
    fn worker_record_round_trips_and_channel_trims() {
        let dir =
            std::env::temp_dir().join(format!("outpost-store-cluster-{}", rand::random::<u64>()));
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.worker_record().unwrap(), WorkerRecord::default());
        let rec = WorkerRecord {
            applied: 7,
            ..Default::default()
        };
        store.put_worker_record(&rec).unwrap();
        assert_eq!(store.worker_record().unwrap(), rec);
        let p = |machine: u128, seq| Publication {
            machine: NodeId(machine),
            seq,
            sealed: vec![1, 2, 3],
            signature: vec![0; 64],
        };
        let dirty = Dirty {
            publications: vec![p(1, 1), p(1, 2), p(1, 3), p(2, 1)],
            ..Dirty::default()
        };
        store.controller_commit(&dirty).unwrap();
        let dirty = Dirty {
            acked: vec![(NodeId(1), 2)],
            ..Dirty::default()
        };
        store.controller_commit(&dirty).unwrap();
        let (_, pubs) = store.controller_load().unwrap();
        assert_eq!(pubs, vec![p(1, 3), p(2, 1)]);
        // A removed machine takes its channel with it.
        let dirty = Dirty {
            removed: vec![NodeId(2)],
            ..Dirty::default()
        };
        store.controller_commit(&dirty).unwrap();
        let (_, pubs) = store.controller_load().unwrap();
        assert_eq!(pubs, vec![p(1, 3)]);

        // Deployments: stored whole, replaced by id, listed newest first.
        assert_eq!(store.deployment_last_id().unwrap(), 0);
        assert_eq!(store.deployment(1).unwrap(), None);
        let d = |id: u64, failures: usize| DeploymentRecord {
            id,
            service: "voice".into(),
            bundle_id: "ab".repeat(32),
            version: "1.0".into(),
            created_ms: id * 10,
            targets: vec![(NodeId(1), "w-1".into()), (NodeId(2), "w-2".into())],
            failures: (0..failures)
                .map(|_| (NodeId(2), "sealing failed".into()))
                .collect(),
            // Even ids have a rollout (stored after the record); odd ones are as stored
            // before rollouts existed.
            rollout: if id % 2 == 0 {
                crate::cluster::controller::rollout::Rollout::new(
                    vec![vec![NodeId(1)], vec![NodeId(2)]],
                    &crate::cluster::controller::rollout::RolloutSpec {
                        max_parallel: Some(1),
                        ..Default::default()
                    },
                    id,
                )
            } else {
                Default::default()
            },
        };
        store
            .controller_commit_with(&Dirty::default(), &[d(1, 0), d(2, 0), d(3, 0)])
            .unwrap();
        store
            .controller_commit_with(&Dirty::default(), &[d(2, 1)])
            .unwrap();
        assert_eq!(store.deployment_last_id().unwrap(), 3);
        assert_eq!(store.deployment(2).unwrap(), Some(d(2, 1)));
        assert_eq!(store.deployments_newest(2).unwrap(), vec![d(3, 0), d(2, 1)]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
