//! Node runtime (in progress): init and run.
use std::path::Path;

use crate::ids::{Fingerprint, NodeId};
use crate::wire::Role;

pub struct InitInfo {
    pub node_id: NodeId,
    pub fingerprint: Fingerprint,
    /// False when the directory already held a database.
    pub created: bool,
}

pub fn init(_data_dir: &Path, _role: Role, _name: Option<&str>) -> anyhow::Result<InitInfo> {
    anyhow::bail!("not yet")
}

pub fn run(_config: crate::config::Config) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
