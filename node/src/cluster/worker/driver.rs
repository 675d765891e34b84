//! The one task that owns the worker's core and its database: it feeds the core what arrived,
//! commits the record the core hands back, and only then performs the outputs (frames to the
//! controller, the pool file, the pins, the load balancer's link, a deployment handed to the
//! software task, whose results come back as inputs). Inputs that queued up while a
//! commit ran are fed together and committed once.
//!
//! It never blocks a tokio worker thread: commits and file writes run on the blocking pool.
//! A commit that fails is retried (reopening the database, as redb refuses everything after a
//! failed write) before anything that depends on it is performed.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::core::{Effect, WorkerCore, WorkerOutput, WorkerRecord, WorkerRefusal};
use super::{pool_file, relay, WorkerShared};
use crate::http::backup::BackupCopy;
use crate::limits::{
    POOL_FILE_RETRY, WORKER_COMMIT_RETRY_MAX, WORKER_COMMIT_RETRY_MIN, WORKER_DRIVER_BATCH_MAX,
};
use crate::replication::StoreError;
use crate::store::Store;
use crate::wire::{ConfigReport, Join, MachineReport, Message, Publication};

pub(crate) enum Input {
    /// The Join for a new connection to the controller.
    Join(oneshot::Sender<Join>),
    /// The Join was sent on a new connection, now the current one.
    Connected,
    Controller(Message, oneshot::Sender<Result<(), WorkerRefusal>>),
    Relay(Publication, oneshot::Sender<Result<(), WorkerRefusal>>),
    Report(MachineReport),
    /// A deployment is finished (running, rolled back or failed): `core.deployed`.
    Deployed(u64, MachineReport),
    /// A configuration version was applied, rolled back or failed: `core.configured`.
    Configured(u64, ConfigReport),
    /// Answered after the step it lands in is committed and performed.
    Ping(oneshot::Sender<()>),
    /// `GET /v1/backup`: a consistent copy of the database, written after the step.
    Backup(oneshot::Sender<Result<BackupCopy, BackupError>>),
}

/// Why `GET /v1/backup` got no copy (its 503's reason).
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackupError {
    /// The store is being reopened after a failed commit.
    #[error("the database is closed")]
    Closed,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the backup thread failed: {0}")]
    Thread(#[source] tokio::task::JoinError),
}

enum Reply {
    Refusal(
        oneshot::Sender<Result<(), WorkerRefusal>>,
        Result<(), WorkerRefusal>,
    ),
    Ping(oneshot::Sender<()>),
    Backup(oneshot::Sender<Result<BackupCopy, BackupError>>),
}

struct Driver {
    shared: Arc<WorkerShared>,
    core: WorkerCore,
    /// `None` only while it is being reopened after a failed commit.
    store: Option<Store>,
    data_dir: PathBuf,
    stop: watch::Receiver<bool>,
    /// The pool file could not be written yet: it is, from the record, after `POOL_FILE_RETRY`.
    pool_pending: bool,
}

pub(crate) async fn run(
    shared: Arc<WorkerShared>,
    core: WorkerCore,
    store: Store,
    data_dir: PathBuf,
    mut inputs: mpsc::Receiver<Input>,
    stop: watch::Receiver<bool>,
) {
    let mut d = Driver {
        shared,
        core,
        store: Some(store),
        data_dir,
        stop,
        pool_pending: false,
    };
    // A machine that never reported says it is idle; the stored state's effects (the pool
    // file, the load balancer's link) are applied again with this first step.
    if d.core.record().report.is_none() {
        d.core.report(MachineReport {
            state: "idle".into(),
            software: None,
            detail: None,
            deployment: None,
        });
    }
    if !d.settle().await {
        return;
    }
    let mut stop = d.stop.clone();
    loop {
        let retrying = d.pool_pending;
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            got = inputs.recv() => {
                let Some(first) = got else { return };
                let mut replies = Vec::new();
                d.feed(first, &mut replies);
                while replies.len() < WORKER_DRIVER_BATCH_MAX {
                    match inputs.try_recv() {
                        Ok(i) => d.feed(i, &mut replies),
                        Err(_) => break,
                    }
                }
                if !d.settle().await {
                    return;
                }
                for r in replies {
                    match r {
                        Reply::Refusal(tx, r) => {
                            let _ = tx.send(r);
                        }
                        Reply::Ping(tx) => {
                            let _ = tx.send(());
                        }
                        Reply::Backup(tx) => {
                            let _ = tx.send(d.backup().await);
                        }
                    }
                }
            }
            _ = tokio::time::sleep(POOL_FILE_RETRY), if retrying => {
                d.pool_pending = false;
                d.write_pool().await;
            }
        }
    }
}

impl Driver {
    fn feed(&mut self, input: Input, replies: &mut Vec<Reply>) {
        match input {
            Input::Join(tx) => {
                let _ = tx.send(self.core.join());
            }
            Input::Connected => self.core.connected(),
            Input::Controller(m, tx) => {
                let r = self.core.from_controller(m);
                replies.push(Reply::Refusal(tx, r));
            }
            Input::Relay(p, tx) => {
                let r = self.core.from_relay(p);
                replies.push(Reply::Refusal(tx, r));
            }
            Input::Report(r) => self.core.report(r),
            Input::Deployed(d, r) => self.core.deployed(d, r),
            Input::Configured(v, r) => self.core.configured(v, r),
            Input::Ping(tx) => replies.push(Reply::Ping(tx)),
            Input::Backup(tx) => replies.push(Reply::Backup(tx)),
        }
    }

