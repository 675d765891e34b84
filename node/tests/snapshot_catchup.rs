//! Catch-up behind log retention (issue: "gets a snapshot when it is behind log retention"):
//! with a tiny retention, a datacenter that was down while the others trimmed their logs past
//! what it had acknowledged is sent a snapshot, and everyone converges.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost::datacenter::{self, Running};
use outpost::model::{Event, RawEvent};
use serde_json::json;

fn event(i: usize) -> Event {
    Event::from_raw(RawEvent {
        account: format!("acct-{}", i % 40),
        etype: "setting".into(),
        data: json!({"key": format!("k{}", i % 3), "value": i}),
    })
    .unwrap()
}

async fn digests(nodes: &[&Running]) -> Vec<(String, u64)> {
    nodes
        .iter()
        .map(|r| r.shared.store.digest().unwrap())
        .collect()
}

fn quiet(nodes: &[&Running]) -> bool {
    nodes.iter().all(|r| {
        let tail = *r.shared.tail.borrow();
        let progress = r.shared.store.read().unwrap().peers().unwrap();
        r.shared.peers.active().iter().all(|(_, p)| {
            let info = p.info.lock().unwrap();
            let stored = info
                .node_id
                .and_then(|id| progress.iter().find(|(n, _)| *n == id))
                .map_or(0, |(_, pp)| pp.acked);
            info.connected && {
                drop(info);
                p.lag(tail, stored) == 0
            }
        })
    })
}

async fn wait_converged(nodes: &[&Running]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = digests(nodes).await;
        if quiet(nodes) && d.iter().all(|x| *x == d[0]) {
            return;
        }
        assert!(Instant::now() < deadline, "no convergence: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_retention_catches_up_by_snapshot() {
    let dir = std::env::temp_dir().join(format!("outpost-snap-{}", rand::random::<u64>()));
    let mut configs = outpost::demo::local_configs(&dir, 3).unwrap();
    for c in &mut configs {
        c.limits.log_records_max = 20;
    }
    let a = datacenter::start(configs[0].clone()).await.unwrap();
    let b = datacenter::start(configs[1].clone()).await.unwrap();
    let c = datacenter::start(configs[2].clone()).await.unwrap();
    a.ingest((0..30).map(event).collect()).await.unwrap();
    wait_converged(&[&a, &b, &c]).await;
    c.shutdown().await;

    // Many small commits at a and b, each trimming the logs down to 20 records.
    for round in 0..40 {
        a.ingest((0..5).map(|j| event(1000 + round * 10 + j)).collect())
            .await
            .unwrap();
        b.ingest((0..5).map(|j| event(5000 + round * 10 + j)).collect())
            .await
            .unwrap();
    }
    let first = a.shared.store.read().unwrap();
    use outpost::replication::LogRead;
    assert!(
        first.log_first().unwrap().unwrap() > 100,
        "retention must have trimmed the log"
    );
    drop(first);

    // The stopped node's QUIC socket is released once its endpoint has drained its
    // connections (its peers keep dialling it meanwhile); wait for the port, then restart.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::UdpSocket::bind(configs[2].listen).is_err() {
        assert!(
            Instant::now() < deadline,
            "port {} never freed",
            configs[2].listen
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = datacenter::start(configs[2].clone()).await.unwrap();
    wait_converged(&[&a, &b, &c]).await;
    let snapshots = a.shared.metrics.snapshots_sent.load(Ordering::Relaxed)
        + b.shared.metrics.snapshots_sent.load(Ordering::Relaxed);
    assert!(snapshots >= 1, "c must have been sent a snapshot");
    // c goes on with ordinary replication afterwards.
    a.ingest((0..10).map(|j| event(9000 + j)).collect())
        .await
        .unwrap();
    wait_converged(&[&a, &b, &c]).await;
    for r in [a, b, c] {
        r.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
