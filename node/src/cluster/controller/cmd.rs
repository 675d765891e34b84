//! What the controller's runtime asks of its core thread: the commands (`Cmd`, `DeployCmd`,
//! `ConfigCmd`), their answers and views, and the summary the thread publishes. Plain types, so
//! that the API, the connections, the deployments' tasks and the thread itself all build on
//! them without importing one another.

use super::bundles;
use super::configdata::ConfigChange;
use super::configdata::Scope;
use super::core::ConfigSet;
use super::core::ConnId;
use super::core::KeyActionError;
use super::core::KeyStatus;
use super::core::MachineRecord;
use super::core::Peer;
use super::rollout::Control;
use crate::cluster::body::DeployOrder;
use crate::ids::Fingerprint;
use crate::ids::NodeId;
use crate::limits::REFUSAL_REASON_BYTES_MAX;
use crate::wire::Join;
use crate::wire::Message;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

pub use super::deploy_core::{DeployError, DeploymentView, NewDeployment};
/// What a connection's writer task sends, in order.
// Messages are nearly every item; boxing them would cost an allocation per send for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Out {
    Msg(Message),
    /// Flush what is queued, then close the connection with a `net::close` code.
    Close {
        code: u32,
        reason: String,
    },
}

/// The core thread's hold on one connection.
pub(crate) struct ConnHandle {
    pub conn: quinn::Connection,
    /// Bounded (`conn::OUTBOUND_MAX`); full means the machine does not keep up.
    pub out: mpsc::Sender<Out>,
}

pub(crate) type KeyReply = oneshot::Sender<Result<KeyView, KeyCmdError>>;

pub(crate) type MachinesReply = oneshot::Sender<Result<Vec<MachineView>, KeyCmdError>>;

pub(crate) enum Cmd {
    /// A worker finished its handshake and sent its Join (protocol version already checked).
    Joined {
        conn: ConnId,
        /// What its certificate proved.
        peer: Peer,
        join: Box<Join>,
        handle: ConnHandle,
    },
    Frame {
        conn: ConnId,
        msg: Message,
    },
    Closed {
        conn: ConnId,
    },
    Accept {
        key: String,
        reply: KeyReply,
    },
    Reject {
        key: String,
        reply: KeyReply,
    },
    /// `outpost machines remove`: the machine leaves the cluster for good.
    Remove {
        key: String,
        reply: KeyReply,
    },
    /// Every machine record (all key statuses), or only the one named.
    Machines {
        name: Option<String>,
        reply: MachinesReply,
    },
    Tick,
    /// Deployments: created and recorded here, published by the core (see `deploy`).
    Deploy(Box<DeployCmd>),
    /// Configuration data: changes (answered after their commit) and reads.
    Config(ConfigCmd),
    /// Answered after the batch it arrived in: the watchdog's proof that the thread moves.
    Ping {
        reply: oneshot::Sender<()>,
    },
    /// Finish the batch, close every connection, end the thread.
    Stop,
    /// `GET /v1/backup`: a consistent copy of the database, written after the batch's commit.
    Backup {
        reply: oneshot::Sender<Result<crate::http::backup::BackupCopy, KeyCmdError>>,
    },
}

pub(crate) type ConfigReply<T> = oneshot::Sender<Result<T, ConfigCmdError>>;

pub(crate) enum ConfigCmd {
    /// `PUT` (`Some`) or `DELETE` (`None`) of a scope's document.
    Set {
        scope: Scope,
        doc: Option<serde_json::Value>,
        reply: ConfigReply<ConfigSet>,
    },
    /// A new version holding what version `version` of the scope held.
    Rollback {
        scope: Scope,
        version: u64,
        reply: ConfigReply<ConfigSet>,
    },
    /// The scope's stored changes, newest first (the first is the current one).
    History {
        scope: Scope,
        reply: ConfigReply<Vec<ConfigChange>>,
    },
    /// A machine's effective configuration and where it stands.
    Effective {
        name: String,
        reply: ConfigReply<EffectiveView>,
    },
}

