//! Which node a client command talks to: `--api` and `--data-dir` when given, else `api` and
//! `data_dir` from the node's config (`--config FILE`, or by default the role's
//! `/etc/outpost/ROLE.toml` when it exists), else the built-in defaults. So a client command on
//! a node with non-default ports needs no flags.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::Args;

use crate::config;
use crate::wire::Role;

/// Where the packaged configs live: `/etc/outpost/ROLE.toml`.
pub const CONFIG_DIR: &str = "/etc/outpost";
/// The roles, in the order their default configs are looked for.
const ROLES: [Role; 3] = [Role::Datacenter, Role::Controller, Role::Worker];

/// `/etc/outpost/ROLE.toml`.
pub fn role_config(role: Role) -> PathBuf {
    Path::new(CONFIG_DIR).join(format!("{role}.toml"))
}

/// The flags of every client command that say which node to reach.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// The node's HTTP API [default: `api` from the config, else http://127.0.0.1:7480].
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// The API token (else OUTPOST_TOKEN, else DIR/token).
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where the token file is when neither --token nor OUTPOST_TOKEN is given [default:
    /// `data_dir` from the config, else /var/lib/outpost].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The node's config, read for `api` and `data_dir` [default: /etc/outpost/ROLE.toml of
    /// --role, or of the only role there, or of the only one whose node was created].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The role whose /etc/outpost/ROLE.toml to read (datacenter, controller or worker).
    #[arg(long, value_name = "ROLE", value_parser = super::role_parser())]
    pub role: Option<Role>,
}

/// A client command's resolved target.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiOpts {
    /// The API's base URL.
    pub api: String,
    pub token: Option<String>,
    pub data_dir: PathBuf,
    /// The config `api` and `data_dir` came from, if one was read (for hints).
    pub config: Option<PathBuf>,
}

/// Why a client command has no target: bad usage or bad config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// Several role configs are here and nothing says which.
    #[error(
        "--config: several node configs here ({}); choose one with --role or --config, or give \
         --api and --data-dir",
        shown(configs)
    )]
    Several { configs: Vec<PathBuf> },
    /// The config that names the API and data directory is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

fn shown(paths: &[PathBuf]) -> String {
    let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    list.join(", ")
}

impl ApiArgs {
    /// Resolves the target; `natural` is the role the command is for (a controller's
    /// `machines`), used when --role is not given. An error is bad usage or bad config.
    pub fn resolve(&self, natural: Option<Role>) -> Result<ApiOpts, TargetError> {
        self.resolve_in(natural, &|role| {
            let path = role_config(role);
            path.is_file().then_some(path)
        })
    }

    /// [`Self::resolve`] with the default configs found by `existing` (a test's directory).
    fn resolve_in(
        &self,
        natural: Option<Role>,
        existing: &dyn Fn(Role) -> Option<PathBuf>,
    ) -> Result<ApiOpts, TargetError> {
        let needs_config = self.api.is_none() || self.data_dir.is_none();
        let path = match (&self.config, self.role.or(natural)) {
            _ if !needs_config => None,
            (Some(p), _) => Some(p.clone()),
            (None, Some(role)) => existing(role),
            (None, None) => {
                let mut found: Vec<PathBuf> = ROLES.iter().filter_map(|r| existing(*r)).collect();
                // The package ships a config for every role: of several, the ones whose node
                // was created (its data directory holds the API token) are the ones in use.
                if found.len() > 1 {
                    let in_use: Vec<PathBuf> = found
                        .iter()
                        .filter(|p| {
                            config::load_client_view(p)
                                .is_ok_and(|v| v.data_dir.join(config::TOKEN_FILE).is_file())
                        })
                        .cloned()
                        .collect();
                    if !in_use.is_empty() {
                        found = in_use;
                    }
                }
                match found.len() {
                    0 | 1 => found.into_iter().next(),
                    _ => {
                        return Err(TargetError::Several { configs: found });
                    }
                }
            }
        };
        let view = match &path {
            Some(p) => Some(config::load_client_view(p)?),
            None => None,
        };
        let api = match (&self.api, &view) {
            (Some(a), _) => a.clone(),
            (None, Some(v)) => api_url(v.api),
            (None, None) => api_url(config::DEFAULT_API.parse().expect("valid default")),
        };
        let data_dir = match (&self.data_dir, &view) {
            (Some(d), _) => d.clone(),
            (None, Some(v)) => v.data_dir.clone(),
            (None, None) => PathBuf::from(config::DEFAULT_DATA_DIR),
        };
        Ok(ApiOpts {
            api,
            token: self.token.clone(),
            data_dir,
            config: path,
        })
    }
}

