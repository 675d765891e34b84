//! `outpost demo`: three (or N) datacenters on 127.0.0.1 in a temporary directory, in this
//! process, talking real QUIC and HTTP. Events are submitted at every datacenter, two of them at
//! once for one account, one datacenter is stopped and restarted and catches up; the demo then
//! prints the digests and message counts and succeeds only if everything converged.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the demo waits for a stopped node's QUIC port (its endpoint drains first).
const PORT_FREE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::{Config, PeerConfig};
use crate::datacenter::{self, Running};
use crate::ids::Fingerprint;
use crate::wire::Role;

pub struct DemoOpts {
    pub datacenters: usize,
    pub workers: usize,
    pub events: usize,
}

const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);

struct Dc {
    config: Config,
    running: Option<Running>,
    api: String,
    token: String,
}

/// Returns whether everything converged.
pub fn run(opts: DemoOpts) -> anyhow::Result<bool> {
    if !(2..=9).contains(&opts.datacenters) {
        bail!("--datacenters: between 2 and 9");
    }
    let dir = std::env::temp_dir().join(format!(
        "outpost-demo-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(demo(&dir, &opts));
    match &result {
        Ok(true) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        _ => println!("data kept in {}", dir.display()),
    }
    result
}

fn free_port() -> anyhow::Result<u16> {
    // QUIC and HTTP use the same number, UDP and TCP; both are checked free.
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// Initialises `n` datacenters `dc-1..` under `dir` and returns configs that make them a full
/// mesh on 127.0.0.1 (also used by in-process tests).
pub fn local_configs(dir: &Path, n: usize) -> anyhow::Result<Vec<Config>> {
    let mut nodes: Vec<(String, PathBuf, Fingerprint, u16)> = Vec::new();
    for i in 0..n {
        let name = format!("dc-{}", i + 1);
        let data = dir.join(&name);
        let info = crate::roles::init(&data, Role::Datacenter, Some(&name))?;
        nodes.push((name, data, info.fingerprint, free_port()?));
    }
    let addr = |port: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], port)) };
    Ok(nodes
        .iter()
        .map(|(name, data, _, port)| {
            let mut c = Config::with_defaults(Role::Datacenter, name, data);
            c.listen = addr(*port);
            c.api = addr(*port);
            c.peers = nodes
                .iter()
                .filter(|(other, ..)| other != name)
                .map(|(other, _, fp, p)| PeerConfig {
                    name: other.clone(),
                    addr: addr(*p),
                    fingerprints: vec![*fp],
                })
                .collect();
            c
        })
        .collect())
}

