//! `GET /v1/watch` on real datacenter processes (issue 13.4): every change a datacenter
//! applies, its own and its peers', streamed in order with a cursor; a client that reconnects
//! with its last cursor misses nothing and sees nothing twice; a cursor the node cannot serve
//! is told to re-read (reset); bad queries are 400 with the field named; a client that stops
//! reading is cut off with the reason as its stream's last line.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use outpost::testkit::{sample_event, wait_for, Api, Check, Cluster, ClusterSpec, Event, NodeInfo};
use serde_json::Value;

const A: usize = 0;
const B: usize = 1;
const WAIT: Duration = Duration::from_secs(30);

/// A watch stream read line by line.
struct Watch {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

async fn open(node: &NodeInfo, query: &str, headers: &[(&str, &str)]) -> (u16, Watch) {
    let mut r = reqwest::Client::new()
        .get(format!("http://{}/v1/watch{query}", node.api_addr))
        .bearer_auth(&node.token);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    (
        resp.status().as_u16(),
        Watch {
            resp,
            buf: Vec::new(),
        },
    )
}

impl Watch {
    /// The next line, or None at the end of the stream.
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8(line).unwrap().trim_end().to_owned());
            }
            let chunk = tokio::time::timeout(WAIT, self.resp.chunk())
                .await
                .expect("a line within the deadline")
                .unwrap();
            match chunk {
                Some(c) => self.buf.extend_from_slice(&c),
                // A JSON error answer is one line without a newline.
                None if !self.buf.is_empty() => {
                    let rest = std::mem::take(&mut self.buf);
                    return Some(String::from_utf8(rest).unwrap());
                }
                None => return None,
            }
        }
    }

    async fn json(&mut self) -> Value {
        let line = self.next_line().await.expect("the stream goes on");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    /// The next `n` change lines (heartbeats skipped).
    async fn changes(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let v = self.json().await;
            if v.get("heartbeat").is_some() {
                continue;
            }
            assert!(v.get("account").is_some(), "not a change: {v}");
            out.push(v);
        }
        out
    }
}

fn lseq(v: &Value) -> u64 {
    let c = v["cursor"].as_str().unwrap();
    c.split_once('-').unwrap().1.parse().unwrap()
}

