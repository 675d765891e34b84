//! Messages of the cluster (controller and worker roles). Appended to [`super::Message`] after
//! the datacenter's variants, so the datacenter's golden bytes never change.
//!
//! Who sends what:
//!
//! ```text
//! worker     -> controller  Join (first frame), Notify, PublicationAck, Heartbeat
//! controller -> worker      Admission, Publication, NotifyAck, Goodbye
//! controller -> LB          Relay (a dependent's sealed publication, forwarded as is)
//! dependent  -> its LB      RelayHello (first frame); then the LB sends it Publication
//! worker     -> controller  BundleRequest (first frame of a transfer stream; answer
//!                           BundleHeader + raw bytes); a dependent asks its LB, which forwards
//! ```

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// Length of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;

/// A worker's first frame on its connection to the controller: who it is and what it offers.
/// The TLS certificate of the connection is the worker's key; everything here is bound to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    pub protocol: u16,
    pub node_id: NodeId,
    pub name: String,
    /// voice, messaging, video (`config::SERVICES`).
    pub service: String,
    /// `config::COMPONENTS`.
    pub component: String,
    /// The name of the load balancer in front of it.
    pub load_balancer: Option<String>,
    /// Where its software serves (`host:port`), listed in its load balancer's pool.
    pub service_addr: Option<String>,
    /// A load balancer: the QUIC address (`host:port`) where its dependents reach it.
    pub relay_addr: Option<String>,
    /// The age X25519 recipient (`age1...`) that publications and bundles are sealed to.
    pub seal_key: String,
    /// `keys::token_proof(token, fingerprint)` when the worker has a join token.
    pub token_proof: Option<[u8; 32]>,
    /// The last sequence of its publication channel it durably applied (0: none).
    pub resume: u64,
}

/// The controller's answer to a Join, and later news (pending -> admitted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Admission {
    /// Recorded; nothing more until an operator accepts the key.
    Pending,
    /// Admitted: the controller's Ed25519 verifying key, which signs every publication, and
    /// how often the worker must show it is alive.
    Admitted {
        controller_key: [u8; 32],
        heartbeat_ms: u64,
    },
    /// Refused; the connection closes after this.
    Rejected { reason: String },
    /// Recorded as pending, like [`Admission::Pending`], and the join token it presented was not
    /// accepted: it waits for an operator. (Appended: older variants keep their bytes.)
    PendingTokenNotAccepted,
    /// Not recorded, for now; the connection closes after this and the worker asks again later.
    /// Says only what the worker can fix or wait out, nothing about other machines.
    Refused(JoinRefusal),
}

/// Why a Join was refused without recording anything ([`Admission::Refused`]). New reasons go
/// at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRefusal {
    /// The name belongs to another machine key (admitted, or pending while this one has no
    /// valid join token).
    NameTaken,
    /// The controller records no more machines waiting for an operator.
    TooManyWaiting,
    /// The Join's node id is not the one the worker's certificate carries, or it is the
    /// controller's own.
    NodeIdNotProven,
    /// The node id belongs to another machine key.
    NodeIdTaken,
}

impl JoinRefusal {
    /// What the refused worker's status and log say.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinRefusal::NameTaken => "name taken by another key",
            JoinRefusal::TooManyWaiting => "too many machines waiting",
            JoinRefusal::NodeIdNotProven => "node id not proven by this machine's certificate",
            JoinRefusal::NodeIdTaken => "node id taken by another key",
        }
    }
}

impl std::fmt::Display for JoinRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a pending worker whose join token was not accepted shows in its status and log.
pub const TOKEN_NOT_ACCEPTED: &str = "join token not accepted: waiting for an operator";

/// One publication of a machine's channel, sealed to that machine and signed by the
/// controller over `keys::publication_digest(machine, seq, sealed)`. A relay sees only
/// `machine` and `seq`; it can neither read `sealed` nor change anything without breaking the
/// signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub machine: NodeId,
    pub seq: u64,
    /// age ciphertext of a postcard `cluster::Body`.
    pub sealed: Vec<u8>,
    /// Ed25519, [`SIGNATURE_BYTES`] long.
    pub signature: Vec<u8>,
}

/// What software a machine runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Software {
    pub service: String,
    pub bundle_id: String,
    pub version: String,
}

/// What a machine's software is doing, as its reports say. On the wire it is the word
/// ([`ReportState::as_str`]) in [`MachineReport::state`]: parsed at the boundary
/// ([`MachineReport::parsed_state`]), formatted back with [`MachineReport::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReportState {
    Idle,
    Starting,
    /// A deployment's order is received; its bundle is on the way (`fetching` and
    /// `installing` are older words for the same).
    Delivering,
    Fetching,
    Installing,
    Installed,
    Running,
    RolledBack,
    Failed,
    Stopped,
}

