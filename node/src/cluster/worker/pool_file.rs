//! What the software of a load balancer or a call router must know about load balancing, as
//! it reads it: a load balancer's backend pool and the call router it serves, or a call
//! router's load balancer. One JSON file,
//! replaced atomically (written beside it, fsynced, renamed over it, the directory fsynced), so
//! a reader sees the old pool or the new one, never a mix, and a crash leaves one of the two.
//! Pure file I/O: it never decides what the pool is (the core does) nor signals anyone.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::cluster::body::{LbEndpoint, Pool, RouterPeer};
use crate::cluster::controller::core::{CALL_ROUTER, LOAD_BALANCER};
use crate::cluster::worker::core::WorkerRecord;

/// The pool file's default name in the data directory.
pub const POOL_FILE: &str = "pool.json";

/// What a load balancer's file holds: the members (the dependents that are up), sorted by name
/// as the controller computed them, and the call router it serves (`null`: none). Dependents
/// that are down are not listed; the relay's list of dependents is the worker's business, not
/// the software's.
///
/// ```json
/// {"load_balancer": "lb-1", "members": [
///   {"name": "mp-1", "node_id": "<32 hex>", "service_addr": "192.0.2.31:5060", "fingerprint": "<64 hex>"}
/// ], "call_router": {"name": "cr-1", "node_id": "<32 hex>", "service_addr": "192.0.2.10:5060", "fingerprint": "<64 hex>"}}
/// ```
pub fn pool_json(load_balancer: &str, pool: &Pool, router: Option<&RouterPeer>) -> Value {
    let members: Vec<Value> = pool
        .members
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "node_id": m.node_id.to_string(),
                "service_addr": m.service_addr,
                "fingerprint": m.fingerprint.to_string(),
            })
        })
        .collect();
    let router = router.map(|r| {
        json!({
            "name": r.name,
            "node_id": r.node_id.to_string(),
            "service_addr": r.service_addr,
            "fingerprint": r.fingerprint.to_string(),
        })
    });
    json!({ "load_balancer": load_balancer, "members": members, "call_router": router })
}

/// What a call router's file holds: the load balancer that takes its jobs (`null`: none is
/// admitted under the name it gives, or it serves another router), and whether it is up.
///
/// ```json
/// {"call_router": "cr-1", "load_balancer": {"name": "lb-1", "node_id": "<32 hex>",
///   "service_addr": "192.0.2.20:5060", "relay_addr": "192.0.2.20:7400", "fingerprint": "<64 hex>", "up": true}}
/// ```
pub fn router_json(router: &str, endpoint: Option<&LbEndpoint>) -> Value {
    json!({ "call_router": router, "load_balancer": endpoint.map(endpoint_json) })
}

/// A call router's load balancer as JSON (its pool file, the worker's status and the
/// controller's machine view show the same).
pub fn endpoint_json(e: &LbEndpoint) -> Value {
    json!({
        "name": e.name,
        "node_id": e.node_id.to_string(),
        "service_addr": e.service_addr,
        "relay_addr": e.relay_addr,
        "fingerprint": e.fingerprint.to_string(),
        "up": e.up,
    })
}

/// The file a worker named `name` of `component` writes from its record; `None`: it writes
/// none (neither a load balancer with a pool yet nor a call router).
pub fn document(name: &str, component: &str, rec: &WorkerRecord) -> Option<Value> {
    match component {
        LOAD_BALANCER => rec
            .pool
            .as_ref()
            .map(|p| pool_json(name, p, rec.coupling.router.as_ref())),
        CALL_ROUTER => Some(router_json(name, rec.coupling.endpoint.as_ref())),
        _ => None,
    }
}

/// Writes `bytes` to `path` atomically and durably. On any error the previous file (if any) is
/// untouched and no temporary file is left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        // Owner-only like everything a node writes (the software reading it is the worker's child).
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(crate::fsmode::PRIVATE_FILE_MODE)
                .open(&tmp)?
        };
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable only once the directory entry is.
    fs::File::open(&dir)?.sync_all()
}

/// Writes the pool file holding `doc` ([`document`]).
pub fn write_doc(path: &Path, doc: &Value) -> io::Result<()> {
    let mut text = serde_json::to_string_pretty(doc).map_err(io::Error::other)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes a load balancer's pool file for `pool` (serving no router).
pub fn write_pool(path: &Path, load_balancer: &str, pool: &Pool) -> io::Result<()> {
    write_doc(path, &pool_json(load_balancer, pool, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::body::{Dependent, PoolMember};
    use crate::ids::{Fingerprint, NodeId};

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "outpost-pool-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    fn pool(names: &[&str]) -> Pool {
        Pool {
            members: names
                .iter()
                .enumerate()
                .map(|(i, n)| PoolMember {
                    name: n.to_string(),
                    node_id: NodeId(i as u128 + 1),
                    service_addr: Some(format!("127.0.0.1:{}", 5060 + i)),
                    fingerprint: Fingerprint([i as u8; 32]),
                })
                .collect(),
            dependents: vec![Dependent {
                name: "down-one".into(),
                node_id: NodeId(99),
                fingerprint: Fingerprint([9; 32]),
            }],
        }
    }

    #[test]
    fn pool_file_is_replaced_whole_and_leaves_no_temporary() {
        let dir = temp_dir("replace");
        let path = dir.join("sub").join("pool.json");
        write_pool(&path, "lb-1", &pool(&["mp-1", "mp-2"])).unwrap();
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["load_balancer"], "lb-1");
        let names: Vec<&str> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["mp-1", "mp-2"]);
        assert_eq!(v["members"][1]["service_addr"], "127.0.0.1:5061");
        assert_eq!(v["members"][0]["fingerprint"], "00".repeat(32));
        // Dependents that are not members never reach the software.
        assert!(!String::from_utf8(fs::read(&path).unwrap())
            .unwrap()
            .contains("down-one"));

        write_pool(&path, "lb-1", &pool(&[])).unwrap();
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["members"], json!([]));
        assert!(leftovers(&dir.join("sub")).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pool_file_failed_write_keeps_the_old_file() {
        let dir = temp_dir("fail");
        let path = dir.join("pool.json");
        write_pool(&path, "lb-1", &pool(&["mp-1"])).unwrap();
        let before = fs::read(&path).unwrap();
        // Renaming a file over a non-empty directory fails after the temporary is written.
        let blocked = dir.join("blocked");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_pool(&blocked, "lb-1", &pool(&["mp-2"])).is_err());
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
        assert_eq!(fs::read(&path).unwrap(), before);
        assert!(write_atomic(Path::new("/"), b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
