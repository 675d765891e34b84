//! The worker role: the pure state machine (`core`) and the runtime around it. The runtime owns
//! the QUIC endpoint, the database, the clock and the files; it never decides what a frame
//! means (the core does) and never opens or changes a publication it relays.
//!
//! ```text
//!  controller ──(Join, then frames)──> controller_link ──Input──> driver (owns WorkerCore
//!       ^                                  │ Relay                   and the Store)
//!       └──────── ToController ────────────┼──────────────────────── │ outputs after commit
//!                                          v                         v
//!  dependents <──Publication── relay (LB: accept loop)      pool file, pins, dependent link
//!  LB ──Publication──> relay (dependent link) ──Input──> driver
//! ```
//!
//! One task, the driver, owns the core: every input goes through its bounded channel, so a
//! caller that is cancelled (a connection that dies) never interrupts a commit or loses the
//! outputs that follow it.
//!
//! Another task, `software`, owns the installed software and the process that runs it: it
//! carries out the deployments the driver hands it (`fetch` brings the sealed bundle, through
//! the load balancer for a dependent, `bundle_relay` being the load balancer's side) and feeds
//! its reports back to the driver as inputs.

mod api;
mod bundle_relay;
mod controller_link;
pub mod core;
#[cfg(test)]
mod deploy_tests;
mod driver;
mod fetch;
pub mod lifecycle;
pub mod pool_file;
mod relay;
mod software;
#[cfg(test)]
mod tests;

pub use self::fetch::STALL_ENV;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};

use self::core::{JoinInfo, Standing, WorkerCore, WorkerRecord, WorkerRefusal};
use self::driver::Input;
use crate::cluster::keys::{token_proof, SealKey, SEAL_SECRET};
use crate::config::{Config, ConfigError};
use crate::ids::{Fingerprint, NodeId};
use crate::limits::{SOFTWARE_STOP_WAIT, WORKER_INPUTS_MAX};
use crate::net::{close, PinSet, TransportLimits};
use crate::ops::Notifier;
use crate::store::Store;
use crate::wire::{Join, MachineReport, Message, Publication, Role};

/// The component that relays publications to its dependents.
pub const LOAD_BALANCER: &str = "load-balancer";

/// Loads the worker's seal key (the age X25519 identity publications and bundles are sealed
/// to), or generates and stores it on first use.
pub fn ensure_seal_key(store: &Store) -> anyhow::Result<SealKey> {
    if let Some(bytes) = store.secret(SEAL_SECRET)? {
        return SealKey::from_secret(&bytes)
            .with_context(|| format!("the stored seal key ({SEAL_SECRET}) is unusable"));
    }
    let key = SealKey::generate();
    store.put_secret(SEAL_SECRET, &key.secret_bytes())?;
    Ok(key)
}

/// Reads `controller.join_token_file` (see [`crate::config::read_join_token`]).
fn read_join_token(path: &Path) -> Result<Vec<u8>, ConfigError> {
    crate::config::read_join_token(path, "controller.join_token_file")
}

/// Counters of the worker runtime (`GET /metrics`).
#[derive(Default)]
pub struct WorkerMetrics {
    /// Publications handed to a dependent's relay connection.
    pub relay_forwarded: AtomicU64,
    /// Relayed publications dropped (dependent not connected, or its queue full); the
    /// controller resends them directly.
    pub relay_dropped: AtomicU64,
    /// Connections closed and frames refused as hostile or from an unknown peer.
    pub refused: AtomicU64,
    pub api_refused: AtomicU64,
    /// Pool files written.
    pub pool_writes: AtomicU64,
    /// Bytes of sealed bundles fetched (written to disk).
    pub bundle_bytes_fetched: AtomicU64,
    /// Deployments finished with the new software running.
    pub deployments_running: AtomicU64,
    /// Deployments whose software was not healthy, rolled back to the previous one.
    pub deployments_rolled_back: AtomicU64,
    /// Deployments refused or failed (altered, not sealed to this machine, wrong bundle id,
    /// nothing to roll back to, superseded before it was installed).
    pub deployments_failed: AtomicU64,
    /// Restarts of software that died after it was healthy.
    pub software_restarts: AtomicU64,
    /// The API server's requests and connections.
    pub http: Arc<crate::http::serve::HttpStats>,
}

/// What the API and the heartbeat read of the core, refreshed by the driver after each step.
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub standing: Standing,
    pub record: WorkerRecord,
}

