//! The core thread: the only owner of the [`ControllerCore`] and of the controller's database.
//! It takes commands over one bounded channel, steps the core with a whole batch of them,
//! commits what changed in one fsynced transaction, and only then performs the outputs (a
//! publication is durable before it is sent, a notification recorded before it is acked).
//!
//! It never blocks on a connection: outputs go to each connection's bounded queue with
//! `try_send`, and a connection whose queue is full is closed (its publications are stored and
//! resent when it reconnects). It never answers an operator before the commit that carries the
//! answer. A failed commit performs nothing of its batch: every connection is closed and the
//! core is rebuilt from what the database holds, so nothing acknowledged is lost.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use quinn::VarInt;
use tokio::sync::{mpsc, oneshot};

use super::cmd::*;
use super::core::{
    ConfigError, ConfigSet, ConnId, ControllerCore, CoreEvent, Dirty, KeyActionError, KeyStatus,
    MachineRecord, Output, Settings,
};
use super::deploy::{DeployBook, DeploymentRecord, SealJob};
use super::shared::ControllerShared;
use super::storage::ClusterStore;
use crate::clock::now_ms;
use crate::cluster::keys::{AgeSealer, ControllerKey};
use crate::ids::NodeId;
use crate::limits::{CONTROLLER_COMMIT_BATCH_MAX, CONTROLLER_REOPEN_EVERY};
use crate::net::close;
use crate::store::Store;
use crate::wire::Message;

/// The part of a connection's send queue relayed copies leave free (see `perform`).
const RELAY_HEADROOM: usize = crate::limits::CONNECTION_OUTBOUND_MAX / 4;

enum Reply {
    Key(KeyReply, Result<NodeId, KeyActionError>),
    ConfigSet(ConfigReply<ConfigSet>, Result<ConfigSet, ConfigCmdError>),
    ConfigRead(ConfigCmd),
    Machines(MachinesReply, Option<String>),
    Ping(oneshot::Sender<()>),
    Backup(oneshot::Sender<Result<crate::http::backup::BackupCopy, KeyCmdError>>),
}

pub(crate) struct CoreThread {
    shared: Arc<ControllerShared>,
    settings: Settings,
    /// To rebuild the core (`ControllerKey` is deliberately not `Clone`).
    key_secret: Vec<u8>,
    store: Option<Store>,
    core: Option<ControllerCore>,
    /// Connections the current core knows. A command for a connection not here (one closed
    /// when the core was rebuilt) never reaches the core.
    handles: HashMap<ConnId, ConnHandle>,
    reopened_at: Instant,
    /// Deployment records written by the batch, and what waits for its commit.
    deploy: DeployBook,
}

impl CoreThread {
    pub(crate) fn new(
        shared: Arc<ControllerShared>,
        settings: Settings,
        key: &ControllerKey,
        store: Store,
        core: ControllerCore,
        seal_tx: mpsc::UnboundedSender<SealJob>,
    ) -> CoreThread {
        CoreThread {
            shared,
            settings,
            key_secret: key.secret_bytes(),
            store: Some(store),
            core: Some(core),
            handles: HashMap::new(),
            reopened_at: Instant::now(),
            deploy: DeployBook::new(seal_tx),
        }
    }

    /// Runs until [`Cmd::Stop`] or until every sender is gone.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        // Deployments a previous run left unfinished go on.
        self.deploy.reload(self.core.as_ref(), self.store.as_ref());
        self.publish_summary();
        let mut stopping = false;
        while !stopping {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            while batch.len() < CONTROLLER_COMMIT_BATCH_MAX {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            stopping = self.batch(batch);
        }
        for (_, h) in self.handles.drain() {
            h.conn.close(
                VarInt::from_u32(close::SHUTDOWN),
                b"controller shutting down",
            );
        }
        tracing::debug!("controller core thread stopped");
    }

