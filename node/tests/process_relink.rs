//! A clean restart relinks at once (issue 10.8): the side that does not dial shuts down with a
//! reason on every connection, the dialling side logs exactly one INFO line naming that reason
//! (not a WARN, not three lines), and redials so that the link is up again within about a second
//! of the restarted node being ready, instead of waiting out QUIC's handshake retransmissions
//! and idle timeout (11 s and more before).

use std::path::Path;
use std::time::{Duration, Instant};

use outpost::testkit::{Cluster, ClusterSpec};

/// The dialling side's worst case by construction: a dial attempt abandoned after 1 s
/// (`DIAL_TIMEOUT_MIN`), a pause of at most 200 ms, then a fresh handshake on loopback. The
/// assertion leaves room for a loaded 2-core CI machine; the figure is printed.
const RELINK_BOUND: Duration = Duration::from_secs(3);

async fn both_connected(c: &Cluster) -> bool {
    for (i, other) in [(0, 1), (1, 0)] {
        let Ok(s) = c.api(i).status().await else {
            return false;
        };
        let name = &c.node(other).name;
        if !s.peer(name).is_some_and(|p| p.connected) {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_of_the_accepting_side_relinks_at_once_with_one_info_line() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let mut c = Cluster::start(bin, ClusterSpec::new("relink", &["dc-1", "dc-2"]))
        .await
        .unwrap();
    c.wait_quiet().await.unwrap();
    let (dialler, acceptor) = if c.dials(0, 1) { (0, 1) } else { (1, 0) };

    let before = c.log_tail(dialler, 10_000).lines().count();
    c.stop(acceptor).await.unwrap();
    c.restart(acceptor).unwrap();
    c.wait_ready(acceptor).await.unwrap();
    let ready = Instant::now();
    let deadline = ready + Duration::from_secs(60);
    while !both_connected(&c).await {
        assert!(Instant::now() < deadline, "no relink within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relink = ready.elapsed();
    println!("relinked {relink:?} after the restarted node was ready");
    assert!(
        relink < RELINK_BOUND,
        "relinked only {relink:?} after the restarted node was ready"
    );

    let log = c.log_tail(dialler, 10_000);
    let new: Vec<&str> = log.lines().skip(before).collect();
    let down: Vec<&&str> = new.iter().filter(|l| l.contains("link down")).collect();
    assert_eq!(
        down.len(),
        1,
        "one line for the link going down:\n{}",
        new.join("\n")
    );
    assert!(
        down[0].contains("INFO") && down[0].contains(outpost::net::close::SHUTDOWN_REASON),
        "a clean shutdown is INFO with its reason: {}",
        down[0]
    );
    assert!(
        !new.iter().any(|l| l.contains("WARN")),
        "no warning for a clean restart:\n{}",
        new.join("\n")
    );
    c.finish().await.unwrap();
}