/// `GET /v1/machines/{name}/config`.
#[derive(Clone, Debug)]
pub struct EffectiveView {
    pub record: MachineRecord,
    /// What would be published now (`None`: no document applies to it).
    pub doc: Option<serde_json::Value>,
}

/// Why a configuration command could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ConfigCmdError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Why an operator command (or a read of the machines) could not be done.
#[derive(Debug, thiserror::Error)]
pub enum KeyCmdError {
    #[error(transparent)]
    Key(#[from] KeyActionError),
    /// The database cannot be written or read now; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
}

/// A machine key as `GET /v1/keys` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyView {
    pub node_id: NodeId,
    pub name: String,
    pub fingerprint: Fingerprint,
    pub status: KeyStatus,
    pub first_seen_ms: u64,
}

impl KeyView {
    pub(crate) fn of(m: &MachineRecord) -> KeyView {
        KeyView {
            node_id: m.node_id,
            name: m.name.clone(),
            fingerprint: m.fingerprint,
            status: m.key_status,
            first_seen_ms: m.first_seen_ms,
        }
    }
}

/// A machine as the API shows it: its committed record and whether it is connected now.
#[derive(Clone, Debug)]
pub struct MachineView {
    pub record: MachineRecord,
    pub connected: bool,
}

/// Counts for `/v1/status`, `/metrics` and the supervisor's STATUS line, refreshed after every
/// batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Admitted and heard from within `down_after`.
    pub up: usize,
    /// Admitted and silent.
    pub down: usize,
    pub pending: usize,
    pub rejected: usize,
    /// Tombstones of machines removed for good.
    pub removed: usize,
    /// Publications stored and not yet acknowledged, all machines.
    pub unacked: usize,
    /// Connections past their Join.
    pub connections: usize,
    /// False while the database cannot be opened after a failed commit.
    pub available: bool,
}

/// A close reason cut to [`REFUSAL_REASON_BYTES_MAX`] on a character boundary.
pub(crate) fn cut(mut reason: String) -> String {
    if reason.len() > REFUSAL_REASON_BYTES_MAX {
        let mut end = REFUSAL_REASON_BYTES_MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, DeployError>>;

/// The core thread's deployment commands.
pub(crate) enum DeployCmd {
    Create {
        req: NewDeployment,
        reply: Reply<u64>,
    },
    /// The bundle is sealed to `node`: publish the order.
    Sealed {
        deployment: u64,
        node: NodeId,
        order: DeployOrder,
    },
    SealFailed {
        deployment: u64,
        node: NodeId,
        reason: String,
    },
    Get {
        id: u64,
        reply: Reply<Option<DeploymentView>>,
    },
    /// `pause`, `resume` or `abort` its rollout.
    Control {
        id: u64,
        control: Control,
        reply: Reply<()>,
    },
    /// The newest `limit`, newest first.
    List {
        limit: usize,
        reply: Reply<Vec<DeploymentView>>,
    },
    /// May the machine `requester` (its connection's certificate: `fingerprint`) fetch the
    /// bundles sealed to `machine`? Itself, or its admitted load balancer.
    Authorize {
        requester: NodeId,
        fingerprint: Fingerprint,
        machine: NodeId,
        reply: oneshot::Sender<Result<(), super::deploy_view::FetchRefused>>,
    },
    /// Which of these sealed files are no longer needed.
    Sweep {
        files: Vec<(u64, NodeId)>,
        reply: oneshot::Sender<Vec<(u64, NodeId)>>,
    },
    /// Deletes the uploaded bundles no deployment needs that were uploaded longer than
    /// `keep_unused` ago (on the core thread, so that no deployment is created meanwhile);
    /// answers the ids deleted.
    SweepBundles {
        bundles: bundles::BundleStore,
        keep_unused: Duration,
        reply: oneshot::Sender<Vec<String>>,
    },
}
