//! The demo (in progress).
pub struct DemoOpts {
    pub datacenters: usize,
    pub workers: usize,
    pub events: usize,
}

/// Returns whether everything converged.
pub fn run(_opts: DemoOpts) -> anyhow::Result<bool> {
    anyhow::bail!("not yet")
}
