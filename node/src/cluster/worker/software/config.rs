//! The configuration half of the software task: a configuration order (an `Effect::Config`
//! the driver hands over after its commit) is written atomically where the software expects
//! it (the manifest's `config.path`, by default `DATA_DIR/config.json`), the software is told
//! (SIGHUP to its group, or the manifest's `config.reload` command), and its health checked
//! again from that moment. Unhealthy, the previous configuration is written back and the
//! software told again; the outcome goes to the driver (`core.configured`). Software started
//! later (a restart, a deployment) finds the configuration in effect already in its file.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokio::time::Instant;

use super::super::driver::Input;
use super::super::pool_file::write_atomic;
use super::{blocking, clip, Child, Task};
use crate::bundle::{ConfigFormat, ConfigSpec, HealthError, ReloadCommandError};
use crate::cluster::body::ConfigOrder;
use crate::limits::SOFTWARE_RELOAD_TIMEOUT;
use crate::wire::ConfigReport;

/// The configuration file's name in the data directory when the manifest names none.
pub(crate) const CONFIG_FILE: &str = "config";
/// The environment variable that tells the software where its configuration is.
pub(crate) const CONFIG_FILE_ENV: &str = "OUTPOST_CONFIG_FILE";

/// Where configuration for software with `spec` goes.
pub(crate) fn config_path(data_dir: &Path, spec: &ConfigSpec) -> PathBuf {
    spec.path
        .clone()
        .unwrap_or_else(|| data_dir.join(format!("{CONFIG_FILE}.{}", spec.format.extension())))
}

/// Why a configuration document has no file form.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RenderError {
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
    #[error(transparent)]
    Json(serde_json::Error),
    #[error("has no TOML form: {0}")]
    NoToml(#[source] toml::ser::Error),
}

/// Why the configuration file was not written (or removed).
#[derive(Debug, thiserror::Error)]
enum ConfigFileError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why the software is not healthy after a configuration change.
#[derive(Debug, thiserror::Error)]
enum Unhealthy {
    #[error(transparent)]
    Reload(#[from] ReloadCommandError),
    #[error("cannot signal the software: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error("lost track of the software")]
    Lost,
    /// The software task's blocking pool failed (its reason, as the task words it).
    #[error("{0}")]
    Task(String),
}

/// The file's bytes: pretty JSON, or TOML (a document with a `null` inside an array, or an
/// array mixing tables and values, has no TOML form: an error).
pub(crate) fn render(doc: &str, format: ConfigFormat) -> Result<Vec<u8>, RenderError> {
    let v: Value = serde_json::from_str(doc).map_err(RenderError::NotJson)?;
    if !v.is_object() {
        return Err(RenderError::NotAnObject);
    }
    let mut text = match format {
        ConfigFormat::Json => serde_json::to_string_pretty(&v).map_err(RenderError::Json)?,
        ConfigFormat::Toml => toml::to_string(&v).map_err(RenderError::NoToml)?,
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text.into_bytes())
}

/// Renders `doc` as `format` and writes it to `path` atomically.
fn write_config(path: &Path, doc: &str, format: ConfigFormat) -> Result<(), ConfigFileError> {
    let bytes = render(doc, format)?;
    write_atomic(path, &bytes).map_err(|source| ConfigFileError::Write {
        path: path.to_owned(),
        source,
    })
}

fn config_report(version: u64, state: &str, detail: Option<String>) -> ConfigReport {
    ConfigReport {
        version,
        state: state.into(),
        detail: detail.map(clip),
    }
}

impl Task {
    /// Where the running (or last started) software reads its configuration.
    pub(super) fn config_target(&self) -> (PathBuf, ConfigSpec) {
        let spec = self.config_spec.clone().unwrap_or_default();
        (config_path(&self.data_dir, &spec), spec)
    }

    /// Before software with `spec` starts: the configuration in effect goes to its file.
    /// Returns the path, for its environment.
    pub(super) async fn prepare_config(&mut self, spec: &ConfigSpec) -> PathBuf {
        let path = config_path(&self.data_dir, spec);
        self.config_spec = Some(spec.clone());
        if let Some(current) = &self.config_current {
            let (p, doc, format) = (path.clone(), current.doc.clone(), spec.format);
            let r = blocking(move || write_config(&p, &doc, format))
                .await
                .and_then(|r| r.map_err(|e| e.to_string()));
            if let Err(e) = r {
                self.shared
                    .note_error(format!("configuration for the software: {e}"));
            }
        }
        path
    }

    /// Applies the newest configuration order waiting, if any.
    pub(super) async fn configure(&mut self) {
        let Some(order) = self.shared.software.take_config() else {
            return;
        };
        let version = order.version;
        let report = self.apply_config(order).await;
        tracing::info!(
            version,
            state = %report.state,
            detail = report.detail.as_deref().unwrap_or(""),
            "configuration data"
        );
        let _ = self.shared.input(Input::Configured(version, report)).await;
    }

