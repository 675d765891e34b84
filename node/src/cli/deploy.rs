//! `outpost deploy`: uploads a bundle to the controller (a progress bar on a terminal), creates
//! a deployment, and with `--wait` follows it until every target is running or rolled back.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::commands::{connect, text};
use super::{ApiOpts, EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::bundle::manifest::MANIFEST_BYTES_MAX;
use crate::bundle::{Manifest, MANIFEST_FILE};

/// How often `--wait` asks where the deployment stands.
const POLL: Duration = Duration::from_millis(250);

/// Statuses after which a machine's part of a deployment does not change any more.
const FINAL: [&str; 3] = ["running", "rolled_back", "failed"];

/// What `outpost deploy` was asked to do.
pub(super) struct Request<'a> {
    pub service: &'a str,
    pub bundle: &'a Path,
    pub machines: &'a [String],
    pub wait: bool,
    pub timeout: Duration,
    /// One JSON object on stdout, and no other text there.
    pub json: bool,
}

pub(super) fn deploy(opts: &ApiOpts, req: &Request<'_>) -> i32 {
    let (service, bundle) = (req.service, req.bundle);
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
    // A bundle for another service would be refused by the controller only after the upload.
    match manifest_of(bundle) {
        Ok(m) if m.service == service => {}
        Ok(m) => {
            eprintln!(
                "error: --service: {service:?}, but the bundle {} is for {:?} (its manifest's \
                 service, version {})",
                bundle.display(),
                m.service,
                m.version
            );
            return EXIT_USAGE;
        }
        Err(e) => {
            eprintln!("error: --bundle: {}: {e}", bundle.display());
            return EXIT_USAGE;
        }
    }
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
    if !req.json {
        println!(
            "bundle {bundle_id}: {} {} ({len} bytes) uploaded",
            text(up.get("service")),
            text(up.get("version"))
        );
    }
    let mut body = json!({"service": service, "bundle_id": bundle_id});
    if !req.machines.is_empty() {
        body["machines"] = json!(req.machines);
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
    if !req.json {
        println!("deployment {id} created");
    }
    let mut answer = json!({"bundle": up, "deployment": created});
    let code = if req.wait {
        let (code, last) = follow(&conn, &id, req.timeout, !req.json);
        if let Some(last) = last {
            answer["result"] = last;
        }
        code
    } else {
        EXIT_OK
    };
    if req.json {
        println!("{}", super::commands::pretty(&answer));
    }
    code
}

/// The manifest inside a bundle file, read without unpacking it (bounded by the manifest's own
/// size limit).
fn manifest_of(bundle: &Path) -> Result<Manifest, String> {
    let file = std::fs::File::open(bundle).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let entries = archive
        .entries()
        .map_err(|e| format!("not a bundle (a tar file): {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("not a bundle (a tar file): {e}"))?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let path = path.strip_prefix(".").unwrap_or(&path);
        if path == Path::new(MANIFEST_FILE) {
            let mut bytes = Vec::new();
            entry
                .take(MANIFEST_BYTES_MAX + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("reading {MANIFEST_FILE}: {e}"))?;
            return Manifest::parse(&bytes).map_err(|e| format!("{MANIFEST_FILE}: {e}"));
        }
    }
    Err(format!(
        "no {MANIFEST_FILE} in it (pack a directory with `outpost bundle pack DIR -o FILE`)"
    ))
}

/// Polls the deployment until every machine's status is final, printing (when `print`) each
/// machine's status as it changes. Answers the exit code and the deployment's last state.
fn follow(
    conn: &super::commands::Connection,
    id: &str,
    timeout: Duration,
    print: bool,
) -> (i32, Option<Value>) {
    let started = Instant::now();
    let mut shown: std::collections::BTreeMap<String, String> = Default::default();
    loop {
        let d = match conn.get(&["v1", "deployments", id]) {
            Ok(v) => v,
            Err(code) => return (code, None),
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
                if print {
                    println!("  {name:<16} {line}");
                }
                shown.insert(name, line);
            }
            done &= FINAL.contains(&status.as_str());
        }
        if done {
            let running = list.iter().filter(|m| m["status"] == "running").count();
            if print {
                println!(
                    "deployment {id}: {running} of {} machines run the new bundle",
                    list.len()
                );
            }
            let code = if running == list.len() {
                EXIT_OK
            } else {
                EXIT_FAILED
            };
            return (code, Some(d));
        }
        if started.elapsed() > timeout {
            eprintln!(
                "error: deployment {id} not finished after {}",
                humantime::format_duration(timeout)
            );
            return (EXIT_FAILED, Some(d));
        }
        std::thread::sleep(POLL);
    }
}
