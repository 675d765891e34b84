//! `outpost-bundle.toml`: what a bundle runs and how its health is judged. Parsed from a
//! generic TOML table key by key, so that every error names its field; nothing here resolves a
//! name or touches the network ([`Manifest::check_in_dir`] only looks at the bundle's files).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use toml::{Table, Value};

use super::paths::{components, walk_no_symlinks, PathProblem};
use crate::limits::{
    ARG_BYTES_MAX, ENV_BYTES_MAX, ENV_NAME_BYTES_MAX, ENV_VARS_MAX, EXEC_ARGS_MAX,
    EXEC_PATH_BYTES_MAX, HEALTH_ALIVE_DEFAULT, HEALTH_TARGET_BYTES_MAX, HEALTH_TIMEOUT_DEFAULT,
    MANIFEST_BYTES_MAX, MANIFEST_DURATION_MAX, MANIFEST_VERSION_BYTES_MAX, STOP_TIMEOUT_DEFAULT,
};

/// The manifest's file name, at the root of the bundle.
pub const MANIFEST_FILE: &str = "outpost-bundle.toml";

/// A validated manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// voice, messaging or video (`config::SERVICES`).
    pub service: String,
    pub version: String,
    /// The program (a path relative to the bundle root) and its arguments.
    pub exec: Vec<String>,
    /// SIGTERM, then SIGKILL after this.
    pub stop_timeout: Duration,
    /// Added to the child's otherwise clean environment.
    pub env: BTreeMap<String, String>,
    pub health: Health,
    /// Where the machine's configuration data goes and how the software is told.
    pub config: ConfigSpec,
}

/// `[config]`: where the worker writes the machine's configuration data, in what format, and
/// how it tells the software (SIGHUP to its process group unless `reload` names a command).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpec {
    /// An absolute path; `None`: `DATA_DIR/config.json` (or `.toml`).
    pub path: Option<std::path::PathBuf>,
    pub format: ConfigFormat,
    /// A program of the bundle (relative to its root) and its arguments, run in the bundle
    /// directory with the software's environment; exit 0 means the software took it.
    pub reload: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConfigFormat {
    #[default]
    Json,
    Toml,
}

impl ConfigFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ConfigFormat::Json => "json",
            ConfigFormat::Toml => "toml",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub check: HealthCheck,
    /// How long a `tcp` or `http` check keeps trying.
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthCheck {
    /// The process is still running after this long.
    Alive(Duration),
    /// A TCP connection to `host:port` succeeds.
    Tcp { host: String, port: u16 },
    /// `GET` answers 2xx.
    Http(HttpTarget),
}

/// A parsed `http://host[:port]/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpTarget {
    pub host: String,
    pub port: u16,
    /// Starts with `/`; visible ASCII only.
    pub path: String,
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::Alive(d) => write!(f, "alive {}", humantime::format_duration(*d)),
            HealthCheck::Tcp { host, port } => write!(f, "tcp {host}:{port}"),
            HealthCheck::Http(t) => write!(f, "http://{}:{}{}", t.host, t.port, t.path),
        }
    }
}