/// The URL a client on this box uses for an API bound to `addr`: a wildcard bind is reached on
/// the loopback address of its family.
fn api_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ApiArgs {
        ApiArgs {
            api: None,
            token: None,
            data_dir: None,
            config: None,
            role: None,
        }
    }

    fn dir_with(label: &str, roles: &[(Role, &str)]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("outpost-cli-target-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (role, text) in roles {
            std::fs::write(dir.join(format!("{role}.toml")), text).unwrap();
        }
        dir
    }

    fn in_dir(dir: &Path) -> impl Fn(Role) -> Option<PathBuf> + '_ {
        move |role| {
            let p = dir.join(format!("{role}.toml"));
            p.is_file().then_some(p)
        }
    }

    #[test]
    fn no_config_anywhere_gives_the_documented_defaults() {
        let dir = dir_with("none", &[]);
        let o = args().resolve_in(None, &in_dir(&dir)).unwrap();
        assert_eq!(o.api, "http://127.0.0.1:7480");
        assert_eq!(o.data_dir, Path::new("/var/lib/outpost"));
        assert_eq!(o.config, None);
    }

    #[test]
    fn the_only_role_config_or_the_commands_role_is_read_and_flags_win() {
        let dir = dir_with(
            "two",
            &[
                (
                    Role::Controller,
                    "role = \"controller\"\nname = \"c\"\napi = \"0.0.0.0:9480\"\n\
                 data_dir = \"/var/lib/outpost/controller\"\n",
                ),
                (
                    Role::Worker,
                    "role = \"worker\"\nname = \"w\"\napi = \"[::]:9481\"\n",
                ),
            ],
        );
        // Two roles configured and no hint: refused, naming both.
        let e = args()
            .resolve_in(None, &in_dir(&dir))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("controller.toml") && e.contains("worker.toml"),
            "{e}"
        );
        // `machines` is a controller's command.
        let o = args()
            .resolve_in(Some(Role::Controller), &in_dir(&dir))
            .unwrap();
        assert_eq!(o.api, "http://127.0.0.1:9480");
        assert_eq!(o.data_dir, Path::new("/var/lib/outpost/controller"));
        // --role picks another; its data_dir defaults.
        let mut a = args();
        a.role = Some(Role::Worker);
        let o = a.resolve_in(Some(Role::Controller), &in_dir(&dir)).unwrap();
        assert_eq!(o.api, "http://[::1]:9481");
        assert_eq!(o.data_dir, Path::new("/var/lib/outpost"));
        // Explicit flags win over the file.
        a.api = Some("http://127.0.0.1:1".into());
        let o = a.resolve_in(None, &in_dir(&dir)).unwrap();
        assert_eq!(o.api, "http://127.0.0.1:1");
        a.data_dir = Some("/d".into());
        let o = a.resolve_in(None, &in_dir(&dir)).unwrap();
        assert_eq!((o.data_dir.as_path(), o.config), (Path::new("/d"), None));
    }

    #[test]
    fn of_several_configs_the_one_whose_node_was_created_is_read() {
        let data =
            std::env::temp_dir().join(format!("outpost-cli-target-data-{}", std::process::id()));
        std::fs::create_dir_all(data.join("worker")).unwrap();
        std::fs::write(data.join("worker/token"), "t\n").unwrap();
        let dir = dir_with(
            "several",
            &[
                (
                    Role::Datacenter,
                    "name = \"d\"\ndata_dir = \"/nonexistent/outpost/dc\"\n",
                ),
                (
                    Role::Controller,
                    "name = \"c\"\ndata_dir = \"/nonexistent/outpost/ctl\"\n",
                ),
                (
                    Role::Worker,
                    &format!(
                        "name = \"w\"\napi = \"127.0.0.1:9482\"\ndata_dir = \"{}\"\n",
                        data.join("worker").display()
                    ),
                ),
            ],
        );
        let o = args().resolve_in(None, &in_dir(&dir)).unwrap();
        assert_eq!(o.api, "http://127.0.0.1:9482");
        assert_eq!(o.config, Some(dir.join("worker.toml")));
        let _ = std::fs::remove_dir_all(&data);
    }

    #[test]
    fn an_explicit_config_that_is_wrong_names_the_field() {
        let dir = dir_with(
            "explicit",
            &[(Role::Datacenter, "name = \"d\"\napi = \"nowhere\"\n")],
        );
        let mut a = args();
        a.config = Some(dir.join("datacenter.toml"));
        let e = a.resolve_in(None, &in_dir(&dir)).unwrap_err().to_string();
        assert!(e.contains(": api: "), "{e}");
        a.config = Some(dir.join("missing.toml"));
        let e = a.resolve_in(None, &in_dir(&dir)).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