    /// Steps, commits, performs. Returns whether a Stop was among the commands.
    fn batch(&mut self, batch: Vec<Cmd>) -> bool {
        let now = now_ms();
        let mut replies = Vec::new();
        let mut keys_changed = false;
        let mut stop = false;
        for cmd in batch {
            match cmd {
                Cmd::Joined {
                    conn,
                    peer,
                    join,
                    handle,
                } => match self.core.as_mut() {
                    Some(core) => {
                        self.handles.insert(conn, handle);
                        core.joined(conn, peer, *join, now);
                    }
                    None => handle.conn.close(
                        VarInt::from_u32(close::SHUTDOWN),
                        b"the controller's database is unavailable; retry later",
                    ),
                },
                Cmd::Frame { conn, msg } => {
                    if let (Some(core), true) =
                        (self.core.as_mut(), self.handles.contains_key(&conn))
                    {
                        core.frame(conn, msg, now);
                    }
                }
                Cmd::Closed { conn } => {
                    if self.handles.remove(&conn).is_some() {
                        if let Some(core) = self.core.as_mut() {
                            core.closed(conn, now);
                        }
                    }
                }
                Cmd::Accept { key, reply }
                | Cmd::Reject { key, reply }
                | Cmd::Remove { key, reply }
                    if self.core.is_none() =>
                {
                    let _ = key;
                    let _ = reply.send(Err(self.unavailable()));
                }
                Cmd::Accept { key, reply } => {
                    let core = self.core.as_mut().expect("checked above");
                    keys_changed = true;
                    replies.push(Reply::Key(reply, core.accept(&key, now)));
                }
                Cmd::Reject { key, reply } => {
                    let core = self.core.as_mut().expect("checked above");
                    keys_changed = true;
                    replies.push(Reply::Key(reply, core.reject(&key, now)));
                }
                Cmd::Remove { key, reply } => {
                    let core = self.core.as_mut().expect("checked above");
                    keys_changed = true;
                    replies.push(Reply::Key(reply, core.remove(&key, now)));
                }
                Cmd::Machines { name, reply } => replies.push(Reply::Machines(reply, name)),
                Cmd::Tick => match self.core.as_mut() {
                    Some(core) => {
                        core.tick(now);
                        self.deploy.tick(core, now);
                    }
                    None => {
                        if self.reopened_at.elapsed() >= CONTROLLER_REOPEN_EVERY {
                            self.reopen();
                        }
                    }
                },
                Cmd::Deploy(cmd) => {
                    self.deploy
                        .step(self.core.as_mut(), self.store.as_ref(), *cmd, now)
                }
                Cmd::Config(cmd) => {
                    if let Some(r) = self.config_step(cmd, now) {
                        replies.push(r);
                    }
                }
                Cmd::Ping { reply } => replies.push(Reply::Ping(reply)),
                Cmd::Backup { reply } => replies.push(Reply::Backup(reply)),
                Cmd::Stop => stop = true,
            }
        }
        let committed = self.commit_and_perform();
        self.deploy
            .after_commit(self.core.as_ref(), self.store.as_ref(), committed);
        if keys_changed || !committed {
            // A rejected key is refused in the handshake from now on; an accepted one that was
            // rejected may come back.
            if let Some(core) = &self.core {
                self.shared.deny.replace(core.rejected_fingerprints());
            }
        }
        for r in replies {
            self.answer(r, committed);
        }
        self.publish_summary();
        stop
    }

    /// Commits what the batch changed, then performs its outputs. On a failed commit nothing
    /// is performed and the core is rebuilt from the database. Returns whether it committed.
    fn commit_and_perform(&mut self) -> bool {
        let Some(core) = self.core.as_mut() else {
            return true;
        };
        let (dirty, outputs) = core.take();
        log_core_events(core);
        let deployments = self.deploy.take_writes();
        if !dirty.is_empty() || !deployments.is_empty() {
            let result = match &mut self.store {
                #[cfg(test)]
                Some(_) if self.shared.fail_commits.load(Ordering::Relaxed) => {
                    Err("injected commit failure".to_owned())
                }
                Some(store) => {
                    ClusterStore::commit(store, &dirty, &deployments).map_err(|e| e.to_string())
                }
                None => Err("the database is not open".to_owned()),
            };
            if let Err(e) = result {
                self.shared
                    .metrics
                    .commit_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.note_error(format!(
                    "commit failed ({e}); closing every connection and reloading the machine state from the database"
                ));
                self.rebuild();
                return false;
            }
            self.shared.metrics.commits.fetch_add(1, Ordering::Relaxed);
            self.journal(&dirty, &deployments);
        }
        for o in outputs {
            self.perform(o);
        }
        true
    }

