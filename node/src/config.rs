//! The node's TOML config: parsing, validation with errors that name the field, defaults, the
//! starter config `outpost init` writes, and the API token file in the data directory.
//!
//! Parsing goes through permissive-typed raw structs (`raw.rs`, `deny_unknown_fields`) and is then
//! validated into the typed [`Config`]; everything the runtime reads is checked here, once. This
//! module never opens the database or the network (it may resolve a `host:port` address).

mod raw;
mod starter;
#[cfg(test)]
mod tests;
mod token;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ids::Fingerprint;
use crate::wire::Role;

use crate::limits::{
    self, CONFIG_BYTES_MAX, FRAME_BYTES_MAX_HIGHEST, FRAME_BYTES_MAX_LOWEST, NODE_NAME_BYTES_MAX,
    PEER_FINGERPRINTS_MAX,
};
pub use crate::ops::logging::LogFormat;
pub use starter::{starter, FINGERPRINT_PLACEHOLDER};
pub use token::{ensure_token, read_join_token, read_token};

/// Where `outpost run` looks for the data directory when the config does not say.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/outpost";
/// QUIC listen address default.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7400";
/// Local HTTP API address default.
pub const DEFAULT_API: &str = "127.0.0.1:7480";
/// The API token's file name inside the data directory.
pub const TOKEN_FILE: &str = "token";

/// The services a worker may belong to.
pub const SERVICES: &[&str] = &["voice", "messaging", "video"];
/// The components a worker may be.
pub const COMPONENTS: &[&str] = &[
    "call-router",
    "load-balancer",
    "media-processor",
    "routing",
    "call-queue",
    "resource-db",
    "proxy",
];

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub role: Role,
    pub name: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub api: SocketAddr,
    /// Datacenter: every peer datacenter.
    pub peers: Vec<PeerConfig>,
    pub limits: Limits,
    pub replication: ReplicationConfig,
    pub log: LogConfig,
    /// Controller: the join token that admits a worker at once.
    pub admission: Option<AdmissionConfig>,
    /// Controller: cluster timing.
    pub cluster: ClusterConfig,
    /// Worker: where its controller is (always `Some` for a worker).
    pub controller: Option<ControllerConfig>,
    /// Worker: what this box is (always `Some` for a worker).
    pub machine: Option<MachineConfig>,
}

