//! The node runtime: opens the store, creates the identity on first boot, and runs a role. For a
//! datacenter: the writer thread (`writer`), the peer links over QUIC (`link`) and the local
//! HTTP API (`crate::http`). Decisions live in `replication`; this module only moves bytes,
//! time and threads. A controller or a worker is started from here too
//! ([`start_role`]), but its runtime lives in `crate::cluster`.

pub mod api;
pub mod link;
pub mod metrics;
pub mod reload;
pub mod supervise;
pub mod writer;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::boot::open_node;
use crate::clock::now_ms;
use crate::config::{Config, Limits};
use crate::ids::Fingerprint;
use crate::net::{PinSet, TransportLimits};
use crate::ops::Notifier;
use crate::replication::Core;
use crate::replication::StoreError;
use crate::store::{NodeMeta, ReadTxn, Store};
use crate::wire::Role;

use crate::limits::RETENTION_TRIM_EVERY;
pub use metrics::Metrics;

/// The open database, replaceable. After a failed write (a full disk, an I/O error) redb refuses
/// every later operation until the file is reopened; the writer thread then reopens it
/// (`writer::reopen`) and puts the new one here. Take the current one per use, never keep it:
/// a kept `Arc<Store>` holds redb's file lock and stops the reopen.
pub struct StoreSlot {
    current: RwLock<Option<Arc<Store>>>,
}

impl StoreSlot {
    pub fn new(store: Arc<Store>) -> StoreSlot {
        StoreSlot {
            current: RwLock::new(Some(store)),
        }
    }

    /// The database, unless it is being reopened (then a `StoreError::Io` saying so).
    pub fn get(&self) -> Result<Arc<Store>, StoreError> {
        self.current
            .read()
            .expect("store lock")
            .clone()
            .ok_or_else(|| {
                StoreError::Io(
                    "the database is being reopened after a failed write; retry shortly".into(),
                )
            })
    }

    /// A read transaction on the current database.
    pub fn read(&self) -> Result<ReadTxn, StoreError> {
        self.get()?.read()
    }

    /// The digest and entry count of everything committed, without a flush (see
    /// [`Store::digest_merged`]).
    pub fn digest(&self) -> Result<(String, u64), StoreError> {
        self.get()?.digest_merged()
    }

    /// The account's committed state rows (overlay first, then the table).
    pub fn state(
        &self,
        account: &str,
        etype: Option<crate::model::EventType>,
    ) -> Result<Vec<crate::store::StateRow>, StoreError> {
        self.get()?.state(account, etype)
    }

    pub(crate) fn take(&self) -> Option<Arc<Store>> {
        self.current.write().expect("store lock").take()
    }

    pub(crate) fn put(&self, store: Arc<Store>) {
        *self.current.write().expect("store lock") = Some(store);
    }
}

/// State shared by the API, the links and the writer.
pub struct Shared {
    /// The config the node started with. What SIGHUP may change is read from
    /// [`Shared::current_config`] / [`Shared::limits`] instead.
    pub config: Config,
    /// The config as last (re)loaded.
    live: RwLock<Arc<Config>>,
    pub meta: NodeMeta,
    pub fingerprint: Fingerprint,
    /// The open database; see [`StoreSlot`].
    pub store: StoreSlot,
    pub token: String,
    pub writer: mpsc::Sender<writer::Cmd>,
    pub tail: watch::Receiver<u64>,
    /// Counts commits that applied the end of a snapshot: our marks rose by what we now hold
    /// only in our state table, so every link checks again whether its peer lacks it
    /// (`Session::check_peer_marks`).
    pub snapshots_applied: watch::Sender<u64>,
    pub peers: link::Peers,
    pub metrics: Metrics,
    pub ready: AtomicBool,
    pub disk_full: AtomicBool,
    /// A backup is being written or streamed (one at a time).
    pub backup_running: AtomicBool,
    /// Restored from a backup and still recovering its own log from its peers.
    pub restore: link::RestoreState,
    /// The certificates the endpoint accepts (every peer's); SIGHUP replaces them.
    pub pins: PinSet,
    /// The QUIC endpoint, for peers added at SIGHUP.
    pub endpoint: quinn::Endpoint,
    last_errors: crate::ops::ErrorLog,
}

