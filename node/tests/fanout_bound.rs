//! A configured fan-out bounds relays in larger meshes (issue: "a configured fan-out bounds this
//! for large meshes"). Four datacenters with `replication.fanout = 1`: each relays a message to at
//! most one peer (its origin still sends to all), so counts away from the origin stay at most 2
//! instead of 3; everything still converges.

use std::time::{Duration, Instant};

use outpost::datacenter::{self, Running};
use outpost::model::{Event, RawEvent};
use serde_json::json;

fn event(i: usize) -> Event {
    Event::from_raw(RawEvent {
        account: format!("acct-{}", i % 13),
        etype: "presence".into(),
        data: json!({"status": format!("s{i}")}),
    })
    .unwrap()
}

fn quiet(nodes: &[Running]) -> bool {
    let digests: Vec<_> = nodes
        .iter()
        .map(|r| r.shared.store.digest().unwrap())
        .collect();
    let links_idle = nodes.iter().all(|r| {
        let tail = *r.shared.tail.borrow();
        r.shared.peers.active().iter().all(|(_, p)| {
            let connected = p.info.lock().unwrap().connected;
            connected && p.lag(tail, 0) == 0
        })
    });
    links_idle && digests.iter().all(|d| *d == digests[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_are_bounded_by_fanout_and_everything_converges() {
    let dir = std::env::temp_dir().join(format!("outpost-fanout-{}", rand::random::<u64>()));
    let mut configs = outpost::demo::local_configs(&dir, 4).unwrap();
    for c in &mut configs {
        c.replication.fanout = 1;
    }
    let mut nodes = Vec::new();
    for c in &configs {
        nodes.push(datacenter::start(c.clone()).await.unwrap());
    }
    let mut ids = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let got = n
            .ingest((0..50).map(|j| event(i * 100 + j)).collect())
            .await;
        ids.extend(got.unwrap().into_iter().map(|a| a.msg_id));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !quiet(&nodes) {
        assert!(Instant::now() < deadline, "no convergence with fanout 1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut counts = std::collections::BTreeMap::new();
    for n in &nodes {
        let r = n.shared.store.read().unwrap();
        for id in &ids {
            let m = r
                .find_message(id)
                .unwrap()
                .expect("every message everywhere");
            if m.origin != n.shared.meta.node_id {
                *counts.entry(m.senders.len()).or_insert(0) += 1;
                assert!(
                    m.senders.contains(&m.origin),
                    "the origin sends to every peer"
                );
            }
        }
    }
    // Origin + at most one relay from each of the two other non-origin nodes would be 3 with
    // full relay; with fan-out 1, each relayer picks one of its 3 peers, so some messages must
    // arrive with fewer than 3 copies.
    assert!(
        counts.keys().all(|&c| (1..=3).contains(&c)) && counts.keys().any(|&c| c < 3),
        "counts by copies: {counts:?}"
    );
    for n in nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
