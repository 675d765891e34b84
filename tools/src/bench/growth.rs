//! Growth runs that recover a stopped datacenter (`catchup-1m`, `snapshot-1m`): the last node is
//! stopped, the others are filled with distinct entries (one `presence` event per account,
//! batches of [`FILL_BATCH`]), then the stopped node is restarted and timed until it holds them
//! all. `catchup-1m` keeps the default log retention, so the node is sent the log; `snapshot-1m`
//! retains only [`SNAPSHOT_LOG_RECORDS_MAX`] records, so the node is behind retention and must be
//! sent a snapshot. The ingest run over many accounts (`batch1000-1m`) is an ordinary load run.
//! Progress goes to stderr every [`PROGRESS_EVERY`]; nothing here asserts on time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use outpost::testkit::{Api, Cluster, ClusterSpec};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Serialize;

use crate::{load, nodes, procstat, Ctx, NodeFigures, RunDef, RunFigures, ThreadCpu};

/// Events per fill request.
pub const FILL_BATCH: u64 = 1000;
/// Concurrent fill requests per writing node.
const FILL_CLIENTS: usize = 2;
/// Log records the nodes keep in `snapshot-1m` (far below what is written, so the stopped node
/// falls behind retention).
pub const SNAPSHOT_LOG_RECORDS_MAX: u64 = 10_000;
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often the recovering node's counters are polled (bounds the precision of the time).
const POLL: Duration = Duration::from_millis(100);
/// How long the writers may take to hold each other's writes, and the stopped node to catch up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the stopped node's QUIC port may stay taken after it exited.
const PORT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the nodes' VmRSS is sampled.
const RSS_EVERY: Duration = Duration::from_millis(200);

/// How the stopped node is expected to recover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// From its peers' logs (retention holds everything it missed).
    Log,
    /// By snapshot (retention trimmed what it missed).
    Snapshot,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GrowthFigures {
    /// Distinct entries written while the node was down.
    pub elements: u64,
    /// Writing them at the running nodes, until those held each other's writes.
    pub write_secs: f64,
    pub write_per_sec: f64,
    /// From the restart of the stopped node until it held every element.
    pub recover_secs: Option<f64>,
    pub recover_per_sec: Option<f64>,
    /// Snapshots the running nodes sent over the run.
    pub snapshots_sent: u64,
    /// Entries the recovered node holds at the end.
    pub entries: u64,
    pub digests_equal: Option<bool>,
}

/// One node's counters, with what the cluster says when it cannot answer.
async fn counters(api: &Api) -> anyhow::Result<nodes::Counters> {
    nodes::counters(api).await
}

/// Posts `total` distinct `presence` events (accounts `acct-0` ...) spread over `targets`,
/// [`FILL_CLIENTS`] requests at a time per target; prints progress. Fails on the first refused
/// request (the count would no longer be exact).
async fn fill(label: &str, targets: &[load::Target], total: u64) -> anyhow::Result<()> {
    fill_over(label, targets, total, u64::MAX).await
}

