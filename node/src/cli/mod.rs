//! The command line: parses arguments (clap), runs the command and turns its outcome into the
//! exit code of the interface (0 done, 1 failed at run time, 2 bad usage or bad config). It owns
//! no node logic: `init`, `run` and `demo` call into the library, and the client commands
//! (`commands.rs`) only talk to a node's HTTP API through [`client::ApiClient`].

mod bundle;
pub mod client;
mod cluster;
mod commands;
mod deploy;
mod files;
mod ops;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{self, ConfigError};
use crate::wire::Role;

/// Exit code: done.
pub const EXIT_OK: i32 = 0;
/// Exit code: failed at run time.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad usage or bad config.
pub const EXIT_USAGE: i32 = 2;

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "A durable edge node",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole system on 127.0.0.1 in a temporary directory; exit 0 only if it converged.
    Demo {
        #[arg(long, default_value_t = 3, value_name = "N")]
        datacenters: usize,
        #[arg(long, default_value_t = 3, value_name = "N")]
        workers: usize,
        #[arg(long, default_value_t = 1000, value_name = "N")]
        events: usize,
    },
    /// Create the database, the node identity and the API token; print the node id and fingerprint.
    Init {
        #[arg(long, value_name = "ROLE")]
        role: Role,
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Also write a commented starter config for the role here.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run a node.
    Run {
        /// Overrides the config's `role`; may be left out when --config names a config with one.
        #[arg(long, value_name = "ROLE", required_unless_present = "config")]
        role: Option<Role>,
        /// Default: /etc/outpost/ROLE.toml
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Role, identity, peers and their link state, lag, last errors.
    Status {
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Submit one event; print its message id and the resulting data element.
    Event {
        #[arg(long, value_name = "A")]
        account: String,
        #[arg(long = "type", value_name = "T")]
        event_type: String,
        /// The event's data, as JSON (default {}).
        #[arg(long, value_name = "JSON")]
        data: Option<String>,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Read the state table.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// A consistent copy of the database: through a running node's API, or with --offline
    /// from a stopped node's data directory.
    Backup {
        /// Where to write the copy (replaced atomically; mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Copy a stopped node's database directly (from --data-dir).
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Offline database tools.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Controller: admitted machines and their state, as a table.
    Machines {
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Controller: machine keys (pending ones first), and admitting or refusing them.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Controller: uploads a bundle and deploys it (default targets: every admitted worker).
    Deploy {
        /// voice, messaging or video; must be the bundle manifest's service.
        #[arg(long, value_name = "S")]
        service: String,
        /// A bundle file (`outpost bundle pack DIR -o FILE`).
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// A target machine by name; repeat for several (default: every admitted worker).
        #[arg(long = "machine", value_name = "NAME")]
        machines: Vec<String>,
        /// Follow the deployment until every target is running or rolled back; exit non-zero
        /// if any target does not run the new bundle.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Software bundles.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Packs a directory holding an `outpost-bundle.toml` manifest into a bundle file (a
    /// deterministic tar; its id is the blake3 of the file).
    Pack {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The bundle file to write.
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Every machine key: pending first, then admitted, then rejected.
    List {
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Admit a pending (or rejected) key; the machine is told at once if connected.
    Accept {
        /// The node id (or a unique prefix of at least 8 hex characters) or the machine name.
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Refuse a key from now on; its connection is closed and it leaves any pool.
    Reject {
        /// The node id (or a unique prefix of at least 8 hex characters) or the machine name.
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        api: ApiOpts,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Verify a stopped node's database; print what is wrong (exit 1) or a summary (exit 0).
    Check {
        #[arg(long, value_name = "DIR", default_value = config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print an account's entries (or one entry) as JSON.
    Get {
        #[arg(long, value_name = "A")]
        account: String,
        #[arg(long = "type", value_name = "T")]
        event_type: Option<String>,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Print one line: `<digest> <entry count>`.
    Digest {
        #[command(flatten)]
        api: ApiOpts,
    },
}

/// How a client command reaches a node's API.
#[derive(Args, Clone, Debug)]
pub struct ApiOpts {
    /// The node's HTTP API.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7480")]
    pub api: String,
    /// The API token (else OUTPOST_TOKEN, else DIR/token).
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where the token file is when neither --token nor OUTPOST_TOKEN is given.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// Runs the command line and exits with the interface's exit code.
pub fn main() {
    std::process::exit(run_cli());
}

fn run_cli() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 on a usage error and 0 for --help and --version.
            e.exit();
        }
    };
    match cli.command {
        Command::Demo {
            datacenters,
            workers,
            events,
        } => demo(datacenters, workers, events),
        Command::Init {
            role,
            data_dir,
            name,
            config,
        } => init(role, &data_dir, name.as_deref(), config.as_deref()),
        Command::Run { role, config } => run(role, config),
        Command::Status { json, api } => commands::status(&api, json),
        Command::Event {
            account,
            event_type,
            data,
            api,
        } => commands::event(&api, &account, &event_type, data.as_deref()),
        Command::State { command } => match command {
            StateCommand::Get {
                account,
                event_type,
                api,
            } => commands::state_get(&api, &account, event_type.as_deref()),
            StateCommand::Digest { api } => commands::digest(&api),
        },
        Command::Backup { out, offline, api } => {
            if offline {
                ops::backup_offline(&api.data_dir, &out)
            } else {
                ops::backup_online(&api, &out)
            }
        }
        Command::Db {
            command: DbCommand::Check { data_dir },
        } => ops::db_check(&data_dir),
        Command::Machines { json, api } => cluster::machines(&api, json),
        Command::Keys { command } => match command {
            KeysCommand::List { json, api } => cluster::keys_list(&api, json),
            KeysCommand::Accept { id, api } => cluster::keys_decide(&api, &id, true),
            KeysCommand::Reject { id, api } => cluster::keys_decide(&api, &id, false),
        },
        Command::Deploy {
            service,
            bundle,
            machines,
            wait,
            timeout,
            api,
        } => deploy::deploy(&api, &service, &bundle, &machines, wait, timeout),
        Command::Bundle { command } => match command {
            BundleCommand::Pack { dir, out } => match bundle::pack_command(&dir, &out) {
                Ok(()) => EXIT_OK,
                // A directory that is not a bundle is the user's input: bad usage.
                Err(e) => {
                    eprintln!("error: {e:#}");
                    EXIT_USAGE
                }
            },
        },
    }
}

/// Prints a runtime failure; a config problem found by the runtime (say, a database created for
/// another role) is reported as bad config.
fn failed(e: &anyhow::Error) -> i32 {
    eprintln!("error: {e:#}");
    if e.downcast_ref::<ConfigError>().is_some() {
        EXIT_USAGE
    } else {
        EXIT_FAILED
    }
}

fn usage(message: impl std::fmt::Display) -> i32 {
    eprintln!("error: {message}");
    EXIT_USAGE
}

fn demo(datacenters: usize, workers: usize, events: usize) -> i32 {
    let opts = crate::demo::DemoOpts {
        datacenters,
        workers,
        events,
    };
    match crate::demo::run(opts) {
        Ok(true) => EXIT_OK,
        Ok(false) => {
            eprintln!("demo: the system did not converge");
            EXIT_FAILED
        }
        Err(e) => failed(&e),
    }
}

fn init(role: Role, data_dir: &Path, name: Option<&str>, config_path: Option<&Path>) -> i32 {
    if let Some(name) = name {
        if let Err(reason) = config::check_name(name) {
            return usage(format_args!("--name: {reason}"));
        }
    }
    // The starter config is decided before anything is created, so a refusal changes nothing.
    let starter = match config_path {
        None => None,
        Some(path) => {
            let name = name.map_or_else(host_name, str::to_owned);
            let dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned());
            let text = config::starter(role, &name, &dir);
            match std::fs::read(path) {
                Ok(existing) if existing == text.as_bytes() => None,
                Ok(_) => {
                    return usage(format_args!(
                        "--config: {} already exists and differs from the starter config; not overwriting it",
                        path.display()
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some((path, text)),
                Err(e) => return usage(format_args!("--config: {}: {e}", path.display())),
            }
        }
    };
    let info = match crate::node::init(data_dir, role, name) {
        Ok(info) => info,
        Err(e) => return failed(&e),
    };
    if let Err(e) = config::ensure_token(data_dir) {
        eprintln!(
            "error: cannot create the API token in {}: {e}",
            data_dir.display()
        );
        return EXIT_FAILED;
    }
    println!("node-id: {}", info.node_id);
    println!("fingerprint: {}", info.fingerprint);
    if let Some((path, text)) = starter {
        if let Err(e) = write_new(path, &text) {
            eprintln!("error: --config: cannot write {}: {e}", path.display());
            return if e.kind() == std::io::ErrorKind::AlreadyExists {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            };
        }
        eprintln!("wrote a starter config to {}", path.display());
    }
    EXIT_OK
}

/// Writes a file that must not exist yet.
fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The host name, made into a valid node name; `outpost` if there is none.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(config::NAME_BYTES_MAX)
        .collect();
    if name.is_empty() {
        "outpost".to_owned()
    } else {
        name
    }
}

fn run(role: Option<Role>, config_path: Option<PathBuf>) -> i32 {
    let path = match (config_path, role) {
        (Some(path), _) => path,
        (None, Some(role)) => PathBuf::from(format!("/etc/outpost/{role}.toml")),
        (None, None) => return usage("run: give --role, --config or both"),
    };
    let config = match config::load(&path, role) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let log = match init_logging(&config.log.level) {
        Ok(log) => log,
        Err(e) => return usage(e),
    };
    // A broken supervisor environment is logged and otherwise ignored: the node still runs.
    let notify = crate::ops::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!("not notifying systemd: {e}");
        crate::ops::Notifier::disabled()
    });
    let opts = crate::node::RunOpts {
        source: crate::ops::reload::Source {
            path: path.clone(),
            role_override: role,
        },
        log,
        notify,
    };
    match crate::node::run(config, opts) {
        Ok(()) => EXIT_OK,
        Err(e) => failed(&e),
    }
}

/// Logs to stderr (the journal, under systemd: then without our own timestamps, since the
/// journal keeps its own); `RUST_LOG`, when set, overrides the config's `log.level`. The filter
/// can be changed later through the returned [`crate::ops::LogControl`] (SIGHUP).
fn init_logging(level: &str) -> Result<crate::ops::LogControl, String> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|e| !e.trim().is_empty());
    let filter = match &env {
        Some(env) => {
            EnvFilter::try_new(env).map_err(|e| format!("RUST_LOG: invalid filter {env:?}: {e}"))?
        }
        None => EnvFilter::try_new(level).map_err(|e| format!("log.level: {e}"))?,
    };
    let (filter, handle) = reload::Layer::new(filter);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let out = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let out = if journal {
        out.without_time().boxed()
    } else {
        out.boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(out)
        .try_init()
        .map_err(|e| format!("cannot start logging: {e}"))?;
    let set = move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| format!("invalid filter {level:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    };
    Ok(crate::ops::LogControl::new(Box::new(set), env.is_some()))
}
