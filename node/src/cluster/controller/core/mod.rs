//! The controller's state machine: admission, the machine-state database, the per-machine
//! publication channels and the computation of new state. Pure: no I/O, no clock, no
//! randomness (publications are sealed by the [`Sealer`] the driver gives [`ControllerCore::open`],
//! and signed with deterministic Ed25519), no logging (what an operator should hear of is
//! returned as [`CoreEvent`]s); the runtime (`controller::run`) and the simulation
//! (`tests/sim_cluster.rs`) drive it the same way:
//!
//! 1. feed inputs with [`ControllerCore::step`] (and operator actions with `accept`/`reject`),
//! 2. [`ControllerCore::take`] the changes and the outputs,
//! 3. commit the [`Dirty`] records in one transaction,
//! 4. only then perform the outputs (a publication is durable before it is sent; a
//!    notification is recorded before it is acknowledged).
//!
//! After a crash the runtime rebuilds the core with [`ControllerCore::open`] from what was
//! committed; nothing that was only in memory matters (connections, resend timers).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::cluster::body::{
    Body, ConfigOrder, Dependent, LbEndpoint, LbRoute, Pool, PoolMember, RouterPeer,
};
use crate::cluster::controller::configdata::{self, ConfigChange, ConfigData, Scope};
use crate::cluster::keys::{self, ControllerKey, Sealer};
use crate::config;
use crate::ids::{Fingerprint, NodeId};
use crate::limits::{DEPLOYS_KEPT, REPORT_DETAIL_MAX, REPORT_TEXT_MAX};
use crate::net::close;
use crate::wire::{
    Admission, ConfigReport, Join, JoinRefusal, MachineReport, Message, Publication, Relay,
    ReportState, CLUSTER_PROTOCOL_VERSION,
};

mod checks;
mod inputs;
mod machines;
mod operator;
mod pools;

use checks::*;

/// A connection, numbered by the runtime (never reused within a run).
pub type ConnId = u64;

/// The component that load-balances for others.
pub const LOAD_BALANCER: &str = "load-balancer";
/// The component coupled with a dedicated load balancer: the one it names in
/// `load_balancer` takes its jobs (it is not one of that load balancer's backends).
pub const CALL_ROUTER: &str = "call-router";

#[derive(Clone, Debug)]
pub struct Settings {
    /// A machine silent this long is marked down and leaves its pool.
    pub down_after_ms: u64,
    /// Told to workers on admission; below `down_after_ms`.
    pub heartbeat_ms: u64,
    /// Most pending keys recorded; beyond it unknown machines are refused unrecorded.
    pub pending_max: usize,
    /// An unacknowledged publication is sent again (directly) after this long.
    pub resend_after_ms: u64,
    /// The join token, if the controller has one.
    pub join_token: Option<Vec<u8>>,
    /// The controller's own node id: never admitted as a machine.
    pub controller_node_id: Option<NodeId>,
    /// Most publications stored unacknowledged for one machine (its channel's bound). At the
    /// bound, pool and route changes for it wait (recomputed once it acknowledges, so only
    /// the newest is sent) and a deployment to it fails with the reason.
    pub channel_max: usize,
}

impl Settings {
    pub fn new(down_after_ms: u64) -> Settings {
        Settings {
            down_after_ms,
            heartbeat_ms: (down_after_ms / 4).max(50),
            pending_max: crate::limits::PENDING_MAX_DEFAULT,
            resend_after_ms: 1000,
            join_token: None,
            controller_node_id: None,
            channel_max: crate::limits::CHANNEL_MAX_DEFAULT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyStatus {
    Pending,
    Admitted,
    Rejected,
    /// `outpost machines remove`: gone for good. Only a tombstone stays (id, name,
    /// fingerprint) so that the key stays refused; `keys accept` does not take it back.
    /// (Postcard: variants only ever added at the end.)
    Removed,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Pending => "pending",
            KeyStatus::Admitted => "admitted",
            KeyStatus::Rejected => "rejected",
            KeyStatus::Removed => "removed",
        }
    }
}

/// One machine as the controller knows it: its key and admission, what it is, whether it is
/// up, what it last reported, and where its channels stand. Persisted whole (postcard) in the
/// controller's `machines` table, keyed by node id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub node_id: NodeId,
    pub name: String,
    pub fingerprint: Fingerprint,
    /// age recipient publications are sealed to.
    pub seal_key: String,
    pub key_status: KeyStatus,
    pub service: String,
    pub component: String,
    pub load_balancer: Option<String>,
    pub service_addr: Option<String>,
    pub relay_addr: Option<String>,
    /// Alive: heard from within `down_after`.
    pub up: bool,
    pub report: Option<MachineReport>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Highest notification sequence applied.
    pub notify_seq: u64,
    /// Highest publication sequence assigned (0: none yet).
    pub pub_seq: u64,
    /// Highest publication sequence the machine acknowledged.
    pub pub_acked: u64,
    /// A load balancer: the pool last published to it.
    pub pool: Option<Pool>,
    /// A dependent: the route last published to it, and that publication's sequence (its
    /// publications go through the load balancer only once it has applied the route).
    pub route: Option<LbRoute>,
    pub route_seq: u64,
    /// The latest deployments sent to it (at most [`DEPLOYS_KEPT`]), oldest first.
    pub deploys: Vec<DeployState>,
    /// Its configuration data. Not in the record's postcard encoding: the store appends it
    /// after the record (see [`MachineRecord::encode`]), so records written before it existed
    /// still decode.
    #[serde(skip)]
    pub config: MachineConfig,
    /// A call router's or a load balancer's coupling, and whether it is drained; stored after
    /// `config`, like it.
    #[serde(skip)]
    pub balancing: Balancing,
}