    /// What a committed batch changed, for `GET /v1/watch`: each machine written (its API view,
    /// or `removed`), and each deployment created, failed somewhere, or whose targets moved.
    fn journal(&self, dirty: &Dirty, deployments: &[DeploymentRecord]) {
        let Some(core) = self.core.as_ref() else {
            return;
        };
        let journal = &self.shared.journal;
        let now = crate::clock::now_ms();
        let mut touched: std::collections::BTreeSet<u64> =
            deployments.iter().map(|d| d.id).collect();
        for m in &dirty.machines {
            if let Some(d) = m.deploys.last() {
                touched.insert(d.deployment);
            }
            let view = match m.key_status {
                KeyStatus::Admitted => super::views::machine_json(
                    &MachineView {
                        record: m.clone(),
                        connected: core.connected(m.node_id),
                    },
                    now,
                ),
                other => serde_json::json!({
                    "name": m.name,
                    "node_id": m.node_id.to_string(),
                    "key_status": other.as_str(),
                }),
            };
            journal.push("machine", &m.name, view);
        }
        for c in &dirty.config {
            journal.push("config", &c.scope, super::views::change_json(c));
        }
        for id in &dirty.removed {
            journal.push(
                "machine",
                "",
                serde_json::json!({"node_id": id.to_string(), "key_status": "dropped"}),
            );
        }
        if let Some(store) = &self.store {
            for id in touched {
                if let Some(v) = super::deploy::view_of(core, store, id) {
                    journal.push(
                        "deployment",
                        &id.to_string(),
                        super::views::deployment_json(&v),
                    );
                }
            }
        }
    }

    fn perform(&mut self, o: Output) {
        match o {
            Output::Send { conn, msg } => {
                let Some(h) = self.handles.get(&conn) else {
                    return;
                };
                // A relayed copy is best effort: the publication stays unacknowledged and the
                // core sends it directly after `resend_after`. So relays never take the last
                // quarter of a load balancer's queue, which stays for its own messages: one
                // that relays for many dependents is not cut off by a burst of them (a new
                // pool or configuration for every dependent at once).
                if matches!(msg, Message::Relay(_)) && h.out.capacity() <= RELAY_HEADROOM {
                    self.shared
                        .metrics
                        .relays_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match h.out.try_send(Out::Msg(msg)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.shared
                            .metrics
                            .slow_closed
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            conn,
                            "closing a connection whose send queue is full; its publications are resent when it reconnects"
                        );
                        // Not a protocol error: the machine reconnects and resumes.
                        h.conn.close(
                            VarInt::from_u32(close::OVERLOADED),
                            b"the controller's send queue for this machine is full; reconnect to resume",
                        );
                    }
                    // The writer is gone: the reader will report Closed.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            Output::Close { conn, code, reason } => {
                let Some(h) = self.handles.get(&conn) else {
                    return;
                };
                if code == close::PROTOCOL || code == close::VERSION {
                    self.shared.metrics.refusals.fetch_add(1, Ordering::Relaxed);
                    let kind = if code == close::VERSION {
                        "protocol version"
                    } else {
                        "protocol violation"
                    };
                    self.shared
                        .note_refusal(kind, format!("connection {conn} refused: {reason}"));
                } else if code == close::UNKNOWN_PEER {
                    // A refused Join: the kind is the reason the worker was told.
                    let kind = reason.split(':').next().unwrap_or_default();
                    self.shared
                        .note_refusal(kind, format!("connection {conn} refused: {reason}"));
                } else {
                    tracing::info!(conn, code, "closing connection: {reason}");
                }
                let reason = cut(reason);
                // Through the writer, so that what was queued before (an Admission::Rejected)
                // still leaves; directly when the queue is full.
                if let Err(e) = h.out.try_send(Out::Close { code, reason }) {
                    let reason = match e.into_inner() {
                        Out::Close { reason, .. } => reason,
                        Out::Msg(_) => String::new(),
                    };
                    h.conn.close(VarInt::from_u32(code), reason.as_bytes());
                }
            }
        }
    }

