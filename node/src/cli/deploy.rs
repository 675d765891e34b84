//! `outpost deploy`: uploads a bundle to the controller (a progress bar on a terminal), creates
//! a deployment (in waves with `--waves` or `--max-parallel`), and with `--wait` follows it wave
//! by wave until every target is running, rolled back or skipped; `deploy pause|resume|abort
//! ID` steer a rollout and `deploy status ID` shows it.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::commands::{connect, text};
use super::{ApiOpts, EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::bundle::{Manifest, ManifestError, MANIFEST_FILE};
use crate::limits::CLI_DEPLOY_POLL;
use crate::limits::MANIFEST_BYTES_MAX;

/// Statuses after which a machine's part of a deployment does not change any more.
const FINAL: [&str; 4] = ["running", "rolled_back", "failed", "skipped"];

/// The rollout flags of `outpost deploy`, as given.
pub(super) struct RolloutArgs {
    pub waves: Vec<String>,
    pub max_parallel: Option<u64>,
    pub healthy_for: Option<String>,
    pub failure_threshold: Option<u32>,
    pub drain: Option<String>,
}

impl RolloutArgs {
    /// Adds the rollout's keys to the request body (the controller checks them).
    fn add_to(&self, body: &mut Value) {
        if !self.waves.is_empty() {
            let waves: Vec<Value> = self
                .waves
                .iter()
                .map(|w| match w.trim().parse::<u64>() {
                    Ok(n) => json!(n),
                    Err(_) => json!(w.trim()),
                })
                .collect();
            body["waves"] = json!(waves);
        }
        if let Some(n) = self.max_parallel {
            body["max_parallel"] = json!(n);
        }
        if let Some(d) = &self.healthy_for {
            body["healthy_for"] = json!(d);
        }
        if let Some(n) = self.failure_threshold {
            body["failure_threshold"] = json!(n);
        }
        if let Some(d) = &self.drain {
            body["drain"] = json!(d);
        }
    }
}

/// What `outpost deploy` was asked to do.
pub(super) struct Request<'a> {
    pub service: &'a str,
    pub bundle: &'a Path,
    pub machines: &'a [String],
    pub rollout: RolloutArgs,
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
    req.rollout.add_to(&mut body);
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
        match conn.get(&["v1", "deployments", &id]) {
            Ok(d) => {
                println!("deployment {id} created");
                let waves = waves_summary(&d);
                if !waves.is_empty() {
                    println!("  {waves}");
                }
            }
            Err(_) => println!("deployment {id} created"),
        }
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

/// Why the manifest of a bundle file could not be read (the caller names the file).
#[derive(Debug, thiserror::Error)]
enum BundleManifestError {
    /// Opening the file, or an entry's path.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not a bundle (a tar file): {0}")]
    NotTar(#[source] std::io::Error),
    #[error("reading {MANIFEST_FILE}: {0}")]
    Read(#[source] std::io::Error),
    #[error("{MANIFEST_FILE}: {0}")]
    Invalid(#[source] ManifestError),
    #[error("no {MANIFEST_FILE} in it (pack a directory with `outpost bundle pack DIR -o FILE`)")]
    NoManifest,
}

/// The manifest inside a bundle file, read without unpacking it (bounded by the manifest's own
/// size limit).
fn manifest_of(bundle: &Path) -> Result<Manifest, BundleManifestError> {
    let file = std::fs::File::open(bundle)?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let entries = archive.entries().map_err(BundleManifestError::NotTar)?;
    for entry in entries {
        let entry = entry.map_err(BundleManifestError::NotTar)?;
        let path = entry.path()?.into_owned();
        let path = path.strip_prefix(".").unwrap_or(&path);
        if path == Path::new(MANIFEST_FILE) {
            let mut bytes = Vec::new();
            entry
                .take(MANIFEST_BYTES_MAX + 1)
                .read_to_end(&mut bytes)
                .map_err(BundleManifestError::Read)?;
            return Manifest::parse(&bytes).map_err(BundleManifestError::Invalid);
        }
    }
    Err(BundleManifestError::NoManifest)
}

/// `in 3 waves (1, 2, 7 machines)`, or nothing for one wave.
fn waves_summary(d: &Value) -> String {
    let waves = d["rollout"]["waves"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if waves.len() < 2 {
        return String::new();
    }
    let sizes: Vec<String> = waves
        .iter()
        .map(|w| w["machines"].as_array().map_or(0, Vec::len).to_string())
        .collect();
    format!("in {} waves ({} machines)", waves.len(), sizes.join(", "))
}

/// `wave 2 of 3 deploying`, from a deployment's rollout.
fn wave_line(d: &Value) -> String {
    let r = &d["rollout"];
    if r.is_null() {
        return String::new();
    }
    let n = r["waves"].as_array().map_or(0, Vec::len);
    let wave = r["wave"].as_u64().unwrap_or(1);
    let state = r["waves"]
        .get(wave.saturating_sub(1) as usize)
        .map(|w| text(w.get("state")))
        .unwrap_or_default();
    match text(r.get("state")).as_str() {
        "running" => format!("wave {wave} of {n} {state}"),
        other => format!("rollout {other} at wave {wave} of {n}"),
    }
}

/// Polls the deployment until every machine's status is final, printing (when `print`) each
/// machine's status and each wave as they change, with a progress bar on a terminal. Answers
/// the exit code and the deployment's last state.
fn follow(
    conn: &super::commands::Connection,
    id: &str,
    timeout: Duration,
    print: bool,
) -> (i32, Option<Value>) {
    let started = Instant::now();
    let mut shown: std::collections::BTreeMap<String, String> = Default::default();
    let mut shown_wave = String::new();
    let bar = (print && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} {wide_bar} {pos}/{len} machines done  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => println!("{line}"),
    };
    loop {
        let d = match conn.get(&["v1", "deployments", id]) {
            Ok(v) => v,
            Err(code) => return (code, None),
        };
        let list = d["machines"].as_array().cloned().unwrap_or_default();
        let wave = wave_line(&d);
        if print && wave != shown_wave && !wave.is_empty() {
            say(format!("deployment {id}: {wave}"));
            shown_wave = wave.clone();
        }
        let mut done = !list.is_empty();
        let mut finished = 0;
        for m in &list {
            let name = text(m.get("name"));
            let status = text(m.get("status"));
            let line = match m.get("reason").and_then(Value::as_str) {
                Some(r) if !r.is_empty() => format!("{status}: {r}"),
                _ => status.clone(),
            };
            if shown.get(&name) != Some(&line) {
                if print {
                    say(format!("  {name:<16} {line}"));
                }
                shown.insert(name, line);
            }
            let is_final = FINAL.contains(&status.as_str());
            finished += is_final as u64;
            done &= is_final;
        }
        // A rollout that runs its last wave is done once that wave stayed healthy.
        let rollout = text(d["rollout"].get("state"));
        done &= d["rollout"].is_null() || rollout != "running";
        if let Some(b) = &bar {
            b.set_length(list.len() as u64);
            b.set_position(finished);
            b.set_message(wave.clone());
        }
        if done {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let running = list.iter().filter(|m| m["status"] == "running").count();
            if print {
                if let Some(reason) = d["rollout"]["reason"].as_str() {
                    println!("deployment {id}: rollout {rollout}: {reason}");
                }
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
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            eprintln!(
                "error: deployment {id} not finished after {}",
                humantime::format_duration(timeout)
            );
            return (EXIT_FAILED, Some(d));
        }
        std::thread::sleep(CLI_DEPLOY_POLL);
    }
}

/// `outpost deploy pause|resume|abort ID`.
pub(super) fn control(opts: &ApiOpts, id: u64, action: &str) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let id = id.to_string();
    match conn.post(&["v1", "deployments", &id, action], &json!({})) {
        Ok(d) => {
            println!("deployment {id}: {}", wave_line(&d));
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// `outpost deploy status ID`: the rollout's waves, then each machine.
pub(super) fn status(opts: &ApiOpts, id: u64, as_json: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let d = match conn.get(&["v1", "deployments", &id.to_string()]) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if as_json {
        println!("{}", super::commands::pretty(&d));
        return EXIT_OK;
    }
    println!(
        "deployment {id}: {} {}{}",
        text(d.get("service")),
        text(d.get("version")),
        match wave_line(&d) {
            w if w.is_empty() => String::new(),
            w => format!(", {w}"),
        }
    );
    if let Some(reason) = d["rollout"]["reason"].as_str() {
        println!("  {reason}");
    }
    let waves = d["rollout"]["waves"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !waves.is_empty() {
        let rows: Vec<Vec<String>> = waves
            .iter()
            .map(|w| {
                vec![
                    text(w.get("wave")),
                    text(w.get("state")),
                    format!(
                        "{}/{}",
                        text(w.get("running")),
                        w["machines"].as_array().map_or(0, Vec::len)
                    ),
                    w["machines"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|m| text(Some(m)))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default(),
                ]
            })
            .collect();
        print!(
            "{}",
            super::cluster::table(&["WAVE", "STATE", "RUNNING", "MACHINES"], &rows)
        );
    }
    let rows: Vec<Vec<String>> = d["machines"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            vec![
                text(m.get("name")),
                text(m.get("status")),
                m["reason"].as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    print!(
        "{}",
        super::cluster::table(&["MACHINE", "STATUS", "REASON"], &rows)
    );
    EXIT_OK
}