/// Where a machine stands with load balancing: what a call router or a load balancer was last
/// published about its coupling (so that it is published again only when that changes;
/// `None`: never published), and whether a rollout took it out of its pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balancing {
    /// A call router: its load balancer (`Some(None)`: it was told it has none).
    pub endpoint: Option<Option<LbEndpoint>>,
    /// A load balancer: the call router it serves.
    pub router: Option<Option<RouterPeer>>,
    /// Drained by this deployment's rollout: out of its pool until the rollout lets it back.
    pub draining: Option<u64>,
}

/// Where a machine's configuration data stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// The version last published to it (0: none) and the blake3 of that document.
    pub version: u64,
    pub digest: [u8; 32],
    /// The publication that carried it.
    pub seq: u64,
    /// The newest version it reported applied (0: none).
    pub applied: u64,
    /// `pending` (published), `applying` (received), then what it reported: `applied`,
    /// `rolled_back`, `failed`. Empty: never sent any.
    pub state: String,
    pub detail: Option<String>,
    /// Highest configuration report applied.
    pub notify_seq: u64,
}

impl MachineRecord {
    /// The stored bytes: the record, then its [`MachineConfig`], then its [`Balancing`] (all
    /// postcard).
    pub fn encode(&self) -> Vec<u8> {
        crate::wire::encode_with_tail(self, &(&self.config, &self.balancing))
    }

    /// From [`MachineRecord::encode`]'s bytes, or a record stored before configuration data
    /// or load balancing existed (nothing, or only the configuration, after it).
    pub fn decode(bytes: &[u8]) -> Result<MachineRecord, postcard::Error> {
        let (mut rec, config, balancing) =
            crate::wire::decode_with_tail2::<MachineRecord, _, _>(bytes)?;
        rec.config = config;
        rec.balancing = balancing;
        Ok(rec)
    }

    pub fn is_call_router(&self) -> bool {
        self.component == CALL_ROUTER
    }
}

/// Where one deployment stands on one machine: `pending` (published, not yet received),
/// `delivering` (the order is received; the bundle is being fetched), then what the machine
/// reports: `installed`, `running`, `rolled_back`, `failed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployState {
    pub deployment: u64,
    pub seq: u64,
    pub state: DeployPhase,
    pub detail: Option<String>,
}

/// Where a deployment stands on a machine: `pending` (the controller's own word), or what
/// the machine reported. Stored as its word (the same bytes as when this was a string), so
/// records written before it decode unchanged. New reports with a word this node does not
/// know are refused at the wire boundary; such a word stored by an older controller (which
/// took any) reads as `delivering`, which is how it always counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum DeployPhase {
    Pending,
    Reported(ReportState),
}

impl DeployPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            DeployPhase::Pending => "pending",
            DeployPhase::Reported(r) => r.as_str(),
        }
    }
}

impl From<DeployPhase> for String {
    fn from(p: DeployPhase) -> String {
        p.as_str().to_owned()
    }
}

impl From<String> for DeployPhase {
    fn from(s: String) -> DeployPhase {
        match s.as_str() {
            "pending" => DeployPhase::Pending,
            other => DeployPhase::Reported(other.parse().unwrap_or(ReportState::Delivering)),
        }
    }
}

impl MachineRecord {
    pub fn is_load_balancer(&self) -> bool {
        self.component == LOAD_BALANCER
    }
}