impl Shared {
    /// Asks the writer to write every dirty state entry to the state table (see
    /// `store::overlay`) and waits until that is committed: what a reader of the whole table
    /// (the digest, the entry count) does first, so that it sees everything acknowledged.
    pub async fn flush_state(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || StoreError::Io("the writer thread has stopped".into());
        self.writer
            .send(writer::Cmd::Flush { reply: Some(tx) })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// The state digest and entry count over everything committed. The writer writes its
    /// dirty state entries to the table first; when it cannot (a full disk: nothing commits),
    /// the table is merged with the overlay instead, so reads keep working.
    pub async fn digest(self: &Arc<Self>) -> Result<(String, u64), StoreError> {
        let flushed = self.flush_state().await.is_ok();
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            let store = s.store.get()?;
            if flushed {
                store.read()?.digest()
            } else {
                store.digest_merged()
            }
        })
        .await
        .map_err(|e| StoreError::Io(format!("digest task: {e}")))?
    }

    /// The config as last reloaded (SIGHUP); the start-time one until then.
    pub fn current_config(&self) -> Arc<Config> {
        self.live.read().expect("config lock").clone()
    }

    pub(crate) fn set_config(&self, config: Config) {
        *self.live.write().expect("config lock") = Arc::new(config);
    }

    /// The limits in force now: read them at use time, so that a reload applies.
    pub fn limits(&self) -> Limits {
        self.live.read().expect("config lock").limits.clone()
    }

    pub fn note_error(&self, e: String) {
        self.last_errors.note(&e);
    }

    /// Keeps `e` for `outpost status` without logging it (the caller has logged it already).
    pub fn record_error(&self, e: String) {
        self.last_errors.record(&e);
    }

    pub fn last_errors(&self) -> Vec<String> {
        self.last_errors.list()
    }
}

/// A running node inside this process.
pub struct Running {
    pub shared: Arc<Shared>,
    pub api_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    api_stop: Option<tokio::sync::oneshot::Sender<()>>,
    api_task: tokio::task::JoinHandle<()>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    link_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Ingests events in this process, as `POST /v1/events/batch` would: answered after the
    /// commit is durable.
    pub async fn ingest(
        &self,
        events: Vec<crate::model::Event>,
    ) -> Result<Vec<crate::replication::Ingested>, crate::replication::IngestError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let closed = || crate::replication::IngestError::NotReady("node is shutting down".into());
        self.shared
            .writer
            .send(writer::Cmd::Ingest { events, reply: tx })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Stops cleanly: the API stops taking requests, links close with a reason, queued commits
    /// finish, then the writer thread ends.
    pub async fn shutdown(mut self) {
        use crate::ops::shutdown;
        shutdown::stop_api(self.api_stop.take(), &mut self.api_task).await;
        shutdown::close_and_abort(
            &self.endpoint,
            crate::net::close::SHUTDOWN_REASON,
            &mut self.link_tasks,
        )
        .await;
        let _ = self.shared.writer.send(writer::Cmd::Stop).await;
        shutdown::join_thread(self.writer_thread.take()).await;
        shutdown::wait_idle(&self.endpoint).await;
    }
}

/// Starts a datacenter node on the current tokio runtime, without a supervisor to notify.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, Notifier::disabled()).await
}

