//! What a run's figures are compared with (targets, the baseline, NATS) and the tables printed.

use crate::*;

/// Each growth ingest run over its baseline's figures, and its target judged on them.
pub(crate) fn compare_growth(runs: &mut [RunFigures]) {
    let Some(base) = runs
        .iter()
        .find(|r| r.name == GROWTH_BASELINE && r.problem.is_none())
        .cloned()
    else {
        return;
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let rss = |f: &RunFigures| f.node.iter().map(|n| n.rss_max_mib).reduce(f64::max);
    for r in runs.iter_mut() {
        if (r.accounts <= base.accounts && r.prefilled_records == 0)
            || r.growth.is_some()
            || r.events_per_request != base.events_per_request
        {
            continue;
        }
        let v = BaselineRatios {
            baseline: base.name.clone(),
            events_per_sec: r.events_per_sec / base.events_per_sec.max(1e-9),
            p99: ratio(r.latency_p99_ms, base.latency_p99_ms),
            rss: ratio(rss(r), rss(&base)),
        };
        r.target = format!(
            "ev/s >= {TARGET_GROWTH_EPS_RATIO}x {b}, RSS <= {TARGET_GROWTH_RSS_RATIO}x {b}",
            b = base.name
        );
        r.target_met = Some(
            r.target_met.unwrap_or(true)
                && v.events_per_sec >= TARGET_GROWTH_EPS_RATIO
                && v.rss.is_some_and(|x| x <= TARGET_GROWTH_RSS_RATIO),
        );
        r.vs_baseline = Some(v);
    }
}

/// Every run's events/s and p99 over NATS's msg/s and publish-to-ack p99.
pub(crate) fn compare_nats(runs: &mut [RunFigures], n: &nats::NatsFigures) {
    for r in runs.iter_mut() {
        // A recovery run's rate (entries into a restarted node) is not a publish rate.
        if r.problem.is_some() || r.growth.is_some() || n.msgs_per_sec <= 0.0 {
            continue;
        }
        r.vs_nats = Some(r.events_per_sec / n.msgs_per_sec);
        let p99 = match &r.replication {
            Some(rep) => rep.everywhere_p99_ms,
            None => r.latency_p99_ms,
        };
        r.p99_vs_nats = match (p99, n.ack_p99_ms) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
    }
}

pub(crate) fn header_text(
    m: &procstat::Machine,
    ctx: &Ctx,
    base: &Path,
    base_note: &str,
    mount: Option<&(String, String, String)>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "outpost-bench");
    let _ = writeln!(
        s,
        "machine:  {} cores, {}, {} MiB RAM, Linux {}",
        m.nproc, m.model, m.mem_total_mib, m.kernel
    );
    let _ = writeln!(
        s,
        "disk:     {} ({}) on {}",
        base.display(),
        base_note,
        mount
            .map(|(mp, fs, dev)| format!("{mp} {fs} {dev}"))
            .unwrap_or_else(|| "?".into())
    );
    let _ = writeln!(
        s,
        "load:     loadavg {} at start; {:.1} s per run after a {:.1} s warm-up (1 DC runs), each run on fresh nodes",
        procstat::loadavg(),
        ctx.duration.as_secs_f64(),
        ctx.warmup.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "note:     the load generator runs on the same {} cores as the nodes (its CPU share is shown as `bench cpu`);",
        m.nproc
    );
    let _ = write!(
        s,
        "          figures taken while other work runs on the machine (see loadavg) are noisy"
    );
    s
}