/// What to commit, in one transaction, before performing the outputs.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Records to write whole.
    pub machines: Vec<MachineRecord>,
    /// Publications to store (key: machine, seq).
    pub publications: Vec<Publication>,
    /// Publications to delete: every seq <= upto of the machine.
    pub acked: Vec<(NodeId, u64)>,
    /// Records to delete (pending keys that gave way to a key with the join token). Applied
    /// after `machines`.
    pub removed: Vec<NodeId>,
    /// Configuration changes to store (each scope keeps its newest `configdata::HISTORY_KEPT`).
    pub config: Vec<ConfigChange>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.machines.is_empty()
            && self.publications.is_empty()
            && self.acked.is_empty()
            && self.removed.is_empty()
            && self.config.is_empty()
    }
}

/// Who the TLS handshake proved a connection's machine to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// blake3 of its certificate.
    pub fingerprint: Fingerprint,
    /// The node id its certificate carries (`net::cert_id::node_id_of_cert`); `None`: none.
    pub node_id: Option<NodeId>,
}

impl Peer {
    /// A certificate `fingerprint` that carries `node_id`.
    pub fn new(fingerprint: Fingerprint, node_id: NodeId) -> Peer {
        Peer {
            fingerprint,
            node_id: Some(node_id),
        }
    }
}

// Outputs live only between `take` and their delivery; boxing the message would cost an
// allocation per frame for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send {
        conn: ConnId,
        msg: Message,
    },
    /// Close the connection with a `net::close` code and a reason for the other side's log.
    Close {
        conn: ConnId,
        code: u32,
        reason: String,
    },
}

/// What the core did that an operator should hear of. The core performs no logging: the
/// driver takes these ([`ControllerCore::take_events`]) and logs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreEvent {
    /// At open: a stored machine record carried the controller's own node id; it is removed.
    OwnNodeIdRemoved { name: String },
    /// A pending key gave way to a key with the join token.
    PendingGaveWay {
        name: String,
        node: NodeId,
        fingerprint: Fingerprint,
        why: JoinRefusal,
    },
    /// A machine applied more of its channel than this controller remembers publishing (a
    /// database restored from an older backup): the channel moved forward to `resume`.
    ChannelMovedForward {
        machine: NodeId,
        resume: u64,
        published: u64,
    },
    /// A machine's channel reached its bound (once per episode).
    ChannelFull {
        name: String,
        node: NodeId,
        unacknowledged: usize,
    },
    /// A machine's channel has room again.
    ChannelHasRoom { name: String },
    /// A publication could not be sealed to a stored machine's key.
    SealFailed { machine: NodeId, error: String },
}

/// An operator action that could not be done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyActionError {
    #[error("no machine key {0:?} (use the id or the name shown by `outpost keys list`)")]
    NotFound(String),
    #[error("{0:?} matches more than one key; use the full id")]
    Ambiguous(String),
    #[error(
        "machine {0:?} was removed from the cluster for good; to bring it back, give it a new \
         key (`outpost init` on a fresh data directory) and admit that"
    )]
    Removed(String),
}

/// Why [`ControllerCore::publish`] stored nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotPublished {
    #[error("the machine is not known")]
    Unknown,
    #[error("the machine's key is {0}")]
    NotAdmitted(&'static str),
    #[error(
        "the machine's publication channel is full ({0} unacknowledged publications): it is \
         not applying what it is sent"
    )]
    ChannelFull(usize),
    #[error("cannot seal a publication to it: {0}")]
    Seal(String),
}

/// Why a configuration change was not made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} has no configuration document")]
    NoDocument(String),
}

/// What [`ControllerCore::set_config`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSet {
    pub change: ConfigChange,
    /// Machines sent a new effective configuration, by name.
    pub published: Vec<String>,
    /// Machines whose new configuration waits (their channel is full), with the reason.
    pub waiting: Vec<(String, String)>,
}

/// Why a frame from a machine was refused (the connection is closed, nothing is stored).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{0}")]
    Protocol(String),
}

pub struct ControllerCore {
    settings: Settings,
    key: ControllerKey,
    /// Seals publications (the only randomness a publication needs; given by the driver).
    sealer: Box<dyn Sealer>,
    machines: BTreeMap<NodeId, MachineRecord>,
    /// Stored, unacknowledged publications by machine and seq.
    unacked: BTreeMap<NodeId, BTreeMap<u64, Publication>>,
    /// Live connections (in memory only).
    conns: BTreeMap<ConnId, Conn>,
    by_node: BTreeMap<NodeId, ConnId>,
    /// When each unacknowledged publication was last sent (in memory only).
    sent_at: BTreeMap<(NodeId, u64), u64>,
    dirty_machines: BTreeSet<NodeId>,
    dirty: Dirty,
    out: Vec<Output>,
    events: Vec<CoreEvent>,
    /// Machines whose channel reached its bound (in memory only: logged once per episode).
    full: BTreeSet<NodeId>,
    /// The current configuration documents.
    configs: ConfigData,
}

