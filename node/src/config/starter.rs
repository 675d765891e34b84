//! The commented starter config `outpost init --config FILE` writes for each role. Every value
//! it sets is valid, so `parse` accepts it as written (a test checks each role); optional keys
//! are shown commented out with their defaults.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use super::{Limits, DEFAULT_API, DEFAULT_LISTEN};
use crate::wire::Role;

/// The worker starter's stand-in for the controller's fingerprint. Validation refuses it (at
/// `config check` and at start), naming the field, so a forgotten edit cannot go unnoticed.
pub const FINGERPRINT_PLACEHOLDER: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// A TOML basic string holding `s`.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A commented starter config for `role`, which [`super::parse`] accepts.
pub fn starter(role: Role, name: &str, data_dir: &Path) -> String {
    let mut out = String::new();
    let w = &mut out;
    let dir = data_dir.display().to_string();
    line(
        w,
        &format!("# Outpost {role} config, written by `outpost init`."),
    );
    line(
        w,
        "# Unknown keys are an error. Durations are humantime (\"30s\", \"5m\", \"24h\").",
    );
    line(w, "");
    line(w, &format!("role = {}", quote(role.as_str())));
    line(
        w,
        &format!("name = {:<28}# unique in the cluster", quote(name)),
    );
    line(w, &format!("data_dir = {}", quote(&dir)));
    line(
        w,
        &format!(
            "listen = {:<26}# QUIC (UDP), where other nodes reach this one",
            quote(DEFAULT_LISTEN)
        ),
    );
    line(
        w,
        &format!(
            "api = {:<29}# local HTTP API; bearer token in data_dir/token",
            quote(DEFAULT_API)
        ),
    );
    line(w, "");
    match role {
        Role::Datacenter => datacenter(w),
        Role::Controller => controller(w),
        Role::Worker => worker(w),
    }
    limits(w);
    line(w, "");
    line(w, "[log]");
    line(
        w,
        "level = \"info\"                     # trace, debug, info, warn, error, off, or e.g.",
    );
    line(
        w,
        "                                   # \"info,outpost=debug\"; RUST_LOG overrides it",
    );
    line(
        w,
        "# format = \"text\"                  # text, or json: one JSON object per line",
    );
    out
}

/// `24h` rather than humantime's `1day`: the unit operators type.
fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs > 0 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if d.subsec_nanos() == 0 && secs > 0 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn line(w: &mut String, s: &str) {
    w.push_str(s.trim_end());
    w.push('\n');
}

fn datacenter(w: &mut String) {
    for s in [
        "# Every peer datacenter; both sides list each other. One block per peer.",
        "# [[peers]]",
        "# name = \"dc-west\"",
        "# addr = \"192.0.2.10:7400\"",
        "# fingerprint = \"<64 hex, as `outpost init` prints it on that node>\"",
        "#   (or a list of two while its certificate rotates)",
        "",
        "[replication]",
        "fanout = 0                         # 0 relays to every peer; N bounds relays in a large mesh",
        "",
    ] {
        line(w, s);
    }
}

fn controller(w: &mut String) {
    for s in [
        "# A worker presenting this token is admitted at once; without [admission] it waits as",
        "# pending for `outpost keys accept`.",
        "# [admission]",
        "# join_token_file = \"/etc/outpost/join-token\"",
        "",
        "[cluster]",
        "down_after = \"15s\"                 # a worker silent this long is marked down and leaves its pool",
        "# channel_max = 256                # unacknowledged publications kept per machine",
        "# bundle_keep_unused = \"24h\"       # an upload no deployment needs is deleted this long after",
        "",
    ] {
        line(w, s);
    }
}

fn worker(w: &mut String) {
    for s in [
        "[controller]                       # where this worker's controller is",
        "addr = \"127.0.0.1:7400\"            # REPLACE with the controller's listen address",
        "# REPLACE with the fingerprint `outpost init` printed on the controller (zeros are refused):",
    ] {
        line(w, s);
    }
    line(
        w,
        &format!("fingerprint = {}", quote(FINGERPRINT_PLACEHOLDER)),
    );
    for s in [
        "# join_token_file = \"/etc/outpost/join-token\"   # admitted at once with the controller's token",
        "",
        "[machine]                          # what this box is",
        "service = \"voice\"                  # voice, messaging, video",
        "component = \"media-processor\"      # call-router, load-balancer, media-processor, routing,",
        "                                   # call-queue, resource-db, proxy",
        "# load_balancer = \"lb-1\"           # the machine in front of this one, if any",
        "# service_addr = \"192.0.2.31:5060\" # where its software serves, listed in its load balancer's pool",
        "",
    ] {
        line(w, s);
    }
}

fn limits(w: &mut String) {
    let d = Limits::default();
    line(
        w,
        "# Every bound of the node; the values shown are the defaults.",
    );
    line(w, "[limits]");
    let rows: [(&str, String, &str); 13] = [
        (
            "log_retention",
            quote(&short_duration(d.log_retention)),
            "datacenter: how long origin logs are kept for catch-up",
        ),
        (
            "log_records_max",
            d.log_records_max.to_string(),
            "records kept across origin logs",
        ),
        (
            "frame_bytes_max",
            d.frame_bytes_max.to_string(),
            "largest QUIC frame (64 KiB to 64 MiB)",
        ),
        (
            "ingest_queue_max",
            d.ingest_queue_max.to_string(),
            "requests waiting for the writer",
        ),
        (
            "batch_events_max",
            d.batch_events_max.to_string(),
            "events in one POST /v1/events/batch",
        ),
        (
            "commit_events_max",
            d.commit_events_max.to_string(),
            "events in one group commit",
        ),
        (
            "in_flight_max",
            d.in_flight_max.to_string(),
            "log positions unacknowledged per peer",
        ),
        (
            "api_body_bytes_max",
            d.api_body_bytes_max.to_string(),
            "largest API request body",
        ),
        (
            "peers_max",
            d.peers_max.to_string(),
            "most [[peers]] entries",
        ),
        (
            "api_connections_max",
            d.api_connections_max.to_string(),
            "API connections open at once (the oldest idle one makes room)",
        ),
        (
            "api_header_timeout",
            quote(&short_duration(d.api_header_timeout)),
            "time to send a request head",
        ),
        (
            "api_idle_timeout",
            quote(&short_duration(d.api_idle_timeout)),
            "an API connection idle this long is closed",
        ),
        (
            "api_body_timeout",
            quote(&short_duration(d.api_body_timeout)),
            "time to send a whole request body (raise it for big bundles on slow links)",
        ),
    ];
    for (key, value, what) in rows {
        let setting = format!("# {key} = {value}");
        let _ = writeln!(w, "{setting:<35}# {what}");
    }
}