fn ids(lines: &[Value]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|v| v["message_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn post(api: &Api, account: &str, from: u64, n: u64) -> BTreeSet<String> {
    let events: Vec<Event> = (from..from + n).map(|i| sample_event(account, i)).collect();
    let acks = api.post_batch(&events).await.unwrap();
    acks.into_iter().map(|a| a.message_id).collect()
}

/// Invariants: the feed carries every change a datacenter applies (its own and replicated),
/// filtered by account and type, in cursor order; resuming from a cursor delivers exactly what
/// came after it; a cursor that cannot be served is answered with a reset, never silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_every_change_in_order_and_resumes_from_its_cursor() {
    let spec = ClusterSpec::new("watch", &["dc-a", "dc-b"]);
    let cluster = Cluster::start(Path::new(env!("CARGO_BIN_EXE_outpost")), spec)
        .await
        .expect("cluster starts");
    cluster.wait_all_ready().await.expect("all ready");
    let (a, b) = (cluster.api(A), cluster.api(B));
    let nb = cluster.node(B);

    // Bad queries: 400 naming the field.
    for (q, field) in [
        ("?type=nope", "type"),
        ("?cursor=zz", "cursor"),
        ("?account=", "account"),
        ("?format=xml", "format"),
        ("?from=yesterday", "from"),
        ("?cursor=1-1&from=oldest", "from"),
        ("?colour=red", "query"),
    ] {
        let (status, mut w) = open(nb, q, &[]).await;
        assert_eq!(status, 400, "{q}");
        let v = w.json().await;
        assert!(v["error"].as_str().unwrap().starts_with(field), "{q}: {v}");
    }

    // From now: what dc-a and dc-b ingest for one account, none of another's.
    let (_, mut w) = open(nb, "?account=watch-1", &[]).await;
    let mut want = post(&a, "watch-1", 0, 5).await;
    post(&a, "watch-2", 0, 3).await;
    want.extend(post(&b, "watch-1", 100, 2).await);
    let got = w.changes(7).await;
    assert_eq!(ids(&got), want);
    assert!(got.iter().all(|v| v["account"] == "watch-1"), "{got:?}");
    assert!(got.windows(2).all(|p| lseq(&p[0]) < lseq(&p[1])), "{got:?}");
    let last = got.last().unwrap()["cursor"].as_str().unwrap().to_owned();
    drop(w);

    // Away while more changes come; back with its cursor: exactly those, once.
    let missed = post(&a, "watch-1", 10, 4).await;
    let (_, mut w) = open(nb, &format!("?account=watch-1&cursor={last}"), &[]).await;
    let again = w.changes(4).await;
    assert_eq!(ids(&again), missed);
    assert!(lseq(&again[0]) > lseq(got.last().unwrap()));
    drop(w);

    // From the oldest retained change, one type only: every one of that type, in order.
    let (_, mut w) = open(nb, "?from=oldest&type=presence&account=watch-1", &[]).await;
    let presence = w.changes(2).await;
    assert!(
        presence.iter().all(|v| v["type"] == "presence"),
        "{presence:?}"
    );
    assert!(lseq(&presence[0]) < lseq(&presence[1]));
    drop(w);

    // Server-sent events, resumed by Last-Event-ID.
    let (status, mut w) = open(
        nb,
        "?account=watch-1",
        &[("accept", "text/event-stream"), ("last-event-id", &last)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        w.resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let id = w.next_line().await.unwrap();
    assert!(id.starts_with("id: "), "{id}");
    assert_eq!(w.next_line().await.unwrap(), "event: change");
    let data = w.next_line().await.unwrap();
    let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
    assert!(missed.contains(v["message_id"].as_str().unwrap()), "{v}");
    assert_eq!(id.strip_prefix("id: ").unwrap(), v["cursor"]);
    drop(w);

    // A cursor of another log, or ahead of this one: reset, with where to go on from.
    let epoch = last.split_once('-').unwrap().0.parse::<u64>().unwrap();
    for (cursor, says) in [
        (format!("{}-1", epoch + 1), "replaced"),
        (format!("{epoch}-99999999"), "ahead"),
    ] {
        let (_, mut w) = open(nb, &format!("?cursor={cursor}"), &[]).await;
        let v = w.json().await;
        assert_eq!(v["reset"], true, "{v}");
        assert!(v["reason"].as_str().unwrap().contains(says), "{v}");
        assert!(v["cursor"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{epoch}-")));
    }

    // `outpost watch` prints the same changes, a line each, cursor first.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["watch", "--account", "watch-1", "--oldest", "--api"])
        .arg(format!("http://{}", nb.api_addr))
        .env("OUTPOST_TOKEN", &nb.token)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    for _ in 0..11 {
        printed.push(rx.recv_timeout(WAIT).expect("a line from outpost watch"));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let first_lseq = |l: &str| {
        l.split(' ')
            .next()
            .unwrap()
            .split_once('-')
            .unwrap()
            .1
            .parse::<u64>()
            .unwrap()
    };
    assert!(
        printed
            .iter()
            .all(|l| l.split(' ').nth(1) == Some("watch-1")),
        "{printed:?}"
    );
    assert!(
        printed
            .windows(2)
            .all(|p| first_lseq(&p[0]) < first_lseq(&p[1])),
        "{printed:?}"
    );
    assert_eq!(printed[10].split(' ').next().unwrap(), again[3]["cursor"]);

    let metrics = b.metrics().await.unwrap();
    assert!(metrics.contains("outpost_watchers "), "{metrics}");
    cluster.finish().await.expect("clean shutdown");
}

/// Invariant (bounded): a watcher that does not read is cut off after 10 s, its memory held to
/// its queue, and its stream (read later) ends with the reason; everything before it is in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_does_not_read_is_cut_off_with_the_reason() {
    let spec = ClusterSpec::new("watch-slow", &["dc-a"]);
    let cluster = Cluster::start(Path::new(env!("CARGO_BIN_EXE_outpost")), spec)
        .await
        .expect("cluster starts");
    cluster.wait_all_ready().await.expect("all ready");
    let a = cluster.api(A);
    // Far more than the socket buffers and the queue hold (50 events per account, under an
    // element's size bound).
    for k in 0..6u64 {
        let events: Vec<Event> = (k * 10_000..(k + 1) * 10_000)
            .map(|i| sample_event(&format!("slow-{}", i / 50), i))
            .collect();
        a.post_batch(&events).await.unwrap();
    }
    let (status, mut w) = open(cluster.node(A), "?from=oldest", &[]).await;
    assert_eq!(status, 200);
    wait_for(
        "the watcher to be cut off",
        Duration::from_secs(60),
        || async {
            let m = a.metrics().await.unwrap_or_default();
            if m.contains("outpost_watchers_slow_closed_total 1") {
                Check::Done(())
            } else {
                Check::NotYet(
                    m.lines()
                        .filter(|l| l.starts_with("outpost_watchers"))
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            }
        },
    )
    .await
    .unwrap();
    // Read now: changes in order, then the reason, then the end.
    let mut prev = 0;
    let mut changes = 0u64;
    let last = loop {
        let line = w.next_line().await.expect("the reason before the end");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v.get("error").is_some() {
            break v;
        }
        assert!(lseq(&v) > prev, "out of order at {v}");
        prev = lseq(&v);
        changes += 1;
    };
    assert!(
        last["error"].as_str().unwrap().contains("did not read"),
        "{last}"
    );
    assert!(changes < 60_000, "it was cut off before the end");
    assert_eq!(w.next_line().await, None, "nothing after the reason");
    assert!(a.metrics().await.unwrap().contains("outpost_watchers 0"));
    cluster.finish().await.expect("clean shutdown");
}