/// The worker's connection to its controller, as the status shows it.
#[derive(Default)]
pub(crate) struct ControllerLink {
    generation: u64,
    conn: Option<quinn::Connection>,
    /// Frames to the controller, written by the connection's writer.
    tx: Option<mpsc::Sender<Message>>,
    pub connected: bool,
    pub last_error: Option<String>,
    /// The controller's reason, while it refuses this machine.
    pub rejected: Option<String>,
}

/// State shared by the driver, the links and the API.
pub struct WorkerShared {
    pub config: Config,
    pub node_id: NodeId,
    pub name: String,
    pub fingerprint: Fingerprint,
    pub controller_addr: SocketAddr,
    pub controller_fingerprint: Fingerprint,
    pub token: String,
    /// This machine is a load balancer: it relays to its dependents.
    pub is_lb: bool,
    /// Where a load balancer's pool is written.
    pub pool_path: PathBuf,
    /// A load balancer: where its dependents reach it, as told to the controller.
    pub relay_addr: Option<String>,
    pub quic_addr: SocketAddr,
    pub metrics: WorkerMetrics,
    started: Instant,
    endpoint: quinn::Endpoint,
    pins: PinSet,
    inputs: mpsc::Sender<Input>,
    view: Mutex<View>,
    controller: Mutex<ControllerLink>,
    relay: Mutex<relay::RelayState>,
    dependent: Mutex<relay::DependentLink>,
    software: software::SoftwareShared,
    last_errors: crate::ops::ErrorLog,
}

impl WorkerShared {
    pub fn standing(&self) -> Standing {
        self.view.lock().expect("view lock").standing
    }

    pub fn record(&self) -> WorkerRecord {
        self.view.lock().expect("view lock").record.clone()
    }

    pub(crate) fn view(&self) -> View {
        self.view.lock().expect("view lock").clone()
    }

    pub(crate) fn set_view(&self, standing: Standing, record: Option<WorkerRecord>) {
        let mut v = self.view.lock().expect("view lock");
        v.standing = standing;
        if let Some(r) = record {
            v.record = r;
        }
    }

    pub fn controller_connected(&self) -> bool {
        self.controller.lock().expect("controller lock").connected
    }

    pub fn note_error(&self, e: String) {
        self.last_errors.note(&e);
    }

    pub fn last_errors(&self) -> Vec<String> {
        self.last_errors.list()
    }

    fn refused(&self) {
        self.metrics.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The certificates this endpoint accepts and dials: the controller's, a load balancer's
    /// dependents', a dependent's load balancer's. Applies from the next handshake on.
    pub(crate) fn refresh_pins(&self) {
        let mut pins = vec![self.controller_fingerprint];
        pins.extend(
            self.relay
                .lock()
                .expect("relay lock")
                .allowed_fingerprints(),
        );
        if let Some(fp) = self
            .dependent
            .lock()
            .expect("dependent lock")
            .route_fingerprint()
        {
            pins.push(fp);
        }
        self.pins.replace(pins);
    }

    /// Queues a frame for the controller on the current connection. Without one it is
    /// dropped: the core sends what is unacknowledged again once connected, and the Join's
    /// `resume` covers publication acks.
    pub(crate) fn send_controller(&self, m: Message) {
        let link = self.controller.lock().expect("controller lock");
        let Some(tx) = link.tx.as_ref() else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(m)) = tx.try_send(m) {
            tracing::warn!(
                kind = m.kind(),
                "the controller is not reading its connection; reconnecting"
            );
            if let Some(c) = link.conn.as_ref() {
                c.close(
                    close::PROTOCOL.into(),
                    b"not reading: the worker's queue is full",
                );
            }
        }
    }

    /// Sends an input to the driver; false when the worker is shutting down.
    async fn input(&self, i: Input) -> bool {
        self.inputs.send(i).await.is_ok()
    }

    /// A consistent copy of the database; `None` when the worker is shutting down.
    pub(crate) async fn backup(
        &self,
    ) -> Option<Result<crate::http::backup::BackupCopy, driver::BackupError>> {
        let (tx, rx) = oneshot::channel();
        if !self.input(Input::Backup(tx)).await {
            return None;
        }
        rx.await.ok()
    }

    pub(crate) async fn join_frame(&self) -> Option<Join> {
        let (tx, rx) = oneshot::channel();
        if !self.input(Input::Join(tx)).await {
            return None;
        }
        rx.await.ok()
    }

    /// A frame from the controller, through the core; `None` when shutting down.
    pub(crate) async fn feed_controller(&self, m: Message) -> Option<Result<(), WorkerRefusal>> {
        let (tx, rx) = oneshot::channel();
        if !self.input(Input::Controller(m, tx)).await {
            return None;
        }
        rx.await.ok()
    }

