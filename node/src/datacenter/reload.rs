//! SIGHUP on a datacenter: re-reads the config file, validates it, applies what can change while
//! running (the log filter, the limits read at use time, the peers) and says, in one log line,
//! what it reloaded and what needs a restart (the sorting is [`crate::ops::reload::plan`]). A bad
//! config changes nothing: the error names the field, the node keeps running on what it has.

use std::sync::Arc;

use super::Shared;
use crate::config;
use crate::ops::reload::{plan, LogControl, Source};

/// Reloads the config from `source`; returns the summary line it logged.
pub async fn reload(shared: &Arc<Shared>, source: &Source, log: &LogControl) -> String {
    let path = source.path.clone();
    let role = source.role_override;
    // Reading the file and resolving host names block.
    let loaded = tokio::task::spawn_blocking(move || config::load(&path, role)).await;
    let new = match loaded {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            shared
                .metrics
                .reload_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let line = format!("reload refused, still running on the previous config: {e}");
            shared.note_error(line.clone());
            return line;
        }
        Err(e) => {
            let line = format!("reload failed: {e}");
            shared.note_error(line.clone());
            return line;
        }
    };
    let old = shared.current_config();
    let plan = plan(&old, &new);
    let mut applied = plan.applied.clone();
    if plan.log_changed {
        match (&log.set, log.env_override) {
            (_, true) => applied.push(format!(
                "log.level {:?} recorded but RUST_LOG, set at start, still decides the filter",
                new.log.level
            )),
            (Some(set), false) => match set(&new.log.level) {
                Ok(()) => applied.push(format!(
                    "log.level {:?} -> {:?}",
                    old.log.level, new.log.level
                )),
                Err(e) => applied.push(format!("log.level not applied: {e}")),
            },
            (None, false) => applied.push("log.level not applied: no reloadable logger".into()),
        }
    }
    // Peers apply now: new addresses and fingerprints (a certificate rotation, a moved peer),
    // peers added (dialled at once) and removed (unpinned, disconnected).
    applied.extend(super::link::reload_peers(shared, &new.peers));
    shared.set_config(new);
    shared
        .metrics
        .reloads
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut line = format!("reloaded {}: ", source.path.display());
    if applied.is_empty() {
        line.push_str("nothing changed");
    } else {
        line.push_str(&applied.join(", "));
    }
    if !plan.restart.is_empty() {
        line.push_str(&format!(
            "; restart required to apply: {}",
            plan.restart.join(", ")
        ));
    }

    tracing::info!("{line}");
    line
}
