//! The demo's optional real-SIP part (reference 14): when Kamailio 5.6 (with the modules the
//! integration loads) and SIPp are installed, two of the demo's datacenters each get a Kamailio
//! running `integration/kamailio/kamailio-outpost.cfg`; a SIPp phone registers as alice at the
//! first, a SIPp caller at the second calls her, and the call completes (INVITE, 200, ACK, BYE)
//! with her registration and her call known at both datacenters through Outpost. Without the
//! software it says what to install and the demo goes on.
//!
//! The integration's files are compiled in, so an installed `outpost` can run this without the
//! repository.

use std::fs;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const CFG: &str = include_str!("../../integration/kamailio/kamailio-outpost.cfg");
const JS: &str = include_str!("../../integration/kamailio/outpost.js");
const REGISTER_XML: &str = include_str!("../../integration/kamailio/sipp/register.xml");
const UAS_XML: &str = include_str!("../../integration/kamailio/sipp/uas.xml");
const CALL_XML: &str = include_str!("../../integration/kamailio/sipp/call.xml");

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
const INSTALL: &str = "apt-get install kamailio kamailio-utils-modules kamailio-json-modules \
                       kamailio-extra-modules sip-tester";
/// Deadline of each step (Kamailio answering, a SIPp scenario, a binding replicating).
const STEP_WAIT: Duration = Duration::from_secs(30);
/// How long alice's call is held, so that both datacenters can be seen counting it.
const HOLD_MS: u64 = 1_500;
/// Between two reads of a condition being waited for.
const POLL: Duration = Duration::from_millis(20);

