//! One run: start the nodes, put the load on, wait for convergence, sample replication
//! latencies, read CPU and memory, stop the nodes.

use crate::*;

pub(crate) async fn run_one(ctx: &Ctx, def: &RunDef) -> anyhow::Result<RunFigures> {
    if let Shape::Recover(recovery, elements) = def.shape {
        return growth::run(ctx, def, recovery, elements).await;
    }
    let names: Vec<String> = (1..=def.nodes).map(|i| format!("dc{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut spec = ClusterSpec::new(&format!("bench-{}", def.name), &name_refs);
    spec.base_dir = Some(ctx.base.clone());
    spec.log_level = ctx.log_level.clone();
    let mut cluster = Cluster::start(&ctx.bin, spec).await?;
    cluster.wait_all_ready().await?;
    if def.nodes > 1 {
        cluster.wait_quiet().await?;
    }
    let apis: Vec<Api> = (0..def.nodes).map(|i| cluster.api(i)).collect();
    let targets: Vec<Target> = (0..def.nodes)
        .map(|i| Target {
            node: i,
            base: format!("http://{}", cluster.node(i).api_addr),
            token: cluster.node(i).token.clone(),
        })
        .collect();
    if let Shape::LoadOnLog(records) = def.shape {
        growth::fill_over(def.name, &targets, records, def.accounts).await?;
    }
    let mut pids = Vec::new();
    for i in 0..def.nodes {
        pids.push(nodes::pid_of_config(&cluster.node(i).config)?);
    }
    let per = match def.kind {
        Kind::Single => 1,
        Kind::Batch(n) => n,
    };
    let mut fig = RunFigures {
        name: def.name.to_owned(),
        section: def.section.to_owned(),
        description: def.description.to_owned(),
        nodes: def.nodes,
        clients: def.clients_per_node * def.nodes,
        events_per_request: per,
        accounts: def.accounts,
        prefilled_records: match def.shape {
            Shape::LoadOnLog(n) => n,
            _ => 0,
        },
        loadavg_before: procstat::loadavg(),
        ..RunFigures::default()
    };
    let replicated = def.nodes > 1;
    let load_spec = load::Spec {
        targets,
        clients_per_target: def.clients_per_node,
        kind: def.kind,
        // The replication runs count everything from the first request: what matters there is
        // the time until every node holds every event.
        warmup: if replicated {
            Duration::ZERO
        } else {
            ctx.warmup
        },
        duration: ctx.duration,
        sample_every: if replicated {
            match def.kind {
                Kind::Single => 40,
                Kind::Batch(n) => n as u64,
            }
        } else {
            0
        },
        accounts: def.accounts,
    };

    // A fresh client per run: its pooled connections go with it.
    let http = load::client(def.clients_per_node * def.nodes);
    let rss = procstat::RssSampler::start(pids.clone(), RSS_EVERY);
    let writers = pids
        .iter()
        .map(|p| {
            procstat::thread_ids(*p, WRITER_THREAD)
                .first()
                .map(|t| (*p, *t))
        })
        .collect();
    let states = procstat::StateSampler::start(writers, STATE_EVERY);
    let base_snap = nodes::snapshot(&apis, &pids).await?;
    let warmup = load_spec.warmup;
    let (outcome, before) = tokio::join!(load::run(&http, &load_spec), async {
        tokio::time::sleep(warmup).await;
        nodes::snapshot(&apis, &pids).await
    });
    let before = before?;
    let load_end = outcome.finished.unwrap_or_else(Instant::now);

    // Replication: wait until every node holds every event.
    let mut repl = None;
    let mut problem = None;
    if replicated {
        let mut r = Replication {
            load_secs: load_end.duration_since(base_snap.at).as_secs_f64(),
            ..Replication::default()
        };
        match converge(&apis, &base_snap, &cluster).await {
            Ok((total, at)) => {
                r.total_events = total;
                let from_start = at.duration_since(base_snap.at).as_secs_f64();
                r.converged_secs = Some(from_start);
                r.tail_secs = Some(at.saturating_duration_since(load_end).as_secs_f64());
                r.events_per_sec_everywhere = Some(total as f64 / from_start);
            }
            Err(e) => problem = Some(format!("no convergence: {e:#}")),
        }
        repl = Some(r);
    }
    let after = nodes::snapshot(&apis, &pids).await?;
    fig.entries_end = after.counters[0].entries;
    let rss_max = rss.finish();
    let writer_states = states.finish();

    // Window figures.
    let (from, window) = if replicated {
        (
            &base_snap,
            after.at.duration_since(base_snap.at).as_secs_f64(),
        )
    } else {
        (&before, outcome.window.as_secs_f64())
    };
    let cpu_window = after.at.duration_since(from.at).as_secs_f64().max(1e-9);
    fig.window_secs = if replicated {
        repl.as_ref()
            .and_then(|r| r.converged_secs)
            .unwrap_or(window)
    } else {
        window
    };
    fig.events = outcome.events;
    fig.requests = outcome.requests;
    fig.events_per_sec = if replicated {
        repl.as_ref()
            .and_then(|r| r.events_per_sec_everywhere)
            .unwrap_or(0.0)
    } else {
        outcome.events_per_sec()
    };
    let lat = &outcome.latencies_us;
    let ms = |v: Option<u32>| v.map(|us| us as f64 / 1000.0);
    fig.latency_p50_ms = ms(load::quantile(lat, 0.5));
    fig.latency_p99_ms = ms(load::quantile(lat, 0.99));
    fig.latency_max_ms = ms(lat.last().copied());
    fig.errors = outcome.errors;
    fig.error_examples = outcome.error_examples.clone();
    let mut commits = 0u64;
    let mut ingested = 0u64;
    let mut commit_sum = 0.0;
    let mut commit_count = 0u64;
    for i in 0..def.nodes {
        let (a, b) = (&after.counters[i], &from.counters[i]);
        commits += a.commits - b.commits;
        ingested += a.ingested - b.ingested;
        commit_sum += a.commit_seconds_sum - b.commit_seconds_sum;
        commit_count += a.commit_seconds_count - b.commit_seconds_count;
        let top = procstat::threads_delta(&from.threads[i], &after.threads[i])
            .into_iter()
            .take(6)
            .map(|(thread, secs)| ThreadCpu {
                thread,
                cores: secs / cpu_window,
            })
            .collect();
        fig.node.push(NodeFigures {
            name: names[i].clone(),
            pid: pids[i],
            rss_max_mib: rss_max[i] as f64 / 1024.0,
            cpu_cores: (after.node_cpu[i] - from.node_cpu[i]) / cpu_window,
            top_threads: top,
            writer_states: writer_states.get(i).copied().filter(|w| w.samples > 0),
            events_ingested: a.ingested - b.ingested,
            elements_applied: a.applied - b.applied,
            commits: a.commits - b.commits,
        });
    }
    // Commits over the load window (for replication runs: until convergence; every node's
    // commits, applying included).
    fig.commits_per_sec = commits as f64 / window.max(1e-9);
    fig.events_per_commit = if commits > 0 {
        (ingested as f64
            + fig
                .node
                .iter()
                .map(|n| n.elements_applied as f64)
                .sum::<f64>())
            / commits as f64
    } else {
        0.0
    };
    fig.commit_mean_ms = (commit_count > 0).then(|| commit_sum * 1000.0 / commit_count as f64);
    fig.bench_cpu_cores = (after.bench_cpu - from.bench_cpu) / cpu_window;
    let machine = (after.machine_busy - from.machine_busy) / cpu_window;
    let nodes_cpu: f64 = fig.node.iter().map(|n| n.cpu_cores).sum();
    fig.other_cpu_cores = (machine - nodes_cpu - fig.bench_cpu_cores).max(0.0);

    // Replication latency from the sampled message ids, fetched after the run.
    if let Some(r) = repl.as_mut() {
        if problem.is_none() {
            match cluster.wait_quiet().await {
                Ok(st) => r.digests_equal = Some(st.iter().all(|s| s.digest == st[0].digest)),
                Err(e) => problem = Some(format!("not quiet after convergence: {e:#}")),
            }
            let mut samples = outcome.samples.clone();
            if samples.len() > SAMPLES_MAX {
                let step = samples.len() as f64 / SAMPLES_MAX as f64;
                samples = (0..SAMPLES_MAX)
                    .map(|k| samples[(k as f64 * step) as usize].clone())
                    .collect();
            }
            sample_latencies(&apis, &samples, r).await;
        }
    }
    fig.replication = repl;

    if outcome.errors > 0 {
        problem.get_or_insert_with(|| {
            format!(
                "{} request(s) failed, e.g. {}",
                outcome.errors,
                outcome.error_examples.first().cloned().unwrap_or_default()
            )
        });
    }
    if let Err(e) = cluster.check_alive() {
        problem.get_or_insert(e.to_string());
    }
    fig.loadavg_after = procstat::loadavg();
    judge(&mut fig);
    fig.problem = problem;
    if fig.problem.is_some() {
        // Dropping the cluster kills the nodes and keeps the directory with their logs.
        fig.kept_dir = Some(cluster.dir().display().to_string());
        drop(cluster);
    } else {
        fig.notes.extend(stop_nodes(&mut cluster, &pids).await);
        if let Err(e) = cluster.finish().await {
            fig.problem = Some(format!("removing the cluster: {e:#}"));
        }
    }
    Ok(fig)
}

/// Stops the nodes: SIGTERM to each, then up to [`STOP_GRACE`] for all to exit; a node still
/// running then is killed (SIGKILL). Returns what did not go as it should. (The testkit's
/// `Cluster::finish` waits 30 s per node, which would stretch every run when nodes do not exit.)
pub(crate) async fn stop_nodes(cluster: &mut Cluster, pids: &[u32]) -> Vec<String> {
    let mut notes = Vec::new();
    let start = Instant::now();
    for pid in pids {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    let mut exited = vec![false; pids.len()];
    while start.elapsed() < STOP_GRACE {
        for (i, pid) in pids.iter().enumerate() {
            exited[i] = procstat::has_exited(*pid);
        }
        if exited.iter().all(|e| *e) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, done) in exited.iter().enumerate() {
        let name = cluster.node(i).name.clone();
        if !done {
            notes.push(format!(
                "{name} did not exit within {STOP_GRACE:?} of SIGTERM; killed"
            ));
        }
        // Reaps the child (a node that exited is only reaped here; kill9 then says it had
        // exited already, which is what we want).
        let _ = cluster.kill9(i);
    }
    notes
}

/// Polls every node's counters until each holds every event ingested anywhere (its own ingested
/// plus remote elements applied equals the sum of everyone's ingested); returns that total and
/// when it was first seen.
pub(crate) async fn converge(
    apis: &[Api],
    base: &nodes::Snapshot,
    cluster: &Cluster,
) -> anyhow::Result<(u64, Instant)> {
    let start = Instant::now();
    let mut last;
    loop {
        let at = Instant::now();
        let mut cs = Vec::new();
        for a in apis {
            cs.push(nodes::counters(a).await?);
        }
        let total: u64 = cs
            .iter()
            .zip(&base.counters)
            .map(|(c, b)| c.ingested - b.ingested)
            .sum();
        let held: Vec<u64> = cs
            .iter()
            .zip(&base.counters)
            .map(|(c, b)| (c.ingested - b.ingested) + (c.applied - b.applied))
            .collect();
        if held.iter().all(|h| *h == total) {
            return Ok((total, at));
        }
        if held.iter().any(|h| *h > total) {
            bail!("a node holds more events than were ingested: held {held:?}, total {total}");
        }
        last = format!("total ingested {total}, held per node {held:?}");
        if let Err(e) = cluster.check_alive() {
            bail!("{e}");
        }
        if start.elapsed() > CONVERGE_TIMEOUT {
            let mut detail = String::new();
            for a in apis {
                match a.status().await {
                    Ok(s) => detail.push_str(&testkit::summarize(&[s])),
                    Err(e) => {
                        let _ = writeln!(detail, "  {}: {e}", a.base);
                    }
                }
            }
            bail!("after {CONVERGE_TIMEOUT:?}: {last}\n{detail}");
        }
        tokio::time::sleep(CONVERGE_POLL).await;
    }
}

/// Fetches every sampled message at every node and fills in the latency figures.
pub(crate) async fn sample_latencies(apis: &[Api], samples: &[load::Sample], r: &mut Replication) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut set = tokio::task::JoinSet::new();
    for (k, s) in samples.iter().enumerate() {
        for (i, api) in apis.iter().enumerate() {
            let api = api.clone();
            let id = s.message_id.clone();
            let locator = s.locator.clone();
            let sem = sem.clone();
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let info = match locator {
                    Some((origin, oseq)) => api.message_at(&id, &origin, oseq).await,
                    None => api.message(&id).await,
                };
                (k, i, info)
            });
        }
    }
    let n = apis.len();
    let mut infos: Vec<Vec<Option<testkit::MessageInfo>>> = vec![vec![None; n]; samples.len()];
    while let Some(res) = set.join_next().await {
        if let Ok((k, i, Ok(Some(m)))) = res {
            infos[k][i] = Some(m);
        }
    }
    let mut peer = Vec::new();
    let mut everywhere = Vec::new();
    for (k, s) in samples.iter().enumerate() {
        let Some(origin) = infos[k][s.node].as_ref() else {
            r.missing_samples += 1;
            continue;
        };
        let mut worst: Option<i64> = None;
        let mut complete = true;
        let mut full = true;
        for (i, info) in infos[k].iter().enumerate() {
            if i == s.node {
                continue;
            }
            match info {
                Some(m) => {
                    let d = m.first_seen_ms as i64 - origin.first_seen_ms as i64;
                    peer.push(d);
                    worst = Some(worst.map_or(d, |w| w.max(d)));
                    if m.message_count != (n - 1) as u64 {
                        full = false;
                    }
                }
                None => complete = false,
            }
        }
        if !complete {
            r.missing_samples += 1;
            continue;
        }
        if full {
            r.full_count_samples += 1;
        }
        if let Some(w) = worst {
            everywhere.push(w);
        }
    }
    peer.sort_unstable();
    everywhere.sort_unstable();
    let f = |v: Option<i64>| v.map(|x| x as f64);
    r.samples = samples.len();
    r.peer_p50_ms = f(load::quantile(&peer, 0.5));
    r.peer_p99_ms = f(load::quantile(&peer, 0.99));
    r.everywhere_p50_ms = f(load::quantile(&everywhere, 0.5));
    r.everywhere_p99_ms = f(load::quantile(&everywhere, 0.99));
    r.everywhere_max_ms = f(everywhere.last().copied());
}