/// Starts a datacenter node; tells `notify` READY=1 once the database is open and both
/// endpoints are bound (not when peers answer), then keeps its STATUS line and watchdog fed.
/// Other roles start with [`start_role`].
pub async fn start_with(config: Config, notify: Notifier) -> anyhow::Result<Running> {
    if config.role != Role::Datacenter {
        anyhow::bail!(
            "datacenter::start_with runs a datacenter, not a {}; use roles::start_role",
            config.role
        );
    }
    let data_dir = config.data_dir.clone();
    let (store, meta, identity, _) = open_node(&data_dir, config.role, Some(&config.name))?;
    let restored = store.restored()?;
    let config_peers = config.peers.len();
    if restored {
        tracing::warn!(
            peers = config_peers,
            "this database was restored from a backup: recovering this node's own log from every peer before taking events"
        );
    }
    let meta = crate::boot::with_configured_name(meta, &config.name);
    remove_stale_backups(&data_dir);
    let token = crate::config::ensure_token(&data_dir)
        .with_context(|| format!("creating the API token in {}", data_dir.display()))?;
    let store = Arc::new(store);
    let core = {
        let txn = store.begin()?;
        let t = txn.tables()?;
        Core::open(meta.node_id, &meta.name, &t)?
    };
    let tail0 = writer::read_tail(&store)?;
    let (tail_tx, tail_rx) = watch::channel(tail0);
    let (wtx, wrx) = mpsc::channel(config.limits.ingest_queue_max);
    let pins = PinSet::new(
        config
            .peers
            .iter()
            .flat_map(|p| p.fingerprints.iter().copied()),
    );
    let endpoint = crate::net::endpoint(
        config.listen,
        &identity,
        pins.clone(),
        TransportLimits::default(),
    )
    .with_context(|| format!("binding QUIC on {} (field `listen`)", config.listen))?;
    let quic_addr = endpoint.local_addr()?;
    let api_listener = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| format!("binding the HTTP API on {} (field `api`)", config.api))?;
    let api_addr = api_listener.local_addr()?;
    let peers = config
        .peers
        .iter()
        .map(|p| link::PeerState::new(p.clone(), &identity.fingerprint))
        .collect();
    let peers = link::Peers::new(peers);
    let shared = Arc::new(Shared {
        live: RwLock::new(Arc::new(config.clone())),
        config,
        meta,
        fingerprint: identity.fingerprint,
        store: StoreSlot::new(store.clone()),
        token,
        writer: wtx,
        tail: tail_rx,
        snapshots_applied: watch::Sender::new(0),
        peers,
        metrics: Metrics::default(),
        ready: AtomicBool::new(false),
        disk_full: AtomicBool::new(false),
        backup_running: AtomicBool::new(false),
        restore: link::RestoreState::new(restored, config_peers),
        pins,
        endpoint: endpoint.clone(),
        last_errors: crate::ops::ErrorLog::default(),
    });
    let writer_thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("outpost-writer".into())
            .spawn(move || writer::run(shared, store, core, wrx, tail_tx))?
    };
    let (api_stop, api_task) = crate::http::serve::spawn(
        api_listener,
        api::router(shared.clone()),
        &shared.config.limits,
        shared.metrics.http.clone(),
    );
    let mut link_tasks = link::spawn_all(shared.clone(), endpoint.clone());
    link_tasks.push(tokio::spawn(retention(shared.clone())));
    link_tasks.push(tokio::spawn(flush_tick(shared.clone())));
    shared.ready.store(true, Ordering::Relaxed);
    notify.ready();
    link_tasks.push(tokio::spawn(crate::ops::watchdog::run(
        shared.clone(),
        notify,
    )));
    tracing::info!(
        role = %Role::Datacenter,
        name = %shared.meta.name,
        node_id = %shared.meta.node_id,
        fingerprint = %shared.fingerprint,
        quic = %quic_addr,
        api = %api_addr,
        peers = shared.peers.len_all(),
        "ready"
    );
    Ok(Running {
        shared,
        api_addr,
        quic_addr,
        endpoint,
        api_stop: Some(api_stop),
        api_task,
        writer_thread: Some(writer_thread),
        link_tasks,
    })
}

/// Backups interrupted by a crash leave their copy in `DATA_DIR/tmp/`; nothing else uses it.
fn remove_stale_backups(data_dir: &Path) {
    let dir = data_dir.join(crate::store::backup::TMP_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("backup-") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(path = %e.path().display(), "removed an interrupted backup")
                }
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), "cannot remove an interrupted backup: {err}")
                }
            }
        }
    }
}

/// Trims the local log by age (`limits.log_retention`) and size (`limits.log_records_max`).
/// A peer that falls behind what is kept needs a snapshot to catch up.
async fn retention(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(RETENTION_TRIM_EVERY);
    loop {
        every.tick().await;
        let limits = shared.limits();
        let retention_ms = limits.log_retention.as_millis() as u64;
        let cmd = writer::Cmd::Trim {
            cutoff_ms: now_ms().saturating_sub(retention_ms),
            keep_max: limits.log_records_max,
        };
        if shared.writer.send(cmd).await.is_err() {
            return;
        }
    }
}

/// Ticks the writer's state flush (`crate::limits::STATE_FLUSH_INTERVAL`): an idle node writes its
/// dirty state entries to the table, a busy one starts a flush round when one is due.
async fn flush_tick(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(crate::limits::STATE_FLUSH_INTERVAL);
    loop {
        every.tick().await;
        if shared
            .writer
            .send(writer::Cmd::Flush { reply: None })
            .await
            .is_err()
        {
            return;
        }
    }
}