/// One datacenter as this part needs it.
pub struct Site<'a> {
    pub name: &'a str,
    pub api: &'a str,
    pub token: &'a str,
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// What is missing for this part, if anything.
pub fn missing() -> Option<String> {
    if which("kamailio").is_none() {
        return Some("kamailio is not installed".into());
    }
    if which("sipp").is_none() {
        return Some("sipp is not installed".into());
    }
    MODULES
        .iter()
        .find(|m| !Path::new(MODULE_DIR).join(m).is_file())
        .map(|m| format!("the Kamailio module {m} is not installed"))
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something listens on UDP `port` (binding it fails): a SIPp UAS started on
/// it is ready for calls. Without this, an INVITE sent before SIPp bound its port is refused
/// (ICMP unreachable) and Kamailio answers 477, as a loaded machine showed once.
pub fn wait_udp_taken(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        if Instant::now() > deadline {
            bail!("nothing listens on udp 127.0.0.1:{port} after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

struct Kamailio {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start_kamailio(dir: &Path, site: &Site) -> anyhow::Result<Kamailio> {
    fs::create_dir_all(dir.join("run"))?;
    fs::write(dir.join("kamailio-outpost.cfg"), CFG)?;
    fs::write(dir.join("outpost.js"), JS)?;
    let port = free_udp_port()?;
    fs::write(
        dir.join("outpost-local.cfg"),
        format!(
            "#!define LISTEN udp:127.0.0.1:{port}\n#!define OUTPOST_API \"{}\"\n\
             #!define OUTPOST_TOKEN \"{}\"\n#!define OUTPOST_JS \"{}\"\n#!define CHILDREN 2\n",
            site.api,
            site.token,
            dir.join("outpost.js").display()
        ),
    )?;
    let log = dir.join("kamailio.log");
    let out = fs::File::create(&log)?;
    let child = Command::new(which("kamailio").context("kamailio")?)
        .arg("-f")
        .arg(dir.join("kamailio-outpost.cfg"))
        .args(["-DD", "-E", "-Y"])
        .arg(dir.join("run"))
        .arg("-w")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .context("starting kamailio")?;
    let mut k = Kamailio { child, port, log };
    let deadline = Instant::now() + STEP_WAIT;
    while options(port, None)? != Some(200) {
        if let Some(status) = k.child.try_wait()? {
            bail!(
                "kamailio for {} exited ({status}); its log: {}",
                site.name,
                k.log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "kamailio for {} did not answer within {STEP_WAIT:?}",
                site.name
            );
        }
    }
    Ok(k)
}

/// One OPTIONS to the Kamailio on `port` (a probe for `user` when given); its final status, or
/// `None` when nothing answered within 300 ms.
fn options(port: u16, user: Option<&str>) -> anyhow::Result<Option<u16>> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let local = sock.local_addr()?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let ruri = match user {
        Some(u) => format!("sip:{u}@127.0.0.1:{port}"),
        None => format!("sip:127.0.0.1:{port}"),
    };
    let branch = format!("z9hG4bK-demo-{}", local.port());
    let msg = format!(
        "OPTIONS {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={branch}\r\n\
         From: <sip:demo@{local}>;tag={branch}\r\nTo: <{ruri}>\r\nCall-ID: {branch}@demo\r\n\
         CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n{}Content-Length: 0\r\n\r\n",
        if user.is_some() {
            "X-Outpost-Probe: 1\r\n"
        } else {
            ""
        }
    );
    sock.send_to(msg.as_bytes(), ("127.0.0.1", port))?;
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let code = String::from_utf8_lossy(&buf[..n])
                    .get(8..11)
                    .and_then(|c| c.parse().ok());
                if code.is_some_and(|c: u16| c >= 200) {
                    return Ok(code);
                }
            }
            Err(_) => return Ok(None),
        }
    }
}

fn sipp(dir: &Path, scenario: &str, target: u16, args: &[&str]) -> anyhow::Result<Child> {
    let log =
        fs::File::create(dir.join(format!("sipp-{}.log", scenario.trim_end_matches(".xml"))))?;
    let mut cmd = Command::new(which("sipp").context("sipp")?);
    cmd.arg("-sf").arg(dir.join(scenario)).args(args);
    if !args.contains(&"-p") {
        cmd.args(["-p", &free_udp_port()?.to_string()]);
    }
    cmd.args(["-nostdin", "-timeout", "30s", "-timeout_error"])
        .arg(format!("127.0.0.1:{target}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting sipp")
}

fn succeeds(mut child: Child, what: &str) -> anyhow::Result<()> {
    let status = child.wait()?;
    if !status.success() {
        bail!("{what}: sipp ended with {status} (0: every call succeeded)");
    }
    Ok(())
}

/// Runs the part; `Ok(true)` when the call went through and both datacenters agreed.
pub async fn run(
    dir: &Path,
    a: &Site<'_>,
    b: &Site<'_>,
    http: &reqwest::Client,
) -> anyhow::Result<bool> {
    println!(
        "\nreal SIP: Kamailio 5.6 at {} and at {}, SIPp as the phones",
        a.name, b.name
    );
    if let Some(why) = missing() {
        println!("   skipped: {why}. To see it: {INSTALL}");
        return Ok(true);
    }
    fs::create_dir_all(dir)?;
    for (name, text) in [
        ("register.xml", REGISTER_XML),
        ("uas.xml", UAS_XML),
        ("call.xml", CALL_XML),
    ] {
        fs::write(dir.join(name), text)?;
    }
    let ka = start_kamailio(&dir.join("kamailio-a"), a)?;
    let kb = start_kamailio(&dir.join("kamailio-b"), b)?;
    println!(
        "   kamailio udp:127.0.0.1:{} beside {}, udp:127.0.0.1:{} beside {}",
        ka.port, a.name, kb.port, b.name
    );

    let phone_port = free_udp_port()?;
    let phone_port_s = phone_port.to_string();
    let phone = sipp(dir, "uas.xml", ka.port, &["-p", &phone_port_s, "-m", "1"])?;
    wait_udp_taken(phone_port, STEP_WAIT)?;
    fs::write(
        dir.join("alice.csv"),
        format!("SEQUENTIAL\nalice;127.0.0.1:{phone_port};3600\n"),
    )?;
    succeeds(
        sipp(
            dir,
            "register.xml",
            ka.port,
            &["-inf", "alice.csv", "-m", "1"],
        )?,
        "alice's REGISTER",
    )?;
    println!(
        "   alice's phone registered at {}'s Kamailio (200 once {}'s Outpost committed it)",
        a.name, a.name
    );

    let kb_port = kb.port;
    let deadline = Instant::now() + STEP_WAIT;
    let routed_after = Instant::now();
    while tokio::task::spawn_blocking(move || options(kb_port, Some("alice"))).await?? != Some(200)
    {
        if Instant::now() > deadline {
            bail!("alice never became callable at {}", b.name);
        }
    }
    println!(
        "   {} can call her {:.0?} later: her binding replicated, not re-processed",
        b.name,
        routed_after.elapsed()
    );

    let hold = HOLD_MS.to_string();
    let call = sipp(
        dir,
        "call.xml",
        kb.port,
        &["-s", "alice", "-d", &hold, "-m", "1"],
    )?;
    let mut during = [0u64; 2];
    let deadline = Instant::now() + STEP_WAIT;
    while during != [1, 1] && Instant::now() < deadline {
        for (i, site) in [a, b].iter().enumerate() {
            during[i] = active_calls(http, site).await?;
        }
        tokio::time::sleep(POLL).await;
    }
    let placed = call.id();
    succeeds(call, &format!("the call from {} to alice", b.name))?;
    succeeds(phone, "alice's phone")?;
    println!(
        "   a call placed at {} (sipp pid {placed}) reached her phone: INVITE, 200, ACK, BYE; \
         her active calls during it: {} at {}, {} at {}",
        b.name, during[0], a.name, during[1], b.name
    );
    let deadline = Instant::now() + STEP_WAIT;
    let mut after = [1u64; 2];
    while after != [0, 0] && Instant::now() < deadline {
        for (i, site) in [a, b].iter().enumerate() {
            after[i] = active_calls(http, site).await?;
        }
        tokio::time::sleep(POLL).await;
    }
    println!(
        "   after the BYE: {} at {}, {} at {}",
        after[0], a.name, after[1], b.name
    );
    drop(ka);
    drop(kb);
    Ok(during == [1, 1] && after == [0, 0])
}

async fn active_calls(http: &reqwest::Client, site: &Site<'_>) -> anyhow::Result<u64> {
    let resp = http
        .get(format!("{}/v1/state/alice/call", site.api))
        .bearer_auth(site.token)
        .send()
        .await?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(0);
    }
    let body: serde_json::Value = resp.error_for_status()?.json().await?;
    Ok(body["entries"][0]["element"]["count"].as_u64().unwrap_or(0))
}
