//! The cluster roles' tables, beside the datacenter's in the same file (a database holds one
//! role, so only one set is ever written). Defined here, where the backup copies them; what the
//! records mean, and reading and writing them, is `crate::cluster::store`.
//!
//! ```text
//! table       key                     value
//! ──────────  ──────────────────────  ─────────────────────────────────────────────────
//! machines    u128 node id            controller: MachineRecord (postcard)
//! channel     (u128 node id, u64 seq) controller: a stored, unacknowledged Publication
//! deployments u64 deployment id          controller: DeploymentRecord (postcard)
//! config      (&str scope, u64 version)  controller: ConfigChange (postcard), the newest
//!                                     `configdata::HISTORY_KEPT` of each scope
//! meta        &str "worker"           worker: WorkerRecord (postcard)
//! ```

use redb::TableDefinition;

/// The node's meta table (the worker keeps its record under `"worker"`).
pub(crate) use super::tables::META;

pub(crate) const MACHINES: TableDefinition<u128, &[u8]> = TableDefinition::new("machines");
pub(crate) const CHANNEL: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("channel");
pub(crate) const DEPLOYMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("deployments");
pub(crate) const CONFIG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("config");
