//! `outpost deploy`: uploads a bundle to the controller (a progress bar on a terminal), creates
//! a deployment, and with `--wait` follows it until every target is running or rolled back.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::commands::{connect, text};
use super::{ApiOpts, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// How often `--wait` asks where the deployment stands.
const POLL: Duration = Duration::from_millis(250);

/// Statuses after which a machine's part of a deployment does not change any more.
const FINAL: [&str; 3] = ["running", "rolled_back", "failed"];

pub(super) fn deploy(
    opts: &ApiOpts,
    service: &str,
    bundle: &Path,
    machines: &[String],
    wait: bool,
    timeout: Duration,
) -> i32 {
    if !crate::config::SERVICES.contains(&service) {
        eprintln!(
            "error: --service: unknown {service:?}; expected one of {}",
            crate::config::SERVICES.join(", ")
        );
        return EXIT_USAGE;
    }
    let len = match std::fs::metadata(bundle) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            eprintln!(
                "error: --bundle: {} is not a file (pack a directory with `outpost bundle pack DIR -o FILE`)",
                bundle.display()
            );
            return EXIT_USAGE;
        }
        Err(e) => {
            eprintln!("error: --bundle: {}: {e}", bundle.display());
            return EXIT_USAGE;
        }
    };
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let shown = bar.clone();
    let uploaded = conn.upload(&["v1", "bundles"], bundle, move |sent| {
        if let Some(b) = &shown {
            b.set_position(sent);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let up = match uploaded {
        Ok(v) => v,
        Err(code) => return code,
    };
    let bundle_id = text(up.get("bundle_id"));
    println!(
        "bundle {bundle_id}: {} {} ({len} bytes) uploaded",
        text(up.get("service")),
        text(up.get("version"))
    );
    let mut body = json!({"service": service, "bundle_id": bundle_id});
    if !machines.is_empty() {
        body["machines"] = json!(machines);
    }
    let created = match conn.post(&["v1", "deployments"], &body) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let id = match created.get("deployment_id") {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        _ => {
            eprintln!("error: the controller did not answer a deployment id: {created}");
            return EXIT_FAILED;
        }
    };
    println!("deployment {id} created");
    if !wait {
        return EXIT_OK;
    }
    follow(&conn, &id, timeout)
}

/// Polls the deployment, printing every machine's status when it changes, until all are final.
fn follow(conn: &super::commands::Connection, id: &str, timeout: Duration) -> i32 {
    let started = Instant::now();
    let mut shown: std::collections::BTreeMap<String, String> = Default::default();
    loop {
        let d = match conn.get(&["v1", "deployments", id]) {
            Ok(v) => v,
            Err(code) => return code,
        };
        let list = d["machines"].as_array().cloned().unwrap_or_default();
        let mut done = !list.is_empty();
        for m in &list {
            let name = text(m.get("name"));
            let status = text(m.get("status"));
            let line = match m.get("reason").and_then(Value::as_str) {
                Some(r) if !r.is_empty() => format!("{status}: {r}"),
                _ => status.clone(),
            };
            if shown.get(&name) != Some(&line) {
                println!("  {name:<16} {line}");
                shown.insert(name, line);
            }
            done &= FINAL.contains(&status.as_str());
        }
        if done {
            let running = list.iter().filter(|m| m["status"] == "running").count();
            println!(
                "deployment {id}: {running} of {} machines run the new bundle",
                list.len()
            );
            return if running == list.len() {
                EXIT_OK
            } else {
                EXIT_FAILED
            };
        }
        if started.elapsed() > timeout {
            eprintln!(
                "error: deployment {id} not finished after {}",
                humantime::format_duration(timeout)
            );
            return EXIT_FAILED;
        }
        std::thread::sleep(POLL);
    }
}
