//! The node runtime: opens the store, creates the identity on first boot, and runs a role. For a
//! datacenter: the writer thread (`writer`), the peer links over QUIC (`link`) and the local
//! HTTP API (`crate::api`). Decisions live in `replication`; this module only moves bytes,
//! time and threads.

pub mod link;
pub mod metrics;
pub mod writer;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError};
use crate::ids::{Fingerprint, NodeId};
use crate::net::{Identity, PinSet, TransportLimits};
use crate::replication::Core;
use crate::store::{NodeMeta, Store};
use crate::wire::Role;

pub use metrics::Metrics;

const SECRET_CERT: &str = "tls_cert_der";
const SECRET_KEY: &str = "tls_key_der";
/// How many recent errors `status` shows.
const LAST_ERRORS_MAX: usize = 16;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct InitInfo {
    pub node_id: NodeId,
    pub fingerprint: Fingerprint,
    /// False when the directory already held a database.
    pub created: bool,
}

/// Opens (or creates) the database, its meta and the node identity. A database created for
/// another role is refused as bad config (exit 2).
fn open_node(
    data_dir: &Path,
    role: Role,
    name: Option<&str>,
) -> anyhow::Result<(Store, NodeMeta, Identity, bool)> {
    let store = Store::open(data_dir)?;
    let (meta, created) = match store.meta()? {
        Some(m) => {
            if m.role != role {
                return Err(ConfigError {
                    origin: data_dir.display().to_string(),
                    field: "role".into(),
                    reason: format!(
                        "this database was created for a {}; refusing to run it as a {role}",
                        m.role
                    ),
                }
                .into());
            }
            (m, false)
        }
        None => {
            let m = NodeMeta {
                node_id: NodeId::random(),
                role,
                name: name.map(str::to_string).unwrap_or_else(|| {
                    format!("{role}-{}", &hex::encode(rand::random::<[u8; 3]>()))
                }),
                log_epoch: rand::random::<u64>() | 1,
                created_ms: now_ms(),
            };
            store.init_meta(&m)?;
            (m, true)
        }
    };
    let identity = match (store.secret(SECRET_CERT)?, store.secret(SECRET_KEY)?) {
        (Some(c), Some(k)) => Identity::from_der(c, k)?,
        _ => {
            let id = Identity::generate(meta.node_id, &meta.name)?;
            store.put_secret(SECRET_KEY, &id.key_der)?;
            store.put_secret(SECRET_CERT, &id.cert_der)?;
            id
        }
    };
    Ok((store, meta, identity, created))
}

pub fn init(data_dir: &Path, role: Role, name: Option<&str>) -> anyhow::Result<InitInfo> {
    let (_, meta, id, created) = open_node(data_dir, role, name)?;
    Ok(InitInfo {
        node_id: meta.node_id,
        fingerprint: id.fingerprint,
        created,
    })
}

/// State shared by the API, the links and the writer.
pub struct Shared {
    pub config: Config,
    pub meta: NodeMeta,
    pub fingerprint: Fingerprint,
    pub store: Arc<Store>,
    pub token: String,
    pub writer: mpsc::Sender<writer::Cmd>,
    pub tail: watch::Receiver<u64>,
    pub peers: Vec<link::PeerState>,
    pub metrics: Metrics,
    pub ready: AtomicBool,
    pub disk_full: AtomicBool,
    last_errors: Mutex<VecDeque<String>>,
}

impl Shared {
    pub fn note_error(&self, e: String) {
        tracing::warn!("{e}");
        let mut q = self.last_errors.lock().expect("errors lock");
        if q.len() == LAST_ERRORS_MAX {
            q.pop_front();
        }
        q.push_back(format!(
            "{} {e}",
            humantime::format_rfc3339_seconds(SystemTime::now())
        ));
    }

    pub fn last_errors(&self) -> Vec<String> {
        self.last_errors
            .lock()
            .expect("errors lock")
            .iter()
            .cloned()
            .collect()
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
    /// Stops cleanly: the API stops taking requests, links close with a reason, queued commits
    /// finish, then the writer thread ends.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.api_stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.api_task)
            .await
            .is_err()
        {
            self.api_task.abort();
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(crate::net::close::SHUTDOWN),
            b"node shutting down",
        );
        for t in &self.link_tasks {
            t.abort();
        }
        for t in self.link_tasks.drain(..) {
            let _ = t.await;
        }
        let _ = self.shared.writer.send(writer::Cmd::Stop).await;
        if let Some(w) = self.writer_thread.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// Starts a datacenter node on the current tokio runtime.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    if config.role != Role::Datacenter {
        anyhow::bail!(
            "the {} role is not available in this version; run a datacenter",
            config.role
        );
    }
    let data_dir = config.data_dir.clone();
    let (store, meta, identity, _) = open_node(&data_dir, config.role, Some(&config.name))?;
    if meta.name != config.name {
        tracing::info!(
            stored = %meta.name,
            configured = %config.name,
            "the configured name differs from the one stored at init; using the configured one"
        );
    }
    let meta = NodeMeta {
        name: config.name.clone(),
        ..meta
    };
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
    let endpoint = crate::net::endpoint(config.listen, &identity, pins, TransportLimits::default())
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
    let shared = Arc::new(Shared {
        config,
        meta,
        fingerprint: identity.fingerprint,
        store: store.clone(),
        token,
        writer: wtx,
        tail: tail_rx,
        peers,
        metrics: Metrics::default(),
        ready: AtomicBool::new(false),
        disk_full: AtomicBool::new(false),
        last_errors: Mutex::new(VecDeque::new()),
    });
    let writer_thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("outpost-writer".into())
            .spawn(move || writer::run(shared, store, core, wrx, tail_tx))?
    };
    let (api_stop, api_stop_rx) = tokio::sync::oneshot::channel();
    let api_task = {
        let app = crate::api::router(shared.clone());
        tokio::spawn(async move {
            let serve = axum::serve(api_listener, app).with_graceful_shutdown(async move {
                let _ = api_stop_rx.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("HTTP API stopped: {e}");
            }
        })
    };
    let mut link_tasks = link::spawn_all(shared.clone(), endpoint.clone());
    link_tasks.push(tokio::spawn(retention(shared.clone())));
    shared.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        role = %Role::Datacenter,
        name = %shared.meta.name,
        node_id = %shared.meta.node_id,
        fingerprint = %shared.fingerprint,
        quic = %quic_addr,
        api = %api_addr,
        peers = shared.peers.len(),
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

/// How often an idle node trims old log records (busy nodes trim with their commits).
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Trims the local log by age (`limits.log_retention`) and size (`limits.log_records_max`).
/// A peer that falls behind what is kept needs a snapshot to catch up.
async fn retention(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(TRIM_EVERY);
    loop {
        every.tick().await;
        let retention_ms = shared.config.limits.log_retention.as_millis() as u64;
        let cmd = writer::Cmd::Trim {
            cutoff_ms: now_ms().saturating_sub(retention_ms),
            keep_max: shared.config.limits.log_records_max,
        };
        if shared.writer.send(cmd).await.is_err() {
            return;
        }
    }
}

/// `outpost run`: runs until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outpost")
        .build()?;
    rt.block_on(async move {
        let running = start(config).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        running.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}