    /// A publication relayed by the load balancer, through the core.
    pub(crate) async fn feed_relay(&self, p: Publication) -> Option<Result<(), WorkerRefusal>> {
        let (tx, rx) = oneshot::channel();
        if !self.input(Input::Relay(p, tx)).await {
            return None;
        }
        rx.await.ok()
    }

    /// One round trip through the driver: it answers after whatever it is committing.
    /// One round trip through the driver, within `timeout`.
    pub(crate) async fn ping_driver(
        &self,
        timeout: Duration,
    ) -> Result<(), crate::ops::watchdog::PingError> {
        crate::ops::watchdog::round_trip("driver", timeout, |tx| self.input(Input::Ping(tx)))
            .await
            .map(|_| ())
    }

    /// The pool file changed: the software (the load balancer's) gets a SIGHUP to its process
    /// group once it runs healthy.
    pub(crate) fn reload_software(&self) {
        self.software.reload();
    }
}

/// A running worker inside this process.
pub struct WorkerRunning {
    pub shared: Arc<WorkerShared>,
    pub api_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<()>,
    api_stop: Option<oneshot::Sender<()>>,
    api_task: tokio::task::JoinHandle<()>,
    software: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WorkerRunning {
    /// A new report about this machine (its software's state): numbered, stored, and sent to
    /// the controller when admitted and connected.
    pub async fn report(&self, report: MachineReport) -> anyhow::Result<()> {
        if !self.shared.input(Input::Report(report)).await {
            anyhow::bail!("the worker is shutting down");
        }
        Ok(())
    }

    /// Stops cleanly: the API stops, the driver finishes what it is committing and closes the
    /// database, the software is stopped, connections close with a reason.
    pub async fn shutdown(mut self) {
        use crate::ops::shutdown;
        shutdown::stop_api(self.api_stop.take(), &mut self.api_task).await;
        let _ = self.stop.send(true);
        let _ = (&mut self.driver).await;
        shutdown::wait_or_abort(&mut self.software, SOFTWARE_STOP_WAIT).await;
        relay::stop_dependent_link(&self.shared);
        shutdown::close_and_abort(&self.endpoint, "worker shutting down", &mut self.tasks).await;
        shutdown::wait_idle(&self.endpoint).await;
    }
}

/// Starts a worker on the current tokio runtime; tells `notify` READY=1 once the database is
/// open and both endpoints are bound (not when the controller answers).
pub async fn start(config: Config, notify: Notifier) -> anyhow::Result<WorkerRunning> {
    if config.role != Role::Worker {
        anyhow::bail!("worker::start called for a {}", config.role);
    }
    let controller = config
        .controller
        .clone()
        .context("a worker needs [controller] in its config")?;
    let machine = config
        .machine
        .clone()
        .context("a worker needs [machine] in its config")?;
    let data_dir = config.data_dir.clone();
    let (store, meta, identity, _) =
        crate::boot::open_node(&data_dir, Role::Worker, Some(&config.name))?;
    let token = crate::config::ensure_token(&data_dir)
        .with_context(|| format!("creating the API token in {}", data_dir.display()))?;
    let seal = ensure_seal_key(&store)?;
    // The software task opens bundles with its own copy.
    let bundle_seal = SealKey::from_secret(&seal.secret_bytes())?;
    let proof = match &controller.join_token_file {
        Some(path) => {
            let t = read_join_token(path)?;
            Some(token_proof(&t, &identity.fingerprint))
        }
        None => None,
    };
    let record = store.worker_record()?;
    let is_lb = machine.component == LOAD_BALANCER;

    let pins = PinSet::new([controller.fingerprint]);
    let endpoint = crate::net::endpoint(
        config.listen,
        &identity,
        pins.clone(),
        TransportLimits::default(),
    )
    .with_context(|| format!("binding QUIC on {} (field `listen`)", config.listen))?;
    let quic_addr = endpoint.local_addr()?;
    let relay_addr = if is_lb {
        let addr = machine
            .relay_addr
            .or_else(|| (!config.listen.ip().is_unspecified()).then_some(quic_addr));
        if addr.is_none() {
            tracing::warn!(
                listen = %config.listen,
                "a load balancer listening on every address cannot tell its dependents where \
                 it is: set machine.relay_addr; they reach the controller directly meanwhile"
            );
        }
        addr.map(|a| a.to_string())
    } else {
        None
    };
    let info = JoinInfo {
        node_id: meta.node_id,
        name: config.name.clone(),
        service: machine.service.clone(),
        component: machine.component.clone(),
        load_balancer: machine.load_balancer.clone(),
        service_addr: machine.service_addr.map(|a| a.to_string()),
        relay_addr: relay_addr.clone(),
        token_proof: proof,
    };
    let core = WorkerCore::open(info, seal, record.clone())
        .context("opening the worker's stored state")?;
    let api_listener = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| format!("binding the HTTP API on {} (field `api`)", config.api))?;
    let api_addr = api_listener.local_addr()?;

