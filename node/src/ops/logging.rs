//! The node's log: one line per event on stderr, as text or as JSON (`[log] format`), filtered by
//! `[log] level` (or `RUST_LOG`), the filter replaceable at run time (SIGHUP, through
//! [`LogControl`]). Under journald (`JOURNAL_STREAM` set, as systemd sets it for a unit whose
//! stderr is the journal) each line starts with its syslog priority, `<3>` to `<7>`, the
//! sd-daemon(3) convention journald strips and records as PRIORITY (so `journalctl -p warning`
//! works), and carries no timestamp of its own (the journal keeps one).
//!
//! It owns the validation of a level string ([`check_level`]), which the config calls too: a
//! filter that `EnvFilter` accepts is not necessarily one that logs anything (`"infoo"` is a
//! target name there, and the node would log nothing), so every directive must name a level.

use std::io::{IsTerminal, Write};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use super::LogControl;

/// The level names a directive may end in (case-insensitive, as `EnvFilter` reads them).
pub const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// How a refusal of a filter shows a good one.
const FILTER_EXAMPLE: &str = "e.g. \"info\" or \"info,outpost=debug\"";

/// Why a log filter was refused (by [`check_level`], or when it was applied).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    #[error("must not be empty ({FILTER_EXAMPLE})")]
    Empty,
    #[error("{filter:?} has an empty directive ({FILTER_EXAMPLE})")]
    EmptyDirective { filter: String },
    #[error("{directive:?} has no target before '=' ({FILTER_EXAMPLE})")]
    NoTarget { directive: String },
    #[error(
        "{level:?} in {directive:?} is not a level; expected one of {} ({FILTER_EXAMPLE})",
        LEVELS.join(", ")
    )]
    NotALevel { level: String, directive: String },
    /// `EnvFilter` refused it.
    #[error("invalid filter {filter:?}: {source} ({FILTER_EXAMPLE})")]
    Invalid {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The running logger could not take the new filter.
    #[error(transparent)]
    Reload(#[from] tracing_subscriber::reload::Error),
}

/// Why the logger could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogInitError {
    /// The filter in effect (`origin`: `RUST_LOG` or `log.level`) is refused.
    #[error("{origin}: {source}")]
    Filter {
        origin: &'static str,
        #[source]
        source: FilterError,
    },
    /// A global logger was already set.
    #[error("cannot start logging: {0}")]
    Start(#[source] tracing_subscriber::util::TryInitError),
}

/// The environment variable systemd sets when stderr is connected to the journal.
pub const JOURNAL_STREAM_ENV: &str = "JOURNAL_STREAM";

/// How each line is written (`[log] format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `LEVEL target: message key=value`, the tracing-subscriber default.
    #[default]
    Text,
    /// One JSON object per line (`level`, `target`, `message` and the event's fields).
    Json,
}

impl LogFormat {
    pub const NAMES: &'static [&'static str] = &["text", "json"];

    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Checks a filter: a comma-separated list of directives, each a level (`info`) or
/// `TARGET=LEVEL` (`outpost=debug`, `outpost::datacenter[span]=trace`), whose level is one of
/// [`LEVELS`]; and the whole a filter `EnvFilter` accepts. Refuses what `EnvFilter` would take as
/// a bare target name (`infoo`), which silently logs nothing at the intended level.
pub fn check_level(filter: &str) -> Result<(), FilterError> {
    env_filter(filter).map(drop)
}

/// The `EnvFilter` of a filter [`check_level`] accepts.
fn env_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, FilterError> {
    if filter.trim().is_empty() {
        return Err(FilterError::Empty);
    }
    for directive in filter.split(',') {
        let directive = directive.trim();
        if directive.is_empty() {
            return Err(FilterError::EmptyDirective {
                filter: filter.to_owned(),
            });
        }
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level.trim(),
            Some(_) => {
                return Err(FilterError::NoTarget {
                    directive: directive.to_owned(),
                })
            }
            None => directive,
        };
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(FilterError::NotALevel {
                level: level.to_owned(),
                directive: directive.to_owned(),
            });
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|source| FilterError::Invalid {
        filter: filter.to_owned(),
        source,
    })
}