/// An invalid manifest: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{MANIFEST_FILE}: {field}: {reason}")]
pub struct ManifestError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Manifest {
    /// Parses and validates manifest bytes (not against any files: see [`Self::check_in_dir`]).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MANIFEST_BYTES_MAX {
            return Err(err(
                "(file)",
                format!("{} bytes (at most {MANIFEST_BYTES_MAX})", bytes.len()),
            ));
        }
        let text =
            std::str::from_utf8(bytes).map_err(|e| err("(file)", format!("not UTF-8: {e}")))?;
        let table: Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        Self::from_table(table)
    }

    /// Reads `dir/outpost-bundle.toml` (a regular file, not a symlink), parses it and checks it
    /// against the directory.
    pub fn load(dir: &Path) -> Result<Manifest, super::BundleError> {
        use super::BundleError;
        let path = dir.join(MANIFEST_FILE);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::MissingManifest)
            }
            Err(e) => return Err(BundleError::io(format!("{}", path.display()), e)),
        };
        if !meta.file_type().is_file() {
            return Err(err(
                "(file)",
                "must be a regular file (not a symlink or directory)",
            )
            .into());
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MANIFEST_BYTES_MAX + 1).read_to_end(&mut bytes))
            .map_err(|e| BundleError::io(format!("reading {}", path.display()), e))?;
        let manifest = Manifest::parse(&bytes)?;
        manifest.check_in_dir(dir)?;
        Ok(manifest)
    }

    /// Checks that `exec[0]` is a regular, executable file of the bundle in `dir`, reached
    /// without going through a symlink.
    pub fn check_in_dir(&self, dir: &Path) -> Result<(), ManifestError> {
        check_program(dir, "exec[0]", &self.exec[0])?;
        if let Some(reload) = &self.config.reload {
            check_program(dir, "config.reload[0]", &reload[0])?;
        }
        Ok(())
    }

    fn from_table(mut t: Table) -> Result<Manifest, ManifestError> {
        const KEYS: &[&str] = &[
            "service",
            "version",
            "exec",
            "stop_timeout",
            "env",
            "health",
            "config",
        ];
        if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(err(
                k.clone(),
                format!("unknown key (expected one of {})", KEYS.join(", ")),
            ));
        }
        let service = required_string(&mut t, "service")?;
        if !crate::config::SERVICES.contains(&service.as_str()) {
            return Err(err(
                "service",
                format!(
                    "unknown service {service:?} (expected one of {})",
                    crate::config::SERVICES.join(", ")
                ),
            ));
        }
        let version = required_string(&mut t, "version")?;
        check_version(&version)?;
        let exec = exec(t.remove("exec"))?;
        let stop_timeout = match t.remove("stop_timeout") {
            None => STOP_TIMEOUT_DEFAULT,
            Some(v) => duration("stop_timeout", v)?,
        };
        let env = env(t.remove("env"))?;
        let health = health(t.remove("health"))?;
        let config = config_spec(t.remove("config"))?;
        Ok(Manifest {
            service,
            version,
            exec,
            stop_timeout,
            env,
            health,
            config,
        })
    }
}

/// `shown` (a path relative to the bundle root) is a regular, executable file of the bundle in
/// `dir`, reached without going through a symlink.
fn check_program(dir: &Path, field: &str, shown: &str) -> Result<(), ManifestError> {
    let parts = program_components(field, shown)?;
    let path = walk_no_symlinks(dir, &parts).map_err(|r| err(field, r.to_string()))?;
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_file() => {
            let mode = m.permissions().mode();
            if mode & 0o111 == 0 {
                return Err(err(
                    field,
                    format!("{shown} is not executable (mode {:04o})", mode & 0o7777),
                ));
            }
            Ok(())
        }
        Ok(m) if m.file_type().is_symlink() => Err(err(
            field,
            format!("{shown} is a symlink; it must be a regular file"),
        )),
        Ok(_) => Err(err(field, format!("{shown} is not a regular file"))),
        Err(_) => Err(err(field, format!("{shown} is not in the bundle"))),
    }
}

/// Names the key a syntax or type error points at, with its line.
fn toml_error(text: &str, e: &toml::de::Error) -> ManifestError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let message = e.message().trim().to_string();
    match line {
        Some(l) => err(format!("line {l}"), message),
        None => err("(file)", message),
    }
}

fn type_name(v: &Value) -> &'static str {
    v.type_str()
}

