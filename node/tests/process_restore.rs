//! Backup under load, restore, rejoin (design.md: "A node restored from a backup learns from its
//! peers the highest sequence it had originated and catches up its own log before it accepts new
//! events"). Three datacenters; a backup of dc-1 is taken through its API while clients write to
//! it; dc-1 then originates more events (which reach its peers), is stopped and its database is
//! replaced by the backup. Restarted, it refuses events (503) until every peer has given back what
//! it holds of dc-1's log; then it takes events again. Afterwards:
//!
//! - every acknowledged event is known at every datacenter, dc-1 included, with its origin
//!   sequence unchanged: nothing dc-1 originated after the backup is lost;
//! - dc-1 never numbers a new event like an old one: (origin, sequence) pairs are unique;
//! - digests are equal everywhere.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use outpost::testkit::{sample_event, wait_for, Api, Check, Cluster, ClusterSpec};
use serde_json::Value;

const NAMES: [&str; 3] = ["dc-1", "dc-2", "dc-3"];

async fn post_many(api: &Api, prefix: &str, from: u64, n: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for k in from..from + n {
        let ev = sample_event(&format!("{prefix}-{}", k % 11), k);
        ids.push(api.post(&ev).await.expect("acknowledged").message_id);
    }
    ids
}

/// `outpost backup` of node `i` through its API, into the cluster directory.
async fn take_backup(bin: &Path, c: &Cluster, i: usize) -> std::path::PathBuf {
    let node = c.node(i);
    let backup = c.dir().join(format!("{}.backup.redb", node.name));
    let out = tokio::process::Command::new(bin)
        .args(["backup", "--api", &format!("http://{}", node.api_addr)])
        .args(["--token", &node.token, "--out"])
        .arg(&backup)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    backup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_node_recovers_its_own_log_and_converges() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let mut c = Cluster::start(bin, ClusterSpec::new("restore", &NAMES))
        .await
        .unwrap();
    c.wait_all_ready().await.unwrap();
    let mut acked: Vec<String> = Vec::new();
    for i in 0..3 {
        acked.extend(post_many(&c.api(i), &format!("before-{i}"), 0, 60).await);
    }

    // The backup is taken while a client writes to dc-1.
    let writer = {
        let api = c.api(0);
        tokio::spawn(async move { post_many(&api, "during", 0, 150).await })
    };
    let backup = take_backup(bin, &c, 0).await;
    let node = c.node(0).clone();
    acked.extend(writer.await.unwrap());
    // Originated after the backup: the restored database will not have these.
    let after_backup = post_many(&c.api(0), "after", 0, 120).await;
    acked.extend(after_backup.iter().cloned());
    c.wait_quiet().await.unwrap();

    // Restore dc-1 from the backup.
    c.stop(0).await.unwrap();
    std::fs::copy(&backup, node.data_dir.join("outpost.redb")).unwrap();
    c.restart(0).unwrap();
    let api = c.api(0);
    wait_for(
        "dc-1 recovers its own log and takes events again",
        Duration::from_secs(120),
        || {
            let api = api.clone();
            async move {
                match api.get_json::<Value>("/v1/status").await {
                    Ok(s) if s["restoring"] == false && s["ready"] == true => Check::Done(()),
                    Ok(s) => Check::NotYet(format!("restoring: {}", s["restoring"])),
                    Err(e) => Check::NotYet(e.to_string()),
                }
            }
        },
    )
    .await
    .unwrap();
    // It numbers new events after everything it originated before.
    let after_restore = post_many(&c.api(0), "restored", 0, 40).await;
    acked.extend(after_restore.iter().cloned());
    c.wait_quiet().await.unwrap();

    let mut numbering: BTreeMap<(String, u64), String> = BTreeMap::new();
    for id in &acked {
        for (i, name) in NAMES.iter().enumerate() {
            let m = c
                .api(i)
                .message(id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{name} lacks acknowledged {id}"));
            if i == 0 {
                if let Some(other) = numbering.insert((m.origin.clone(), m.oseq), id.clone()) {
                    assert_eq!(&other, id, "origin sequence {} used twice", m.oseq);
                }
            }
        }
    }
    let digests: Vec<_> = futures_digests(&c).await;
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    c.finish().await.unwrap();
}

async fn futures_digests(c: &Cluster) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for i in 0..c.len() {
        let d = c.api(i).digest().await.unwrap();
        out.push((d.digest, d.entries));
    }
    out
}

/// A restored node waits for every configured peer and answers 503 meanwhile; a peer that is
/// gone for good is removed from its config (SIGHUP), and then it proceeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_node_waits_for_its_peers_until_a_dead_one_is_removed() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let mut c = Cluster::start(bin, ClusterSpec::new("restore-wait", &NAMES))
        .await
        .unwrap();
    c.wait_all_ready().await.unwrap();
    post_many(&c.api(0), "before", 0, 20).await;
    let backup = take_backup(bin, &c, 0).await;
    let node = c.node(0).clone();
    c.wait_quiet().await.unwrap();

    // dc-3 goes away for good; dc-1 is restored.
    c.stop(2).await.unwrap();
    c.stop(0).await.unwrap();
    std::fs::copy(&backup, node.data_dir.join("outpost.redb")).unwrap();
    c.restart(0).unwrap();
    let api = c.api(0);
    wait_for(
        "dc-1 has heard dc-2 and waits for dc-3",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                match api.status().await {
                    Ok(s) if s.peers.iter().any(|p| p.name == "dc-2" && p.connected) => {
                        Check::Done(())
                    }
                    other => Check::NotYet(format!("{other:?}")),
                }
            }
        },
    )
    .await
    .unwrap();
    let s: Value = api.get_json("/v1/status").await.unwrap();
    assert_eq!(s["restoring"], true, "{s}");
    let refused = api.post(&sample_event("x", 1)).await;
    assert!(
        format!("{refused:?}").contains("503"),
        "ingest is refused while restoring: {refused:?}"
    );

    // The operator removes dc-3 from dc-1's config.
    let text = std::fs::read_to_string(&node.config).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let mut peers = doc["peers"].as_array().unwrap().clone();
    peers.retain(|p| p["name"].as_str() != Some("dc-3"));
    doc.insert("peers".into(), toml::Value::Array(peers));
    std::fs::write(&node.config, toml::to_string(&doc).unwrap()).unwrap();
    c.sighup(0).unwrap();
    wait_for("dc-1 takes events again", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            match api.post(&sample_event("x", 2)).await {
                Ok(_) => Check::Done(()),
                Err(e) => Check::NotYet(e.to_string()),
            }
        }
    })
    .await
    .unwrap();
    c.finish().await.unwrap();
}