/// The sd-daemon(3) priority prefix of a level: error 3, warn 4, info 6, debug and trace 7.
pub fn journal_prefix(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

/// Whether stderr is the journal.
pub fn under_journald() -> bool {
    std::env::var_os(JOURNAL_STREAM_ENV).is_some_and(|v| !v.is_empty())
}

/// Writes each event to stderr in one write, prefixed with its journal priority when `journal`.
#[derive(Clone, Copy)]
struct Stderr {
    journal: bool,
}

/// One event's line, gathered and written whole on drop (the formatter may write in pieces;
/// the prefix must stay at the start of the line, and lines of two threads must not interleave).
struct Line {
    prefix: &'static str,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.prefix.len() + self.buf.len());
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(&self.buf);
        // Nowhere to report a failed log write.
        let _ = std::io::stderr().lock().write_all(&out);
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            prefix: "",
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            prefix: if self.journal {
                journal_prefix(meta.level())
            } else {
                ""
            },
            buf: Vec::new(),
        }
    }
}

/// Starts the process's logger. `RUST_LOG`, when set, overrides `level` (and is checked the
/// same way); the filter can be changed later through the returned [`LogControl`] (SIGHUP).
pub fn init(level: &str, format: LogFormat) -> Result<LogControl, LogInitError> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload};
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|e| !e.trim().is_empty());
    let (origin, text) = match &env {
        Some(env) => ("RUST_LOG", env.as_str()),
        None => ("log.level", level),
    };
    let filter = env_filter(text).map_err(|source| LogInitError::Filter { origin, source })?;
    let (filter, handle) = reload::Layer::new(filter);
    let journal = under_journald();
    let writer = Stderr { journal };
    let ansi = !journal && format == LogFormat::Text && std::io::stderr().is_terminal();
    let out = match (format, journal) {
        (LogFormat::Text, false) => fmt::layer().with_writer(writer).with_ansi(ansi).boxed(),
        (LogFormat::Text, true) => fmt::layer()
            .with_writer(writer)
            .with_ansi(false)
            .without_time()
            .boxed(),
        (LogFormat::Json, false) => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .boxed(),
        (LogFormat::Json, true) => fmt::layer()
            .json()
            .flatten_event(true)
            .without_time()
            .with_writer(writer)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(out)
        .try_init()
        .map_err(LogInitError::Start)?;
    let set = move |level: &str| -> Result<(), FilterError> {
        handle.reload(env_filter(level)?)?;
        Ok(())
    };
    Ok(LogControl::new(Box::new(set), env.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directive_lists_are_accepted() {
        for ok in [
            "info",
            "INFO",
            "off",
            "warn,outpost=debug",
            "info,outpost::datacenter=trace",
            "outpost[link]=debug",
        ] {
            check_level(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
    }

    #[test]
    fn a_directive_without_a_real_level_is_refused() {
        for bad in [
            "infoo",
            "",
            " ",
            "info,",
            "info,outpost=verbose",
            "outpost",
            "=debug",
            "info,,debug",
        ] {
            assert!(check_level(bad).is_err(), "{bad:?} accepted");
        }
        let e = check_level("infoo").unwrap_err().to_string();
        assert!(e.contains("\"infoo\" in \"infoo\" is not a level"), "{e}");
        assert!(e.contains("trace, debug, info, warn, error, off"), "{e}");
    }

    #[test]
    fn journal_priorities_follow_sd_daemon() {
        assert_eq!(journal_prefix(&Level::ERROR), "<3>");
        assert_eq!(journal_prefix(&Level::WARN), "<4>");
        assert_eq!(journal_prefix(&Level::INFO), "<6>");
        assert_eq!(journal_prefix(&Level::DEBUG), "<7>");
        assert_eq!(journal_prefix(&Level::TRACE), "<7>");
    }
}