impl Config {
    /// A config with every default, no peers and no role sections; for tests and the demo,
    /// which fill in what they need.
    pub fn with_defaults(role: Role, name: &str, data_dir: &Path) -> Config {
        Config {
            role,
            name: name.to_owned(),
            data_dir: data_dir.to_owned(),
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            api: DEFAULT_API.parse().expect("valid default"),
            peers: Vec::new(),
            limits: Limits::default(),
            replication: ReplicationConfig::default(),
            log: LogConfig::default(),
            admission: None,
            cluster: ClusterConfig::default(),
            controller: None,
            machine: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PeerConfig {
    pub name: String,
    pub addr: SocketAddr,
    /// One, or two while the peer's certificate rotates.
    pub fingerprints: Vec<Fingerprint>,
}

/// Every bound of the node, named. All have defaults; all can be set under `[limits]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// How long origin logs are kept for catch-up.
    pub log_retention: Duration,
    /// Most records kept across origin logs.
    pub log_records_max: u64,
    /// Largest frame on a QUIC stream.
    pub frame_bytes_max: usize,
    /// Pending requests queued for the writer thread.
    pub ingest_queue_max: usize,
    /// Events in one `POST /v1/events/batch`.
    pub batch_events_max: usize,
    /// Events in one group commit.
    pub commit_events_max: usize,
    /// Log positions unacknowledged per peer.
    pub in_flight_max: u64,
    /// Largest HTTP API request body.
    pub api_body_bytes_max: usize,
    /// Most peers in `[[peers]]`.
    pub peers_max: usize,
    /// Most HTTP API connections open at once; at the bound the oldest idle one is closed to
    /// make room (see `crate::http::serve`).
    pub api_connections_max: usize,
    /// Time a client has to send a whole request head, from its first byte.
    pub api_header_timeout: Duration,
    /// An API connection with no request for this long is closed.
    pub api_idle_timeout: Duration,
    /// Time a client has to send a whole request body, from the end of its head.
    pub api_body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            log_retention: limits::LOG_RETENTION_DEFAULT,
            log_records_max: limits::LOG_RECORDS_MAX_DEFAULT,
            frame_bytes_max: limits::FRAME_BYTES_MAX_DEFAULT,
            ingest_queue_max: limits::INGEST_QUEUE_MAX_DEFAULT,
            batch_events_max: limits::BATCH_EVENTS_MAX_DEFAULT,
            commit_events_max: limits::COMMIT_EVENTS_MAX_DEFAULT,
            in_flight_max: limits::IN_FLIGHT_MAX_DEFAULT,
            api_body_bytes_max: limits::API_BODY_BYTES_MAX_DEFAULT,
            peers_max: limits::PEERS_MAX_DEFAULT,
            api_connections_max: limits::API_CONNECTIONS_MAX_DEFAULT,
            api_header_timeout: limits::API_HEADER_TIMEOUT_DEFAULT,
            api_idle_timeout: limits::API_IDLE_TIMEOUT_DEFAULT,
            api_body_timeout: limits::API_BODY_TIMEOUT_DEFAULT,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicationConfig {
    /// 0 relays to every peer; N bounds relays in large meshes.
    pub fanout: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    /// A level, or directives each ending in one (`info,outpost=debug`); `RUST_LOG` overrides it.
    pub level: String,
    /// `text` (default) or `json`, one object per line.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdmissionConfig {
    pub join_token_file: PathBuf,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    /// A worker silent this long is marked down and leaves its pool.
    pub down_after: Duration,
    /// Most machine keys waiting as pending; beyond it unknown machines are refused unrecorded.
    pub pending_max: usize,
    /// Most publications stored unacknowledged for one machine; at the bound its pool and
    /// route changes wait (only the newest is sent once it acknowledges) and deployments to it
    /// fail with the reason.
    pub channel_max: usize,
    /// An uploaded bundle that no deployment needs is deleted once it is this old (by its
    /// upload time): upload first and deploy within this, or upload again.
    pub bundle_keep_unused: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            down_after: limits::DOWN_AFTER_DEFAULT,
            pending_max: limits::PENDING_MAX_DEFAULT,
            channel_max: limits::CHANNEL_MAX_DEFAULT,
            bundle_keep_unused: limits::BUNDLE_KEEP_UNUSED_DEFAULT,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ControllerConfig {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub join_token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MachineConfig {
    /// One of [`SERVICES`].
    pub service: String,
    /// One of [`COMPONENTS`].
    pub component: String,
    /// The name of the machine in front of this one, if any.
    pub load_balancer: Option<String>,
    /// Where its software serves; listed in its load balancer's pool.
    pub service_addr: Option<SocketAddr>,
    /// A load balancer: the QUIC address its dependents dial (default: `listen`, which must
    /// then be a specific address).
    pub relay_addr: Option<SocketAddr>,
    /// A load balancer: where its backend pool is written (default `DATA_DIR/pool.json`).
    pub pool_file: Option<PathBuf>,
}

/// A config that cannot be used, naming the file, the field (`limits.frame_bytes`,
/// `peers[1].fingerprint`) and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {field}: {reason}")]
pub struct ConfigError {
    pub origin: String,
    pub field: String,
    pub reason: String,
}

/// Reads and validates the config at `path`; `role_override` (from `--role`) wins over the
/// file's `role`.
pub fn load(path: &Path, role_override: Option<Role>) -> Result<Config, ConfigError> {
    let text = read_text(path)?;
    parse(&text, &path.display().to_string(), role_override)
}

/// What a client command (`outpost status`, ...) takes from a node's config: where its API
/// listens and where its data directory (with the token) is.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientView {
    pub api: SocketAddr,
    pub data_dir: PathBuf,
}

/// Reads only `api` and `data_dir` (with their defaults) from the config at `path`. The rest is
/// not validated: an operator may not be able to read, say, the controller's join token file,
/// and needs none of it to talk to the node.
pub fn load_client_view(path: &Path) -> Result<ClientView, ConfigError> {
    let text = read_text(path)?;
    let origin = path.display().to_string();
    let raw: raw::RawConfig =
        toml::from_str(&text).map_err(|e| raw::toml_error(&origin, &text, &e))?;
    let v = Validator { origin: &origin };
    let data_dir = match raw.data_dir {
        Some(d) if d.as_os_str().is_empty() => return Err(v.err("data_dir", "must not be empty")),
        Some(d) => d,
        None => PathBuf::from(DEFAULT_DATA_DIR),
    };
    Ok(ClientView {
        api: v.addr("api", raw.api.as_deref().unwrap_or(DEFAULT_API))?,
        data_dir,
    })
}

/// A config file's text, refusing what is too large to be one.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    let origin = path.display().to_string();
    let err = |reason: String| ConfigError {
        origin: origin.clone(),
        field: "file".to_owned(),
        reason,
    };
    let file = fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut bytes = Vec::new();
    file.take(CONFIG_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > CONFIG_BYTES_MAX {
        return Err(err(format!(
            "larger than {CONFIG_BYTES_MAX} bytes; not a config"
        )));
    }
    String::from_utf8(bytes).map_err(|e| err(format!("not UTF-8: {e}")))
}

/// Parses and validates config text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str, role_override: Option<Role>) -> Result<Config, ConfigError> {
    let raw: raw::RawConfig =
        toml::from_str(text).map_err(|e| raw::toml_error(origin, text, &e))?;
    Validator { origin }.config(raw, role_override)
}

/// Why a node, peer or machine name is refused (the caller names the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("{0} bytes, more than {NODE_NAME_BYTES_MAX}")]
    TooLong(usize),
    #[error("{name:?} contains {c:?}; use only letters, digits, '.', '_' and '-'")]
    BadChar { name: String, c: char },
}

/// Checks a node, peer or machine name: non-empty, at most 64 bytes of `[A-Za-z0-9._-]`.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NODE_NAME_BYTES_MAX {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadChar {
            name: name.to_owned(),
            c,
        });
    }
    Ok(())
}

