//! SIGHUP applies peer changes (issue 5: "SIGHUP reloads what can change at run time (peers,
//! ...)"). dc-1 starts with dc-2 pinned to the wrong certificate and without dc-3, so neither
//! link comes up (invariant 5: an unknown certificate is refused on both sides). The operator
//! fixes the fingerprint, adds dc-3 and sends SIGHUP: the pin set is replaced, both links come
//! up and what was written meanwhile replicates, without a restart. Then dc-3 is removed again:
//! dc-1 drops it from its peers.

use std::path::Path;
use std::time::Duration;

use outpost::testkit::{sample_event, wait_for, Check, Cluster, ClusterSpec};

/// dc-1's config with its peers filtered and edited by `f`.
fn edit_peers(text: &str, f: impl Fn(&mut Vec<toml::Value>)) -> String {
    let mut doc: toml::Table = text.parse().unwrap();
    let mut peers = doc["peers"].as_array().unwrap().clone();
    f(&mut peers);
    doc.insert("peers".into(), toml::Value::Array(peers));
    toml::to_string(&doc).unwrap()
}

fn named(p: &toml::Value, name: &str) -> bool {
    p["name"].as_str() == Some(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_peer_fingerprints_additions_and_removals() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let mut c = Cluster::start(bin, ClusterSpec::new("reload", &["dc-1", "dc-2", "dc-3"]))
        .await
        .unwrap();
    c.wait_all_ready().await.unwrap();
    let config = c.node(0).config.clone();
    let good = std::fs::read_to_string(&config).unwrap();
    let wrong = "ab".repeat(32);
    let broken = edit_peers(&good, |peers| {
        peers.retain(|p| !named(p, "dc-3"));
        for p in peers.iter_mut() {
            p.as_table_mut()
                .unwrap()
                .insert("fingerprint".into(), toml::Value::String(wrong.clone()));
        }
    });
    c.stop(0).await.unwrap();
    std::fs::write(&config, &broken).unwrap();
    c.restart(0).unwrap();
    c.wait_ready(0).await.unwrap();

    let a = c.api(0).post(&sample_event("acct-a", 1)).await.unwrap();
    let b = c.api(1).post(&sample_event("acct-b", 2)).await.unwrap();
    let s = c.api(0).status().await.unwrap();
    assert_eq!(s.peers.len(), 1, "{s:?}");
    assert!(s.peers.iter().all(|p| !p.connected), "{s:?}");

    std::fs::write(&config, &good).unwrap();
    c.sighup(0).unwrap();
    for i in [1, 2] {
        let api = c.api(i);
        let id = a.message_id.clone();
        wait_for(
            "dc-1's event reaches its peers after the reload",
            Duration::from_secs(60),
            || {
                let api = api.clone();
                let id = id.clone();
                async move {
                    match api.message(&id).await {
                        Ok(Some(_)) => Check::Done(()),
                        other => Check::NotYet(format!("{other:?}")),
                    }
                }
            },
        )
        .await
        .unwrap();
    }
    c.wait_quiet().await.unwrap();
    assert!(c.api(0).message(&b.message_id).await.unwrap().is_some());
    let log = std::fs::read_to_string(&c.node(0).log).unwrap();
    assert!(log.contains("peer dc-2: fingerprints"), "{log}");
    assert!(log.contains("peer dc-3 added"), "{log}");

    // Removing dc-3 again: dc-1 lists only dc-2.
    std::fs::write(
        &config,
        edit_peers(&good, |p| p.retain(|p| !named(p, "dc-3"))),
    )
    .unwrap();
    c.sighup(0).unwrap();
    let api = c.api(0);
    wait_for("dc-1 drops dc-3", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            match api.status().await {
                Ok(s) if s.peers.len() == 1 && s.peers[0].name == "dc-2" => Check::Done(()),
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    c.finish().await.unwrap();
}