fn required_string(t: &mut Table, field: &str) -> Result<String, ManifestError> {
    match t.remove(field) {
        None => Err(err(field, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(err(
            field,
            format!("expected a string, found {}", type_name(&v)),
        )),
    }
}

fn check_version(v: &str) -> Result<(), ManifestError> {
    if v.is_empty() {
        return Err(err("version", "empty"));
    }
    if v.len() > MANIFEST_VERSION_BYTES_MAX {
        return Err(err(
            "version",
            format!("{} bytes (at most {MANIFEST_VERSION_BYTES_MAX})", v.len()),
        ));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_' | '~')))
    {
        return Err(err(
            "version",
            format!("character {c:?} (allowed: letters, digits and . - + _ ~)"),
        ));
    }
    Ok(())
}

/// The components of a program path inside the bundle (`exec[0]`, `config.reload[0]`).
pub(crate) fn program_components<'a>(
    field: &str,
    exec0: &'a str,
) -> Result<Vec<&'a str>, ManifestError> {
    match components(exec0.as_bytes(), EXEC_PATH_BYTES_MAX) {
        Ok(parts) if parts.is_empty() => Err(err(field, "names no file")),
        Ok(parts) => Ok(parts),
        Err(PathProblem::Absolute) => Err(err(
            field,
            format!("{exec0:?} is absolute; it must be relative to the bundle root"),
        )),
        Err(PathProblem::Parent) => Err(err(field, format!("{exec0:?} has a `..` component"))),
        Err(PathProblem::TooLong(n)) => Err(err(
            field,
            format!("{n} bytes (at most {EXEC_PATH_BYTES_MAX})"),
        )),
        Err(PathProblem::Bad(r)) => Err(err(field, r)),
    }
}

fn exec(v: Option<Value>) -> Result<Vec<String>, ManifestError> {
    command("exec", v)
}

/// A program of the bundle and its arguments (`exec`, `config.reload`).
fn command(name: &str, v: Option<Value>) -> Result<Vec<String>, ManifestError> {
    let items = match v {
        None => return Err(err(name, "missing")),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(err(
                name,
                format!("expected an array of strings, found {}", type_name(&v)),
            ))
        }
    };
    if items.is_empty() {
        return Err(err(name, "empty (name the program to run)"));
    }
    if items.len() > EXEC_ARGS_MAX {
        return Err(err(
            name,
            format!("{} strings (at most {EXEC_ARGS_MAX})", items.len()),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let field = format!("{name}[{i}]");
        let Value::String(s) = item else {
            return Err(err(
                field,
                format!("expected a string, found {}", type_name(&item)),
            ));
        };
        if s.len() > ARG_BYTES_MAX {
            return Err(err(
                field,
                format!("{} bytes (at most {ARG_BYTES_MAX})", s.len()),
            ));
        }
        if s.contains('\0') {
            return Err(err(field, "a NUL character"));
        }
        out.push(s);
    }
    program_components(&format!("{name}[0]"), &out[0])?;
    Ok(out)
}

fn config_spec(v: Option<Value>) -> Result<ConfigSpec, ManifestError> {
    let mut t = match v {
        None => return Ok(ConfigSpec::default()),
        Some(Value::Table(t)) => t,
        Some(v) => {
            return Err(err(
                "config",
                format!("expected a table, found {}", type_name(&v)),
            ))
        }
    };
    const KEYS: &[&str] = &["path", "format", "reload"];
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(err(
            format!("config.{k}"),
            format!("unknown key (expected one of {})", KEYS.join(", ")),
        ));
    }
    let path = match t.remove("path") {
        None => None,
        Some(Value::String(s)) => {
            let p = std::path::PathBuf::from(&s);
            if !p.is_absolute() {
                return Err(err(
                    "config.path",
                    format!("{s:?} must be an absolute path"),
                ));
            }
            if s.len() > EXEC_PATH_BYTES_MAX || s.contains('\0') {
                return Err(err("config.path", "too long or holds a NUL character"));
            }
            if p.components().any(|c| c == std::path::Component::ParentDir) || s.ends_with('/') {
                return Err(err(
                    "config.path",
                    format!("{s:?} must name a file, without `..`"),
                ));
            }
            Some(p)
        }
        Some(v) => {
            return Err(err(
                "config.path",
                format!("expected a string, found {}", type_name(&v)),
            ))
        }
    };
    let format = match t.remove("format") {
        None => ConfigFormat::Json,
        Some(Value::String(s)) if s == "json" => ConfigFormat::Json,
        Some(Value::String(s)) if s == "toml" => ConfigFormat::Toml,
        Some(v) => {
            return Err(err(
                "config.format",
                format!("expected \"json\" or \"toml\", found {v}"),
            ))
        }
    };
    let reload = match t.remove("reload") {
        None => None,
        v => Some(command("config.reload", v)?),
    };
    Ok(ConfigSpec {
        path,
        format,
        reload,
    })
}

fn duration(field: &str, v: Value) -> Result<Duration, ManifestError> {
    let Value::String(s) = v else {
        return Err(err(
            field,
            format!(
                "expected a duration string like \"10s\", found {}",
                type_name(&v)
            ),
        ));
    };
    let d = humantime::parse_duration(&s)
        .map_err(|e| err(field, format!("invalid duration {s:?}: {e}")))?;
    if d.is_zero() {
        return Err(err(field, "must be greater than 0"));
    }
    if d > MANIFEST_DURATION_MAX {
        return Err(err(
            field,
            format!(
                "{s:?} is over the limit of {}",
                humantime::format_duration(MANIFEST_DURATION_MAX)
            ),
        ));
    }
    Ok(d)
}

fn env(v: Option<Value>) -> Result<BTreeMap<String, String>, ManifestError> {
    let table = match v {
        None => return Ok(BTreeMap::new()),
        Some(Value::Table(t)) => t,
        Some(v) => {
            return Err(err(
                "env",
                format!("expected a table, found {}", type_name(&v)),
            ))
        }
    };
    if table.len() > ENV_VARS_MAX {
        return Err(err(
            "env",
            format!("{} variables (at most {ENV_VARS_MAX})", table.len()),
        ));
    }
    let mut out = BTreeMap::new();
    let mut total = 0usize;
    for (name, value) in table {
        let field = format!("env.{name}");
        check_env_name(&name).map_err(|r| err(field.clone(), r.to_string()))?;
        if reserved_env_name(&name) {
            return Err(err(
                field,
                "reserved: OUTPOST_* and NOTIFY_SOCKET are never passed to the software",
            ));
        }
        let Value::String(value) = value else {
            return Err(err(
                field,
                format!("expected a string, found {}", type_name(&value)),
            ));
        };
        if value.len() > ARG_BYTES_MAX {
            return Err(err(
                field,
                format!("{} bytes (at most {ARG_BYTES_MAX})", value.len()),
            ));
        }
        if value.contains('\0') {
            return Err(err(field, "a NUL character"));
        }
        total += name.len() + value.len();
        if total > ENV_BYTES_MAX {
            return Err(err(
                "env",
                format!("names and values over {ENV_BYTES_MAX} bytes in total"),
            ));
        }
        out.insert(name, value);
    }
    Ok(out)
}

/// Why a name is not a portable environment variable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EnvNameError {
    #[error("empty name")]
    Empty,
    #[error("a name of {0} bytes (at most {ENV_NAME_BYTES_MAX})")]
    TooLong(usize),
    #[error("not a variable name (letters, digits and _, not starting with a digit)")]
    NotAName,
}

