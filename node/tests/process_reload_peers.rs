//! SIGHUP applies peer changes (issue 5: "SIGHUP reloads what can change at run time (peers,
//! ...)"): dc-1 starts with dc-2 pinned to the wrong certificate, so the link never comes up
//! (invariant 5: an unknown certificate is refused on both sides). The operator fixes the
//! fingerprint and sends SIGHUP: the pin set is replaced, the link comes up, and what was
//! written meanwhile replicates, without a restart.

use std::path::Path;
use std::time::Duration;

use outpost::testkit::{sample_event, wait_for, Check, Cluster, ClusterSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_corrected_peer_fingerprint() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let mut c = Cluster::start(bin, ClusterSpec::new("reload", &["dc-1", "dc-2"]))
        .await
        .unwrap();
    c.wait_all_ready().await.unwrap();
    let config = c.node(0).config.clone();
    let good = std::fs::read_to_string(&config).unwrap();
    let right = c.node(1).fingerprint.clone();
    let wrong = "ab".repeat(32);
    assert!(good.contains(&right));
    c.stop(0).await.unwrap();
    std::fs::write(&config, good.replace(&right, &wrong)).unwrap();
    c.restart(0).unwrap();
    c.wait_ready(0).await.unwrap();

    // Events at both sides; the link cannot come up with the wrong pin.
    let a = c.api(0).post(&sample_event("acct-a", 1)).await.unwrap();
    let b = c.api(1).post(&sample_event("acct-b", 2)).await.unwrap();
    let s = c.api(0).status().await.unwrap();
    assert!(s.peers.iter().all(|p| !p.connected), "{s:?}");
    assert!(c.api(1).message(&a.message_id).await.unwrap().is_none());

    std::fs::write(&config, &good).unwrap();
    let pid = c.pid(0).expect("dc-1 runs");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());

    let api = c.api(1);
    let id = a.message_id.clone();
    wait_for(
        "dc-1's event reaches dc-2 after the reload",
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
    c.wait_quiet().await.unwrap();
    assert!(c.api(0).message(&b.message_id).await.unwrap().is_some());
    let log = std::fs::read_to_string(&c.node(0).log).unwrap();
    assert!(
        log.contains("peer dc-2: fingerprints"),
        "the reload says what it applied:\n{log}"
    );
    c.finish().await.unwrap();
}
