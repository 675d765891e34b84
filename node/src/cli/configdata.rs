//! `outpost config set|get|delete|history|rollback SCOPE` and `outpost config effective NAME`:
//! configuration data on a controller, through its HTTP API (`/v1/config/...`). A SCOPE is
//! `service/S`, `component/S/C` or `machine/NAME`.

use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};

use super::cluster::table;
use super::commands::{connect, pretty, text};
use super::{ApiOpts, EXIT_OK, EXIT_USAGE};
use crate::limits::CONFIG_DOC_BYTES_MAX;

fn segments(scope: &str) -> Vec<&str> {
    let mut s = vec!["v1", "config"];
    s.extend(scope.split('/'));
    s
}

/// `outpost config set SCOPE FILE` (`-`: standard input). A FILE ending in `.toml` (or
/// `--toml`) is sent as TOML.
pub(super) fn set(opts: &ApiOpts, scope: &str, file: &Path, toml: bool) -> i32 {
    let mut bytes = Vec::new();
    let read = if file == Path::new("-") {
        std::io::stdin()
            .take(CONFIG_DOC_BYTES_MAX as u64 + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file).and_then(|f| {
            f.take(CONFIG_DOC_BYTES_MAX as u64 + 1)
                .read_to_end(&mut bytes)
        })
    };
    if let Err(e) = read {
        eprintln!("error: reading {}: {e}", file.display());
        return EXIT_USAGE;
    }
    if bytes.len() > CONFIG_DOC_BYTES_MAX {
        eprintln!(
            "error: {}: more than {CONFIG_DOC_BYTES_MAX} bytes, the most a document may hold",
            file.display()
        );
        return EXIT_USAGE;
    }
    let toml = toml || file.extension().is_some_and(|e| e == "toml");
    let content_type = if toml {
        "application/toml"
    } else {
        "application/json"
    };
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.put_bytes(&segments(scope), bytes, content_type) {
        Ok(answer) => {
            print_set(&answer);
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub(super) fn delete(opts: &ApiOpts, scope: &str) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.delete(&segments(scope)) {
        Ok(answer) => {
            print_set(&answer);
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub(super) fn rollback(opts: &ApiOpts, scope: &str, version: u64) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut path = segments(scope);
    path.push("rollback");
    match conn.post(&path, &json!({ "version": version })) {
        Ok(answer) => {
            print_set(&answer);
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// Prints the document itself (so that it can be edited and set again); `--json` the whole
/// answer with its version and time.
pub(super) fn get(opts: &ApiOpts, scope: &str, as_json: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.get(&segments(scope)) {
        Ok(answer) if as_json => {
            println!("{}", pretty(&answer));
            EXIT_OK
        }
        Ok(answer) => {
            eprintln!(
                "# {} version {}, set {}",
                text(answer.get("scope")),
                text(answer.get("version")),
                text(answer.get("at"))
            );
            println!("{}", pretty(answer.get("doc").unwrap_or(&Value::Null)));
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub(super) fn history(opts: &ApiOpts, scope: &str, as_json: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut path = segments(scope);
    path.push("history");
    match conn.get(&path) {
        Ok(answer) if as_json => {
            println!("{}", pretty(&answer));
            EXIT_OK
        }
        Ok(answer) => {
            let list = answer.as_array().map(Vec::as_slice).unwrap_or_default();
            if list.is_empty() {
                println!("{scope} has never had a document");
                return EXIT_OK;
            }
            print!("{}", history_table(list));
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// `outpost config effective NAME`: the machine's effective configuration (service, then
/// component, then machine) and whether it applied it.
pub(super) fn effective(opts: &ApiOpts, name: &str, as_json: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.get(&["v1", "machines", name, "config"]) {
        Ok(answer) if as_json => {
            println!("{}", pretty(&answer));
            EXIT_OK
        }
        Ok(answer) => {
            let p = answer.get("published");
            match p.filter(|p| p.is_object()) {
                Some(p) => eprintln!(
                    "# {name}: version {} {}{}",
                    text(p.get("version")),
                    text(p.get("state")),
                    p.get("detail")
                        .and_then(Value::as_str)
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ),
                None => eprintln!("# {name}: no configuration was ever sent to it"),
            }
            println!("{}", pretty(answer.get("doc").unwrap_or(&Value::Null)));
            EXIT_OK
        }
        Err(code) => code,
    }
}

fn print_set(answer: &Value) {
    let machines: Vec<String> = answer
        .get("machines")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|m| text(Some(m))).collect())
        .unwrap_or_default();
    let what = if answer.get("deleted").and_then(Value::as_bool) == Some(true) {
        "deleted"
    } else {
        "set"
    };
    println!(
        "{} {what}: version {}; sent to {} machine{}{}",
        text(answer.get("scope")),
        text(answer.get("version")),
        machines.len(),
        if machines.len() == 1 { "" } else { "s" },
        if machines.is_empty() {
            " (no machine's effective configuration changed)".to_owned()
        } else {
            format!(" ({})", machines.join(", "))
        }
    );
    for w in answer
        .get("waiting")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        println!("  {} waits: {}", text(w.get("name")), text(w.get("reason")));
    }
}

fn history_table(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            let doc = match c.get("doc") {
                Some(d @ Value::Object(_)) => {
                    let t = d.to_string();
                    if t.chars().count() > 60 {
                        format!("{}...", t.chars().take(57).collect::<String>())
                    } else {
                        t
                    }
                }
                _ => "(deleted)".to_owned(),
            };
            vec![
                text(c.get("version")),
                text(c.get("at")),
                text(c.get("note")),
                doc,
            ]
        })
        .collect();
    table(&["VERSION", "AT", "NOTE", "DOCUMENT"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_shows_deletions_and_cuts_long_documents() {
        let t = history_table(&[
            json!({"version": 3, "at": "2026-12-04T10:00:00Z", "note": "rollback to 1",
                   "doc": {"log": "info"}}),
            json!({"version": 2, "at": "2026-12-04T09:00:00Z", "note": null, "doc": null}),
            json!({"version": 1, "at": "2026-12-04T08:00:00Z", "note": null,
                   "doc": {"k": "x".repeat(100)}}),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("VERSION"), "{t}");
        assert!(lines[1].contains("rollback to 1") && lines[1].contains(r#"{"log":"info"}"#));
        assert!(lines[2].contains("(deleted)"), "{t}");
        assert!(lines[3].ends_with("..."), "{t}");
    }

    #[test]
    fn a_scope_maps_to_its_api_path() {
        assert_eq!(
            segments("component/voice/call-router"),
            ["v1", "config", "component", "voice", "call-router"]
        );
    }
}
