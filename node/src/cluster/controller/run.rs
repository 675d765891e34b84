//! Starting and stopping a controller: opens the node (database, identity, API token), loads or
//! creates the signing key, reads the join token, rebuilds the core from the database, binds
//! QUIC and the API, then runs the core thread, the accept loop, the tick, the seal worker, the
//! sweeper of sealed bundles and the supervisor loop until `shutdown`. It decides nothing
//! itself.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::bundles::BundleStore;
use super::cmd::{Cmd, Summary};
use super::core::{ControllerCore, Settings};
use super::refusal::RefusalLog;
use super::shared::*;
use super::thread::CoreThread;
use crate::boot::open_node;
use crate::clock::now_ms;
use crate::cluster::keys::{AgeSealer, ControllerKey, SIGNING_SECRET};
use crate::config::{Config, ConfigError};
use crate::limits::CONTROLLER_TICK_EVERY;
use crate::limits::{
    CONTROLLER_CMD_QUEUE_MAX, JOINING_MAX, REFUSAL_LOG_EVERY, UPLOADS_MAX, UPLOAD_BYTES_MAX,
};
use crate::net::{PinPolicy, PinSet, TransportLimits};
use crate::ops::watchdog::PingError;
use crate::ops::Notifier;
use crate::store::Store;
use crate::wire::Role;

/// A running controller inside this process.
pub struct ControllerRunning {
    pub shared: Arc<ControllerShared>,
    pub api_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    api_stop: Option<oneshot::Sender<()>>,
    api_task: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    core_thread: Option<std::thread::JoinHandle<()>>,
}

impl ControllerRunning {
    /// Stops cleanly: the API stops taking requests, connections close with a reason, the
    /// core thread commits what it has queued and ends.
    pub async fn shutdown(mut self) {
        use crate::ops::shutdown;
        shutdown::stop_api(self.api_stop.take(), &mut self.api_task).await;
        shutdown::close_and_abort(&self.endpoint, "controller shutting down", &mut self.tasks)
            .await;
        let _ = self.shared.cmd.send(Cmd::Stop).await;
        shutdown::join_thread(self.core_thread.take()).await;
        shutdown::wait_idle(&self.endpoint).await;
    }
}

/// The controller's Ed25519 signing key: the stored one, or a new one stored now.
pub fn ensure_signing_key(store: &Store) -> anyhow::Result<ControllerKey> {
    if let Some(bytes) = store.secret(SIGNING_SECRET)? {
        return ControllerKey::from_secret(&bytes)
            .with_context(|| format!("the stored secret {SIGNING_SECRET:?}"));
    }
    let key = ControllerKey::generate();
    store.put_secret(SIGNING_SECRET, &key.secret_bytes())?;
    Ok(key)
}

/// Reads `admission.join_token_file` (see [`crate::config::read_join_token`]).
pub fn read_join_token(path: &Path) -> Result<Vec<u8>, ConfigError> {
    crate::config::read_join_token(path, "admission.join_token_file")
}