/// The growth section: the many-account ingest run beside its baseline, and the recovery runs.
pub(crate) fn growth_text(runs: &[RunFigures]) -> String {
    let mut s = String::new();
    let rss = |f: &RunFigures| f.node.iter().map(|n| n.rss_max_mib).reduce(f64::max);
    let x = |v: Option<f64>| v.map_or("-".to_owned(), |r| format!("{r:.2}x"));
    let ingest: Vec<&RunFigures> = runs.iter().filter(|f| f.vs_baseline.is_some()).collect();
    if !ingest.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "growth: the same load over more accounts or onto a longer log (ratio: this run over the baseline in the same sitting)"
        );
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "run",
            "accounts",
            "entries",
            "events/s",
            "ratio",
            "p99 ms",
            "ratio",
            "RSS MiB",
            "ratio"
        );
        for f in ingest {
            let v = f.vs_baseline.as_ref().expect("filtered");
            if let Some(b) = runs.iter().find(|r| r.name == v.baseline) {
                let _ = writeln!(
                    s,
                    "{:<16} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
                    b.name,
                    thousands(b.accounts as f64),
                    thousands(b.entries_end as f64),
                    thousands(b.events_per_sec),
                    "1.00x",
                    opt_ms(b.latency_p99_ms),
                    "1.00x",
                    rss(b).map_or("-".into(), |m| format!("{m:.0}")),
                    "1.00x",
                );
            }
            let _ = writeln!(
                s,
                "{:<16} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
                f.name,
                thousands(f.accounts as f64),
                thousands(f.entries_end as f64),
                thousands(f.events_per_sec),
                x(Some(v.events_per_sec)),
                opt_ms(f.latency_p99_ms),
                x(v.p99),
                rss(f).map_or("-".into(), |m| format!("{m:.0}")),
                x(v.rss),
            );
        }
    }
    let rec: Vec<&RunFigures> = runs.iter().filter(|f| f.growth.is_some()).collect();
    if !rec.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "recovery: the last node stopped, entries written at the others, the node restarted and timed until it holds them"
        );
        let _ = writeln!(
            s,
            "{:<12} {:>10} {:>8} {:>10} {:>9} {:>12} {:>9} {:>8} {:>13}",
            "run",
            "entries",
            "write s",
            "written/s",
            "recover s",
            "recovered/s",
            "snapshots",
            "digests",
            "RSS MiB"
        );
        for f in rec {
            let g = f.growth.as_ref().expect("filtered");
            let rss = f
                .node
                .iter()
                .map(|n| format!("{:.0}", n.rss_max_mib))
                .collect::<Vec<_>>()
                .join("/");
            let _ = writeln!(
                s,
                "{:<12} {:>10} {:>8.1} {:>10} {:>9} {:>12} {:>9} {:>8} {:>13}",
                f.name,
                thousands(g.elements as f64),
                g.write_secs,
                thousands(g.write_per_sec),
                g.recover_secs.map_or("-".into(), |v| format!("{v:.1}")),
                g.recover_per_sec.map_or("-".into(), thousands),
                g.snapshots_sent,
                match g.digests_equal {
                    Some(true) => "equal",
                    Some(false) => "DIFFER",
                    None => "-",
                },
                rss,
            );
        }
        let _ = writeln!(
            s,
            "recover s: from the restart (process start included) until the node holds every entry; RSS: each node's peak"
        );
        let _ = writeln!(
            s,
            "(the writers' over the whole run, the restarted node's while it recovers)."
        );
    }
    s
}

/// Sets the run's target text and whether it was met.
pub(crate) fn judge(f: &mut RunFigures) {
    let rss_ok = f.node.iter().all(|n| n.rss_max_mib <= TARGET_RSS_MIB);
    let (target, met) = match f.name.as_str() {
        "batch1000" | "batch10000" => (
            format!(">= {} ev/s", thousands(TARGET_BATCH_EPS)),
            Some(f.events_per_sec >= TARGET_BATCH_EPS),
        ),
        "single256" => (
            format!(">= {} ev/s", thousands(TARGET_SINGLE256_EPS)),
            Some(f.events_per_sec >= TARGET_SINGLE256_EPS),
        ),
        "3dc-single" | "3dc-batch" => {
            let p99 = f.replication.as_ref().and_then(|r| r.everywhere_p99_ms);
            (
                format!(
                    ">= {} ev/s everywhere, p99 <= {TARGET_3DC_P99_MS} ms",
                    thousands(TARGET_3DC_EPS)
                ),
                Some(
                    f.events_per_sec >= TARGET_3DC_EPS
                        && p99.is_some_and(|p| p <= TARGET_3DC_P99_MS),
                ),
            )
        }
        "catchup-1m" => (
            format!(">= {} elements/s", thousands(TARGET_CATCHUP_EPS)),
            Some(f.events_per_sec >= TARGET_CATCHUP_EPS),
        ),
        _ => ("-".to_owned(), None),
    };
    f.target = format!("{target}; RSS <= {TARGET_RSS_MIB} MiB");
    f.target_met = Some(met.unwrap_or(true) && rss_ok);
}