    let (inputs, inputs_rx) = mpsc::channel(WORKER_INPUTS_MAX);
    let pool_path = machine
        .pool_file
        .clone()
        .unwrap_or_else(|| data_dir.join(pool_file::POOL_FILE));
    let shared = Arc::new(WorkerShared {
        name: config.name.clone(),
        config,
        node_id: meta.node_id,
        fingerprint: identity.fingerprint,
        controller_addr: controller.addr,
        controller_fingerprint: controller.fingerprint,
        token,
        is_lb,
        pool_path,
        relay_addr,
        quic_addr,
        metrics: WorkerMetrics::default(),
        started: Instant::now(),
        endpoint: endpoint.clone(),
        pins,
        inputs,
        view: Mutex::new(View {
            standing: core.standing(),
            record,
        }),
        controller: Mutex::new(ControllerLink::default()),
        relay: Mutex::new(relay::RelayState::default()),
        dependent: Mutex::new(relay::DependentLink::default()),
        software: software::SoftwareShared::default(),
        last_errors: crate::ops::ErrorLog::default(),
    });

    let (stop, stop_rx) = watch::channel(false);
    let software = tokio::spawn(software::run(shared.clone(), bundle_seal, stop_rx.clone()));
    let driver = tokio::spawn(driver::run(
        shared.clone(),
        core,
        store,
        data_dir,
        inputs_rx,
        stop_rx,
    ));
    let (api_stop, api_task) = crate::http::serve::spawn(
        api_listener,
        api::router(shared.clone()),
        &shared.config.limits,
        shared.metrics.http.clone(),
    );
    let mut tasks = vec![
        tokio::spawn(controller_link::run(shared.clone())),
        tokio::spawn(relay::accept_loop(shared.clone())),
    ];
    notify.ready();
    tasks.push(tokio::spawn(crate::ops::watchdog::run(
        shared.clone(),
        notify,
    )));
    tracing::info!(
        role = %Role::Worker,
        name = %shared.name,
        node_id = %shared.node_id,
        fingerprint = %shared.fingerprint,
        component = %machine.component,
        controller = %shared.controller_addr,
        quic = %quic_addr,
        api = %api_addr,
        "ready"
    );
    Ok(WorkerRunning {
        shared,
        api_addr,
        quic_addr,
        endpoint,
        stop,
        driver,
        api_stop: Some(api_stop),
        api_task,
        software,
        tasks,
    })
}

/// The watchdog loop (`crate::ops::watchdog`) pings the driver: a driver stuck in a commit
/// stops the pings.
impl crate::ops::watchdog::Watched for WorkerShared {
    async fn ping(&self, timeout: Duration) -> Result<(), crate::ops::watchdog::PingError> {
        self.ping_driver(timeout).await
    }
    async fn status_line(node: &Arc<Self>) -> String {
        status_line(node)
    }
    fn note_error(&self, e: String) {
        WorkerShared::note_error(self, e)
    }
}

/// One line for `systemctl status`, e.g. `worker lb-1: admitted, controller up, applied 12`.
pub fn status_line(shared: &WorkerShared) -> String {
    let v = shared.view();
    let mut s = format!(
        "worker {}: {}, controller {}, applied {}",
        shared.name,
        api::standing_str(v.standing),
        if shared.controller_connected() {
            "up"
        } else {
            "down"
        },
        v.record.applied
    );
    if let Some(pool) = &v.record.pool {
        s.push_str(&format!(", pool {} members", pool.members.len()));
    }
    let sw = shared.software.view();
    match &sw.running {
        Some(r) => s.push_str(&format!(
            ", running {} {}",
            r.software.service, r.software.version
        )),
        None if !sw.state.is_empty() => s.push_str(&format!(", software {}", sw.state)),
        None => {}
    }
    if let Some(d) = &sw.deploying {
        s.push_str(&format!(", deploying {} ({})", d.deployment, d.stage));
    }
    s
}
