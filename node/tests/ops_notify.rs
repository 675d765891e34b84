//! The systemd notify protocol, driven through a socket the test owns, with the real binary:
//! READY once the node is up, a STATUS line, WATCHDOG=1 at half of WATCHDOG_USEC (each after a
//! round trip through the writer thread), STOPPING=1 on SIGTERM and exit code 0. And SIGHUP:
//! a good config is reloaded and says what changed; a bad one is refused naming the field, and
//! the node keeps running (and keeps feeding the watchdog).

mod ops_support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use ops_support::{config_text, test_dir, Node, WAIT};

struct Supervisor {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Supervisor {
    fn bind(path: &std::path::Path) -> Supervisor {
        let sock = UnixDatagram::bind(path).unwrap();
        Supervisor {
            sock,
            seen: Vec::new(),
        }
    }

    /// Receives messages until `done` holds for the messages received so far.
    fn until(&mut self, what: &str, done: impl Fn(&[String]) -> bool) {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        while !done(&self.seen) {
            let left = WAIT
                .checked_sub(start.elapsed())
                .unwrap_or_else(|| panic!("timed out waiting for {what}; got {:?}", self.seen));
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(msg);
                }
                Err(e) => panic!("waiting for {what}: {e}; got {:?}", self.seen),
            }
        }
    }
}

fn count(seen: &[String], msg: &str) -> usize {
    seen.iter().filter(|m| m.lines().any(|l| l == msg)).count()
}

#[test]
fn notify_ready_status_watchdog_then_stopping_on_sigterm() {
    let dir = test_dir("ops-notify");
    let sock_path = dir.join("notify.sock");
    let mut sup = Supervisor::bind(&sock_path);
    let mut node = Node::init(&dir, "dc-notify", "");
    node.start(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);

    sup.until("READY=1", |s| count(s, "READY=1") == 1);
    sup.until("a STATUS line and two watchdog pings", |s| {
        s.iter().any(|m| m.starts_with("STATUS=")) && count(s, "WATCHDOG=1") >= 2
    });
    let status = sup.seen.iter().find(|m| m.starts_with("STATUS=")).unwrap();
    assert!(
        status.contains("datacenter dc-notify: 0/0 peers up") && status.contains("entries"),
        "{status}"
    );
    // READY comes first: no ping before the node said it is up.
    assert_eq!(sup.seen[0], "READY=1", "{:?}", sup.seen);

    node.signal("TERM");
    sup.until("STOPPING=1", |s| count(s, "STOPPING=1") == 1);
    let st = node.wait_exit();
    assert_eq!(st.code(), Some(0), "{}", node.log_text());
    assert_eq!(count(&sup.seen, "READY=1"), 1, "{:?}", sup.seen);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_reloads_a_good_config_and_refuses_a_bad_one_naming_the_field() {
    let dir = test_dir("ops-reload");
    let sock_path = dir.join("notify.sock");
    let mut sup = Supervisor::bind(&sock_path);
    let mut node = Node::init(&dir, "dc-reload", "[log]\nlevel = \"info\"\n");
    node.start(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    sup.until("READY=1", |s| count(s, "READY=1") == 1);

    // A good config: the log level and a limit read at use time change at once; a new API
    // address waits for a restart.
    let good = config_text(
        "dc-reload",
        &node.data_dir,
        "api = \"127.0.0.1:1\"\n[log]\nlevel = \"debug\"\n[limits]\nlog_retention = \"1h\"\n",
    )
    .replace("api = \"127.0.0.1:0\"\n", "");
    std::fs::write(&node.config, good).unwrap();
    let from = node.log_text().len();
    node.signal("HUP");
    let line = node.wait_log(from, &["reloaded"]);
    assert!(
        line.contains("log.level \"info\" -> \"debug\"")
            && line.contains("limits.log_retention 1day -> 1h")
            && line.contains("restart required to apply: api"),
        "{line}"
    );

    // A bad config: refused, naming the field; the node runs on.
    let bad = config_text(
        "dc-reload",
        &node.data_dir,
        "[limits]\nlog_retention = \"soon\"\n",
    );
    std::fs::write(&node.config, bad).unwrap();
    let from = node.log_text().len();
    node.signal("HUP");
    let line = node.wait_log(from, &["reload refused"]);
    assert!(
        line.contains("limits.log_retention") && line.contains("invalid duration"),
        "{line}"
    );
    let pings = count(&sup.seen, "WATCHDOG=1");
    sup.until("two more watchdog pings after the refused reload", |s| {
        count(s, "WATCHDOG=1") >= pings + 2
    });

    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0), "{}", node.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}
