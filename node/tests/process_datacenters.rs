//! Invariant 1 (durable ack) and 2 (convergence) with real processes, across a kill -9.
//!
//! Three datacenters; clients submit events at every one of them at once (singles and batches,
//! accounts of their own and accounts shared by all three datacenters, all five event types).
//! Mid-stream one datacenter is killed with SIGKILL; only the requests answered 200 count as
//! acknowledged. While it is down the others keep acknowledging; then it is restarted and takes
//! more events. Once nothing is in flight:
//!
//! - every acknowledged message is known at every datacenter, with the right origin;
//! - its count is 0 at the origin and exactly 2 (n-1) elsewhere, from the two other datacenters:
//!   every datacenter streams its whole log (first copies included) to every peer, with durable
//!   acknowledgements, so the kill delays copies but loses none and counts none twice;
//! - no origin sequence number was issued twice (the killed node resumed after what it had
//!   committed), and the killed node numbered its post-restart events after its earlier ones;
//! - digests, entry counts and log lengths are equal everywhere;
//! - the datacenters that were not killed refused nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use outpost::testkit::{sample_event, wait_for, Api, Check, Cluster, ClusterSpec, Event};
use tokio::sync::watch;

const NAMES: [&str; 3] = ["dc-1", "dc-2", "dc-3"];
const VICTIM: usize = 1;
const SUBMITTERS_PER_NODE: usize = 2;
/// Every submitter runs at least this many requests (then until told to stop).
const OPS_MIN: u64 = 150;
/// And never more than this (a guard against a run that never gets told to stop).
const OPS_MAX: u64 = 1000;
/// Every fourth request is a batch of this many events.
const BATCH: u64 = 10;
/// The victim is killed once it has acknowledged this many events.
const KILL_AFTER_ACKED: u64 = 400;
/// While it is down, the others acknowledge at least this many more events.
const ACKED_WHILE_DOWN: u64 = 200;
/// After its restart, the victim acknowledges at least this many events before clients stop.
const ACKED_AFTER_RESTART: u64 = 100;
/// One acknowledged message in this many is also looked up by its id alone.
const SCAN_EVERY: usize = 16;

#[derive(Clone, Debug)]
struct Acked {
    id: String,
    origin: usize,
    /// The origin sequence its acknowledgement named: with the origin's node id, where it is stored.
    oseq: u64,
    /// At the victim: answered by the process started after the kill (`Some(true)`), by the
    /// killed one (`Some(false)`), or not known for sure (sent before, answered after the kill
    /// was decided).
    restarted: Option<bool>,
}

#[derive(Default)]
struct Shared {
    acked: Mutex<Vec<Acked>>,
    /// Events acknowledged per node.
    counts: [AtomicU64; 3],
    /// Events acknowledged by the victim's restarted process.
    after_restart: AtomicU64,
    /// 0 until the kill is decided, 1 until the restart, 2 after it.
    generation: AtomicU64,
    /// Failed requests per node: (request number, error).
    failures: Mutex<BTreeMap<usize, Vec<String>>>,
    stop: AtomicBool,
}

/// One client of node `node`: requests until told to stop (and at least `OPS_MIN`). On a failed
/// request at the victim it waits for the restart, then goes on with its next request (the failed
/// one is not acknowledged, so not expected anywhere).
async fn submitter(
    api: Api,
    node: usize,
    k: usize,
    shared: Arc<Shared>,
    mut restarted: watch::Receiver<bool>,
) {
    let mut n = 0u64;
    for op in 0..OPS_MAX {
        if op >= OPS_MIN && shared.stop.load(Ordering::SeqCst) {
            break;
        }
        // Half the events go to accounts of this client, half to accounts every node writes.
        let account = |n: u64| {
            if n % 2 == 0 {
                format!("n{node}-c{k}-acct{}", n % 7)
            } else {
                format!("shared-{}", n % 11)
            }
        };
        let sent_gen = shared.generation.load(Ordering::SeqCst);
        let result = if op % 4 == 3 {
            let batch: Vec<Event> = (0..BATCH)
                .map(|j| sample_event(&account(n + j), n + j))
                .collect();
            n += BATCH;
            api.post_batch(&batch).await
        } else {
            let ev = sample_event(&account(n), n);
            n += 1;
            api.post(&ev).await.map(|a| vec![a])
        };
        match result {
            Ok(acks) => {
                let done_gen = shared.generation.load(Ordering::SeqCst);
                let which = match (sent_gen, done_gen) {
                    (0, 0) => Some(false),
                    (2, _) => Some(true),
                    _ => None,
                };
                let len = acks.len() as u64;
                shared
                    .acked
                    .lock()
                    .unwrap()
                    .extend(acks.into_iter().map(|a| Acked {
                        id: a.message_id,
                        origin: node,
                        oseq: a.oseq,
                        restarted: which,
                    }));
                shared.counts[node].fetch_add(len, Ordering::SeqCst);
                if node == VICTIM && which == Some(true) {
                    shared.after_restart.fetch_add(len, Ordering::SeqCst);
                }
            }
            Err(e) => {
                shared
                    .failures
                    .lock()
                    .unwrap()
                    .entry(node)
                    .or_default()
                    .push(format!("client {k} request {op}: {e}"));
                if node == VICTIM {
                    let _ = restarted.wait_for(|r| *r).await;
                }
            }
        }
    }
}