/// A portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, bounded.
pub(crate) fn check_env_name(name: &str) -> Result<(), EnvNameError> {
    if name.is_empty() {
        return Err(EnvNameError::Empty);
    }
    if name.len() > ENV_NAME_BYTES_MAX {
        return Err(EnvNameError::TooLong(name.len()));
    }
    let mut chars = name.chars();
    let first = chars.next().unwrap_or('0');
    if !(first.is_ascii_alphabetic() || first == '_')
        || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(EnvNameError::NotAName);
    }
    Ok(())
}

/// Names the software may not be given by its manifest.
fn reserved_env_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.starts_with("OUTPOST_") || upper == "NOTIFY_SOCKET"
}

fn health(v: Option<Value>) -> Result<Health, ManifestError> {
    let mut t = match v {
        None => {
            return Ok(Health {
                check: HealthCheck::Alive(HEALTH_ALIVE_DEFAULT),
                timeout: HEALTH_TIMEOUT_DEFAULT,
            })
        }
        Some(Value::Table(t)) => t,
        Some(v) => {
            return Err(err(
                "health",
                format!("expected a table, found {}", type_name(&v)),
            ))
        }
    };
    const KEYS: &[&str] = &["alive", "tcp", "http", "timeout"];
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(err(
            format!("health.{k}"),
            format!("unknown key (expected one of {})", KEYS.join(", ")),
        ));
    }
    let timeout = match t.remove("timeout") {
        None => HEALTH_TIMEOUT_DEFAULT,
        Some(v) => duration("health.timeout", v)?,
    };
    let alive = t.remove("alive");
    let tcp = t.remove("tcp");
    let http = t.remove("http");
    let check = match (alive, tcp, http) {
        (Some(a), None, None) => HealthCheck::Alive(duration("health.alive", a)?),
        (None, Some(v), None) => {
            let s = target_string("health.tcp", v)?;
            let (host, port) = host_port("health.tcp", &s, None)?;
            HealthCheck::Tcp { host, port }
        }
        (None, None, Some(v)) => {
            let s = target_string("health.http", v)?;
            HealthCheck::Http(http_url(&s)?)
        }
        _ => return Err(err("health", "exactly one of alive, tcp, http is required")),
    };
    Ok(Health { check, timeout })
}