    async fn apply_config(&mut self, order: ConfigOrder) -> ConfigReport {
        let version = order.version;
        let (path, spec) = self.config_target();
        let (p, doc, format) = (path.clone(), order.doc.clone(), spec.format);
        // The reason goes into the configuration's report: text.
        let written = blocking(move || write_config(&p, &doc, format))
            .await
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = written {
            return config_report(version, "failed", Some(e));
        }
        // Only a software that runs healthy now can be told; one that died and is not yet seen
        // by the watch (a restart pending) reads the file when it starts again.
        let Some(child) = self
            .child
            .take_if(|c| c.healthy && c.sup.poll_exit().is_none())
        else {
            return config_report(
                version,
                "applied",
                Some(format!(
                    "written to {}; no software runs healthy now (it reads the file when it starts)",
                    path.display()
                )),
            );
        };
        let (child, told) = tell(child, spec.reload.clone()).await;
        let (child, health) = match told {
            Ok(()) => check_since(child, Instant::now()).await,
            Err(e) => (child, Err(e)),
        };
        let Some(child) = child else {
            self.shared
                .note_error("lost track of the software while configuring it".to_owned());
            return config_report(version, "failed", Some("lost track of the software".into()));
        };
        self.child = Some(child);
        let reason = match health {
            Ok(()) => {
                self.config_current = Some(order);
                return config_report(version, "applied", None);
            }
            Err(reason) => reason,
        };
        // Unhealthy after the change: the previous configuration goes back.
        let previous = self.config_current.clone();
        let (p, prev_doc) = (path.clone(), previous.as_ref().map(|c| c.doc.clone()));
        let restored = blocking(move || match prev_doc {
            Some(doc) => write_config(&p, &doc, format),
            None => match std::fs::remove_file(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ConfigFileError::Remove { path: p, source }),
            },
        })
        .await
        .and_then(|r| r.map_err(|e| e.to_string()));
        let back = match (&previous, &restored) {
            (_, Err(e)) => format!("restoring the previous configuration failed: {e}"),
            (Some(p), Ok(())) => format!("configuration {} is back", p.version),
            (None, Ok(())) => "the file is removed again (there was none before)".into(),
        };
        // A software that is still up is told again; one that died is restarted (with the
        // restored file) by the watch like any death.
        if let Some(c) = self.child.take() {
            let alive = c.sup.poll_exit().is_none();
            self.child = Some(if alive {
                let (c, _) = tell(c, spec.reload).await;
                match c {
                    Some(c) => c,
                    None => return config_report(version, "rolled_back", Some(reason.to_string())),
                }
            } else {
                c
            });
        }
        self.shared.note_error(format!(
            "configuration {version} rolled back: the software failed its health check after it: {reason}; {back}"
        ));
        config_report(
            version,
            "rolled_back",
            Some(format!(
                "the software failed its health check after it: {reason}; {back}"
            )),
        )
    }
}

/// Tells the software its configuration changed: the reload command, or SIGHUP.
async fn tell(c: Child, reload: Option<Vec<String>>) -> (Option<Child>, Result<(), Unhealthy>) {
    match blocking(move || {
        let r = match &reload {
            Some(cmd) => c
                .sup
                .run_reload_command(cmd, SOFTWARE_RELOAD_TIMEOUT)
                .map_err(Unhealthy::Reload),
            None => c.sup.reload().map_err(Unhealthy::Signal),
        };
        (c, r)
    })
    .await
    {
        Ok((c, r)) => (Some(c), r),
        Err(e) => (None, Err(Unhealthy::Task(e))),
    }
}

/// The software's health check, with an `alive` check counted from `since`.
async fn check_since(c: Option<Child>, since: Instant) -> (Option<Child>, Result<(), Unhealthy>) {
    let Some(c) = c else {
        return (None, Err(Unhealthy::Lost));
    };
    let since = since.into_std();
    match blocking(move || {
        let r = c.sup.check_health_since(since).map_err(Unhealthy::Health);
        (c, r)
    })
    .await
    {
        Ok((c, r)) => (Some(c), r),
        Err(e) => (None, Err(Unhealthy::Task(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_renders_as_the_manifest_asks_or_says_why_not() {
        let doc = r#"{"limits":{"calls":5},"log":"info"}"#;
        let json = String::from_utf8(render(doc, ConfigFormat::Json).unwrap()).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            serde_json::from_str::<Value>(doc).unwrap()
        );
        let toml_text = String::from_utf8(render(doc, ConfigFormat::Toml).unwrap()).unwrap();
        let back: toml::Table = toml::from_str(&toml_text).unwrap();
        assert_eq!(back["log"].as_str(), Some("info"));
        assert_eq!(back["limits"]["calls"].as_integer(), Some(5));
        let e = render(r#"{"a":[1,null]}"#, ConfigFormat::Toml)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no TOML form"), "{e}");
        assert!(render("[1]", ConfigFormat::Json)
            .unwrap_err()
            .to_string()
            .contains("object"));
    }
}