/// Waits until `f` (an observation of the shared counters) is true.
async fn wait_counter(cluster: &Cluster, shared: &Shared, what: &str, f: impl Fn(&Shared) -> bool) {
    wait_for(what, cluster.timeout, || async {
        if let Err(e) = cluster.check_alive() {
            return Check::Failed(e.to_string());
        }
        if f(shared) {
            Check::Done(())
        } else {
            let counts: Vec<u64> = shared
                .counts
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .collect();
            Check::NotYet(format!(
                "acknowledged per node {counts:?}, after restart {}, failures {:?}",
                shared.after_restart.load(Ordering::SeqCst),
                shared
                    .failures
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (NAMES[*k], v.len()))
                    .collect::<Vec<_>>()
            ))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill9_and_converge() {
    let started = Instant::now();
    let spec = ClusterSpec::new("datacenters", &NAMES);
    let mut cluster = Cluster::start(Path::new(env!("CARGO_BIN_EXE_outpost")), spec)
        .await
        .expect("cluster starts");
    cluster.wait_all_ready().await.expect("all ready");
    cluster
        .wait_quiet()
        .await
        .expect("all connected before the load");

    let shared = Arc::new(Shared::default());
    let (restarted_tx, restarted_rx) = watch::channel(false);
    let mut clients = tokio::task::JoinSet::new();
    for node in 0..NAMES.len() {
        for k in 0..SUBMITTERS_PER_NODE {
            clients.spawn(submitter(
                cluster.api(node),
                node,
                k,
                shared.clone(),
                restarted_rx.clone(),
            ));
        }
    }

    // Kill the victim mid-stream.
    wait_counter(&cluster, &shared, "the victim to acknowledge enough", |s| {
        s.counts[VICTIM].load(Ordering::SeqCst) >= KILL_AFTER_ACKED
    })
    .await;
    shared.generation.store(1, Ordering::SeqCst);
    cluster.kill9(VICTIM).expect("SIGKILL");
    let others = |s: &Shared| -> u64 {
        (0..NAMES.len())
            .filter(|&i| i != VICTIM)
            .map(|i| s.counts[i].load(Ordering::SeqCst))
            .sum()
    };
    let at_kill = others(&shared);
    let victim_at_kill = shared.counts[VICTIM].load(Ordering::SeqCst);

    // The others keep acknowledging while it is down.
    wait_counter(
        &cluster,
        &shared,
        "the others to go on without the victim",
        |s| others(s) >= at_kill + ACKED_WHILE_DOWN,
    )
    .await;
    shared.generation.store(2, Ordering::SeqCst);
    cluster.restart(VICTIM).expect("restart");
    cluster
        .wait_ready(VICTIM)
        .await
        .expect("victim ready again");
    restarted_tx.send_replace(true);
    wait_counter(&cluster, &shared, "the victim to take events again", |s| {
        s.after_restart.load(Ordering::SeqCst) >= ACKED_AFTER_RESTART
    })
    .await;
    shared.stop.store(true, Ordering::SeqCst);
    while let Some(r) = clients.join_next().await {
        r.expect("a client task panicked");
    }
    let load_done = started.elapsed();

    let statuses = cluster.wait_quiet().await.expect("quiet after the load");
    let quiet_at = started.elapsed();

    let acked = shared.acked.lock().unwrap().clone();
    let failures = shared.failures.lock().unwrap().clone();
    eprintln!(
        "acknowledged {} events ({:?} per node; victim: {victim_at_kill} before the kill, {} after \
         the restart); failed requests per node: {:?}; load done at {load_done:?}, quiet at \
         {quiet_at:?}",
        acked.len(),
        shared
            .counts
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect::<Vec<_>>(),
        shared.after_restart.load(Ordering::SeqCst),
        failures
            .iter()
            .map(|(k, v)| (NAMES[*k], v.len()))
            .collect::<Vec<_>>(),
    );

    // Nobody but the victim refused anything.
    for (node, errors) in &failures {
        assert_eq!(
            *node,
            VICTIM,
            "{} failed {} requests, e.g. {:?}",
            NAMES[*node],
            errors.len(),
            &errors[..errors.len().min(5)]
        );
    }
    let ids: BTreeSet<&str> = acked.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids.len(), acked.len(), "a message id acknowledged twice");

    // Convergence.
    for s in &statuses {
        assert_eq!(s.digest, statuses[0].digest, "{} digest", s.name);
        assert_eq!(s.entries, statuses[0].entries, "{} entries", s.name);
        assert_eq!(s.log_tail, statuses[0].log_tail, "{}: log length", s.name);
        assert!(
            s.log_tail >= acked.len() as u64,
            "{}: log of {} < {} acknowledged",
            s.name,
            s.log_tail,
            acked.len()
        );
    }
    let digests: Vec<_> = {
        let mut v = Vec::new();
        for i in 0..NAMES.len() {
            v.push(cluster.api(i).digest().await.expect("digest"));
        }
        v
    };
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    assert_eq!(digests[0].entries, statuses[0].entries);

    // Every acknowledged message at every node, counted exactly.
    let mut lookups = tokio::task::JoinSet::new();
    for (at, &at_name) in NAMES.iter().enumerate() {
        let api = cluster.api(at);
        let acked = acked.clone();
        let node_ids: Vec<String> = (0..NAMES.len())
            .map(|i| cluster.node(i).node_id.clone())
            .collect();
        lookups.spawn(async move {
            let mut problems = Vec::new();
            let mut oseqs: BTreeMap<(usize, Option<bool>), Vec<u64>> = BTreeMap::new();
            for (k, a) in acked.iter().enumerate() {
                let found = api.message_at(&a.id, &node_ids[a.origin], a.oseq).await;
                // A sample is also found by its id alone (a scan of the log): the same answer.
                if k % SCAN_EVERY == 0 {
                    let scanned = api.message(&a.id).await;
                    if let (Ok(x), Ok(y)) = (&found, &scanned) {
                        if x != y {
                            problems.push(format!(
                                "{} at {at_name}: by locator {x:?}, by id {y:?}",
                                a.id
                            ));
                        }
                    }
                }
                let m = match found {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        problems.push(format!(
                            "acknowledged by {} but unknown at {}: {}",
                            NAMES[a.origin], at_name, a.id
                        ));
                        continue;
                    }
                    Err(e) => {
                        problems.push(format!("GET {} at {}: {e}", a.id, at_name));
                        continue;
                    }
                };
                if m.origin != node_ids[a.origin] {
                    problems.push(format!(
                        "{} at {}: origin {} expected {}",
                        a.id, at_name, m.origin, node_ids[a.origin]
                    ));
                }
                let want: BTreeSet<&str> = if a.origin == at {
                    BTreeSet::new()
                } else {
                    (0..NAMES.len())
                        .filter(|&k| k != at)
                        .map(|k| NAMES[k])
                        .collect()
                };
                let got: BTreeSet<&str> = m.copies_from.iter().map(String::as_str).collect();
                if m.message_count != want.len() as u64 || got != want {
                    problems.push(format!(
                        "from {} at {}: count {} from {got:?}, expected {} from {want:?} ({})",
                        NAMES[a.origin],
                        at_name,
                        m.message_count,
                        want.len(),
                        a.id
                    ));
                }
                if at == a.origin {
                    oseqs
                        .entry((a.origin, a.restarted))
                        .or_default()
                        .push(m.oseq);
                }
            }
            (at, problems, oseqs)
        });
    }
    let mut problems = Vec::new();
    let mut oseqs: BTreeMap<(usize, Option<bool>), Vec<u64>> = BTreeMap::new();
    while let Some(r) = lookups.join_next().await {
        let (_, p, o) = r.expect("lookup task");
        problems.extend(p);
        oseqs.extend(o);
    }
    assert!(
        problems.is_empty(),
        "{} problems, first ones:\n{}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n")
    );

    // Origin sequences: never issued twice, and the victim went on after what it had committed.
    for (origin, origin_name) in NAMES.iter().enumerate() {
        let mut all: Vec<u64> = [None, Some(false), Some(true)]
            .iter()
            .flat_map(|r| oseqs.get(&(origin, *r)).cloned().unwrap_or_default())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            all.len(),
            n,
            "{}: an origin sequence issued twice",
            origin_name
        );
    }
    let before = oseqs
        .get(&(VICTIM, Some(false)))
        .expect("victim acked before");
    let after = oseqs
        .get(&(VICTIM, Some(true)))
        .expect("victim acked after");
    assert!(
        after.iter().min() > before.iter().max(),
        "victim numbered post-restart events from {:?}, pre-kill up to {:?}",
        after.iter().min(),
        before.iter().max()
    );

    cluster.finish().await.expect("clean shutdown");
    eprintln!("total {:?}", started.elapsed());
}
