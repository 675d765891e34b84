//! Real SIP traffic across datacenters (issue 14; reference 14): two datacenters, each a real
//! Kamailio 5.6 running `integration/kamailio/kamailio-outpost.cfg` beside its Outpost node,
//! and SIPp as the phones. It defends, with the software operators run:
//!
//! - a registration made at one datacenter lets a call placed at the other reach the phone
//!   (INVITE, 200, ACK, BYE), routed from the replicated state without re-processing;
//! - the called account's active calls are known at both datacenters during the call and are
//!   zero at both after it;
//! - a concurrent-call limit configured once (the account's `call_limit` setting, at one
//!   datacenter) refuses the call one over it with 486 at the other; a user registered nowhere
//!   gets 404;
//! - with one datacenter's Outpost killed (SIGKILL), the other still routes to the phone, the
//!   registrations Kamailio takes meanwhile are acknowledged and, once Outpost is back, reach the
//!   other datacenter (queued and retried, never dropped).
//!
//! It runs where `kamailio` (with http_client, app_jsdt, dialog, mqueue, rtimer) and `sipp` are
//! installed; `.ci/run` installs them with apt-get when it can. Elsewhere it says plainly that
//! it skipped.

use std::fs;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost::testkit::{wait_for, Api, Check, Cluster, ClusterSpec, Event};
use serde_json::{json, Value};

const A: usize = 0;
const B: usize = 1;
const NAMES: [&str; 2] = ["dc-a", "dc-b"];
/// Kamailio's modules the integration loads beyond the core ones.
const MODULES: [&str; 6] = [
    "http_client.so",
    "app_jsdt.so",
    "dialog.so",
    "mqueue.so",
    "rtimer.so",
    "registrar.so",
];
const MODULE_DIR: &str = "/usr/lib/x86_64-linux-gnu/kamailio/modules";
/// How long each call of the test is held after its ACK: long enough to read both
/// datacenters' call counts during it, which the test does while the caller still runs.
const HOLD_MS: u64 = 4_000;
/// Deadline of every wait here (a condition polled, never a guess).
const WAIT: Duration = Duration::from_secs(60);
/// How long one SIP request waits for its answer over loopback before it is sent again.
const SIP_ANSWER_WAIT: Duration = Duration::from_millis(300);

fn integration_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/kamailio")
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// Why the test cannot run here, if it cannot.
fn missing_software() -> Option<String> {
    if which("kamailio").is_none() {
        return Some("kamailio is not installed".into());
    }
    if which("sipp").is_none() {
        return Some("sipp is not installed (Debian: sip-tester)".into());
    }
    for m in MODULES {
        if !Path::new(MODULE_DIR).join(m).is_file() {
            return Some(format!("the Kamailio module {m} is not in {MODULE_DIR}"));
        }
    }
    None
}

/// A UDP port free on 127.0.0.1 when asked (the kernel's choice, released for the child).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends one OPTIONS to the SIP server on `port` and returns the status code of its answer
/// (None if nothing answered within a few retransmissions). `user` addresses a user;
/// `probe` asks the integration whether that user can be called there (reference 14.3).
fn sip_options(port: u16, user: Option<&str>, probe: bool) -> Option<u16> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = sock.local_addr().unwrap();
    sock.set_read_timeout(Some(SIP_ANSWER_WAIT)).unwrap();
    let ruri = match user {
        Some(u) => format!("sip:{u}@127.0.0.1:{port}"),
        None => format!("sip:127.0.0.1:{port}"),
    };
    let branch = format!("z9hG4bK-{}-{}", local.port(), std::process::id());
    let msg = format!(
        "OPTIONS {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={branch}\r\n\
         From: <sip:test@{local}>;tag={branch}\r\nTo: <{ruri}>\r\nCall-ID: {branch}@test\r\n\
         CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n{}Content-Length: 0\r\n\r\n",
        if probe { "X-Outpost-Probe: 1\r\n" } else { "" }
    );
    let mut buf = [0u8; 4096];
    for _ in 0..3 {
        sock.send_to(msg.as_bytes(), ("127.0.0.1", port)).ok()?;
        // A read that times out ends the wait for this transmission.
        while let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = text.get(8..11).and_then(|c| c.parse().ok())?;
            if code >= 200 {
                return Some(code);
            }
        }
    }
    None
}