pub(crate) fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub(crate) fn opt_ms(v: Option<f64>) -> String {
    match v {
        Some(x) if x < 10.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

pub(crate) fn one_line(f: &RunFigures) -> String {
    match &f.problem {
        Some(p) => format!("  {}: PROBLEM: {p}", f.name),
        None => format!(
            "  {}: {} ev/s, p50 {} ms, p99 {} ms (loadavg {})",
            f.name,
            thousands(f.events_per_sec),
            opt_ms(f.latency_p50_ms),
            opt_ms(f.latency_p99_ms),
            f.loadavg_before
        ),
    }
}

pub(crate) fn table_text(
    runs: &[RunFigures],
    nats: Option<&nats::NatsFigures>,
    nats_problem: Option<&str>,
) -> String {
    let mut s = String::new();
    let x = |v: Option<f64>| v.map_or("-".to_owned(), |r| format!("{r:.2}x"));
    let vs_head = if nats.is_some() { " vs NATS" } else { "" };
    let mark = |m: Option<bool>| match m {
        Some(true) => "ok",
        Some(false) => "MISSED",
        None => "",
    };
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<12} {:>4} {:>5} {:>10}{} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>11} {:>5} {:>14} {:>5} {:>15}  target",
        "run", "nodes", "clnts", "events/s", vs_head, "p50 ms", "p99 ms", "max ms", "commits/s", "ev/cmt", "cmt ms", "RSS MiB", "bench", "node cpu", "other", "loadavg"
    );
    for f in runs {
        if let Some(p) = &f.problem {
            if f.events == 0 && f.node.is_empty() {
                let _ = writeln!(s, "{:<12} PROBLEM: {p}", f.name);
                continue;
            }
        }
        let rss = f
            .node
            .iter()
            .map(|n| format!("{:.0}", n.rss_max_mib))
            .collect::<Vec<_>>()
            .join("/");
        let cpu = f
            .node
            .iter()
            .map(|n| format!("{:.2}", n.cpu_cores))
            .collect::<Vec<_>>()
            .join("/");
        let _ = writeln!(
            s,
            "{:<12} {:>4} {:>5} {:>10}{} {:>8} {:>8} {:>8} {:>9} {:>8.1} {:>8} {:>11} {:>5.2} {:>14} {:>5.2} {:>15}  {} {}",
            f.name,
            f.nodes,
            f.clients,
            thousands(f.events_per_sec),
            if nats.is_some() { format!(" {:>7}", x(f.vs_nats)) } else { String::new() },
            opt_ms(f.latency_p50_ms),
            opt_ms(f.latency_p99_ms),
            opt_ms(f.latency_max_ms),
            thousands(f.commits_per_sec),
            f.events_per_commit,
            opt_ms(f.commit_mean_ms),
            rss,
            f.bench_cpu_cores,
            cpu,
            f.other_cpu_cores,
            f.loadavg_before,
            f.target,
            mark(f.target_met),
        );
        for n in &f.notes {
            let _ = writeln!(s, "    note: {n}");
        }
        if let Some(p) = &f.problem {
            let _ = writeln!(s, "    PROBLEM: {p}");
            if let Some(d) = &f.kept_dir {
                let _ = writeln!(s, "    kept for inspection: {d}");
            }
        }
    }
    if let Some(n) = nats {
        let rss = n
            .rss_max_mib
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join("/");
        let cpu = n
            .cpu_cores
            .iter()
            .map(|c| format!("{c:.2}"))
            .collect::<Vec<_>>()
            .join("/");
        let _ = writeln!(
            s,
            "{:<12} {:>4} {:>5} {:>10} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>11} {:>5.2} {:>14} {:>5} {:>15}  {} (R{}, sync_interval: always, {} in flight, {}-byte payloads)",
            "nats-r3",
            n.servers,
            n.in_flight,
            thousands(n.msgs_per_sec),
            "1.00x",
            opt_ms(n.ack_p50_ms),
            opt_ms(n.ack_p99_ms),
            opt_ms(n.ack_max_ms),
            "-",
            "-",
            "-",
            rss,
            n.bench_cpu_cores,
            cpu,
            "-",
            n.loadavg_before,
            n.server_version,
            n.replicas,
            n.in_flight,
            n.payload_bytes,
        );
        if n.errors > 0 || n.duplicates > 0 {
            let _ = writeln!(
                s,
                "    nats: {} failed publish(es), {} duplicate ack(s); e.g. {}",
                n.errors,
                n.duplicates,
                n.error_examples.first().cloned().unwrap_or_default()
            );
        }
    }
    if let Some(p) = nats_problem {
        let _ = writeln!(s, "{:<12} PROBLEM: {p}", "nats-r3");
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "events/s: 1 DC runs: acknowledged (durably committed) events per second of the window;"
    );
    let _ = writeln!(
        s,
        "          3 DC runs: events ingested at all three / time from the first request until every node held every event."
    );
    let _ = writeln!(
        s,
        "p50/p99/max: client-side, send to full answer (for batches: per request). ev/cmt: events (and applied remote"
    );
    let _ = writeln!(
        s,
        "elements) per write transaction; cmt ms: mean outpost_commit_seconds. bench/node cpu: cores used over the window;");
    let _ = writeln!(
        s,
        "other: cores used by everything else on the machine meanwhile (/proc/stat; other engineers' work = noise)."
    );
    if nats.is_some() {
        let _ = writeln!(
            s,
            "vs NATS: the run's events/s over NATS JetStream's acknowledged msg/s in the same sitting (nats-r3: one client,"
        );
        let _ = writeln!(
            s,
            "         async publishes with a unique Nats-Msg-Id each; p50/p99/max: publish to ack, i.e. stored on 2 of 3 servers)."
        );
    }

    let repl: Vec<&RunFigures> = runs.iter().filter(|f| f.replication.is_some()).collect();
    if !repl.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "replication (3 DCs): ingest at the origin to first seen at each peer (first_seen_ms, same clock), sampled ids"
        );
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>8} {:>8} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}{}",
            "run",
            "events",
            "load s",
            "conv s",
            "tail s",
            "ev/s evrywh",
            "peer p50",
            "peer p99",
            "all p50",
            "all p99",
            "all max",
            "samples",
            "count ok",
            if nats.is_some() { " p99 vs NATS" } else { "" }
        );
        for f in repl {
            let r = f.replication.as_ref().expect("filtered");
            let o = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.2}"));
            let _ = writeln!(
                s,
                "{:<12} {:>9} {:>8.2} {:>8} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}{}",
                f.name,
                thousands(r.total_events as f64),
                r.load_secs,
                o(r.converged_secs),
                o(r.tail_secs),
                r.events_per_sec_everywhere.map_or("-".into(), thousands),
                opt_ms(r.peer_p50_ms),
                opt_ms(r.peer_p99_ms),
                opt_ms(r.everywhere_p50_ms),
                opt_ms(r.everywhere_p99_ms),
                opt_ms(r.everywhere_max_ms),
                r.samples,
                format!("{}/{}", r.full_count_samples, r.samples - r.missing_samples),
                if nats.is_some() { format!(" {:>11}", x(f.p99_vs_nats)) } else { String::new() },
            );
            if r.missing_samples > 0 {
                let _ = writeln!(
                    s,
                    "    {} sampled message(s) missing at some node",
                    r.missing_samples
                );
            }
            if r.digests_equal == Some(false) {
                let _ = writeln!(s, "    DIGESTS DIFFER after convergence");
            }
        }
        let _ = writeln!(
            s,
            "all p50/p99/max: per message, the slowest peer (ingest to everywhere). count ok: samples with message_count n-1 at each peer."
        );
        if nats.is_some() {
            let _ = writeln!(
                s,
                "p99 vs NATS: all p99 over NATS's publish-to-ack p99 (NATS acks once 2 of 3 servers hold a message; Outpost's figure is all 3)."
            );
        }
    }
    s.push_str(&growth_text(runs));

    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "where the CPU went (busiest threads of each node over the window, in cores):"
    );
    for f in runs {
        // Recovery runs measure only the recovering node's CPU.
        for n in f
            .node
            .iter()
            .filter(|n| f.growth.is_none() || !n.top_threads.is_empty())
        {
            let threads = n
                .top_threads
                .iter()
                .map(|t| format!("{} {:.2}", t.thread, t.cores))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                s,
                "  {:<12} {:<4} total {:.2}: {threads}",
                f.name, n.name, n.cpu_cores
            );
            if let Some(w) = &n.writer_states {
                let _ = writeln!(
                    s,
                    "  {:<12} {:<4}   writer thread: running/runnable {:.0}%, disk wait {:.0}%, waiting for work {:.0}%",
                    "", "", w.running * 100.0, w.disk * 100.0, w.sleeping * 100.0
                );
            }
        }
    }
    let errors: Vec<&RunFigures> = runs.iter().filter(|f| f.errors > 0).collect();
    for f in errors {
        let _ = writeln!(s, "{}: {} failed request(s):", f.name, f.errors);
        for e in &f.error_examples {
            let _ = writeln!(s, "    {e}");
        }
    }
    s
}