    /// Commits what the core changed, then performs its outputs. False when stopped before the
    /// commit succeeded (nothing is then performed).
    async fn settle(&mut self) -> bool {
        let (rec, outputs) = self.core.take();
        let committed = match rec {
            Some(rec) => match self.commit(rec).await {
                Some(rec) => Some(rec),
                None => return false,
            },
            None => None,
        };
        self.shared.set_view(self.core.standing(), committed);
        for o in outputs {
            match o {
                WorkerOutput::ToController(m) => self.shared.send_controller(m),
                WorkerOutput::Apply(Effect::Pool(pool)) => {
                    relay::set_pool(&self.shared, &pool);
                    self.write_pool().await;
                }
                WorkerOutput::Apply(Effect::Coupling) => self.write_pool().await,
                WorkerOutput::Apply(Effect::Route(route)) => relay::set_route(&self.shared, route),
                WorkerOutput::Apply(Effect::Deploy(order)) => self.shared.software.order(order),
                WorkerOutput::Apply(Effect::Config(order)) => self.shared.software.configure(order),
            }
        }
        true
    }

    /// A consistent copy of the database, written on the blocking pool (the store is lent to
    /// it and comes back, as for a commit).
    async fn backup(&mut self) -> Result<BackupCopy, BackupError> {
        let store = self.store.take().ok_or(BackupError::Closed)?;
        let (store, res) = tokio::task::spawn_blocking(move || {
            let res = crate::http::backup::write_copy(&store);
            (store, res)
        })
        .await
        .map_err(BackupError::Thread)?;
        self.store = Some(store);
        Ok(res?)
    }

    /// Commits `rec` durably, retrying until it succeeds; `None` if stopped first.
    async fn commit(&mut self, rec: WorkerRecord) -> Option<WorkerRecord> {
        let rec = Arc::new(rec);
        let mut wait = WORKER_COMMIT_RETRY_MIN;
        loop {
            let outcome = match self.store.take() {
                Some(store) => {
                    let r = rec.clone();
                    tokio::task::spawn_blocking(move || {
                        let res = store.put_worker_record(&r).map_err(|e| e.to_string());
                        (store, res)
                    })
                    .await
                    .map_err(|e| format!("the commit thread failed: {e}"))
                    .and_then(|(store, res)| match res {
                        Ok(()) => {
                            self.store = Some(store);
                            Ok(())
                        }
                        // Dropped here: redb refuses every write after a failed one until
                        // the file is reopened.
                        Err(e) => Err(e),
                    })
                }
                None => Err("the database is closed".to_owned()),
            };
            match outcome {
                Ok(()) => return Some(Arc::unwrap_or_clone(rec)),
                Err(e) => self.shared.note_error(format!(
                    "cannot commit the worker's state: {e}; retrying in {wait:?}"
                )),
            }
            tokio::select! {
                _ = self.stop.changed() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(WORKER_COMMIT_RETRY_MAX);
            if self.store.is_none() {
                let dir = self.data_dir.clone();
                match tokio::task::spawn_blocking(move || Store::open(&dir)).await {
                    Ok(Ok(s)) => self.store = Some(s),
                    Ok(Err(e)) => self
                        .shared
                        .note_error(format!("cannot reopen the database: {e}")),
                    Err(e) => self
                        .shared
                        .note_error(format!("cannot reopen the database: {e}")),
                }
            }
        }
    }

    /// Writes the pool file from the committed record ([`pool_file::document`]) and tells the
    /// software; a failure is retried later, so the file ends up holding the latest state.
    async fn write_pool(&mut self) {
        let Some(doc) =
            pool_file::document(self.core.name(), self.core.component(), self.core.record())
        else {
            return;
        };
        let path = self.shared.pool_path.clone();
        let written = tokio::task::spawn_blocking(move || pool_file::write_doc(&path, &doc)).await;
        match written {
            Ok(Ok(())) => {
                self.shared
                    .metrics
                    .pool_writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let rec = self.core.record();
                match &rec.pool {
                    Some(pool) => tracing::info!(
                        members = pool.members.len(),
                        dependents = pool.dependents.len(),
                        call_router = rec.coupling.router.as_ref().map(|r| r.name.as_str()),
                        "backend pool applied"
                    ),
                    None => tracing::info!(
                        load_balancer = rec.coupling.endpoint.as_ref().map(|e| e.name.as_str()),
                        up = rec.coupling.endpoint.as_ref().map(|e| e.up),
                        "load balancer applied"
                    ),
                }
                self.shared.reload_software();
            }
            Ok(Err(e)) => {
                self.shared.note_error(format!(
                    "cannot write the pool file {}: {e}; retrying in {POOL_FILE_RETRY:?}",
                    self.shared.pool_path.display()
                ));
                self.pool_pending = true;
            }
            Err(e) => {
                self.shared
                    .note_error(format!("the pool file writer failed: {e}"));
                self.pool_pending = true;
            }
        }
    }
}
