//! The client commands: each builds one API request, prints the answer for a human (or a
//! script) and returns the exit code. The answers are read leniently: a field the node does not
//! send is shown as `-`, never a failure.

use serde_json::{json, Value};

use super::client::{ApiClient, ClientError};
use super::{ApiOpts, EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::config;

/// Where the token came from, for the hint after a 401.
pub(super) struct Connection {
    client: ApiClient,
    token_source: String,
}

pub(super) fn connect(opts: &ApiOpts) -> Result<Connection, i32> {
    let (token, token_source) = match &opts.token {
        Some(t) => (Some(t.clone()), "--token or OUTPOST_TOKEN".to_owned()),
        None => {
            let path = opts.data_dir.join(config::TOKEN_FILE);
            match config::read_token(&opts.data_dir) {
                Ok(t) => (Some(t), path.display().to_string()),
                Err(e) => (None, format!("none: cannot read {}: {e}", path.display())),
            }
        }
    };
    match ApiClient::new(&opts.api, token) {
        Ok(client) => Ok(Connection {
            client,
            token_source,
        }),
        Err(e) => {
            eprintln!("error: {e}");
            Err(EXIT_USAGE)
        }
    }
}

/// `outpost watch`: prints a datacenter's changes as they are applied (see `GET /v1/watch`).
/// `query`: the stream's filters and where to start, as `GET /v1/watch` takes them.
pub(super) fn watch(opts: &ApiOpts, query: &[(&str, &str)], as_json: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut failed = false;
    let streamed = conn.client.stream_lines(&["v1", "watch"], query, |line| {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if let Some(e) = v.get("error") {
            eprintln!(
                "error: {} (last cursor: {})",
                text(Some(e)),
                text(v.get("cursor"))
            );
            failed = true;
            return false;
        }
        if as_json {
            println!("{line}");
        } else if v.get("reset").is_some() {
            println!(
                "reset: {}; going on from {}",
                text(v.get("reason")),
                text(v.get("cursor"))
            );
        } else if v.get("account").is_some() {
            println!(
                "{} {} {} {} {}",
                text(v.get("cursor")),
                text(v.get("account")),
                text(v.get("type")),
                text(v.get("version")),
                v.get("element").map(Value::to_string).unwrap_or_default()
            );
        } else if let Some(kind) = v.get("kind").and_then(Value::as_str) {
            // A controller's change: the machine's or the deployment's view.
            println!(
                "{} {kind} {} {}",
                text(v.get("cursor")),
                text(v.get("name")),
                v.get(kind).map(Value::to_string).unwrap_or_default()
            );
        }
        true
    });
    match streamed {
        Err(e) => conn.report_error(e),
        Ok(()) if failed => EXIT_FAILED,
        Ok(()) => EXIT_OK,
    }
}

impl Connection {
    pub(super) fn report_error(&self, e: ClientError) -> i32 {
        self.report(e)
    }

    pub(super) fn get(&self, segments: &[&str]) -> Result<Value, i32> {
        self.client.get_json(segments).map_err(|e| self.report(e))
    }

    pub(super) fn upload(
        &self,
        segments: &[&str],
        path: &std::path::Path,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Value, i32> {
        self.client
            .upload(segments, path, progress)
            .map_err(|e| self.report(e))
    }

    pub(super) fn post(&self, segments: &[&str], body: &Value) -> Result<Value, i32> {
        self.client
            .post_json(segments, body)
            .map_err(|e| self.report(e))
    }

    pub(super) fn put_bytes(
        &self,
        segments: &[&str],
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<Value, i32> {
        self.client
            .put_bytes(segments, bytes, content_type)
            .map_err(|e| self.report(e))
    }

    pub(super) fn delete(&self, segments: &[&str]) -> Result<Value, i32> {
        self.client
            .delete_json(segments)
            .map_err(|e| self.report(e))
    }

    fn report(&self, e: ClientError) -> i32 {
        eprintln!("error: {e}");
        match e {
            ClientError::Status { status, .. } if status.as_u16() == 401 => {
                eprintln!(
                    "hint: the token comes from --token, else OUTPOST_TOKEN, else the `token` file \
                     in --data-dir (else the config's data_dir, else {}); token used: {}",
                    config::DEFAULT_DATA_DIR,
                    self.token_source
                );
                EXIT_FAILED
            }
            ClientError::BadUrl(_) => EXIT_USAGE,
            _ => EXIT_FAILED,
        }
    }
}

pub(super) fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// A JSON value as a short text: strings bare, anything else compact JSON, absent as `-`.
pub(super) fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

pub(super) fn event(
    opts: &ApiOpts,
    account: &str,
    event_type: &str,
    data: Option<&str>,
    as_json: bool,
) -> i32 {
    let data: Value = match data {
        None => json!({}),
        Some(s) => match serde_json::from_str(s) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: --data: invalid JSON: {e}");
                return EXIT_USAGE;
            }
        },
    };
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let body = json!({ "account": account, "type": event_type, "data": data });
    match conn.post(&["v1", "events"], &body) {
        Ok(answer) if as_json => {
            println!("{}", pretty(&answer));
            EXIT_OK
        }
        Ok(answer) => {
            println!("message-id: {}", text(answer.get("message_id")));
            println!("version: {}", text(answer.get("version")));
            println!("{}", pretty(answer.get("element").unwrap_or(&Value::Null)));
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub(super) fn state_get(opts: &ApiOpts, account: &str, event_type: Option<&str>) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut segments = vec!["v1", "state", account];
    segments.extend(event_type);
    match conn.get(&segments) {
        Ok(answer) => {
            println!("{}", pretty(&answer));
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub(super) fn digest(opts: &ApiOpts) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.get(&["v1", "digest"]) {
        Ok(answer) => {
            println!(
                "{} {}",
                text(answer.get("digest")),
                text(answer.get("entries"))
            );
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub(super) fn status(opts: &ApiOpts, as_json: bool) -> i32 {
    let conn = match connect(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match conn.get(&["v1", "status"]) {
        Ok(answer) if as_json => {
            println!("{}", pretty(&answer));
            EXIT_OK
        }
        Ok(answer) => {
            print!("{}", status_summary(&answer));
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// The human form of `GET /v1/status`.
fn status_summary(s: &Value) -> String {
    let mut out = String::new();
    let mut row = |label: &str, value: String| out.push_str(&format!("{label:<12} {value}\n"));
    row("role:", text(s.get("role")));
    row("name:", text(s.get("name")));
    row("node-id:", text(s.get("node_id")));
    row("fingerprint:", text(s.get("fingerprint")));
    row("listen:", text(s.get("listen")));
    row("api:", text(s.get("api")));
    if s.get("entries").is_some() || s.get("digest").is_some() {
        row(
            "state:",
            format!(
                "{} entries, digest {}",
                text(s.get("entries")),
                text(s.get("digest"))
            ),
        );
    }
    if let Some(m) = s.get("machines").filter(|m| m.is_object()) {
        // A controller.
        row(
            "machines:",
            format!(
                "{} up, {} down, {} pending, {} rejected",
                text(m.get("up")),
                text(m.get("down")),
                text(m.get("pending")),
                text(m.get("rejected"))
            ),
        );
        row(
            "unacked:",
            format!("{} publications", text(s.get("publications_unacked"))),
        );
    }
    if s.get("log_tail").is_some() {
        row("log tail:", text(s.get("log_tail")));
    }
    if let Some(ready) = s.get("ready").and_then(Value::as_bool) {
        row("ready:", if ready { "yes" } else { "no" }.to_owned());
    }
    if s.get("disk_full").and_then(Value::as_bool) == Some(true) {
        row(
            "disk:",
            "FULL: events are refused (503) until space is freed".to_owned(),
        );
    }

    if let Some(peers) = s.get("peers").and_then(Value::as_array) {
        out.push('\n');
        if peers.is_empty() {
            out.push_str("no peers\n");
        } else {
            out.push_str(&peer_table(peers));
        }
    }

    let errors: Vec<String> = s
        .get("last_errors")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|e| text(Some(e))).collect())
        .unwrap_or_default();
    if !errors.is_empty() {
        out.push_str("\nlast errors:\n");
        for e in errors {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}

fn peer_table(peers: &[Value]) -> String {
    let header = ["PEER", "ADDR", "LINK", "LAG", "LAST ERROR"];
    let rows: Vec<[String; 5]> = peers
        .iter()
        .map(|p| {
            let link = match p.get("connected").and_then(Value::as_bool) {
                Some(true) => "up",
                Some(false) => "down",
                None => "-",
            };
            let last_error = match p.get("last_error") {
                None | Some(Value::Null) => String::new(),
                v => text(v),
            };
            [
                text(p.get("name")),
                text(p.get("addr")),
                link.to_owned(),
                text(p.get("lag")),
                last_error,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 5]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_summary_tolerates_missing_fields() {
        let s = status_summary(&json!({"role": "datacenter", "peers": [{"name": "dc-west"}]}));
        assert!(s.contains("role:        datacenter"), "{s}");
        assert!(s.contains("node-id:     -"), "{s}");
        assert!(s.contains("dc-west"), "{s}");
        assert_eq!(status_summary(&json!(null)).lines().count(), 6);
    }

    #[test]
    fn status_summary_shows_peers_and_errors() {
        let s = status_summary(&json!({
            "role": "datacenter", "name": "dc-east", "ready": true, "entries": 3, "digest": "ab",
            "peers": [
                {"name": "dc-west", "addr": "127.0.0.1:7401", "connected": true, "lag": 0},
                {"name": "dc-north", "addr": "127.0.0.1:7402", "connected": false, "lag": 12,
                 "last_error": "timed out"}
            ],
            "last_errors": ["dc-north: timed out"]
        }));
        assert!(s.contains("state:       3 entries, digest ab"), "{s}");
        let table: Vec<&str> = s.lines().filter(|l| l.starts_with("dc-")).collect();
        assert_eq!(table.len(), 2, "{s}");
        assert!(table[0].contains(" up ") && table[0].ends_with('0'), "{s}");
        assert!(
            table[1].contains(" down ") && table[1].ends_with("timed out"),
            "{s}"
        );
        assert!(s.ends_with("last errors:\n  dc-north: timed out\n"), "{s}");
    }
}
