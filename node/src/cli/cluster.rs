//! The controller's client commands: `outpost machines [remove NAME]` and
//! `outpost keys list|accept|reject`.
//! Like the other client commands they only talk to the node's HTTP API and read its answers
//! leniently (a missing field shows as `-`).

use serde_json::{json, Value};

use super::commands::{connect, pretty, text};
use super::{ApiOpts, EXIT_OK};

pub(super) fn machines(opts: &ApiOpts, as_json: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.get(&["v1", "machines"]) {
        Ok(answer) if as_json => {
            println!("{}", pretty(&answer));
            EXIT_OK
        }
        Ok(answer) => {
            let list = answer.as_array().map(Vec::as_slice).unwrap_or_default();
            if list.is_empty() {
                println!(
                    "no admitted machines (keys waiting for an operator: `outpost keys list`)"
                );
            } else {
                print!("{}", machine_table(list));
            }
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub(super) fn keys_list(opts: &ApiOpts, as_json: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.get(&["v1", "keys"]) {
        Ok(answer) if as_json => {
            println!("{}", pretty(&answer));
            EXIT_OK
        }
        Ok(answer) => {
            let list = answer.as_array().map(Vec::as_slice).unwrap_or_default();
            if list.is_empty() {
                println!("no machine keys yet");
            } else {
                print!("{}", key_table(list));
            }
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// `outpost keys accept ID` (`accept`) or `outpost keys reject ID`.
pub(super) fn keys_decide(opts: &ApiOpts, id: &str, accept: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let action = if accept { "accept" } else { "reject" };
    match conn.post(&["v1", "keys", id, action], &json!({})) {
        Ok(k) => {
            println!(
                "{}: {} ({}), key {}",
                if accept { "accepted" } else { "rejected" },
                text(k.get("name")),
                text(k.get("id")),
                text(k.get("status"))
            );
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// `outpost machines remove NAME`.
pub(super) fn machines_remove(opts: &ApiOpts, name: &str) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.delete(&["v1", "machines", name]) {
        Ok(k) => {
            println!(
                "removed: {} ({}); its key is refused from now on",
                text(k.get("name")),
                text(k.get("id"))
            );
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// How long ago, in the largest unit that fits.
fn ago(seconds: Option<u64>) -> String {
    match seconds {
        None => "-".to_owned(),
        Some(s) if s < 120 => format!("{s}s ago"),
        Some(s) if s < 2 * 3600 => format!("{}m ago", s / 60),
        Some(s) if s < 2 * 86400 => format!("{}h ago", s / 3600),
        Some(s) => format!("{}d ago", s / 86400),
    }
}

fn machine_table(list: &[Value]) -> String {
    let header = [
        "NAME",
        "STATUS",
        "SERVICE",
        "COMPONENT",
        "LB",
        "SOFTWARE",
        "STATE",
        "CONFIG",
        "LAST-SEEN",
    ];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            // A load balancer shows its pool's size and its router where a dependent shows
            // its LB, and a call router its LB with the coupling's state.
            let lb = match (m.get("pool").and_then(Value::as_array), m.get("coupling")) {
                (Some(pool), _) => match m.get("call_router").and_then(Value::as_str) {
                    Some(r) => format!("pool {} for {r}", pool.len()),
                    None => format!("pool {}", pool.len()),
                },
                (None, Some(c)) if c.get("load_balancer").is_some_and(Value::is_string) => {
                    format!("{} {}", text(c.get("load_balancer")), text(c.get("state")))
                }
                _ => text(m.get("load_balancer")),
            };
            let software = match m.get("software") {
                Some(sw @ Value::Object(_)) => text(sw.get("version")),
                other => text(other),
            };
            vec![
                text(m.get("name")),
                text(m.get("status")),
                text(m.get("service")),
                text(m.get("component")),
                lb,
                software,
                text(m.get("state")),
                config_cell(m.get("config")),
                ago(m.get("last_seen_s_ago").and_then(Value::as_u64)),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// `v3 applied`; `v4 rolled_back (v3 in effect)` when what it runs is older than it was sent.
fn config_cell(c: Option<&Value>) -> String {
    let Some(c) = c.filter(|c| c.is_object()) else {
        return "-".into();
    };
    let (version, applied) = (c.get("version"), c.get("applied").and_then(Value::as_u64));
    let mut cell = format!("v{} {}", text(version), text(c.get("state")));
    if let Some(a) = applied.filter(|a| Some(*a) != version.and_then(Value::as_u64)) {
        cell.push_str(&format!(" (v{a} in effect)"));
    }
    cell
}

/// Fingerprints are shown in full by `--json`; the table keeps the first 16 characters.
const FINGERPRINT_SHOWN: usize = 16;

fn key_table(list: &[Value]) -> String {
    let header = ["ID", "NAME", "STATUS", "FINGERPRINT", "FIRST-SEEN"];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|k| {
            let mut fp = text(k.get("fingerprint"));
            if fp.len() > FINGERPRINT_SHOWN && fp.is_char_boundary(FINGERPRINT_SHOWN) {
                fp.truncate(FINGERPRINT_SHOWN);
                fp.push_str("...");
            }
            vec![
                text(k.get("id")),
                text(k.get("name")),
                text(k.get("status")),
                fp,
                text(k.get("first_seen")),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Left-aligned columns two spaces apart, no trailing blanks.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (cell, w) in cells.zip(&widths) {
            l.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_table_shows_pool_size_for_a_load_balancer() {
        let t = machine_table(&[
            json!({"name": "lb-1", "status": "up", "service": "voice",
                   "component": "load-balancer", "load_balancer": null,
                   "software": {"version": "1.4.2"}, "state": "running",
                   "last_seen_s_ago": 3, "pool": [{"name": "mp-1"}, {"name": "mp-2"}],
                   "config": {"version": 4, "applied": 3, "state": "rolled_back"}}),
            json!({"name": "mp-1", "status": "down", "service": "voice",
                   "component": "media-processor", "load_balancer": "lb-1",
                   "software": null, "last_seen_s_ago": 600,
                   "config": {"version": 3, "applied": 3, "state": "applied"}}),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("NAME"), "{t}");
        assert!(lines[0].ends_with("LAST-SEEN"), "{t}");
        assert!(
            lines[1].contains("pool 2") && lines[1].contains("1.4.2"),
            "{t}"
        );
        assert!(lines[1].ends_with("3s ago"), "{t}");
        assert!(lines[1].contains("v4 rolled_back (v3 in effect)"), "{t}");
        assert!(lines[2].contains("v3 applied "), "{t}");
        assert!(
            lines[2].contains(" lb-1 ") && lines[2].contains(" down "),
            "{t}"
        );
        assert!(lines[2].ends_with("10m ago"), "{t}");
    }

    #[test]
    fn key_table_tolerates_missing_fields() {
        let t = key_table(&[json!({"id": "00ff", "status": "pending",
                                   "fingerprint": "ab".repeat(32)})]);
        assert!(t.contains("pending"), "{t}");
        assert!(t.contains(&format!("{}...", "ab".repeat(8))), "{t}");
        assert!(t.lines().nth(1).unwrap().ends_with('-'), "{t}");
    }

    #[test]
    fn ago_picks_a_unit() {
        assert_eq!(ago(None), "-");
        assert_eq!(ago(Some(5)), "5s ago");
        assert_eq!(ago(Some(300)), "5m ago");
        assert_eq!(ago(Some(3 * 3600)), "3h ago");
        assert_eq!(ago(Some(3 * 86400)), "3d ago");
    }
}