/// Starts a controller on the current tokio runtime; tells `notify` READY=1 once the database
/// is open and both endpoints are bound.
pub async fn start(config: Config, notify: Notifier) -> anyhow::Result<ControllerRunning> {
    if config.role != Role::Controller {
        anyhow::bail!("cluster::controller::start with a {} config", config.role);
    }
    let data_dir = config.data_dir.clone();
    let join_token = match &config.admission {
        Some(a) => Some(read_join_token(&a.join_token_file)?),
        None => None,
    };
    let (store, meta, identity, _) = open_node(&data_dir, config.role, Some(&config.name))?;
    let meta = crate::boot::with_configured_name(meta, &config.name);
    let token = crate::config::ensure_token(&data_dir)
        .with_context(|| format!("creating the API token in {}", data_dir.display()))?;
    let key = ensure_signing_key(&store)?;
    if store.restored()? {
        // Nothing to wait for, unlike a datacenter: each machine's channel moves forward when
        // it reconnects with the sequence it applied (see `ControllerCore::admitted`).
        tracing::warn!(
            "this database was restored from a backup: each machine's channel moves forward past what it applied when it reconnects, and its pool and route are published again; machines admitted after the backup must be admitted again (join token or `outpost keys accept`)"
        );
        store.clear_restored()?;
    }
    let mut settings = Settings::new(config.cluster.down_after.as_millis() as u64);
    settings.pending_max = config.cluster.pending_max;
    settings.channel_max = config.cluster.channel_max;
    settings.join_token = join_token;
    settings.controller_node_id = Some(meta.node_id);
    let bundles = BundleStore::new(&data_dir);
    bundles.prepare().with_context(|| {
        format!(
            "preparing the bundle store in {}",
            data_dir.join("bundles").display()
        )
    })?;
    let (machines, pubs) = store.controller_load()?;
    let core_key = ControllerKey::from_secret(&key.secret_bytes())?;
    let mut core = ControllerCore::open(
        settings.clone(),
        core_key,
        Box::new(AgeSealer),
        machines,
        pubs,
        now_ms(),
    )
    .with_config(store.config_newest()?);
    super::thread::log_core_events(&mut core);
    let deny = PinSet::new(core.rejected_fingerprints());
    let endpoint = crate::net::endpoint_with_policy(
        config.listen,
        &identity,
        PinPolicy::AllBut(deny.clone()),
        TransportLimits::default(),
    )
    .with_context(|| format!("binding QUIC on {} (field `listen`)", config.listen))?;
    let quic_addr = endpoint.local_addr()?;
    let api_listener = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| format!("binding the HTTP API on {} (field `api`)", config.api))?;
    let api_addr = api_listener.local_addr()?;
    let (cmd_tx, cmd_rx) = mpsc::channel(CONTROLLER_CMD_QUEUE_MAX);
    let shared = Arc::new(ControllerShared {
        config,
        meta,
        fingerprint: identity.fingerprint,
        token,
        metrics: ControllerMetrics::default(),
        deny,
        ready: AtomicBool::new(false),
        cmd: cmd_tx,
        summary: Mutex::new(Summary::default()),
        last_errors: crate::ops::ErrorLog::default(),
        bundles,
        upload_bytes_max: AtomicU64::new(UPLOAD_BYTES_MAX),
        uploads: tokio::sync::Semaphore::new(UPLOADS_MAX),
        joining_max: AtomicUsize::new(JOINING_MAX),
        refusal_log: Mutex::new(RefusalLog::new(REFUSAL_LOG_EVERY)),
        journal: super::journal::Journal::new(),
        #[cfg(test)]
        fail_commits: AtomicBool::new(false),
    });
    let (seal_tx, seal_rx) = mpsc::unbounded_channel();
    let core_thread = {
        let thread = CoreThread::new(shared.clone(), settings, &key, store, core, seal_tx);
        std::thread::Builder::new()
            .name("outpost-controller".into())
            .spawn(move || thread.run(cmd_rx))?
    };
    let (api_stop, api_task) = crate::http::serve::spawn(
        api_listener,
        super::api::router(shared.clone()),
        &shared.config.limits,
        shared.metrics.http.clone(),
    );
    let tasks = vec![
        tokio::spawn(super::conn::accept_loop(shared.clone(), endpoint.clone())),
        tokio::spawn(tick(shared.clone())),
        tokio::spawn(super::deploy::seal_worker(shared.clone(), seal_rx)),
        tokio::spawn(super::deploy::sweep_loop(shared.clone())),
    ];
    shared.ready.store(true, Ordering::Relaxed);
    notify.ready();
    let mut tasks = tasks;
    tasks.push(tokio::spawn(crate::ops::watchdog::run(
        shared.clone(),
        notify,
    )));
    tracing::info!(
        role = %Role::Controller,
        name = %shared.meta.name,
        node_id = %shared.meta.node_id,
        fingerprint = %shared.fingerprint,
        signing_key = %hex::encode(key.public()),
        quic = %quic_addr,
        api = %api_addr,
        admission = if shared.config.admission.is_some() { "join token or operator" } else { "operator" },
        "ready"
    );
    Ok(ControllerRunning {
        shared,
        api_addr,
        quic_addr,
        endpoint,
        api_stop: Some(api_stop),
        api_task,
        tasks,
        core_thread: Some(core_thread),
    })
}

/// Ticks the core; a tick that finds the queue full is skipped (the queue is moving anyway).
async fn tick(shared: Arc<ControllerShared>) {
    let mut every = tokio::time::interval(CONTROLLER_TICK_EVERY);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        shared.flush_refusals();
        match shared.cmd.try_send(Cmd::Tick) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// The watchdog loop (`crate::ops::watchdog`) pings the core thread: a thread stuck in a
/// commit stops the pings and systemd restarts the node.
impl crate::ops::watchdog::Watched for ControllerShared {
    async fn ping(&self, timeout: Duration) -> Result<(), PingError> {
        ping(self, timeout).await
    }
    async fn status_line(node: &Arc<Self>) -> String {
        status_line(node)
    }
    fn note_error(&self, e: String) {
        ControllerShared::note_error(self, e)
    }
}

/// What `systemctl status` shows, e.g.
/// `controller ctl-1: 3 machines up, 1 down, 2 pending, 0 publications unacked`.
pub fn status_line(shared: &ControllerShared) -> String {
    let s = shared.summary();
    let mut line = format!(
        "controller {}: {} machines up, {} down, {} pending, {} publications unacked",
        shared.meta.name, s.up, s.down, s.pending, s.unacked
    );
    if !s.available {
        line.push_str("; DATABASE UNAVAILABLE after a failed write");
    }
    line
}
