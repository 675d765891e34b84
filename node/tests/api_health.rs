//! `/healthz` and `/readyz` of a datacenter (issue 10.4), in-process: both answer without a
//! token; `/readyz` is 200 when the node can take events and 503 with the reason when it cannot
//! (here: restored from a backup, waiting for a peer that never answers).

use outpost::config::{Config, PeerConfig};
use outpost::datacenter;
use outpost::wire::Role;
use serde_json::Value;

fn dir(label: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("outpost-{label}-{}", rand::random::<u64>()))
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::with_defaults(Role::Datacenter, "dc", dir);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.api = "127.0.0.1:0".parse().unwrap();
    c
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restoring_datacenter_is_alive_but_not_ready_and_says_why() {
    let (d1, d2, d3) = (dir("health-a"), dir("health-b"), dir("health-peer"));
    outpost::roles::init(&d1, Role::Datacenter, Some("dc")).unwrap();
    let n = datacenter::start(config(&d1)).await.unwrap();
    assert_eq!(get(n.api_addr, "/healthz").await.0, 200);
    let (status, ready) = get(n.api_addr, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["role"], "datacenter");

    // Its backup, restored into another directory, with one peer that never answers.
    std::fs::create_dir_all(&d2).unwrap();
    let backup = d1.join("health-backup.redb");
    n.shared.store.get().unwrap().backup_to(&backup).unwrap();
    std::fs::rename(&backup, d2.join(outpost::store::DB_FILE)).unwrap();
    let peer = outpost::roles::init(&d3, Role::Datacenter, Some("dc-gone")).unwrap();
    let mut c = config(&d2);
    c.peers = vec![PeerConfig {
        name: "dc-gone".into(),
        addr: "127.0.0.1:9".parse().unwrap(),
        fingerprints: vec![peer.fingerprint],
    }];
    let restored = datacenter::start(c).await.unwrap();
    let (status, alive) = get(restored.api_addr, "/healthz").await;
    assert_eq!(status, 200, "{alive}");
    let (status, ready) = get(restored.api_addr, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    let why = ready["error"].as_str().unwrap_or_default();
    assert!(why.contains("restored from a backup"), "{ready}");
    println!("restoring datacenter: /readyz 503 {ready}");
    restored.shutdown().await;
    n.shutdown().await;
    for d in [d1, d2, d3] {
        let _ = std::fs::remove_dir_all(d);
    }
}