fn target_string(field: &str, v: Value) -> Result<String, ManifestError> {
    let Value::String(s) = v else {
        return Err(err(
            field,
            format!("expected a string, found {}", type_name(&v)),
        ));
    };
    if s.len() > HEALTH_TARGET_BYTES_MAX {
        return Err(err(
            field,
            format!("{} bytes (at most {HEALTH_TARGET_BYTES_MAX})", s.len()),
        ));
    }
    Ok(s)
}

/// `host:port`, `[v6]:port`, or with `default_port`, `host` alone. Never resolved here.
fn host_port(
    field: &str,
    s: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), ManifestError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| err(field, format!("{s:?}: unclosed `[`")))?;
        let host = &rest[..end];
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| err(field, format!("{s:?}: {host:?} is not an IPv6 address")))?;
        let after = &rest[end + 1..];
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(err(field, format!("{s:?}: expected `:port` after `]`"))),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(err(
                    field,
                    format!("{s:?}: an IPv6 address needs brackets, e.g. [::1]:8080"),
                ))
            }
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(err(field, format!("{s:?}: empty host")));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(err(field, format!("{s:?}: invalid host {host:?}")));
    }
    let port = match (port, default_port) {
        (Some(p), _) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(field, format!("{s:?}: invalid port {p:?}")))?,
        (None, Some(d)) => d,
        (None, None) => {
            return Err(err(
                field,
                format!("{s:?}: expected host:port, e.g. 127.0.0.1:5060"),
            ))
        }
    };
    Ok((host.to_owned(), port))
}

fn http_url(s: &str) -> Result<HttpTarget, ManifestError> {
    const FIELD: &str = "health.http";
    let Some(rest) = s.strip_prefix("http://") else {
        let reason = if s.starts_with("https://") {
            format!("{s:?}: only http:// is supported")
        } else {
            format!("{s:?}: expected http://host:port/path")
        };
        return Err(err(FIELD, reason));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(err(FIELD, format!("{s:?}: user info is not supported")));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(err(FIELD, format!("{s:?}: character {c:?} in the path")));
    }
    let (host, port) = host_port(FIELD, authority, Some(80))?;
    Ok(HttpTarget {
        host,
        port,
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests;