    /// A configuration change is made in the core now (answered after the commit); a read
    /// is answered after the batch's commit, so that it sees what the batch changed.
    fn config_step(&mut self, cmd: ConfigCmd, now: u64) -> Option<Reply> {
        let (scope, doc, note, reply) = match cmd {
            ConfigCmd::Set { scope, doc, reply } => (scope, doc, None, reply),
            ConfigCmd::Rollback {
                scope,
                version,
                reply,
            } => {
                let found = match &self.store {
                    Some(store) => store
                        .config_history(&scope.key())
                        .map_err(|e| ConfigCmdError::Unavailable(e.to_string())),
                    None => Err(ConfigCmdError::Unavailable(self.unavailable().to_string())),
                }
                .and_then(|h| {
                    h.into_iter().find(|c| c.version == version).ok_or_else(|| {
                        ConfigCmdError::NotFound(format!(
                            "{} has no version {version} (see its history: the newest {} \
                             changes of each scope are kept)",
                            scope.key(),
                            crate::limits::CONFIG_HISTORY_KEPT
                        ))
                    })
                });
                let old = match found {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return None;
                    }
                };
                let doc = old.doc.as_deref().map(|t| {
                    serde_json::from_str(t).expect("a stored document is JSON the store wrote")
                });
                (scope, doc, Some(format!("rollback to {version}")), reply)
            }
            read => return Some(Reply::ConfigRead(read)),
        };
        let Some(core) = self.core.as_mut() else {
            let _ = reply.send(Err(ConfigCmdError::Unavailable(
                self.unavailable().to_string(),
            )));
            return None;
        };
        let r = core
            .set_config(&scope, doc, note, now)
            .map_err(|e: ConfigError| ConfigCmdError::NotFound(e.to_string()));
        if let Ok(set) = &r {
            tracing::info!(
                scope = %set.change.scope,
                version = set.change.version,
                machines = set.published.len(),
                "configuration changed"
            );
        }
        Some(Reply::ConfigSet(reply, r))
    }

    fn answer_config_read(&self, cmd: ConfigCmd) {
        let unavailable = || ConfigCmdError::Unavailable(self.unavailable().to_string());
        match cmd {
            ConfigCmd::History { scope, reply } => {
                let r = match &self.store {
                    Some(store) => store
                        .config_history(&scope.key())
                        .map_err(|e| ConfigCmdError::Unavailable(e.to_string())),
                    None => Err(unavailable()),
                };
                let _ = reply.send(r);
            }
            ConfigCmd::Effective { name, reply } => {
                let r = match &self.core {
                    None => Err(unavailable()),
                    Some(core) => core
                        .machine_by_name(&name)
                        .filter(|m| m.key_status == KeyStatus::Admitted)
                        .map(|m| EffectiveView {
                            record: m.clone(),
                            doc: core.effective_config(m.node_id),
                        })
                        .ok_or_else(|| {
                            ConfigCmdError::NotFound(format!("no admitted machine named {name:?}"))
                        }),
                };
                let _ = reply.send(r);
            }
            ConfigCmd::Set { reply, .. } | ConfigCmd::Rollback { reply, .. } => {
                let _ = reply.send(Err(unavailable()));
            }
        }
    }

    fn answer(&self, r: Reply, committed: bool) {
        match r {
            Reply::ConfigSet(reply, result) => {
                let answer = if committed {
                    result
                } else {
                    Err(ConfigCmdError::Unavailable(
                        "the controller could not commit this change; nothing was changed, retry"
                            .into(),
                    ))
                };
                let _ = reply.send(answer);
            }
            Reply::ConfigRead(cmd) => self.answer_config_read(cmd),
            Reply::Ping(reply) => {
                let _ = reply.send(());
            }
            Reply::Backup(reply) => {
                // On this thread: a controller's database is small (machines, channels,
                // deployments), and the copy sees exactly what the batch committed.
                let answer = match &self.store {
                    Some(store) => crate::http::backup::write_copy(store).map_err(|e| {
                        self.shared.note_error(format!("backup failed: {e}"));
                        KeyCmdError::Unavailable(format!("backup failed: {e}"))
                    }),
                    None => Err(self.unavailable()),
                };
                let _ = reply.send(answer);
            }
            Reply::Key(reply, result) => {
                let answer = if !committed {
                    Err(KeyCmdError::Unavailable(
                        "the controller could not commit this change; nothing was changed, retry"
                            .into(),
                    ))
                } else {
                    match (result, self.core.as_ref()) {
                        (Err(e), _) => Err(e.into()),
                        (Ok(id), Some(core)) => core
                            .machines()
                            .find(|m| m.node_id == id)
                            .map(KeyView::of)
                            .ok_or_else(|| {
                                KeyCmdError::Unavailable(format!("machine {id} vanished"))
                            }),
                        (Ok(_), None) => Err(self.unavailable()),
                    }
                };
                let _ = reply.send(answer);
            }
            Reply::Machines(reply, name) => {
                let answer = match &self.core {
                    None => Err(self.unavailable()),
                    Some(core) => {
                        let view = |m: &MachineRecord| MachineView {
                            record: m.clone(),
                            connected: core.connected(m.node_id),
                        };
                        Ok(match name {
                            Some(n) => core.machine_by_name(&n).map(view).into_iter().collect(),
                            None => core.machines().map(view).collect(),
                        })
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }

    fn unavailable(&self) -> KeyCmdError {
        KeyCmdError::Unavailable(
            "the controller's database is unavailable after a failed write; retry shortly".into(),
        )
    }

    /// After a failed commit: every connection goes (workers reconnect and resume from what
    /// is stored), redb is reopened (it refuses everything after a failed write) and the core
    /// is rebuilt from the database.
    fn rebuild(&mut self) {
        for (_, h) in self.handles.drain() {
            h.conn.close(
                VarInt::from_u32(close::SHUTDOWN),
                b"the controller could not commit; reconnect to resume",
            );
        }
        self.core = None;
        self.reopen();
    }

    fn reopen(&mut self) {
        self.reopened_at = Instant::now();
        // redb locks its file: the old handle must be gone first.
        drop(self.store.take());
        let opened = Store::open(&self.shared.config.data_dir)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let loaded = ClusterStore::load(&s).map_err(|e| e.to_string())?;
                Ok((s, loaded))
            });
        let key = ControllerKey::from_secret(&self.key_secret);
        match (opened, key) {
            (Ok((store, loaded)), Ok(key)) => {
                let mut core = ControllerCore::open(
                    self.settings.clone(),
                    key,
                    Box::new(AgeSealer),
                    loaded.machines,
                    loaded.publications,
                    now_ms(),
                )
                .with_config(loaded.config);
                log_core_events(&mut core);
                self.shared.deny.replace(core.rejected_fingerprints());
                self.core = Some(core);
                self.store = Some(store);
                // What the failed batch did not commit is done again.
                self.deploy.reload(self.core.as_ref(), self.store.as_ref());
                tracing::info!("controller database reopened; machine state reloaded");
            }
            (Err(e), _) => self
                .shared
                .note_error(format!("cannot reopen the database yet: {e}")),
            (_, Err(e)) => self.shared.note_error(format!("signing key: {e}")),
        }
    }

    fn publish_summary(&self) {
        let mut s = Summary {
            connections: self.handles.len(),
            available: self.core.is_some(),
            ..Summary::default()
        };
        if let Some(core) = &self.core {
            for m in core.machines() {
                match m.key_status {
                    KeyStatus::Admitted if m.up => s.up += 1,
                    KeyStatus::Admitted => s.down += 1,
                    KeyStatus::Pending => s.pending += 1,
                    KeyStatus::Rejected => s.rejected += 1,
                    KeyStatus::Removed => s.removed += 1,
                }
            }
            s.unacked = core.unacked_len();
        }
        *self.shared.summary.lock().expect("summary lock") = s;
    }
}

/// Logs what the core did that an operator should hear of (the core itself logs nothing).
pub(super) fn log_core_events(core: &mut ControllerCore) {
    for e in core.take_events() {
        match e {
            CoreEvent::OwnNodeIdRemoved { name } => tracing::warn!(
                name = %name,
                "removing a machine record that carries the controller's own node id"
            ),
            CoreEvent::PendingGaveWay {
                name,
                node,
                fingerprint,
                why,
            } => tracing::info!(
                name = %name,
                node_id = %node,
                fingerprint = %fingerprint,
                "a pending key gives way to a key with the join token ({why})"
            ),
            CoreEvent::ChannelMovedForward {
                machine,
                resume,
                published,
            } => tracing::warn!(
                machine = %machine,
                resume,
                published,
                "a machine applied more of its channel than this controller remembers publishing; moving the channel forward"
            ),
            CoreEvent::ChannelFull {
                name,
                node,
                unacknowledged,
            } => tracing::warn!(
                name = %name,
                node_id = %node,
                unacknowledged,
                "a machine's publication channel is at its bound: its pool and route \
                 changes wait until it acknowledges, deployments to it fail"
            ),
            CoreEvent::ChannelHasRoom { name } => {
                tracing::info!(name = %name, "a machine's publication channel has room again")
            }
            CoreEvent::SealFailed { machine, error } => {
                tracing::error!(machine = %machine, "cannot seal a publication: {error}")
            }
        }
    }
}
