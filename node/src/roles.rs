//! The role dispatcher and the main loop: `outpost init` creates a node of a role, `outpost run`
//! starts the role's runtime (`crate::datacenter`, `crate::cluster::controller`,
//! `crate::cluster::worker`), then waits for SIGTERM, SIGINT or SIGHUP.

use std::net::SocketAddr;
use std::path::Path;

use crate::config::Config;
use crate::datacenter::{self, Running};
use crate::ids::{Fingerprint, NodeId};
use crate::ops::{reload, LogControl, Notifier};
use crate::wire::Role;

pub struct InitInfo {
    pub node_id: NodeId,
    pub fingerprint: Fingerprint,
    /// False when the directory already held a database.
    pub created: bool,
}

pub fn init(data_dir: &Path, role: Role, name: Option<&str>) -> anyhow::Result<InitInfo> {
    let (store, meta, id, created) = crate::boot::open_node(data_dir, role, name)?;
    match role {
        Role::Controller => {
            crate::cluster::controller::ensure_signing_key(&store)?;
        }
        Role::Worker => {
            crate::cluster::worker::ensure_seal_key(&store)?;
        }
        Role::Datacenter => {}
    }
    Ok(InitInfo {
        node_id: meta.node_id,
        fingerprint: id.fingerprint,
        created,
    })
}

/// A node of any role, running inside this process.
pub enum RoleRunning {
    Datacenter(Running),
    Controller(crate::cluster::controller::ControllerRunning),
    Worker(crate::cluster::worker::WorkerRunning),
}

impl RoleRunning {
    pub fn api_addr(&self) -> SocketAddr {
        match self {
            RoleRunning::Datacenter(r) => r.api_addr,
            RoleRunning::Controller(r) => r.api_addr,
            RoleRunning::Worker(r) => r.api_addr,
        }
    }

    pub fn quic_addr(&self) -> SocketAddr {
        match self {
            RoleRunning::Datacenter(r) => r.quic_addr,
            RoleRunning::Controller(r) => r.quic_addr,
            RoleRunning::Worker(r) => r.quic_addr,
        }
    }

    pub async fn shutdown(self) {
        match self {
            RoleRunning::Datacenter(r) => r.shutdown().await,
            RoleRunning::Controller(r) => r.shutdown().await,
            RoleRunning::Worker(r) => r.shutdown().await,
        }
    }
}

/// Starts the node of `config.role`, telling `notify` READY=1 once it serves.
pub async fn start_role(config: Config, notify: Notifier) -> anyhow::Result<RoleRunning> {
    match config.role {
        Role::Datacenter => datacenter::start_with(config, notify)
            .await
            .map(RoleRunning::Datacenter),
        Role::Controller => crate::cluster::controller::start(config, notify)
            .await
            .map(RoleRunning::Controller),
        Role::Worker => crate::cluster::worker::start(config, notify)
            .await
            .map(RoleRunning::Worker),
    }
}

/// What `outpost run` needs besides the config: where to read it again on SIGHUP, how to
/// change the log filter, and the supervisor to notify.
pub struct RunOpts {
    pub source: reload::Source,
    pub log: LogControl,
    pub notify: Notifier,
}

/// `outpost run`: runs until SIGTERM or SIGINT; SIGHUP reloads the config.
pub fn run(config: Config, opts: RunOpts) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outpost")
        .build()?;
    rt.block_on(async move {
        // Installed before READY, so an early `systemctl reload` is never fatal.
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let running = start_role(config, opts.notify.clone()).await?;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: shutting down");
                    break;
                }
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("SIGINT: shutting down");
                    break;
                }
                _ = hup.recv() => match &running {
                    RoleRunning::Datacenter(r) => {
                        datacenter::reload::reload(&r.shared, &opts.source, &opts.log).await;
                    }
                    RoleRunning::Controller(_) | RoleRunning::Worker(_) => {
                        tracing::info!("SIGHUP: nothing to reload for this role; restart to apply config changes");
                    }
                },
            }
        }
        opts.notify.stopping();
        running.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}