/// [`fill`] over at most `accounts` accounts (`acct-{i % accounts}`): a log of `total` records
/// over a state of `accounts` entries.
pub async fn fill_over(
    label: &str,
    targets: &[load::Target],
    total: u64,
    accounts: u64,
) -> anyhow::Result<()> {
    let http = load::client(targets.len() * FILL_CLIENTS);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let batches = total.div_ceil(FILL_BATCH);
    let mut tasks = tokio::task::JoinSet::new();
    for t in targets {
        let url = format!("{}/v1/events/batch", t.base);
        let auth = HeaderValue::from_str(&format!("Bearer {}", t.token)).context("token")?;
        for _ in 0..FILL_CLIENTS {
            let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
            let (next, done) = (next.clone(), done.clone());
            tasks.spawn(async move {
                let mut body = String::with_capacity(FILL_BATCH as usize * 80);
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let first = b * FILL_BATCH;
                    let last = (first + FILL_BATCH).min(total);
                    body.clear();
                    body.push('[');
                    for i in first..last {
                        if i > first {
                            body.push(',');
                        }
                        let a = i % accounts;
                        body.push_str(&format!(
                            r#"{{"account":"acct-{a}","type":"presence","data":{{"status":"s{i}"}}}}"#
                        ));
                    }
                    body.push(']');
                    let resp = http
                        .post(&url)
                        .header(AUTHORIZATION, auth.clone())
                        .header(CONTENT_TYPE, "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .with_context(|| format!("POST {url}"))?;
                    let status = resp.status();
                    let text = resp.bytes().await.unwrap_or_default();
                    if !status.is_success() {
                        bail!(
                            "POST {url}: HTTP {status}: {}",
                            String::from_utf8_lossy(&text).chars().take(300).collect::<String>()
                        );
                    }
                    done.fetch_add(last - first, Ordering::Relaxed);
                }
            });
        }
    }
    let progress = {
        let done = done.clone();
        let label = label.to_owned();
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let d = done.load(Ordering::Relaxed);
                eprintln!(
                    "  {label}: written {} of {} ({:.0} s)",
                    crate::thousands(d as f64),
                    crate::thousands(total as f64),
                    start.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
                // Stop handing out batches: the run has failed.
                next.store(batches, Ordering::Relaxed);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow::anyhow!("a fill task failed: {e}"));
            }
        }
    }
    progress.abort();
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Polls `check` every [`POLL`] until it returns true, printing `progress()` every
/// [`PROGRESS_EVERY`]; fails after [`SETTLE_TIMEOUT`] or when a node that should run has exited.
async fn until<F, Fut>(label: &str, cluster: &Cluster, mut check: F) -> anyhow::Result<Instant>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(bool, String)>>,
{
    let start = Instant::now();
    let mut shown = start;
    loop {
        let (done, state) = check().await?;
        if done {
            return Ok(Instant::now());
        }
        if let Err(e) = cluster.check_alive() {
            bail!("{label}: {e} ({state})");
        }
        if start.elapsed() > SETTLE_TIMEOUT {
            bail!("{label}: not done after {SETTLE_TIMEOUT:?}: {state}");
        }
        if shown.elapsed() >= PROGRESS_EVERY {
            shown = Instant::now();
            eprintln!(
                "  {label}: {state} ({:.0} s)",
                start.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `catchup-1m` or `snapshot-1m` (see the module comment).
pub async fn run(
    ctx: &Ctx,
    def: &RunDef,
    recovery: Recovery,
    elements: u64,
) -> anyhow::Result<RunFigures> {
    let names: Vec<String> = (1..=def.nodes).map(|i| format!("dc{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut spec = ClusterSpec::new(&format!("bench-{}", def.name), &name_refs);
    spec.base_dir = Some(ctx.base.clone());
    spec.log_level = ctx.log_level.clone();
    if recovery == Recovery::Snapshot {
        spec.extra_config = format!("[limits]\nlog_records_max = {SNAPSHOT_LOG_RECORDS_MAX}");
    }
    let mut cluster = Cluster::start(&ctx.bin, spec).await?;
    let result = run_in(&mut cluster, def, recovery, elements).await;
    match result {
        Ok(mut fig) => {
            let up: Vec<u32> = (0..def.nodes).filter_map(|i| cluster.pid(i)).collect();
            fig.notes.extend(crate::stop_nodes(&mut cluster, &up).await);
            if let Err(e) = cluster.finish().await {
                fig.problem = Some(format!("removing the cluster: {e:#}"));
            }
            Ok(fig)
        }
        Err(e) => {
            // Dropping the cluster kills the nodes and keeps the directory with their logs.
            let dir = cluster.dir().display().to_string();
            drop(cluster);
            Err(e.context(format!("kept for inspection: {dir}")))
        }
    }
}

async fn run_in(
    cluster: &mut Cluster,
    def: &RunDef,
    recovery: Recovery,
    elements: u64,
) -> anyhow::Result<RunFigures> {
    cluster.wait_all_ready().await?;
    cluster.wait_quiet().await?;
    let down = def.nodes - 1;
    let writers: Vec<usize> = (0..down).collect();
    let mut fig = RunFigures {
        name: def.name.to_owned(),
        section: def.section.to_owned(),
        description: def.description.to_owned(),
        nodes: def.nodes,
        clients: FILL_CLIENTS * writers.len(),
        events_per_request: FILL_BATCH as usize,
        loadavg_before: procstat::loadavg(),
        ..RunFigures::default()
    };
    let mut g = GrowthFigures {
        elements,
        ..GrowthFigures::default()
    };
    let status = cluster.stop(down).await?;
    eprintln!(
        "  {}: {} stopped ({status}); writing {} entries at {}",
        def.name,
        cluster.node(down).name,
        crate::thousands(elements as f64),
        writers
            .iter()
            .map(|&i| cluster.node(i).name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let writer_pids: Vec<u32> = writers.iter().filter_map(|&i| cluster.pid(i)).collect();
    let writer_rss = procstat::RssSampler::start(writer_pids, RSS_EVERY);
    let targets: Vec<load::Target> = writers
        .iter()
        .map(|&i| load::Target {
            node: i,
            base: format!("http://{}", cluster.node(i).api_addr),
            token: cluster.node(i).token.clone(),
        })
        .collect();
    let write_start = Instant::now();
    fill(def.name, &targets, elements).await?;
    // The writers hold each other's writes: what is left is the stopped node's alone.
    let apis: Vec<Api> = writers.iter().map(|&i| cluster.api(i)).collect();
    let written_at = until(&format!("{}: writers settling", def.name), cluster, || {
        let apis = apis.clone();
        async move {
            let mut held = Vec::new();
            for a in &apis {
                let c = counters(a).await?;
                held.push(c.ingested + c.applied);
            }
            Ok((
                held.iter().all(|h| *h == elements),
                format!("held per writer {held:?} of {elements}"),
            ))
        }
    })
    .await?;
    g.write_secs = written_at.duration_since(write_start).as_secs_f64();
    g.write_per_sec = elements as f64 / g.write_secs.max(1e-9);
    eprintln!(
        "  {}: written and held by the writers in {:.1} s ({} per second)",
        def.name,
        g.write_secs,
        crate::thousands(g.write_per_sec)
    );

    // The stopped node's QUIC socket is free once its process has exited; check anyway, since a
    // taken port would fail the restart.
    let listen = cluster.node(down).listen;
    let port_deadline = Instant::now() + PORT_TIMEOUT;
    while std::net::UdpSocket::bind(listen).is_err() {
        if Instant::now() > port_deadline {
            bail!("port {listen} of the stopped node still taken after {PORT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restart = Instant::now();
    cluster.restart(down)?;
    let pid = cluster.pid(down).context("the restarted node has no pid")?;
    let rss = procstat::RssSampler::start(vec![pid], RSS_EVERY);
    let api = cluster.api(down);
    let source = cluster.api(0);
    let label = format!("{}: {} recovering", def.name, cluster.node(down).name);
    let recovered = until(&label, cluster, || {
        let (api, source) = (api.clone(), source.clone());
        async move {
            // Not up yet: keep polling (the restart itself is part of the time).
            let Ok(c) = counters(&api).await else {
                return Ok((false, "not answering yet".to_owned()));
            };
            Ok(match recovery {
                Recovery::Log => (
                    c.applied >= elements,
                    format!(
                        "applied {} of {}",
                        crate::thousands(c.applied as f64),
                        crate::thousands(elements as f64)
                    ),
                ),
                Recovery::Snapshot => {
                    let want = counters(&source).await?.entries;
                    (
                        want > 0 && c.entries >= want,
                        format!(
                            "entries {} of {}",
                            crate::thousands(c.entries as f64),
                            crate::thousands(want as f64)
                        ),
                    )
                }
            })
        }
    })
    .await?;
    let secs = recovered.duration_since(restart).as_secs_f64();
    // Everything the restarted process has used is the recovery's: it started with it.
    let recover_cpu = procstat::process_cpu_secs(pid).unwrap_or(0.0);
    let recover_threads = procstat::threads_delta(
        &std::collections::BTreeMap::new(),
        &procstat::threads_cpu_secs(pid),
    );
    g.recover_secs = Some(secs);
    g.recover_per_sec = Some(elements as f64 / secs.max(1e-9));
    let rss_max = rss.finish();
    let writer_rss_max = writer_rss.finish();
    let statuses = cluster
        .wait_quiet()
        .await
        .context("not quiet after the recovery")?;
    g.digests_equal = Some(statuses.iter().all(|s| s.digest == statuses[0].digest));
    g.entries = statuses[down].entries;
    for i in 0..def.nodes {
        g.snapshots_sent += counters(&cluster.api(i)).await?.snapshots_sent;
    }
    let rss_of = |i: usize| {
        if i == down {
            rss_max.first().copied().unwrap_or(0)
        } else {
            writer_rss_max.get(i).copied().unwrap_or(0)
        }
    };
    for i in 0..def.nodes {
        let mut n = NodeFigures {
            name: cluster.node(i).name.clone(),
            pid: cluster.pid(i).unwrap_or(0),
            rss_max_mib: rss_of(i) as f64 / 1024.0,
            ..NodeFigures::default()
        };
        if i == down {
            n.cpu_cores = recover_cpu / secs.max(1e-9);
            n.top_threads = recover_threads
                .iter()
                .take(6)
                .map(|(thread, cpu)| ThreadCpu {
                    thread: thread.clone(),
                    cores: cpu / secs.max(1e-9),
                })
                .collect();
        }
        fig.node.push(n);
    }
    fig.events = elements;
    fig.window_secs = secs;
    fig.events_per_sec = g.recover_per_sec.unwrap_or(0.0);
    fig.loadavg_after = procstat::loadavg();
    let mut problem = None;
    if g.digests_equal == Some(false) {
        problem = Some("digests differ after the recovery".to_owned());
    }
    if g.entries != elements {
        problem.get_or_insert(format!(
            "the recovered node holds {} entries, {} were written",
            g.entries, elements
        ));
    }
    match (recovery, g.snapshots_sent) {
        (Recovery::Snapshot, 0) => {
            problem.get_or_insert("no snapshot was sent: the node caught up from the log".into());
        }
        (Recovery::Log, n) if n > 0 => fig.notes.push(format!(
            "{n} snapshot(s) were sent: not a log catch-up alone"
        )),
        _ => {}
    }
    fig.growth = Some(g);
    crate::judge(&mut fig);
    fig.problem = problem;
    Ok(fig)
}