/// The last lines of a log file.
fn tail_of(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// One Kamailio running the integration's config, in a directory of its own.
struct Kamailio {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Kamailio {
    fn start(dir: PathBuf, outpost_api: &str, token: &str) -> Kamailio {
        fs::create_dir_all(dir.join("run")).unwrap();
        for f in ["kamailio-outpost.cfg", "outpost.js"] {
            fs::copy(integration_dir().join(f), dir.join(f)).unwrap();
        }
        let port = free_udp_port();
        fs::write(
            dir.join("outpost-local.cfg"),
            format!(
                "#!define LISTEN udp:127.0.0.1:{port}\n#!define OUTPOST_API \"http://{outpost_api}\"\n\
                 #!define OUTPOST_TOKEN \"{token}\"\n#!define OUTPOST_JS \"{}\"\n\
                 #!define CHILDREN 4\n",
                dir.join("outpost.js").display()
            ),
        )
        .unwrap();
        let mut k = Kamailio {
            dir,
            port,
            child: None,
        };
        k.spawn();
        k
    }

    fn spawn(&mut self) {
        let log = fs::File::create(self.dir.join("kamailio.log")).unwrap();
        let child = Command::new(which("kamailio").unwrap())
            .arg("-f")
            .arg(self.dir.join("kamailio-outpost.cfg"))
            .args(["-DD", "-E", "-Y"])
            .arg(self.dir.join("run"))
            .arg("-w")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("kamailio starts");
        self.child = Some(child);
    }

    /// Waits until Kamailio answers a keepalive OPTIONS; fails at once if it exits.
    async fn wait_ready(&mut self) {
        let port = self.port;
        let tail = self.log_tail_fn();
        let child = self.child.as_mut().unwrap();
        let what = format!("kamailio on {port} to answer");
        wait_for(&what, WAIT, || {
            let exited = child.try_wait().ok().flatten();
            let tail = tail.clone();
            async move {
                if let Some(status) = exited {
                    return Check::Failed(format!("kamailio exited ({status}):\n{}", tail()));
                }
                match tokio::task::spawn_blocking(move || sip_options(port, None, false))
                    .await
                    .unwrap()
                {
                    Some(200) => Check::Done(()),
                    other => Check::NotYet(format!("keepalive answered {other:?}")),
                }
            }
        })
        .await
        .unwrap();
    }

    /// Reads the log's tail when called (for messages built before a failure).
    fn log_tail_fn(&self) -> std::sync::Arc<dyn Fn() -> String + Send + Sync> {
        let log = self.dir.join("kamailio.log");
        std::sync::Arc::new(move || tail_of(&log))
    }

    fn log_tail(&self) -> String {
        tail_of(&self.dir.join("kamailio.log"))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("kamailio.log")).unwrap_or_default()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

/// A SIPp process running one of the integration's scenarios.
struct Sipp {
    child: tokio::process::Child,
    what: String,
}

/// Runs `scenario` against the SIP server on `target`, from a free local port unless `args`
/// name one with `-p`.
fn sipp(what: &str, scenario: &str, target: u16, args: &[&str]) -> Sipp {
    let mut cmd = tokio::process::Command::new(which("sipp").unwrap());
    cmd.arg("-sf")
        .arg(integration_dir().join("sipp").join(scenario))
        .args(args);
    if !args.contains(&"-p") {
        cmd.args(["-p", &free_udp_port().to_string()]);
    }
    let child = cmd
        .args(["-nostdin", "-timeout", "60s", "-timeout_error"])
        .arg(format!("127.0.0.1:{target}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sipp starts");
    Sipp {
        child,
        what: what.to_owned(),
    }
}

impl Sipp {
    /// Waits for SIPp to end and checks that every call of its scenario succeeded.
    async fn succeeds(mut self) {
        let status = self.child.wait().await.unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        assert!(
            status.success(),
            "{}: sipp ended with {status} (0 means every call succeeded): {err}",
            self.what
        );
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// Registers `user` at the Kamailio on `port`, bound to `contact` (host:port) for `expires` s.
async fn register(dir: &Path, port: u16, user: &str, contact: &str, expires: u32) {
    let inf = dir.join(format!("{user}.csv"));
    fs::write(&inf, format!("SEQUENTIAL\n{user};{contact};{expires}\n")).unwrap();
    sipp(
        &format!("REGISTER {user}"),
        "register.xml",
        port,
        &["-inf", inf.to_str().unwrap(), "-m", "1"],
    )
    .succeeds()
    .await;
}

/// The account's view of `etype` at a datacenter (`null` when it has no entry).
async fn element(api: &Api, account: &str, etype: &str) -> Value {
    let st = api.state(account).await.expect("state answers");
    st["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == etype)
        .map(|e| e["element"].clone())
        .unwrap_or(Value::Null)
}

async fn calls_everywhere(c: &Cluster, account: &str) -> Vec<u64> {
    let mut counts = Vec::new();
    for i in [A, B] {
        let el = element(&c.api(i), account, "call").await;
        counts.push(el["count"].as_u64().unwrap_or(0));
    }
    counts
}

/// Waits until the account has `n` active calls at both datacenters; fails at once if the
/// caller `during` (whose call must still be up) has ended first.
async fn wait_calls(c: &Cluster, account: &str, n: u64, mut during: Option<&mut Sipp>) {
    wait_for(
        &format!("{account} to have {n} active calls at both datacenters"),
        WAIT,
        || {
            let ended = during.as_mut().is_some_and(|s| !s.running());
            async move {
                let counts = calls_everywhere(c, account).await;
                if counts.iter().all(|&k| k == n) {
                    Check::Done(())
                } else if ended {
                    Check::Failed(format!(
                        "the call ended before both datacenters counted it: {counts:?}"
                    ))
                } else {
                    Check::NotYet(format!("counts at dc-a, dc-b: {counts:?}"))
                }
            }
        },
    )
    .await
    .unwrap();
}

async fn wait_routable(k: &Kamailio, user: &str) {
    let port = k.port;
    let user2 = user.to_owned();
    wait_for(&format!("{user} to be callable at {port}"), WAIT, || {
        let u = user2.clone();
        async move {
            match tokio::task::spawn_blocking(move || sip_options(port, Some(&u), true))
                .await
                .unwrap()
            {
                Some(200) => Check::Done(()),
                other => Check::NotYet(format!("probe answered {other:?}")),
            }
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sipp_call_crosses_datacenters_through_outpost() {
    if let Some(why) = missing_software() {
        eprintln!(
            "SKIPPED a_sipp_call_crosses_datacenters_through_outpost: {why}. Install with \
             `apt-get install kamailio kamailio-utils-modules kamailio-json-modules \
             kamailio-extra-modules sip-tester` to run it."
        );
        return;
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let mut c = Cluster::start(bin, ClusterSpec::new("kamailio", &NAMES))
        .await
        .expect("cluster starts");
    c.wait_all_ready().await.unwrap();
    let dir = c.dir().to_owned();
    let node = |i: usize| c.node(i).clone();
    let (na, nb) = (node(A), node(B));
    let mut ka = Kamailio::start(dir.join("kamailio-a"), &na.api_addr.to_string(), &na.token);
    let mut kb = Kamailio::start(dir.join("kamailio-b"), &nb.api_addr.to_string(), &nb.token);
    ka.wait_ready().await;
    kb.wait_ready().await;

    // alice's phone: a SIPp UAS answering the four calls below, registered at dc-a.
    let phone_port = free_udp_port();
    let phone_port_s = phone_port.to_string();
    let phone = sipp(
        "alice's phone",
        "uas.xml",
        ka.port,
        &["-p", &phone_port_s, "-m", "4"],
    );
    outpost::demo_sip::wait_udp_taken(phone_port, Duration::from_secs(30)).unwrap();
    register(
        &dir,
        ka.port,
        "alice",
        &format!("127.0.0.1:{phone_port}"),
        3600,
    )
    .await;
    let bound = element(&c.api(A), "alice", "register").await;
    assert!(
        bound["contacts"][format!("sip:alice@127.0.0.1:{phone_port}")].is_object(),
        "the REGISTER's 200 came before dc-a's Outpost held the binding: {bound}"
    );
    wait_routable(&kb, "alice").await;

    // 1. A call placed at dc-b reaches alice at dc-a; both count it, then neither.
    let hold = HOLD_MS.to_string();
    let mut call = sipp(
        "call from dc-b to alice",
        "call.xml",
        kb.port,
        &["-s", "alice", "-d", &hold, "-m", "1"],
    );
    wait_calls(&c, "alice", 1, Some(&mut call)).await;
    call.succeeds().await;
    wait_calls(&c, "alice", 0, None).await;

    // 2. The limit, configured once at dc-a, refuses the third concurrent call at dc-b... and
    //    the other way round: two calls held from dc-b, the third placed at dc-a.
    c.api(A)
        .post(&Event::new(
            "alice",
            "setting",
            json!({"key": "call_limit", "value": 2}),
        ))
        .await
        .unwrap();
    let api_b = c.api(B);
    wait_for("alice's call_limit to reach dc-b", WAIT, || {
        let api = api_b.clone();
        async move {
            let el = element(&api, "alice", "setting").await;
            if el["settings"]["call_limit"] == 2 {
                Check::Done(())
            } else {
                Check::NotYet(el.to_string())
            }
        }
    })
    .await
    .unwrap();
    let long_hold = (HOLD_MS * 2).to_string();
    let mut two = sipp(
        "two calls from dc-b to alice",
        "call.xml",
        kb.port,
        &[
            "-s", "alice", "-d", &long_hold, "-m", "2", "-l", "2", "-r", "10",
        ],
    );
    wait_calls(&c, "alice", 2, Some(&mut two)).await;
    sipp(
        "a third call, at dc-a, over the limit",
        "call-busy.xml",
        ka.port,
        &["-s", "alice", "-m", "1"],
    )
    .succeeds()
    .await;
    assert!(
        ka.log()
            .contains("call to alice refused: 2 active, limit 2"),
        "dc-a's Kamailio did not say why it refused the call:\n{}",
        ka.log_tail()
    );
    two.succeeds().await;
    wait_calls(&c, "alice", 0, None).await;
    sipp(
        "a call for a user registered nowhere",
        "call-unknown.xml",
        kb.port,
        &["-s", "nobody", "-m", "1"],
    )
    .succeeds()
    .await;

    // 3. dc-a's Outpost killed: dc-b still routes to alice; dc-a's Kamailio still takes
    //    registrations, which reach dc-b once its Outpost is back.
    c.kill9(A).unwrap();
    sipp(
        "call from dc-b to alice while dc-a's Outpost is down",
        "call.xml",
        kb.port,
        &["-s", "alice", "-d", "200", "-m", "1"],
    )
    .succeeds()
    .await;
    for user in ["carol", "dave"] {
        register(&dir, ka.port, user, "127.0.0.1:5999", 3600).await;
    }
    assert!(
        ka.log().contains("outpost: unavailable"),
        "dc-a's Kamailio did not say that it queued:\n{}",
        ka.log_tail()
    );
    // Kamailio keeps serving from its local state meanwhile.
    let port = ka.port;
    assert_eq!(
        tokio::task::spawn_blocking(move || sip_options(port, Some("carol"), true))
            .await
            .unwrap(),
        Some(200),
        "dc-a does not route to carol from its local bindings"
    );
    c.restart(A).unwrap();
    c.wait_ready(A).await.unwrap();
    for user in ["carol", "dave"] {
        wait_routable(&kb, user).await;
        let el = element(&c.api(B), user, "register").await;
        assert!(
            el["contacts"][format!("sip:{user}@127.0.0.1:5999")].is_object(),
            "{user}'s binding made while dc-a's Outpost was down is not at dc-b: {el}"
        );
    }
    phone.succeeds().await;
    drop(ka);
    drop(kb);
    c.finish().await.unwrap();
}