async fn demo(dir: &Path, opts: &DemoOpts) -> anyhow::Result<bool> {
    let n = opts.datacenters;
    println!(
        "outpost demo: {n} datacenters on 127.0.0.1, data in {}",
        dir.display()
    );
    let mut dcs = Vec::new();
    for config in local_configs(dir, n)? {
        let running = datacenter::start(config.clone()).await?;
        let api = format!("http://{}", running.api_addr);
        let token = running.shared.token.clone();
        println!(
            "  {:<5} node {}  quic+api {}",
            config.name, running.shared.meta.node_id, running.api_addr
        );
        dcs.push(Dc {
            config,
            running: Some(running),
            api,
            token,
        });
    }
    let http = reqwest::Client::new();
    wait_converged(&http, &dcs).await?;

    // 1. Concurrent registrations of one account at two datacenters both survive.
    let (a, b) = tokio::join!(
        post(
            &http,
            &dcs[0],
            json!({"account": "alice", "type": "register",
            "data": {"contact": "sip:alice@10.0.0.1", "expires_s": 3600}})
        ),
        post(
            &http,
            &dcs[1],
            json!({"account": "alice", "type": "register",
            "data": {"contact": "sip:alice@10.0.0.2", "expires_s": 3600}})
        ),
    );
    let first_id = a?["message_id"].as_str().unwrap_or_default().to_string();
    b?;
    println!("\n1. alice registers at dc-1 and at dc-2 at the same moment");

    // 2. Load at every datacenter, in batches.
    let started = Instant::now();
    let per_batch = 100;
    let mut sent = 0;
    while sent < opts.events {
        let k = (opts.events - sent).min(per_batch);
        let batch: Vec<Value> = (0..k).map(|j| sample_event(sent + j)).collect();
        let dc = &dcs[(sent / per_batch) % n];
        post_batch(&http, dc, &Value::Array(batch)).await?;
        sent += k;
    }
    println!(
        "2. {} events processed across {n} datacenters, acknowledged in {:.2?}",
        opts.events,
        started.elapsed()
    );

    // 3. A datacenter goes away, the others go on, it comes back and catches up.
    let last = n - 1;
    if let Some(r) = dcs[last].running.take() {
        r.shutdown().await;
    }
    println!(
        "3. {} stopped; 200 more events at dc-1 meanwhile",
        dcs[last].config.name
    );
    let batch: Vec<Value> = (0..200).map(|j| sample_event(opts.events + j)).collect();
    post_batch(&http, &dcs[0], &Value::Array(batch)).await?;
    // In this process the stopped node's QUIC socket is released only once its endpoint has
    // drained (peers keep dialling it meanwhile): wait for the port before starting it again.
    let listen = dcs[last].config.listen;
    let freed_by = std::time::Instant::now() + PORT_FREE_WAIT;
    while std::net::UdpSocket::bind(listen).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < freed_by,
            "port {listen} still in use {PORT_FREE_WAIT:?} after the node stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let running = datacenter::start(dcs[last].config.clone()).await?;
    dcs[last].running = Some(running);
    println!("   {} restarted", dcs[last].config.name);

    let took = wait_converged(&http, &dcs).await?;
    println!("4. every datacenter converged ({took:.2?} after the restart)\n");

    let mut digests = Vec::new();
    for dc in &dcs {
        let d = get(&http, dc, "/v1/digest").await?;
        let m = get(&http, dc, &format!("/v1/messages/{first_id}")).await?;
        let alice = get(&http, dc, "/v1/state/alice/register").await?;
        let contacts = alice["entries"][0]["element"]["contacts"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        println!(
            "  {:<5} digest {} entries {:>5}  alice's first message: count {}  alice's contacts: {}",
            dc.config.name, d["digest"].as_str().unwrap_or("?"), d["entries"], m["message_count"], contacts
        );
        digests.push(d["digest"].as_str().unwrap_or_default().to_string());
    }
    let converged = digests.iter().all(|d| *d == digests[0]);
    println!(
        "\n{}",
        if converged {
            format!("converged: all {n} digests equal; a message counts {} copies away from its origin (one from each other datacenter)", n - 1)
        } else {
            "NOT converged: digests differ".to_string()
        }
    );
    let sip_ok = {
        let (a, b) = (sip_site(&dcs[0]), sip_site(&dcs[1]));
        match crate::demo_sip::run(&dir.join("sip"), &a, &b, &http).await {
            Ok(ok) => ok,
            Err(e) => {
                println!("   real SIP part FAILED: {e:#}");
                false
            }
        }
    };
    for dc in &mut dcs {
        if let Some(r) = dc.running.take() {
            r.shutdown().await;
        }
    }
    let cluster_ok = if opts.workers > 0 {
        crate::demo_cluster::run(&dir.join("cluster"), opts.workers).await?
    } else {
        true
    };
    Ok(converged && sip_ok && cluster_ok)
}

fn sip_site(d: &Dc) -> crate::demo_sip::Site<'_> {
    crate::demo_sip::Site {
        name: &d.config.name,
        api: &d.api,
        token: &d.token,
    }
}

fn sample_event(i: usize) -> Value {
    let account = format!("acct-{}", i % 97);
    match i % 5 {
        0 => json!({"account": account, "type": "register",
            "data": {"contact": format!("sip:{account}@10.1.{}.{}", i % 7, i % 11), "expires_s": 600}}),
        1 => json!({"account": account, "type": "call",
            "data": {"call_id": format!("call-{}", i % 13), "action": if i % 3 == 0 { "end" } else { "start" }}}),
        2 => {
            let status = ["available", "busy", "away"][i % 3];
            json!({"account": account, "type": "presence", "data": {"status": status}})
        }
        3 => json!({"account": account, "type": "setting",
            "data": {"key": format!("k{}", i % 4), "value": i}}),
        _ => json!({"account": account, "type": "element", "data": {"n": i}}),
    }
}

async fn post(http: &reqwest::Client, dc: &Dc, body: Value) -> anyhow::Result<Value> {
    send(http.post(format!("{}/v1/events", dc.api)).json(&body), dc).await
}

async fn post_batch(http: &reqwest::Client, dc: &Dc, body: &Value) -> anyhow::Result<Value> {
    send(
        http.post(format!("{}/v1/events/batch", dc.api)).json(body),
        dc,
    )
    .await
}

async fn get(http: &reqwest::Client, dc: &Dc, path: &str) -> anyhow::Result<Value> {
    send(http.get(format!("{}{path}", dc.api)), dc).await
}

async fn send(req: reqwest::RequestBuilder, dc: &Dc) -> anyhow::Result<Value> {
    let resp = req.bearer_auth(&dc.token).send().await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    if !status.is_success() {
        bail!("{}: {status}: {}", dc.config.name, body["error"]);
    }
    Ok(body)
}

/// Waits until every link is up, nothing is unacknowledged and every digest is equal.
async fn wait_converged(http: &reqwest::Client, dcs: &[Dc]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let mut digests = Vec::new();
        let mut quiet = true;
        for dc in dcs {
            let s = get(http, dc, "/v1/status").await?;
            let peers = s["peers"].as_array().cloned().unwrap_or_default();
            quiet &= peers
                .iter()
                .all(|p| p["connected"] == true && p["lag"] == 0);
            digests.push(s["digest"].clone());
        }
        if quiet && digests.iter().all(|d| *d == digests[0]) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > CONVERGE_DEADLINE {
            bail!("no convergence within {CONVERGE_DEADLINE:?}: digests {digests:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