/// Which role uses each role-specific top-level key.
const ROLE_KEYS: &[(&str, Role, &str)] = &[
    ("peers", Role::Datacenter, "[[peers]]"),
    ("replication", Role::Datacenter, "[replication]"),
    ("admission", Role::Controller, "[admission]"),
    ("cluster", Role::Controller, "[cluster]"),
    ("controller", Role::Worker, "[controller]"),
    ("machine", Role::Worker, "[machine]"),
];

struct Validator<'a> {
    origin: &'a str,
}

impl Validator<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.origin.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn missing(&self, field: &str, what: &str) -> ConfigError {
        self.err(field, format!("missing: {what}"))
    }

    fn config(
        &self,
        raw: raw::RawConfig,
        role_override: Option<Role>,
    ) -> Result<Config, ConfigError> {
        let file_role = match &raw.role {
            Some(s) => Some(s.parse::<Role>().map_err(|e| self.err("role", e))?),
            None => None,
        };
        let role = role_override.or(file_role).ok_or_else(|| {
            self.missing(
                "role",
                "set `role` (datacenter, controller or worker) in the config or pass --role",
            )
        })?;

        let present = [
            ("peers", raw.peers.is_some()),
            ("replication", raw.replication.is_some()),
            ("admission", raw.admission.is_some()),
            ("cluster", raw.cluster.is_some()),
            ("controller", raw.controller.is_some()),
            ("machine", raw.machine.is_some()),
        ];
        for (key, is_present) in present {
            let (_, owner, section) = ROLE_KEYS
                .iter()
                .find(|(k, _, _)| *k == key)
                .expect("every role key listed");
            if is_present && *owner != role {
                return Err(self.err(
                    key,
                    format!("only a {owner} uses {section}; this node is a {role}"),
                ));
            }
        }

        let name = raw.name.ok_or_else(|| {
            self.missing("name", "every node needs a name, unique in its cluster")
        })?;
        check_name(&name).map_err(|r| self.err("name", r.to_string()))?;

        let data_dir = match raw.data_dir {
            Some(d) if d.as_os_str().is_empty() => {
                return Err(self.err("data_dir", "must not be empty"))
            }
            Some(d) => d,
            None => PathBuf::from(DEFAULT_DATA_DIR),
        };
        let listen = self.addr("listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
        let api = self.addr("api", raw.api.as_deref().unwrap_or(DEFAULT_API))?;
        let limits = self.limits(raw.limits.unwrap_or_default())?;
        let peers = self.peers(raw.peers.unwrap_or_default(), &name, &limits)?;
        let replication = ReplicationConfig {
            fanout: raw.replication.and_then(|r| r.fanout).unwrap_or(0),
        };
        let log = self.log(raw.log.unwrap_or_default())?;
        let admission = match raw.admission {
            Some(a) => {
                let f = a.join_token_file.ok_or_else(|| {
                    self.missing(
                        "admission.join_token_file",
                        "the file holding the join token (omit [admission] to admit by hand)",
                    )
                })?;
                self.token_file("admission.join_token_file", &f)?;
                Some(AdmissionConfig { join_token_file: f })
            }
            None => None,
        };
        let mut cluster = ClusterConfig::default();
        if let Some(c) = raw.cluster {
            if let Some(s) = c.down_after {
                cluster.down_after = self.duration("cluster.down_after", &s)?;
                if cluster.down_after < Duration::from_millis(200) {
                    return Err(self.err("cluster.down_after", "must be at least 200ms"));
                }
            }
            if let Some(n) = c.pending_max {
                if n == 0 {
                    return Err(self.err(
                        "cluster.pending_max",
                        "must be at least 1 (unknown machines are recorded as pending)",
                    ));
                }
                cluster.pending_max = n;
            }
            if let Some(n) = c.channel_max {
                if !(8..=65_536).contains(&n) {
                    return Err(self.err("cluster.channel_max", "must be between 8 and 65536"));
                }
                cluster.channel_max = n;
            }
            if let Some(s) = c.bundle_keep_unused {
                cluster.bundle_keep_unused = self.duration("cluster.bundle_keep_unused", &s)?;
                if cluster.bundle_keep_unused < Duration::from_secs(60) {
                    return Err(self.err(
                        "cluster.bundle_keep_unused",
                        "must be at least 1m (an upload needs time to be deployed)",
                    ));
                }
            }
        }
        let controller = match raw.controller {
            Some(c) => Some(self.controller(c)?),
            None if role == Role::Worker => {
                return Err(self.missing(
                    "controller",
                    "a worker needs [controller] with addr and fingerprint",
                ))
            }
            None => None,
        };
        let machine = match raw.machine {
            Some(m) => Some(self.machine(m)?),
            None if role == Role::Worker => {
                return Err(self.missing(
                    "machine",
                    "a worker needs [machine] with service and component",
                ))
            }
            None => None,
        };
        Ok(Config {
            role,
            name,
            data_dir,
            listen,
            api,
            peers,
            limits,
            replication,
            log,
            admission,
            cluster,
            controller,
            machine,
        })
    }

    fn addr(&self, field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a);
        }
        match s.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .ok_or_else(|| self.err(field, format!("{s:?} resolves to no address"))),
            Err(e) => Err(self.err(
                field,
                format!("invalid address {s:?}: {e} (expected host:port, e.g. 192.0.2.10:7400)"),
            )),
        }
    }

    fn duration(&self, field: &str, s: &str) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(s)
            .map_err(|e| self.err(field, format!("invalid duration {s:?}: {e}")))?;
        if d.is_zero() {
            return Err(self.err(field, "must be greater than 0"));
        }
        Ok(d)
    }

    fn fingerprint(&self, field: &str, s: &str) -> Result<Fingerprint, ConfigError> {
        if s == FINGERPRINT_PLACEHOLDER {
            return Err(self.err(
                field,
                "the all-zero placeholder of the starter config; put the peer's real \
                 fingerprint here (64 hex, as `outpost init` prints it on that node)",
            ));
        }
        s.parse::<Fingerprint>()
            .map_err(|e| self.err(field, format!("invalid fingerprint: {e}")))
    }

    fn token_file(&self, field: &str, path: &Path) -> Result<(), ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|e| self.err(field, format!("cannot read {}: {e}", path.display())))?;
        if text.trim().is_empty() {
            return Err(self.err(field, format!("{} is empty", path.display())));
        }
        Ok(())
    }

    fn limits(&self, raw: raw::RawLimits) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let positive = |field: &str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match v {
                Some(0) => Err(self.err(format!("limits.{field}"), "must be greater than 0")),
                Some(v) => Ok(v),
                None => Ok(default),
            }
        };
        let size = |field: &str, v: Option<u64>, default: usize| -> Result<usize, ConfigError> {
            let v = positive(field, v, default as u64)?;
            usize::try_from(v)
                .map_err(|_| self.err(format!("limits.{field}"), format!("{v} is too large")))
        };
        let limits = Limits {
            log_retention: match raw.log_retention {
                Some(s) => self.duration("limits.log_retention", &s)?,
                None => d.log_retention,
            },
            log_records_max: positive("log_records_max", raw.log_records_max, d.log_records_max)?,
            frame_bytes_max: size("frame_bytes_max", raw.frame_bytes_max, d.frame_bytes_max)?,
            ingest_queue_max: size("ingest_queue_max", raw.ingest_queue_max, d.ingest_queue_max)?,
            batch_events_max: size("batch_events_max", raw.batch_events_max, d.batch_events_max)?,
            commit_events_max: size(
                "commit_events_max",
                raw.commit_events_max,
                d.commit_events_max,
            )?,
            in_flight_max: positive("in_flight_max", raw.in_flight_max, d.in_flight_max)?,
            api_body_bytes_max: size(
                "api_body_bytes_max",
                raw.api_body_bytes_max,
                d.api_body_bytes_max,
            )?,
            peers_max: size("peers_max", raw.peers_max, d.peers_max)?,
            api_connections_max: size(
                "api_connections_max",
                raw.api_connections_max,
                d.api_connections_max,
            )?,
            api_header_timeout: match raw.api_header_timeout {
                Some(s) => self.duration("limits.api_header_timeout", &s)?,
                None => d.api_header_timeout,
            },
            api_idle_timeout: match raw.api_idle_timeout {
                Some(s) => self.duration("limits.api_idle_timeout", &s)?,
                None => d.api_idle_timeout,
            },
            api_body_timeout: match raw.api_body_timeout {
                Some(s) => self.duration("limits.api_body_timeout", &s)?,
                None => d.api_body_timeout,
            },
        };
        if !(FRAME_BYTES_MAX_LOWEST..=FRAME_BYTES_MAX_HIGHEST).contains(&limits.frame_bytes_max) {
            return Err(self.err(
                "limits.frame_bytes_max",
                format!(
                    "{} is outside {FRAME_BYTES_MAX_LOWEST}..={FRAME_BYTES_MAX_HIGHEST} (64 KiB to 64 MiB)",
                    limits.frame_bytes_max
                ),
            ));
        }
        if limits.commit_events_max < limits.batch_events_max {
            return Err(self.err(
                "limits.commit_events_max",
                format!(
                    "{} is less than limits.batch_events_max ({}); one batch must fit in one commit",
                    limits.commit_events_max, limits.batch_events_max
                ),
            ));
        }
        Ok(limits)
    }

    fn peers(
        &self,
        raw: Vec<raw::RawPeer>,
        own_name: &str,
        limits: &Limits,
    ) -> Result<Vec<PeerConfig>, ConfigError> {
        if raw.len() > limits.peers_max {
            return Err(self.err(
                "peers",
                format!(
                    "{} peers, more than limits.peers_max ({})",
                    raw.len(),
                    limits.peers_max
                ),
            ));
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut peers = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            let at = |key: &str| format!("peers[{i}].{key}");
            let name = p
                .name
                .ok_or_else(|| self.missing(&at("name"), "the peer's name from its config"))?;
            check_name(&name).map_err(|r| self.err(at("name"), r.to_string()))?;
            if name == own_name {
                return Err(self.err(
                    at("name"),
                    format!("{name:?} is this node's own name; list only the other datacenters"),
                ));
            }
            if let Some(first) = seen.insert(name.clone(), i) {
                return Err(self.err(
                    at("name"),
                    format!("duplicate peer name {name:?} (also peers[{first}])"),
                ));
            }
            let addr = p.addr.ok_or_else(|| {
                self.missing(&at("addr"), "host:port of the peer's listen address")
            })?;
            let addr = self.addr(&at("addr"), &addr)?;
            let fingerprints = self.peer_fingerprints(&at("fingerprint"), p.fingerprint)?;
            peers.push(PeerConfig {
                name,
                addr,
                fingerprints,
            });
        }
        Ok(peers)
    }

    fn peer_fingerprints(
        &self,
        field: &str,
        raw: Option<toml::Value>,
    ) -> Result<Vec<Fingerprint>, ConfigError> {
        let expected = "expected the peer's fingerprint (64 hex, as `outpost init` prints it) \
                        or a list of two while its certificate rotates";
        match raw {
            None => Err(self.missing(field, expected)),
            Some(toml::Value::String(s)) => Ok(vec![self.fingerprint(field, &s)?]),
            Some(toml::Value::Array(items)) => {
                if items.is_empty() || items.len() > PEER_FINGERPRINTS_MAX {
                    return Err(self.err(
                        field,
                        format!("a list of {} fingerprints; {expected}", items.len()),
                    ));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(j, v)| {
                        let f = format!("{field}[{j}]");
                        match v.as_str() {
                            Some(s) => self.fingerprint(&f, s),
                            None => Err(self.err(f, format!("a {}; {expected}", v.type_str()))),
                        }
                    })
                    .collect()
            }
            Some(other) => Err(self.err(field, format!("a {}; {expected}", other.type_str()))),
        }
    }

    fn log(&self, raw: raw::RawLog) -> Result<LogConfig, ConfigError> {
        let d = LogConfig::default();
        let level = raw.level.unwrap_or(d.level);
        crate::ops::logging::check_level(&level)
            .map_err(|r| self.err("log.level", r.to_string()))?;
        let format = match raw.format {
            None => d.format,
            Some(f) => LogFormat::parse(&f).ok_or_else(|| {
                self.err(
                    "log.format",
                    format!(
                        "unknown {f:?}; expected one of {}",
                        LogFormat::NAMES.join(", ")
                    ),
                )
            })?,
        };
        Ok(LogConfig { level, format })
    }

    fn controller(&self, raw: raw::RawController) -> Result<ControllerConfig, ConfigError> {
        let addr = raw.addr.ok_or_else(|| {
            self.missing(
                "controller.addr",
                "host:port of the controller's listen address",
            )
        })?;
        let addr = self.addr("controller.addr", &addr)?;
        let fingerprint = raw.fingerprint.ok_or_else(|| {
            self.missing(
                "controller.fingerprint",
                "the controller's fingerprint (64 hex, as `outpost init` prints it)",
            )
        })?;
        let fingerprint = self.fingerprint("controller.fingerprint", &fingerprint)?;
        if let Some(f) = &raw.join_token_file {
            self.token_file("controller.join_token_file", f)?;
        }
        Ok(ControllerConfig {
            addr,
            fingerprint,
            join_token_file: raw.join_token_file,
        })
    }

    fn machine(&self, raw: raw::RawMachine) -> Result<MachineConfig, ConfigError> {
        let one_of = |field: &str, v: Option<String>, allowed: &[&str]| {
            let list = allowed.join(", ");
            let v = v.ok_or_else(|| self.missing(field, &format!("one of {list}")))?;
            if !allowed.contains(&v.as_str()) {
                return Err(self.err(field, format!("unknown {v:?}; expected one of {list}")));
            }
            Ok(v)
        };
        let service = one_of("machine.service", raw.service, SERVICES)?;
        let component = one_of("machine.component", raw.component, COMPONENTS)?;
        if let Some(lb) = &raw.load_balancer {
            check_name(lb).map_err(|r| self.err("machine.load_balancer", r.to_string()))?;
        }
        let service_addr = match &raw.service_addr {
            Some(s) => Some(self.addr("machine.service_addr", s)?),
            None => None,
        };
        let relay_addr = match &raw.relay_addr {
            Some(s) => Some(self.addr("machine.relay_addr", s)?),
            None => None,
        };
        if let Some(lb) = &raw.load_balancer {
            if component == "load-balancer" {
                return Err(self.err(
                    "machine.load_balancer",
                    format!("a load balancer cannot sit behind another ({lb:?})"),
                ));
            }
        }
        if let Some(f) = &raw.pool_file {
            if f.as_os_str().is_empty() || f.is_dir() {
                return Err(self.err("machine.pool_file", "must be a file path"));
            }
        }
        Ok(MachineConfig {
            service,
            component,
            load_balancer: raw.load_balancer,
            service_addr,
            relay_addr,
            pool_file: raw.pool_file,
        })
    }
}
