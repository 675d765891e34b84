//! The command line: parses arguments (clap), runs the command and turns its outcome into the
//! exit code of the interface (0 done, 1 failed at run time, 2 bad usage or bad config). It owns
//! no node logic: `init`, `run` and `demo` call into the library, and the client commands
//! (`commands.rs`) only talk to a node's HTTP API through [`client::ApiClient`].

mod bundle;
pub mod client;
mod cluster;
mod commands;
mod configdata;
mod deploy;
mod files;
mod manpage;
mod ops;
pub mod target;

use std::path::{Path, PathBuf};

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError};
use crate::wire::Role;

pub use target::{ApiArgs, ApiOpts};

/// Exit code: done.
pub const EXIT_OK: i32 = 0;
/// Exit code: failed at run time.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad usage or bad config.
pub const EXIT_USAGE: i32 = 2;

/// The accepted `--role` values, listed in `--help` and checked by clap.
pub(crate) fn role_parser() -> impl TypedValueParser<Value = Role> {
    PossibleValuesParser::new(["datacenter", "controller", "worker"])
        .map(|s| s.parse::<Role>().expect("every listed role parses"))
}

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
        #[arg(long, default_value_t = 4, value_name = "N")]
        workers: usize,
        #[arg(long, default_value_t = 1000, value_name = "N")]
        events: usize,
    },
    /// Create the database, the node identity and the API token; print the node id and fingerprint.
    Init {
        #[arg(long, value_name = "ROLE", value_parser = role_parser())]
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
        #[arg(long, value_name = "ROLE", required_unless_present = "config", value_parser = role_parser())]
        role: Option<Role>,
        /// Default: /etc/outpost/ROLE.toml
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Config files (`check`), and a controller's configuration data for its machines
    /// (`set`, `get`, `delete`, `history`, `rollback`, `effective`).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Role, identity, peers and their link state, lag, last errors.
    Status {
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
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
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print changes as they happen, each with its cursor (resume with --cursor; see
    /// `GET /v1/watch`): a datacenter's state changes, or a controller's machine and
    /// deployment changes. Runs until interrupted.
    Watch {
        /// Datacenter: only this account's changes.
        #[arg(long, value_name = "A")]
        account: Option<String>,
        /// Datacenter: only this event type's changes.
        #[arg(long = "type", value_name = "T")]
        event_type: Option<String>,
        /// Controller: only `machine` or only `deployment` changes.
        #[arg(long, value_name = "K")]
        kind: Option<String>,
        /// Controller: only the machine of this name (or the deployment of this id).
        #[arg(long, value_name = "N")]
        name: Option<String>,
        /// Go on after this cursor (the first column, or `cursor` with --json).
        #[arg(long, value_name = "CURSOR", conflicts_with = "oldest")]
        cursor: Option<String>,
        /// Start at the oldest change the node retains (default: only what comes next).
        #[arg(long)]
        oldest: bool,
        /// Print the stream's NDJSON lines as they are (heartbeats included).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
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
        /// Print what was written (file, bytes, blake3 or rows) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Offline database tools.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Controller: admitted machines and their state, as a table; `machines remove NAME`
    /// takes one out of the cluster for good.
    #[command(args_conflicts_with_subcommands = true)]
    Machines {
        #[command(subcommand)]
        command: Option<MachinesCommand>,
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Controller: machine keys (pending ones first), and admitting or refusing them.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Controller: uploads a bundle and deploys it (default targets: every admitted worker).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Deploy {
        #[command(subcommand)]
        command: Option<DeployCommand>,
        /// voice, messaging or video; must be the bundle manifest's service.
        #[arg(long, value_name = "S", required = true)]
        service: Option<String>,
        /// A bundle file (`outpost bundle pack DIR -o FILE`).
        #[arg(long, value_name = "FILE", required = true)]
        bundle: Option<PathBuf>,
        /// A target machine by name; repeat for several (default: every admitted worker).
        #[arg(long = "machine", value_name = "NAME")]
        machines: Vec<String>,
        /// Go in waves of these cumulative sizes, machine counts or percentages
        /// (`--waves 1,25%,100%`); each wave must run healthy for --healthy-for first.
        #[arg(long, value_name = "SIZES", value_delimiter = ',')]
        waves: Vec<String>,
        /// Go in waves of at most N machines.
        #[arg(long, value_name = "N", conflicts_with = "waves")]
        max_parallel: Option<u64>,
        /// How long a wave must run healthy before the next starts (phased default 10s).
        #[arg(long, value_name = "DURATION")]
        healthy_for: Option<String>,
        /// Halt when this many machines of one wave roll back or fail (phased default 1; 0:
        /// never).
        #[arg(long, value_name = "N")]
        failure_threshold: Option<u32>,
        /// How long a dependent stays out of its load balancer's pool before it is replaced
        /// (phased default 0s: once its load balancer applied the pool).
        #[arg(long, value_name = "DURATION")]
        drain: Option<String>,
        /// Follow the deployment until every target is running or rolled back; exit non-zero
        /// if any target does not run the new bundle.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Print one JSON object (the bundle, the deployment and, with --wait, where it ended).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Software bundles.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout; the package installs it as outpost(1).
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config without starting anything: exit 0 with `ok: ...`, or 2 naming the field.
    Check {
        /// Overrides the config's `role`, as with `run`.
        #[arg(long, value_name = "ROLE", required_unless_present = "config", value_parser = role_parser())]
        role: Option<Role>,
        /// Default: /etc/outpost/ROLE.toml
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Set the document of a scope (`service/S`, `component/S/C` or `machine/NAME`) on the
    /// controller: a new version, published to every machine whose effective configuration
    /// (service, then component, then machine, merged) changed.
    Set {
        #[arg(value_name = "SCOPE")]
        scope: String,
        /// A JSON object, or TOML when the name ends in `.toml` (or with --toml); `-`: stdin.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Send the document as TOML.
        #[arg(long)]
        toml: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a scope's current document (its version and time on stderr).
    Get {
        #[arg(value_name = "SCOPE")]
        scope: String,
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a scope's document (a new version; machines fall back to the other scopes).
    Delete {
        #[arg(value_name = "SCOPE")]
        scope: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A scope's changes, newest first (the newest 32 are kept).
    History {
        #[arg(value_name = "SCOPE")]
        scope: String,
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make a new version of a scope holding what an older version held.
    Rollback {
        #[arg(value_name = "SCOPE")]
        scope: String,
        /// The version to go back to (see `history`).
        #[arg(long, value_name = "N")]
        version: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A machine's effective configuration, the version it was sent and what it did with it.
    Effective {
        #[arg(value_name = "NAME")]
        name: String,
        /// Print the API's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum DeployCommand {
    /// Stop sending new waves of a rollout (what was sent goes on).
    Pause {
        #[arg(value_name = "ID")]
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Go on with a paused rollout.
    Resume {
        #[arg(value_name = "ID")]
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Send nothing more of a rollout; drained machines return to their pool.
    Abort {
        #[arg(value_name = "ID")]
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Where a deployment stands: its waves and each machine.
    Status {
        #[arg(value_name = "ID")]
        id: u64,
        /// Print `GET /v1/deployments/ID` as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
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
        api: ApiArgs,
    },
    /// Admit a pending (or rejected) key; the machine is told at once if connected.
    Accept {
        /// The node id (or a unique prefix of at least 8 hex characters) or the machine name.
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Refuse a key from now on; its connection is closed and it leaves any pool.
    Reject {
        /// The node id (or a unique prefix of at least 8 hex characters) or the machine name.
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum MachinesCommand {
    /// Take a machine out of the cluster for good: its key is refused from then on, its
    /// stored publications and records are dropped, and its load balancer's pool is updated.
    Remove {
        /// The machine name (or its node id, or a unique prefix of at least 8 hex characters).
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        api: ApiArgs,
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
        api: ApiArgs,
    },
    /// Print one line: `<digest> <entry count>`.
    Digest {
        #[command(flatten)]
        api: ApiArgs,
    },
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
    // A client command's target: flags, else the node's config, else the defaults.
    let controller = Some(Role::Controller);
    macro_rules! target {
        ($args:expr, $natural:expr) => {
            match $args.resolve($natural) {
                Ok(t) => t,
                Err(e) => return usage(e),
            }
        };
    }
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
        Command::Config {
            command: ConfigCommand::Check { role, config },
        } => config_check(role, config),
        Command::Config { command } => match command {
            ConfigCommand::Check { .. } => unreachable!("matched above"),
            ConfigCommand::Set {
                scope,
                file,
                toml,
                api,
            } => configdata::set(&target!(api, controller), &scope, &file, toml),
            ConfigCommand::Get { scope, json, api } => {
                configdata::get(&target!(api, controller), &scope, json)
            }
            ConfigCommand::Delete { scope, api } => {
                configdata::delete(&target!(api, controller), &scope)
            }
            ConfigCommand::History { scope, json, api } => {
                configdata::history(&target!(api, controller), &scope, json)
            }
            ConfigCommand::Rollback {
                scope,
                version,
                api,
            } => configdata::rollback(&target!(api, controller), &scope, version),
            ConfigCommand::Effective { name, json, api } => {
                configdata::effective(&target!(api, controller), &name, json)
            }
        },
        Command::Status { json, api } => commands::status(&target!(api, None), json),
        Command::Event {
            account,
            event_type,
            data,
            json,
            api,
        } => commands::event(
            &target!(api, None),
            &account,
            &event_type,
            data.as_deref(),
            json,
        ),
        Command::Watch {
            account,
            event_type,
            kind,
            name,
            cursor,
            oldest,
            json,
            api,
        } => {
            let mut query = Vec::new();
            for (key, value) in [
                ("account", &account),
                ("type", &event_type),
                ("kind", &kind),
                ("name", &name),
                ("cursor", &cursor),
            ] {
                if let Some(v) = value {
                    query.push((key, v.as_str()));
                }
            }
            if oldest {
                query.push(("from", "oldest"));
            }
            commands::watch(&target!(api, None), &query, json)
        }
        Command::State { command } => match command {
            StateCommand::Get {
                account,
                event_type,
                api,
            } => commands::state_get(&target!(api, None), &account, event_type.as_deref()),
            StateCommand::Digest { api } => commands::digest(&target!(api, None)),
        },
        Command::Backup {
            out,
            offline,
            json,
            api,
        } => {
            let api = target!(api, None);
            if offline {
                ops::backup_offline(&api.data_dir, &out, json)
            } else {
                ops::backup_online(&api, &out, json)
            }
        }
        Command::Db {
            command: DbCommand::Check { data_dir },
        } => ops::db_check(&data_dir),
        Command::Machines {
            command: Some(MachinesCommand::Remove { name, api }),
            ..
        } => cluster::machines_remove(&target!(api, controller), &name),
        Command::Machines {
            command: None,
            json,
            api,
        } => cluster::machines(&target!(api, controller), json),
        Command::Keys { command } => match command {
            KeysCommand::List { json, api } => cluster::keys_list(&target!(api, controller), json),
            KeysCommand::Accept { id, api } => {
                cluster::keys_decide(&target!(api, controller), &id, true)
            }
            KeysCommand::Reject { id, api } => {
                cluster::keys_decide(&target!(api, controller), &id, false)
            }
        },
        Command::Deploy {
            command: Some(command),
            ..
        } => match command {
            DeployCommand::Pause { id, api } => {
                deploy::control(&target!(api, controller), id, "pause")
            }
            DeployCommand::Resume { id, api } => {
                deploy::control(&target!(api, controller), id, "resume")
            }
            DeployCommand::Abort { id, api } => {
                deploy::control(&target!(api, controller), id, "abort")
            }
            DeployCommand::Status { id, json, api } => {
                deploy::status(&target!(api, controller), id, json)
            }
        },
        Command::Deploy {
            command: None,
            service,
            bundle,
            machines,
            waves,
            max_parallel,
            healthy_for,
            failure_threshold,
            drain,
            wait,
            timeout,
            json,
            api,
        } => deploy::deploy(
            &target!(api, controller),
            &deploy::Request {
                service: service.as_deref().unwrap_or_default(),
                bundle: bundle.as_deref().unwrap_or(std::path::Path::new("")),
                machines: &machines,
                rollout: deploy::RolloutArgs {
                    waves,
                    max_parallel,
                    healthy_for,
                    failure_threshold,
                    drain,
                },
                wait,
                timeout,
                json,
            },
        ),
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
        Command::Completions { shell } => manpage::completions::<Cli>(shell),
        Command::Man => manpage::man::<Cli>(),
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
    let info = match crate::roles::init(data_dir, role, name) {
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
        .take(crate::limits::NODE_NAME_BYTES_MAX)
        .collect();
    if name.is_empty() {
        "outpost".to_owned()
    } else {
        name
    }
}

/// `--config`, else the role's `/etc/outpost/ROLE.toml`.
fn config_path(command: &str, role: Option<Role>, path: Option<PathBuf>) -> Result<PathBuf, i32> {
    match (path, role) {
        (Some(path), _) => Ok(path),
        (None, Some(role)) => Ok(target::role_config(role)),
        (None, None) => Err(usage(format_args!(
            "{command}: give --role, --config or both"
        ))),
    }
}

/// `outpost config check`: everything `run` validates before it starts, and nothing more.
fn config_check(role: Option<Role>, path: Option<PathBuf>) -> i32 {
    let path = match config_path("config check", role, path) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let c = match config::load(&path, role) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let mut summary = format!(
        "ok: {}: {} {:?}, data_dir {}, listen {}, api {}",
        path.display(),
        c.role,
        c.name,
        c.data_dir.display(),
        c.listen,
        c.api
    );
    match c.role {
        Role::Datacenter => summary.push_str(&format!(", {} peers", c.peers.len())),
        Role::Controller => summary.push_str(if c.admission.is_some() {
            ", admits workers with the join token"
        } else {
            ", admits workers by hand"
        }),
        Role::Worker => {
            if let Some(ctl) = &c.controller {
                summary.push_str(&format!(", controller {}", ctl.addr));
            }
        }
    }
    println!("{summary}");
    EXIT_OK
}

fn run(role: Option<Role>, config_path_flag: Option<PathBuf>) -> i32 {
    let path = match config_path("run", role, config_path_flag) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let config = match config::load(&path, role) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let log = match crate::ops::logging::init(&config.log.level, config.log.format) {
        Ok(log) => log,
        Err(e) => return usage(e),
    };
    // A broken supervisor environment is logged and otherwise ignored: the node still runs.
    let notify = crate::ops::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!("not notifying systemd: {e}");
        crate::ops::Notifier::disabled()
    });
    let opts = crate::roles::RunOpts {
        source: crate::ops::reload::Source {
            path: path.clone(),
            role_override: role,
        },
        log,
        notify,
    };
    match crate::roles::run(config, opts) {
        Ok(()) => EXIT_OK,
        Err(e) => failed(&e),
    }
}
