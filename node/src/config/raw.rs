//! The config as TOML spells it: every key optional and loosely typed (durations, addresses and
//! fingerprints as strings), unknown keys refused. Validation into the typed config lives in the
//! parent module; this one also turns a toml error into a [`ConfigError`] naming the key.

use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub role: Option<String>,
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub api: Option<String>,
    pub peers: Option<Vec<RawPeer>>,
    pub limits: Option<RawLimits>,
    pub replication: Option<RawReplication>,
    pub log: Option<RawLog>,
    pub admission: Option<RawAdmission>,
    pub cluster: Option<RawCluster>,
    pub controller: Option<RawController>,
    pub machine: Option<RawMachine>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub name: Option<String>,
    pub addr: Option<String>,
    /// A string, or a list of one or two strings.
    pub fingerprint: Option<toml::Value>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub log_retention: Option<String>,
    pub log_records_max: Option<u64>,
    pub frame_bytes_max: Option<u64>,
    pub ingest_queue_max: Option<u64>,
    pub batch_events_max: Option<u64>,
    pub commit_events_max: Option<u64>,
    pub in_flight_max: Option<u64>,
    pub api_body_bytes_max: Option<u64>,
    pub peers_max: Option<u64>,
    pub api_connections_max: Option<u64>,
    pub api_header_timeout: Option<String>,
    pub api_idle_timeout: Option<String>,
    pub api_body_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReplication {
    pub fanout: Option<usize>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmission {
    pub join_token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub down_after: Option<String>,
    pub pending_max: Option<usize>,
    pub channel_max: Option<usize>,
    pub bundle_keep_unused: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawController {
    pub addr: Option<String>,
    pub fingerprint: Option<String>,
    pub join_token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMachine {
    pub service: Option<String>,
    pub component: Option<String>,
    pub load_balancer: Option<String>,
    pub service_addr: Option<String>,
    pub relay_addr: Option<String>,
    pub pool_file: Option<PathBuf>,
}

/// Names the key a toml error points at (`limits.frame_bytes`, `peers[1].addr`), with its line;
/// a syntax error, where no key can be named, is reported by line and column.
pub(super) fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim();
    let (line, column) = match e.span() {
        Some(span) => line_column(text, span.start),
        None => (0, 0),
    };
    let path = e.span().and_then(|span| key_path(text, &span));

    // serde says "unknown field `x`, expected one of ..."; in a config it is a key.
    let unknown = message.strip_prefix("unknown field `").and_then(|rest| {
        let end = rest.find('`')?;
        Some((rest[..end].to_owned(), rest[end + 1..].to_owned()))
    });
    let (field, reason) = match (unknown, path) {
        (Some((key, rest)), path) => {
            let field = match path {
                Some(p) if p == key || p.ends_with(&format!(".{key}")) => p,
                _ => key,
            };
            (field, format!("unknown key{rest}"))
        }
        (None, Some(path)) => (path, message.to_owned()),
        (None, None) if line > 0 => (format!("line {line}, column {column}"), message.to_owned()),
        (None, None) => ("(document)".to_owned(), message.to_owned()),
    };
    let reason = if line > 0 && !field.starts_with("line ") {
        format!("{reason} (line {line})")
    } else {
        reason
    };
    ConfigError {
        origin: origin.to_owned(),
        field,
        reason,
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The dotted path of the key (or scalar value) whose source span covers `span`.
fn key_path(text: &str, span: &Range<usize>) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    // First a key or scalar value under the error; only then a whole array under it.
    [false, true].into_iter().find_map(|containers| {
        let mut path = String::new();
        find_in_table(doc.get_ref(), span.start, containers, &mut path).then_some(path)
    })
}

fn covers(span: Range<usize>, pos: usize) -> bool {
    span.start <= pos && pos < span.end.max(span.start + 1)
}

fn find_in_table(table: &DeTable<'_>, pos: usize, containers: bool, path: &mut String) -> bool {
    for (key, value) in table.iter() {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if covers(key.span(), pos) || find_in_value(value, pos, containers, path) {
            return true;
        }
        path.truncate(len);
    }
    false
}

/// Containers are searched whatever their own span says: the span of an array of tables does
/// not necessarily cover its later `[[...]]` blocks.
fn find_in_value(
    value: &Spanned<DeValue<'_>>,
    pos: usize,
    containers: bool,
    path: &mut String,
) -> bool {
    match value.get_ref() {
        DeValue::Table(t) => find_in_table(t, pos, containers, path),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if find_in_value(item, pos, containers, path) {
                    return true;
                }
                path.truncate(len);
            }
            containers && covers(value.span(), pos)
        }
        _ => covers(value.span(), pos),
    }
}