/// A report state this node does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownReportState(pub String);

impl ReportState {
    pub const ALL: [ReportState; 10] = [
        ReportState::Idle,
        ReportState::Starting,
        ReportState::Delivering,
        ReportState::Fetching,
        ReportState::Installing,
        ReportState::Installed,
        ReportState::Running,
        ReportState::RolledBack,
        ReportState::Failed,
        ReportState::Stopped,
    ];

    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportState::Idle => "idle",
            ReportState::Starting => "starting",
            ReportState::Delivering => "delivering",
            ReportState::Fetching => "fetching",
            ReportState::Installing => "installing",
            ReportState::Installed => "installed",
            ReportState::Running => "running",
            ReportState::RolledBack => "rolled_back",
            ReportState::Failed => "failed",
            ReportState::Stopped => "stopped",
        }
    }

    /// A deployment's final outcome: running, rolled back or failed.
    pub fn is_outcome(self) -> bool {
        matches!(
            self,
            ReportState::Running | ReportState::RolledBack | ReportState::Failed
        )
    }
}

impl std::fmt::Display for ReportState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ReportState {
    type Err = UnknownReportState;

    fn from_str(s: &str) -> Result<ReportState, UnknownReportState> {
        ReportState::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReportState(s.chars().take(64).collect()))
    }
}

/// A machine's report about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineReport {
    /// What its software is doing: a [`ReportState`]'s word (`idle`, `starting`, `running`,
    /// `rolled_back`, `failed`, ...). A string on the wire, so that the encoding never
    /// depends on this enum; parse it with [`MachineReport::parsed_state`].
    pub state: String,
    pub software: Option<Software>,
    /// Why, when not running.
    pub detail: Option<String>,
    /// The deployment this report is about, if any.
    pub deployment: Option<u64>,
}

impl MachineReport {
    pub fn new(
        state: ReportState,
        software: Option<Software>,
        detail: Option<String>,
        deployment: Option<u64>,
    ) -> MachineReport {
        MachineReport {
            state: state.as_str().to_owned(),
            software,
            detail,
            deployment,
        }
    }

    /// The state, parsed: a word this node does not know is an error, never a panic.
    pub fn parsed_state(&self) -> Result<ReportState, UnknownReportState> {
        self.state.parse()
    }

    /// Whether the report says `state` (false for a word this node does not know).
    pub fn is(&self, state: ReportState) -> bool {
        self.parsed_state() == Ok(state)
    }
}

/// A machine's notification channel: the worker numbers its reports; the controller records
/// the highest applied and acknowledges it, so a resent report is never applied twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// Must be the machine of the connection that carries it.
    pub machine: NodeId,
    pub seq: u64,
    pub report: MachineReport,
}

/// Where a machine's configuration data stands: the version it was last sent, and what
/// became of it there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReport {
    /// The configuration version this report is about.
    pub version: u64,
    /// `applied` (written, the software told and healthy), `rolled_back` (the software failed
    /// its health check after it; the previous configuration is back), `failed` (could not
    /// be written).
    pub state: String,
    /// Why, when not applied.
    pub detail: Option<String>,
}

/// A machine's configuration report, numbered on its own channel: the controller records the
/// highest applied and acknowledges it with `ConfigNotifyAck`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigNotify {
    /// Must be the machine of the connection that carries it.
    pub machine: NodeId,
    pub seq: u64,
    pub report: ConfigReport,
}

/// A dependent's first frame on its connection to its load balancer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayHello {
    pub protocol: u16,
    pub node_id: NodeId,
    pub name: String,
}

/// From the controller to a load balancer: forward this publication to dependent `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relay {
    pub to: NodeId,
    pub publication: Publication,
}

/// First frame of a bundle transfer stream (a bi stream of its own, opened by the worker on
/// its connection to the controller, or by a dependent on its connection to its load balancer,
/// which forwards it unchanged on its own connection to the controller): send the bundle of
/// `deployment` sealed to `machine`, from byte `offset`. The answer is a [`BundleHeader`] frame
/// followed by the raw sealed bytes `offset..total` and the end of the stream, or a `Goodbye`
/// frame saying why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRequest {
    pub deployment: u64,
    pub machine: NodeId,
    pub offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// Size of the whole sealed bundle.
    pub total: u64,
    /// Where the bytes that follow start.
    pub offset: u64,
}
