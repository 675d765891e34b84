//! `outpost bundle pack DIR -o FILE`: packs a bundle directory and says what it made.

use std::path::Path;

use anyhow::Context;

use crate::bundle;

/// Packs `dir` into `out`; prints the bundle id, the service, the version and the size.
pub fn pack_command(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let info = bundle::pack(dir, out)
        .with_context(|| format!("packing {} into {}", dir.display(), out.display()))?;
    println!("bundle-id: {}", info.bundle_id);
    println!("service: {}", info.manifest.service);
    println!("version: {}", info.manifest.version);
    println!("bytes: {}", info.bytes);
    Ok(())
}
