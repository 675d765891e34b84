//! Invariant 4 (counted once per sender) across a cut link, with real processes over QUIC.
//!
//! Three datacenters A, B, C; the A-B link runs through a fault proxy that drops everything from
//! the start. Every datacenter relays the first copy of a message to every peer but its origin
//! (its local log is streamed to each peer, leaving out that peer's own records), so with A-B cut:
//!
//! | origin | at A        | at B        | at C        |
//! |--------|-------------|-------------|-------------|
//! | A      | 0           | 1: C        | 2: A, B     |
//! | B      | 1: C        | 0           | 2: B, A     |
//! | C      | 1: C        | 1: C        | 0           |
//!
//! (A's message reaches C, C relays it to B, B relays it back to C; C's message reaches A and B,
//! whose relays to each other are cut.) When the link heals, A and B stream their logs to each
//! other: each copy comes from a peer not counted before, so every message ends with the count
//! n-1 = 2 at every non-origin datacenter. A further round through a lossy link ends the same way.

use std::collections::BTreeSet;
use std::path::Path;

use outpost::testkit::{sample_event, wait_for, Api, Check, Cluster, ClusterSpec, Event, Mode};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const NAMES: [&str; 3] = ["dc-a", "dc-b", "dc-c"];

/// A message acknowledged by its origin.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    origin: usize,
}

/// Submits `singles` single events and `batches` batches of 5 at `node`, across five accounts
/// and all five event types; every one must be acknowledged.
async fn submit(api: &Api, node: usize, tag: &str, singles: u64, batches: u64) -> Vec<Sent> {
    let account = |n: u64| format!("{tag}-acct-{}", n % 5);
    let mut sent = Vec::new();
    let mut n = 0u64;
    for i in 0..singles.max(batches) {
        if i < singles {
            let ev = sample_event(&account(n), n);
            n += 1;
            let ack = api
                .post(&ev)
                .await
                .unwrap_or_else(|e| panic!("{} refused {ev:?}: {e}", NAMES[node]));
            sent.push(Sent {
                id: ack.message_id,
                origin: node,
            });
        }
        if i < batches {
            let batch: Vec<Event> = (0..5)
                .map(|k| sample_event(&account(n + k), n + k))
                .collect();
            n += 5;
            let acks = api
                .post_batch(&batch)
                .await
                .unwrap_or_else(|e| panic!("{} refused a batch: {e}", NAMES[node]));
            sent.extend(acks.into_iter().map(|a| Sent {
                id: a.message_id,
                origin: node,
            }));
        }
    }
    sent
}

/// The peers from which a copy of a message from `origin` must have arrived at `at`.
type Expect = fn(origin: usize, at: usize) -> BTreeSet<&'static str>;

/// While A-B is cut (see the table at the top).
fn expected_cut(origin: usize, at: usize) -> BTreeSet<&'static str> {
    let names: &[&str] = match (origin, at) {
        (o, a) if o == a => &[],
        (A, B) | (B, A) | (C, _) => &["dc-c"],
        (A, C) | (B, C) => &["dc-a", "dc-b"],
        _ => unreachable!(),
    };
    names.iter().copied().collect()
}

/// Every link up (or healed): a copy from each of the other two.
fn expected_full(origin: usize, at: usize) -> BTreeSet<&'static str> {
    if origin == at {
        return BTreeSet::new();
    }
    (0..3).filter(|&k| k != at).map(|k| NAMES[k]).collect()
}

/// Checks every message at every node: known, origin right, count and senders as `expect` says.
/// Returns the problems found (empty: all as expected).
async fn count_problems(cluster: &Cluster, sent: &[Sent], expect: Expect) -> Vec<String> {
    let mut problems = Vec::new();
    for (at, at_name) in NAMES.iter().enumerate() {
        let api = cluster.api(at);
        for s in sent {
            let want = expect(s.origin, at);
            match api.message(&s.id).await {
                Ok(Some(m)) => {
                    let got: BTreeSet<&str> = m.copies_from.iter().map(String::as_str).collect();
                    if m.origin != cluster.node(s.origin).node_id {
                        problems.push(format!(
                            "{} at {}: origin {} (expected {})",
                            s.id,
                            at_name,
                            m.origin,
                            cluster.node(s.origin).node_id
                        ));
                    }
                    if m.message_count != want.len() as u64 || got != want {
                        problems.push(format!(
                            "message from {} at {}: count {} from {:?}, expected {} from {:?} ({})",
                            NAMES[s.origin],
                            at_name,
                            m.message_count,
                            got,
                            want.len(),
                            want,
                            s.id
                        ));
                    }
                }
                Ok(None) => problems.push(format!(
                    "message from {} unknown at {} ({})",
                    NAMES[s.origin], at_name, s.id
                )),
                Err(e) => problems.push(format!("GET message at {}: {e}", at_name)),
            }
        }
    }
    problems
}

fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problems, first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counted_once_per_sender_across_a_cut_link() {
    let spec = ClusterSpec::new("cut-link", &NAMES).fault(A, B, Mode::Drop);
    let cluster = Cluster::start(Path::new(env!("CARGO_BIN_EXE_outpost")), spec)
        .await
        .expect("cluster starts");
    cluster.wait_all_ready().await.expect("all ready");

    // Phase 1: A-B cut from the start.
    let mut sent = submit(&cluster.api(A), A, "a", 40, 16).await; // 120 messages
    sent.extend(submit(&cluster.api(B), B, "b", 20, 4).await); // 40
    sent.extend(submit(&cluster.api(C), C, "c", 20, 4).await); // 40
    let total = sent.len() as u64;

    // B learns A's messages only through C.
    let b = cluster.api(B);
    let from_a: Vec<&Sent> = sent.iter().filter(|s| s.origin == A).collect();
    wait_for("B to know every message from A", cluster.timeout, || {
        let (b, from_a) = (&b, &from_a);
        async move {
            for s in from_a {
                match b.message(&s.id).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Check::NotYet(format!("{} not yet at B", s.id)),
                    Err(e) => return Check::NotYet(e.to_string()),
                }
            }
            Check::Done(())
        }
    })
    .await
    .expect("relay through C");
    let statuses = cluster
        .wait_settled(&[(A, B)])
        .await
        .expect("settled around the cut link");

    let stats = cluster.link(A, B).stats();
    assert_eq!(
        stats.forwarded, 0,
        "the cut link forwarded datagrams: {stats:?}"
    );
    assert!(stats.dropped > 0, "nobody tried the cut link: {stats:?}");
    for s in &statuses {
        assert_eq!(s.log_tail, total, "{}: every message logged once", s.name);
    }
    for (me, other) in [(A, B), (B, A)] {
        let p = statuses[me].peer(NAMES[other]).expect("peer listed");
        assert!(
            !p.connected,
            "{} -> {} connected across the cut",
            NAMES[me], NAMES[other]
        );
        assert_eq!(p.acked, 0, "{} -> {}: {p:?}", NAMES[me], NAMES[other]);
        assert_eq!(p.lag, total, "{} -> {}: {p:?}", NAMES[me], NAMES[other]);
    }
    assert_no_problems(
        "counts with A-B cut",
        &count_problems(&cluster, &sent, expected_cut).await,
    );

    // Phase 2: heal. A and B exchange their logs; every copy is from a peer not counted yet.
    cluster.link(A, B).set(Mode::Pass);
    let statuses = cluster.wait_quiet().await.expect("quiet after healing A-B");
    for s in &statuses {
        assert_eq!(s.log_tail, total, "{}: healing logged nothing new", s.name);
    }
    assert_no_problems(
        "counts after healing A-B",
        &count_problems(&cluster, &sent, expected_full).await,
    );

    // Phase 3: more messages at every node through a lossy A-B link (QUIC retransmits).
    cluster.link(A, B).set(Mode::Lossy(100));
    let before = cluster.link(A, B).stats();
    let mut more = submit(&cluster.api(A), A, "a", 20, 4).await;
    more.extend(submit(&cluster.api(B), B, "b", 20, 4).await);
    more.extend(submit(&cluster.api(C), C, "c", 10, 2).await);
    let statuses = cluster.wait_quiet().await.expect("quiet over a lossy link");
    let after = cluster.link(A, B).stats();
    assert!(
        after.dropped > before.dropped && after.forwarded > before.forwarded,
        "the lossy link carried and lost: {before:?} -> {after:?}"
    );
    sent.extend(more);
    for s in &statuses {
        assert_eq!(s.log_tail, sent.len() as u64, "{}", s.name);
    }
    assert_no_problems(
        "counts after the lossy round",
        &count_problems(&cluster, &sent, expected_full).await,
    );

    cluster.link(A, B).set(Mode::Pass);
    cluster.finish().await.expect("clean shutdown");
}
