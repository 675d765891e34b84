//! SIGHUP: re-reads the config file, validates it, applies what can change while running (the
//! log filter, the limits read at use time) and says, in one log line, what it reloaded and what
//! needs a restart. A bad config changes nothing: the error names the field, the node keeps
//! running on what it has.

use std::path::PathBuf;

use super::logging::FilterError;
use crate::config::{Config, Limits};
use crate::wire::Role;

/// Sets the log filter at run time (a `tracing_subscriber` reload handle, wrapped by
/// [`super::logging::init`]).
type SetFilter = Box<dyn Fn(&str) -> Result<(), FilterError> + Send + Sync>;

/// How the running process's log filter can be changed.
#[derive(Default)]
pub struct LogControl {
    pub(crate) set: Option<SetFilter>,
    /// `RUST_LOG` was set at start: it wins over `log.level`, now and on reload.
    pub(crate) env_override: bool,
}

impl LogControl {
    pub fn new(set: SetFilter, env_override: bool) -> LogControl {
        LogControl {
            set: Some(set),
            env_override,
        }
    }
}

/// Where the running config came from, to read it again.
pub struct Source {
    pub path: PathBuf,
    pub role_override: Option<Role>,
}

/// What a new config changes, sorted into what is applied now and what waits for a restart.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub applied: Vec<String>,
    pub restart: Vec<String>,
    pub log_changed: bool,
}

/// Limits read each time they are used (by the writer thread, retention and the API), which a
/// reload therefore applies at once.
fn live_limits(old: &Limits, new: &Limits) -> Vec<String> {
    let mut out = Vec::new();
    if old.log_retention != new.log_retention {
        out.push(format!(
            "limits.log_retention {} -> {}",
            humantime::format_duration(old.log_retention),
            humantime::format_duration(new.log_retention)
        ));
    }
    let mut num = |name: &str, a: u64, b: u64| {
        if a != b {
            out.push(format!("limits.{name} {a} -> {b}"));
        }
    };
    num("log_records_max", old.log_records_max, new.log_records_max);
    num(
        "batch_events_max",
        old.batch_events_max as u64,
        new.batch_events_max as u64,
    );
    num(
        "commit_events_max",
        old.commit_events_max as u64,
        new.commit_events_max as u64,
    );
    num("peers_max", old.peers_max as u64, new.peers_max as u64);
    out
}

pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan {
        applied: live_limits(&old.limits, &new.limits),
        log_changed: old.log.level != new.log.level,
        ..Plan::default()
    };
    let mut restart = |changed: bool, what: &str| {
        if changed {
            p.restart.push(what.to_owned());
        }
    };
    // Fixed at start: the endpoint, the listener, the writer queue, the router's body limit,
    // and the links (which read the start-time config; the pin set is built once).
    restart(old.role != new.role, "role");
    restart(old.name != new.name, "name");
    restart(old.data_dir != new.data_dir, "data_dir");
    restart(old.listen != new.listen, "listen");
    restart(old.api != new.api, "api");
    // The writer and its layout are built once; only the filter has a reload handle.
    restart(old.log.format != new.log.format, "log.format");

    restart(old.replication != new.replication, "replication");
    let (a, b) = (&old.limits, &new.limits);
    restart(
        a.frame_bytes_max != b.frame_bytes_max,
        "limits.frame_bytes_max",
    );
    restart(a.in_flight_max != b.in_flight_max, "limits.in_flight_max");
    restart(
        a.ingest_queue_max != b.ingest_queue_max,
        "limits.ingest_queue_max",
    );
    restart(
        a.api_body_bytes_max != b.api_body_bytes_max,
        "limits.api_body_bytes_max",
    );
    restart(old.admission != new.admission, "admission");
    restart(old.cluster != new.cluster, "cluster");
    restart(old.controller != new.controller, "controller");
    restart(old.machine != new.machine, "machine");
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn plan_sorts_live_limits_from_restart_only_changes() {
        let old = Config::with_defaults(Role::Datacenter, "dc-east", Path::new("/tmp/x"));
        let mut new = old.clone();
        assert_eq!(plan(&old, &new), Plan::default());
        new.limits.log_retention = Duration::from_secs(3600);
        new.limits.frame_bytes_max *= 2;
        new.log.level = "debug".into();
        new.log.format = crate::config::LogFormat::Json;
        new.api = "127.0.0.1:9999".parse().unwrap();
        let p = plan(&old, &new);
        assert_eq!(p.applied, vec!["limits.log_retention 1day -> 1h"]);
        assert_eq!(
            p.restart,
            vec!["api", "log.format", "limits.frame_bytes_max"]
        );
        assert!(p.log_changed);
    }
}