#[derive(Debug, Clone)]
struct Conn {
    node: NodeId,
    admitted: bool,
}

impl ControllerCore {
    /// Rebuilds the core from what was committed. Every machine that was up gets a fresh
    /// `down_after` from `now_ms` before it can be marked down (the controller was away, not
    /// the machines). `sealer` seals every publication (production: [`keys::AgeSealer`]).
    pub fn open(
        settings: Settings,
        key: ControllerKey,
        sealer: Box<dyn Sealer>,
        machines: Vec<MachineRecord>,
        publications: Vec<Publication>,
        now_ms: u64,
    ) -> ControllerCore {
        let mut map = BTreeMap::new();
        let mut dirty = Dirty::default();
        let mut events = Vec::new();
        for mut m in machines {
            if Some(m.node_id) == settings.controller_node_id {
                // Recorded before the controller refused its own id; never a machine.
                events.push(CoreEvent::OwnNodeIdRemoved { name: m.name });
                dirty.removed.push(m.node_id);
                continue;
            }
            if m.up {
                m.last_seen_ms = m.last_seen_ms.max(now_ms);
            }
            map.insert(m.node_id, m);
        }
        let mut unacked: BTreeMap<NodeId, BTreeMap<u64, Publication>> = BTreeMap::new();
        for p in publications {
            let Some(m) = map.get(&p.machine) else {
                continue;
            };
            if p.seq > m.pub_acked && p.seq <= m.pub_seq {
                unacked.entry(p.machine).or_default().insert(p.seq, p);
            }
        }
        ControllerCore {
            settings,
            key,
            sealer,
            machines: map,
            unacked,
            conns: BTreeMap::new(),
            by_node: BTreeMap::new(),
            sent_at: BTreeMap::new(),
            dirty_machines: BTreeSet::new(),
            dirty,
            out: Vec::new(),
            events,
            full: BTreeSet::new(),
            configs: ConfigData::default(),
        }
    }

    /// The configuration documents, from the newest stored change of each scope (call it
    /// right after [`ControllerCore::open`]).
    pub fn with_config(mut self, newest: Vec<ConfigChange>) -> ControllerCore {
        self.configs = ConfigData::open(newest);
        self
    }

    /// What changed since the last call (commit it), and what to send (after the commit).
    pub fn take(&mut self) -> (Dirty, Vec<Output>) {
        let mut dirty = std::mem::take(&mut self.dirty);
        // A record dropped and created again (a squatter's node id, now the real machine's)
        // is written, not deleted.
        dirty.removed.retain(|id| !self.machines.contains_key(id));
        for id in std::mem::take(&mut self.dirty_machines) {
            if let Some(m) = self.machines.get(&id) {
                dirty.machines.push(m.clone());
            }
        }
        (dirty, std::mem::take(&mut self.out))
    }

    /// What happened since last asked, for the driver to log.
    pub fn take_events(&mut self) -> Vec<CoreEvent> {
        std::mem::take(&mut self.events)
    }

    pub fn machines(&self) -> impl Iterator<Item = &MachineRecord> {
        self.machines.values()
    }

    pub fn machine(&self, node: NodeId) -> Option<&MachineRecord> {
        self.machines.get(&node)
    }

    /// The machine named `name` (a removed machine's tombstone only when no other key has
    /// the name).
    pub fn machine_by_name(&self, name: &str) -> Option<&MachineRecord> {
        self.machines
            .values()
            .filter(|m| m.name == name)
            .min_by_key(|m| m.key_status == KeyStatus::Removed)
    }

    /// Fingerprints of rejected keys: the handshake refuses them.
    pub fn rejected_fingerprints(&self) -> Vec<Fingerprint> {
        self.machines
            .values()
            .filter(|m| matches!(m.key_status, KeyStatus::Rejected | KeyStatus::Removed))
            .map(|m| m.fingerprint)
            .collect()
    }

    /// Publications stored and not yet acknowledged, all machines.
    pub fn unacked_len(&self) -> usize {
        self.unacked.values().map(|c| c.len()).sum()
    }

    pub fn connected(&self, node: NodeId) -> bool {
        self.by_node.contains_key(&node)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public()
    }

    // ---- private ----
}
