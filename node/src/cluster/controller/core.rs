//! The controller's state machine: admission, the machine-state database, the per-machine
//! publication channels and the computation of new state. Pure: no I/O, no clock, no
//! randomness except the sealing inside [`ControllerKey::publication`]; the runtime
//! (`controller::run`) and the simulation (`tests/sim_cluster.rs`) drive it the same way:
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
use crate::cluster::keys::{self, ControllerKey};
use crate::config;
use crate::ids::{Fingerprint, NodeId};
use crate::limits::{DEPLOYS_KEPT, REPORT_DETAIL_MAX, REPORT_TEXT_MAX};
use crate::net::close;
use crate::wire::{
    Admission, ConfigReport, Join, JoinRefusal, MachineReport, Message, Publication, Relay,
    CLUSTER_PROTOCOL_VERSION,
};

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
    pub state: String,
    pub detail: Option<String>,
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
    /// the machines).
    pub fn open(
        settings: Settings,
        key: ControllerKey,
        machines: Vec<MachineRecord>,
        publications: Vec<Publication>,
        now_ms: u64,
    ) -> ControllerCore {
        let mut map = BTreeMap::new();
        let mut dirty = Dirty::default();
        for mut m in machines {
            if Some(m.node_id) == settings.controller_node_id {
                // Recorded before the controller refused its own id; never a machine.
                tracing::warn!(
                    name = %m.name,
                    "removing a machine record that carries the controller's own node id"
                );
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
            machines: map,
            unacked,
            conns: BTreeMap::new(),
            by_node: BTreeMap::new(),
            sent_at: BTreeMap::new(),
            dirty_machines: BTreeSet::new(),
            dirty,
            out: Vec::new(),
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

    /// A worker completed the handshake (its certificate proved `peer`) and sent its Join.
    /// Admits it (join token), records it as pending, or refuses it (and tells it why, in an
    /// [`Admission::Refused`] before the close); an admitted machine is sent its Admission and
    /// every publication above `join.resume`.
    ///
    /// A pending key never blocks a key with a valid join token: a pending record holding the
    /// name or the node id of a Join with the token is dropped (its connection told and
    /// closed), and the pending table's bound does not apply to it.
    pub fn joined(&mut self, conn: ConnId, peer: Peer, join: Join, now_ms: u64) {
        if self.conns.contains_key(&conn) {
            return self.close(conn, close::PROTOCOL, "a second Join on one connection");
        }
        if let Err(reason) = check_join(&join) {
            return self.close(conn, close::PROTOCOL, &format!("bad Join: {reason}"));
        }
        let node = join.node_id;
        let fingerprint = peer.fingerprint;
        if peer.node_id != Some(node) {
            return self.refuse_join(
                conn,
                JoinRefusal::NodeIdNotProven,
                &format!("the Join says node id {node}, its certificate does not"),
            );
        }
        if self.settings.controller_node_id == Some(node) {
            return self.refuse_join(
                conn,
                JoinRefusal::NodeIdNotProven,
                "the Join carries the controller's own node id",
            );
        }
        let token_ok = match (&self.settings.join_token, &join.token_proof) {
            (Some(token), Some(proof)) => keys::token_proof_matches(token, &fingerprint, proof),
            _ => false,
        };
        // Pending keys that give way if this Join carries the token.
        let mut squatters = Vec::new();
        match self.machines.get(&node) {
            Some(m) if m.fingerprint != fingerprint => {
                if !(token_ok && m.key_status == KeyStatus::Pending) {
                    return self.refuse_join(
                        conn,
                        JoinRefusal::NodeIdTaken,
                        &format!("node id {node} belongs to another key"),
                    );
                }
                squatters.push((node, JoinRefusal::NodeIdTaken));
            }
            Some(m) if m.key_status == KeyStatus::Rejected => {
                self.send(
                    conn,
                    Message::Admission(Admission::Rejected {
                        reason: "this machine's key was rejected".into(),
                    }),
                );
                return self.close(conn, close::UNKNOWN_PEER, "key rejected");
            }
            Some(m) if m.key_status == KeyStatus::Removed => {
                self.send(
                    conn,
                    Message::Admission(Admission::Rejected {
                        reason: "this machine was removed from the cluster".into(),
                    }),
                );
                return self.close(conn, close::UNKNOWN_PEER, "key removed");
            }
            _ => {}
        }
        for m in self.machines.values() {
            if m.node_id == node
                || m.name != join.name
                || matches!(m.key_status, KeyStatus::Rejected | KeyStatus::Removed)
            {
                continue;
            }
            if m.key_status == KeyStatus::Admitted || !token_ok {
                return self.refuse_join(
                    conn,
                    JoinRefusal::NameTaken,
                    &format!("the name {:?} belongs to another machine key", join.name),
                );
            }
            squatters.push((m.node_id, JoinRefusal::NameTaken));
        }
        for (squatter, why) in squatters {
            self.drop_pending(squatter, why);
        }
        // A previous connection of the same machine is replaced by this one.
        if let Some(old) = self.by_node.insert(node, conn) {
            self.conns.remove(&old);
            self.close(old, close::DUPLICATE, "replaced by a newer connection");
        }
        self.conns.insert(
            conn,
            Conn {
                node,
                admitted: false,
            },
        );
        let existing = self.machines.get(&node).map(|m| m.key_status);
        match existing {
            None => {
                let pending = self
                    .machines
                    .values()
                    .filter(|m| m.key_status == KeyStatus::Pending)
                    .count();
                if !token_ok && pending >= self.settings.pending_max {
                    self.conns.remove(&conn);
                    self.by_node.remove(&node);
                    return self.refuse_join(
                        conn,
                        JoinRefusal::TooManyWaiting,
                        &format!("{pending} machines wait for an operator already"),
                    );
                }
                let rec = MachineRecord {
                    node_id: node,
                    name: join.name.clone(),
                    fingerprint,
                    seal_key: join.seal_key.clone(),
                    key_status: KeyStatus::Pending,
                    service: join.service.clone(),
                    component: join.component.clone(),
                    load_balancer: join.load_balancer.clone(),
                    service_addr: join.service_addr.clone(),
                    relay_addr: join.relay_addr.clone(),
                    up: false,
                    report: None,
                    first_seen_ms: now_ms,
                    last_seen_ms: now_ms,
                    notify_seq: 0,
                    pub_seq: 0,
                    pub_acked: 0,
                    pool: None,
                    route: None,
                    route_seq: 0,
                    deploys: Vec::new(),
                    config: MachineConfig::default(),
                    balancing: Balancing::default(),
                };
                self.machines.insert(node, rec);
                self.dirty_machines.insert(node);
            }
            Some(_) => {
                let m = self.machines.get_mut(&node).expect("exists");
                let changed = m.name != join.name
                    || m.seal_key != join.seal_key
                    || m.service != join.service
                    || m.component != join.component
                    || m.load_balancer != join.load_balancer
                    || m.service_addr != join.service_addr
                    || m.relay_addr != join.relay_addr;
                let old_lb = m.load_balancer.clone();
                if changed {
                    m.name = join.name.clone();
                    m.seal_key = join.seal_key.clone();
                    m.service = join.service.clone();
                    m.component = join.component.clone();
                    m.load_balancer = join.load_balancer.clone();
                    m.service_addr = join.service_addr.clone();
                    m.relay_addr = join.relay_addr.clone();
                    self.dirty_machines.insert(node);
                }
                m.last_seen_ms = now_ms;
                if m.key_status == KeyStatus::Admitted && changed {
                    if let Some(lb) = old_lb {
                        self.recompute_pool(&lb, now_ms);
                    }
                }
            }
        }
        let status = self.machines[&node].key_status;
        match status {
            KeyStatus::Admitted => self.admitted(node, join.resume, now_ms),
            KeyStatus::Pending if token_ok => self.admit(node, join.resume, now_ms),
            // A proof that does not match (a wrong token, or none configured here) is no proof;
            // the machine is told, so that its operator can fix the token.
            _ if join.token_proof.is_some() => {
                self.send(conn, Message::Admission(Admission::PendingTokenNotAccepted))
            }
            _ => self.send(conn, Message::Admission(Admission::Pending)),
        }
    }

    /// A frame after the Join on connection `conn`. A frame the machine may not send closes
    /// the connection and changes nothing.
    pub fn frame(&mut self, conn: ConnId, msg: Message, now_ms: u64) {
        let Some(c) = self.conns.get(&conn).cloned() else {
            return;
        };
        if !c.admitted {
            return match msg {
                Message::Heartbeat => {}
                other => self.refuse(
                    conn,
                    &format!("{} from a machine that is not admitted", other.kind()),
                ),
            };
        }
        let node = c.node;
        self.seen(node, now_ms);
        match msg {
            Message::Heartbeat => {}
            Message::PublicationAck { upto } => {
                let m = &self.machines[&node];
                if upto > m.pub_seq {
                    return self.refuse(
                        conn,
                        &format!(
                            "acknowledges publication {upto}, only {} were sent",
                            m.pub_seq
                        ),
                    );
                }
                self.acked(node, upto, now_ms);
            }
            Message::Notify(n) => {
                if n.machine != node {
                    return self.refuse(
                        conn,
                        &format!("a notification for machine {} on {node}'s key", n.machine),
                    );
                }
                if let Err(reason) = check_report(&n.report) {
                    return self.refuse(conn, &format!("bad report: {reason}"));
                }
                let m = self.machines.get_mut(&node).expect("admitted machine");
                if n.seq > m.notify_seq {
                    let was_member = is_member(m);
                    if let Some(d) = n.report.deployment {
                        if let Some(ds) = m.deploys.iter_mut().find(|x| x.deployment == d) {
                            ds.state = n.report.state.clone();
                            ds.detail = n.report.detail.clone();
                        }
                    }
                    m.notify_seq = n.seq;
                    m.report = Some(n.report);
                    self.dirty_machines.insert(node);
                    if was_member != is_member(m) {
                        if let Some(lb) = m.load_balancer.clone() {
                            self.recompute_pool(&lb, now_ms);
                        }
                    }
                }
                let upto = self.machines[&node].notify_seq;
                self.send(conn, Message::NotifyAck { upto });
            }
            Message::ConfigNotify(n) => {
                if n.machine != node {
                    return self.refuse(
                        conn,
                        &format!(
                            "a configuration report for machine {} on {node}'s key",
                            n.machine
                        ),
                    );
                }
                if let Err(reason) = check_config_report(&n.report) {
                    return self.refuse(conn, &format!("bad configuration report: {reason}"));
                }
                let sent = self.machines[&node].config.version;
                if n.report.version > sent {
                    return self.refuse(
                        conn,
                        &format!(
                            "reports configuration version {}, only {sent} was sent",
                            n.report.version
                        ),
                    );
                }
                let m = self.machines.get_mut(&node).expect("admitted machine");
                if n.seq > m.config.notify_seq {
                    let r = n.report;
                    if r.state == "applied" {
                        m.config.applied = m.config.applied.max(r.version);
                    }
                    if r.version == m.config.version {
                        m.config.state = r.state;
                        m.config.detail = r.detail;
                    }
                    m.config.notify_seq = n.seq;
                    self.dirty_machines.insert(node);
                }
                let upto = self.machines[&node].config.notify_seq;
                self.send(conn, Message::ConfigNotifyAck { upto });
            }
            other => self.refuse(conn, &format!("unexpected {} from a worker", other.kind())),
        }
    }

    /// The connection is gone (the machine is marked down only after `down_after`).
    pub fn closed(&mut self, conn: ConnId, now_ms: u64) {
        let _ = now_ms;
        if let Some(c) = self.conns.remove(&conn) {
            if self.by_node.get(&c.node) == Some(&conn) {
                self.by_node.remove(&c.node);
            }
        }
    }

    /// Marks silent machines down (and recomputes their pools) and resends publications left
    /// unacknowledged for `resend_after`. Call it every few hundred milliseconds.
    pub fn tick(&mut self, now_ms: u64) {
        let down_after = self.settings.down_after_ms;
        let silent: Vec<NodeId> = self
            .machines
            .values()
            .filter(|m| {
                m.key_status == KeyStatus::Admitted
                    && m.up
                    && now_ms.saturating_sub(m.last_seen_ms) > down_after
            })
            .map(|m| m.node_id)
            .collect();
        for node in silent {
            self.set_up(node, false, now_ms);
        }
        let resend_after = self.settings.resend_after_ms;
        let mut due = Vec::new();
        for (node, chan) in &self.unacked {
            if !self.by_node.contains_key(node) {
                continue;
            }
            for seq in chan.keys() {
                let last = self.sent_at.get(&(*node, *seq)).copied();
                if last.is_none_or(|t| now_ms.saturating_sub(t) >= resend_after) {
                    due.push((*node, *seq));
                }
            }
        }
        for (node, seq) in due {
            self.send_publication(node, seq, true, now_ms);
        }
    }

    /// `outpost keys accept`: a pending (or rejected) key becomes admitted; a connected
    /// machine is told at once. `key` is a node id (or a unique prefix of at least 8 hex
    /// characters) or a machine name.
    pub fn accept(&mut self, key: &str, now_ms: u64) -> Result<NodeId, KeyActionError> {
        let node = self.resolve(key)?;
        let m = &self.machines[&node];
        if m.key_status == KeyStatus::Removed {
            return Err(KeyActionError::Removed(m.name.clone()));
        }
        if m.key_status != KeyStatus::Admitted {
            let resume = self.machines[&node].pub_acked;
            self.admit(node, resume, now_ms);
        }
        Ok(node)
    }

    /// `outpost keys reject`: the key is refused from now on, its connection closed, and it
    /// leaves any pool.
    pub fn reject(&mut self, key: &str, now_ms: u64) -> Result<NodeId, KeyActionError> {
        let node = self.resolve(key)?;
        let m = self.machines.get_mut(&node).expect("resolved");
        if matches!(m.key_status, KeyStatus::Rejected | KeyStatus::Removed) {
            return Ok(node);
        }
        let was = m.key_status;
        m.key_status = KeyStatus::Rejected;
        m.up = false;
        let lb = m.load_balancer.clone();
        let is_lb = m.is_load_balancer();
        let name = m.name.clone();
        self.dirty_machines.insert(node);
        // Its channel stays as it is: nothing is sent to a rejected key, and if an operator
        // accepts it again it resumes where it stopped.
        self.sent_at.retain(|(n, _), _| *n != node);
        if let Some(conn) = self.by_node.remove(&node) {
            self.conns.remove(&conn);
            self.send(
                conn,
                Message::Admission(Admission::Rejected {
                    reason: "rejected by an operator".into(),
                }),
            );
            self.close(conn, close::UNKNOWN_PEER, "key rejected");
        }
        if was == KeyStatus::Admitted {
            if let Some(lb) = lb {
                self.recompute_pool(&lb, now_ms);
            }
            if is_lb {
                self.reroute_dependents(&name, now_ms);
                self.recouple(&name, now_ms);
            }
        }
        Ok(node)
    }

    /// `outpost machines remove`: the machine leaves the cluster for good. Its key is refused
    /// from then on (in the handshake like a rejected key, and `keys accept` does not take it
    /// back), its channel is dropped (every stored publication deleted), what it reported and
    /// what was published to it are forgotten, it leaves its load balancer's pool, and a load
    /// balancer's dependents are told they have none. A tombstone stays (node id, name,
    /// fingerprint): the name is free for another key.
    pub fn remove(&mut self, key: &str, now_ms: u64) -> Result<NodeId, KeyActionError> {
        let node = self.resolve(key)?;
        let m = self.machines.get_mut(&node).expect("resolved");
        if m.key_status == KeyStatus::Removed {
            return Ok(node);
        }
        let was = m.key_status;
        let lb = m.load_balancer.take();
        let is_lb = m.is_load_balancer();
        let name = m.name.clone();
        m.key_status = KeyStatus::Removed;
        m.up = false;
        m.report = None;
        m.pool = None;
        m.route = None;
        m.route_seq = 0;
        m.deploys.clear();
        m.config = MachineConfig::default();
        m.balancing = Balancing::default();
        m.service_addr = None;
        m.relay_addr = None;
        if m.pub_seq > m.pub_acked {
            self.dirty.acked.push((node, m.pub_seq));
        }
        m.pub_acked = m.pub_seq;
        self.dirty_machines.insert(node);
        self.unacked.remove(&node);
        self.sent_at.retain(|(n, _), _| *n != node);
        self.full.remove(&node);
        if let Some(conn) = self.by_node.remove(&node) {
            self.conns.remove(&conn);
            self.send(
                conn,
                Message::Admission(Admission::Rejected {
                    reason: "removed from the cluster by an operator".into(),
                }),
            );
            self.close(conn, close::UNKNOWN_PEER, "key removed");
        }
        if was == KeyStatus::Admitted {
            if let Some(lb) = lb {
                self.recompute_pool(&lb, now_ms);
            }
            if is_lb {
                self.reroute_dependents(&name, now_ms);
                self.recouple(&name, now_ms);
            }
        }
        Ok(node)
    }

    /// Publishes `body` to `machine`: stored in its channel with the next sequence and sent
    /// (through its load balancer when that is up and connected, else directly). Many calls
    /// between two `take`s commit together. Returns the publication's sequence, or why
    /// nothing was stored (a channel at its bound among them).
    pub fn publish(
        &mut self,
        machine: NodeId,
        body: &Body,
        now_ms: u64,
    ) -> Result<u64, NotPublished> {
        let m = self.machines.get(&machine).ok_or(NotPublished::Unknown)?;
        if m.key_status != KeyStatus::Admitted {
            return Err(NotPublished::NotAdmitted(m.key_status.as_str()));
        }
        let held = self.unacked.get(&machine).map_or(0, |c| c.len());
        if held >= self.settings.channel_max {
            if self.full.insert(machine) {
                tracing::warn!(
                    name = %m.name,
                    node_id = %machine,
                    unacknowledged = held,
                    "a machine's publication channel is at its bound: its pool and route \
                     changes wait until it acknowledges, deployments to it fail"
                );
            }
            return Err(NotPublished::ChannelFull(held));
        }
        let seq = m.pub_seq + 1;
        let p = self
            .key
            .publication(machine, seq, &m.seal_key, &body.encode())
            .map_err(|e| {
                // The seal key was checked at Join; this cannot happen with a stored record.
                tracing::error!(machine = %machine, "cannot seal a publication: {e}");
                NotPublished::Seal(e.to_string())
            })?;
        let m = self.machines.get_mut(&machine).expect("exists");
        m.pub_seq = seq;
        match body {
            Body::LoadBalancer(route) => {
                m.route = route.clone();
                m.route_seq = seq;
            }
            Body::Deploy(order) => {
                m.deploys.push(DeployState {
                    deployment: order.deployment,
                    seq,
                    state: "pending".into(),
                    detail: None,
                });
                if m.deploys.len() > DEPLOYS_KEPT {
                    m.deploys.remove(0);
                }
            }
            // What a load balancer was last sent is its pool (`recompute_pool` compares with
            // it); a pool sent to anyone else changes nothing here.
            Body::Pool(pool) if m.is_load_balancer() => m.pool = Some(pool.clone()),
            Body::Pool(_) => {}
            Body::Coupled(endpoint) => m.balancing.endpoint = Some(endpoint.clone()),
            Body::Router(router) => m.balancing.router = Some(router.clone()),
            Body::Config(order) => {
                m.config.version = order.version;
                m.config.digest = *blake3::hash(order.doc.as_bytes()).as_bytes();
                m.config.seq = seq;
                m.config.state = "pending".into();
                m.config.detail = None;
            }
        }
        self.dirty_machines.insert(machine);
        self.dirty.publications.push(p.clone());
        self.unacked.entry(machine).or_default().insert(seq, p);
        self.send_publication(machine, seq, false, now_ms);
        Ok(seq)
    }

    /// `PUT /v1/config/SCOPE` (`Some(doc)`) or `DELETE` (`None`): records the change under
    /// the next version and publishes their new effective configuration to every admitted
    /// machine whose effective configuration changed (and to no other). A machine whose
    /// channel is at its bound gets it once it acknowledges. Deleting a scope that has no
    /// document changes nothing.
    pub fn set_config(
        &mut self,
        scope: &Scope,
        doc: Option<serde_json::Value>,
        note: Option<String>,
        now_ms: u64,
    ) -> Result<ConfigSet, ConfigError> {
        if doc.is_none() && self.configs.get(scope).is_none() {
            return Err(ConfigError::NoDocument(scope.key()));
        }
        let change = self.configs.change(scope, doc, note, now_ms);
        self.dirty.config.push(change.clone());
        let covered: Vec<NodeId> = self
            .machines
            .values()
            .filter(|m| {
                m.key_status == KeyStatus::Admitted
                    && scope.covers(&m.service, &m.component, &m.name)
            })
            .map(|m| m.node_id)
            .collect();
        let mut set = ConfigSet {
            change,
            published: Vec::new(),
            waiting: Vec::new(),
        };
        for node in covered {
            let name = self.machines[&node].name.clone();
            match self.update_config(node, now_ms) {
                Ok(true) => set.published.push(name),
                Ok(false) => {}
                Err(e) => set.waiting.push((name, e.to_string())),
            }
        }
        set.published.sort();
        set.waiting.sort();
        Ok(set)
    }

    /// The current document of `scope` and its version.
    pub fn config(&self, scope: &Scope) -> Option<(u64, &serde_json::Value)> {
        self.configs.get(scope)
    }

    /// The machine's effective configuration as it would be published now.
    pub fn effective_config(&self, node: NodeId) -> Option<serde_json::Value> {
        let m = self.machines.get(&node)?;
        self.configs.effective(&m.service, &m.component, &m.name)
    }

    /// The highest configuration version handed out (0: none).
    pub fn config_version(&self) -> u64 {
        self.configs.last_version()
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

    fn send(&mut self, conn: ConnId, msg: Message) {
        self.out.push(Output::Send { conn, msg });
    }

    fn close(&mut self, conn: ConnId, code: u32, reason: &str) {
        self.out.push(Output::Close {
            conn,
            code,
            reason: reason.to_owned(),
        });
    }

    /// A Join refused before anything is recorded: the worker is told `why` (only that), and
    /// the connection is closed with `why` and `detail` (which repeats only what the Join said).
    fn refuse_join(&mut self, conn: ConnId, why: JoinRefusal, detail: &str) {
        self.send(conn, Message::Admission(Admission::Refused(why)));
        self.close(conn, close::UNKNOWN_PEER, &format!("{why}: {detail}"));
    }

    /// A pending key gives way to a key with the join token: its record is deleted and its
    /// connection, if any, told `why` and closed. It was never admitted, so nothing was
    /// published to it and it is in no pool.
    fn drop_pending(&mut self, node: NodeId, why: JoinRefusal) {
        let Some(m) = self.machines.remove(&node) else {
            return;
        };
        debug_assert_eq!(m.key_status, KeyStatus::Pending);
        tracing::info!(
            name = %m.name,
            node_id = %node,
            fingerprint = %m.fingerprint,
            "a pending key gives way to a key with the join token ({why})"
        );
        self.dirty_machines.remove(&node);
        self.dirty.removed.push(node);
        self.unacked.remove(&node);
        self.sent_at.retain(|(n, _), _| *n != node);
        if let Some(conn) = self.by_node.remove(&node) {
            self.conns.remove(&conn);
            self.refuse_join(conn, why, "a machine with the join token took its place");
        }
    }

    /// A frame the machine may not send: its connection is closed, nothing is stored.
    fn refuse(&mut self, conn: ConnId, reason: &str) {
        if let Some(c) = self.conns.remove(&conn) {
            if self.by_node.get(&c.node) == Some(&conn) {
                self.by_node.remove(&c.node);
            }
        }
        self.close(conn, close::PROTOCOL, reason);
    }

    fn resolve(&self, key: &str) -> Result<NodeId, KeyActionError> {
        let key = key.trim();
        if let Ok(id) = key.parse::<NodeId>() {
            if self.machines.contains_key(&id) {
                return Ok(id);
            }
        }
        // A name a removed machine had may belong to a newer key now: that one is meant.
        if let Some(m) = self
            .machines
            .values()
            .filter(|m| m.name == key)
            .min_by_key(|m| m.key_status == KeyStatus::Removed)
        {
            return Ok(m.node_id);
        }
        let lower = key.to_ascii_lowercase();
        if lower.len() >= 8 && lower.chars().all(|c| c.is_ascii_hexdigit()) {
            let hits: Vec<NodeId> = self
                .machines
                .keys()
                .filter(|id| id.to_string().starts_with(&lower))
                .copied()
                .collect();
            return match hits.as_slice() {
                [one] => Ok(*one),
                [] => Err(KeyActionError::NotFound(key.to_owned())),
                _ => Err(KeyActionError::Ambiguous(key.to_owned())),
            };
        }
        Err(KeyActionError::NotFound(key.to_owned()))
    }

    /// Pending (or rejected) -> admitted.
    fn admit(&mut self, node: NodeId, resume: u64, now_ms: u64) {
        let m = self.machines.get_mut(&node).expect("admit a known machine");
        m.key_status = KeyStatus::Admitted;
        m.last_seen_ms = now_ms;
        self.dirty_machines.insert(node);
        self.admitted(node, resume, now_ms);
    }

    /// An admitted machine is (re)connected, or was just admitted: tell it, resume its
    /// channel, and bring everything that depends on it up to date.
    fn admitted(&mut self, node: NodeId, resume: u64, now_ms: u64) {
        if let Some(&conn) = self.by_node.get(&node) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.admitted = true;
            }
            let heartbeat_ms = self.settings.heartbeat_ms;
            let controller_key = self.key.public();
            self.send(
                conn,
                Message::Admission(Admission::Admitted {
                    controller_key,
                    heartbeat_ms,
                }),
            );
            // The worker applied up to `resume`: that is an acknowledgement (the ack itself may
            // have been lost). A worker ahead of this channel (the controller restored from an
            // older backup) moves the channel forward, so that new publications are not taken
            // for replays.
            let m = self.machines.get_mut(&node).expect("known");
            if resume > m.pub_seq {
                tracing::warn!(
                    machine = %node,
                    resume,
                    published = m.pub_seq,
                    "a machine applied more of its channel than this controller remembers publishing; moving the channel forward"
                );
                m.pub_seq = resume;
                // What this controller remembers publishing is older than what the machine
                // applied: forget it, so that its pool and route are published again below
                // (with sequences above `resume`) even when they look unchanged from here.
                m.pool = None;
                m.route = None;
                m.balancing = Balancing::default();
                self.dirty_machines.insert(node);
            }
            if resume > self.machines[&node].pub_acked {
                self.acked(node, resume, now_ms);
            }
            // Everything still unacknowledged, directly and in order.
            let seqs: Vec<u64> = self
                .unacked
                .get(&node)
                .map(|c| c.keys().copied().collect())
                .unwrap_or_default();
            for seq in seqs {
                self.send_publication(node, seq, true, now_ms);
            }
        }
        self.set_up(node, true, now_ms);
        let m = &self.machines[&node];
        let (lb, is_lb, name) = (
            m.load_balancer.clone(),
            m.is_load_balancer(),
            m.name.clone(),
        );
        if let Some(lb) = lb {
            self.recompute_pool(&lb, now_ms);
            self.update_route(node, now_ms);
        }
        if is_lb {
            self.recompute_pool(&name, now_ms);
            self.reroute_dependents(&name, now_ms);
        }
        // At the channel's bound it waits, like a pool.
        let _ = self.update_config(node, now_ms);
    }

    fn seen(&mut self, node: NodeId, now_ms: u64) {
        let up = {
            let m = self.machines.get_mut(&node).expect("known");
            m.last_seen_ms = now_ms;
            m.up
        };
        if !up {
            self.set_up(node, true, now_ms);
        }
    }

    fn set_up(&mut self, node: NodeId, up: bool, now_ms: u64) {
        let m = self.machines.get_mut(&node).expect("known");
        if m.up == up {
            return;
        }
        m.up = up;
        if up {
            m.last_seen_ms = now_ms;
        }
        self.dirty_machines.insert(node);
        let (lb, own) = (
            m.load_balancer.clone(),
            m.is_load_balancer().then(|| m.name.clone()),
        );
        if let Some(lb) = lb {
            self.recompute_pool(&lb, now_ms);
        }
        // Its router is told that its load balancer went down or came back.
        if let Some(name) = own {
            self.recouple(&name, now_ms);
        }
    }

    fn acked(&mut self, node: NodeId, upto: u64, now_ms: u64) {
        let m = self.machines.get_mut(&node).expect("known");
        if upto <= m.pub_acked {
            return;
        }
        m.pub_acked = upto;
        for d in &mut m.deploys {
            if d.seq <= upto && d.state == "pending" {
                d.state = "delivering".into();
            }
        }
        if m.config.seq <= upto && m.config.state == "pending" {
            m.config.state = "applying".into();
        }
        self.dirty_machines.insert(node);
        self.dirty.acked.push((node, upto));
        if let Some(chan) = self.unacked.get_mut(&node) {
            *chan = chan.split_off(&(upto + 1));
            if chan.is_empty() {
                self.unacked.remove(&node);
            }
        }
        self.sent_at.retain(|(n, seq), _| *n != node || *seq > upto);
        if self.full.remove(&node) {
            // Its channel has room again: what waited is computed now, once.
            let m = &self.machines[&node];
            tracing::info!(name = %m.name, "a machine's publication channel has room again");
            let (name, is_lb, lb, is_router) = (
                m.name.clone(),
                m.is_load_balancer(),
                m.load_balancer.clone(),
                m.is_call_router(),
            );
            if is_lb {
                self.recompute_pool(&name, now_ms);
            }
            if let Some(lb) = lb {
                self.update_route(node, now_ms);
                if is_router {
                    self.recouple(&lb, now_ms);
                }
            }
            let _ = self.update_config(node, now_ms);
        }
    }

    /// Deployment `deployment`'s rollout drains the machines `drain` (out of their load
    /// balancers' pools, published at once; a machine drained by an older rollout is taken
    /// over) and lets `undrain` back (in again once up and healthy; only those it drained
    /// itself, so that a superseded rollout never undoes a newer one's drain). Each load
    /// balancer concerned gets one new pool, not one per machine.
    pub fn drain(&mut self, deployment: u64, drain: &[NodeId], undrain: &[NodeId], now_ms: u64) {
        let mut lbs = BTreeSet::new();
        let changes = drain
            .iter()
            .map(|n| (*n, Some(deployment)))
            .chain(undrain.iter().map(|n| (*n, None)));
        for (node, to) in changes {
            let Some(m) = self.machines.get_mut(&node) else {
                continue;
            };
            let was = m.balancing.draining;
            if was == to || (to.is_none() && was != Some(deployment)) {
                continue;
            }
            m.balancing.draining = to;
            self.dirty_machines.insert(node);
            if let Some(lb) = m.load_balancer.clone() {
                lbs.insert(lb);
            }
        }
        for lb in lbs {
            self.recompute_pool(&lb, now_ms);
        }
    }

    /// The admitted load balancer `node` sits behind.
    fn lb_of(&self, node: NodeId) -> Option<&MachineRecord> {
        self.machines
            .get(&node)
            .and_then(|m| m.load_balancer.as_deref())
            .and_then(|lb| self.lb_record(lb))
    }

    /// Whether `node` is a member of its load balancer's pool as last published.
    pub fn in_pool(&self, node: NodeId) -> bool {
        self.lb_of(node).is_some_and(|lb| {
            lb.up
                && lb
                    .pool
                    .as_ref()
                    .is_some_and(|p| p.members.iter().any(|x| x.node_id == node))
        })
    }

    /// Whether `node`'s load balancer no longer sends it work: it is out of the pool last
    /// published and the load balancer applied everything it was sent (or it is down, or there
    /// is none).
    pub fn drained(&self, node: NodeId) -> bool {
        self.lb_of(node)
            .is_none_or(|lb| !lb.up || (!self.in_pool(node) && lb.pub_acked >= lb.pub_seq))
    }

    /// The load balancer named `lb`, if admitted.
    fn lb_record(&self, lb: &str) -> Option<&MachineRecord> {
        self.machines
            .values()
            .find(|m| m.name == lb && m.key_status == KeyStatus::Admitted && m.is_load_balancer())
    }

    /// Computes the pool of the load balancer named `lb` and publishes it when it changed.
    fn recompute_pool(&mut self, lb: &str, now_ms: u64) {
        self.recouple(lb, now_ms);
        let Some(lb_rec) = self.lb_record(lb) else {
            return;
        };
        let lb_id = lb_rec.node_id;
        let mut pool = Pool::default();
        for m in self.machines.values() {
            if m.key_status != KeyStatus::Admitted
                || m.node_id == lb_id
                || m.load_balancer.as_deref() != Some(lb)
            {
                continue;
            }
            pool.dependents.push(Dependent {
                name: m.name.clone(),
                node_id: m.node_id,
                fingerprint: m.fingerprint,
            });
            // A call router is the load balancer's client: among the dependents (its key may
            // dial the relay), never a backend.
            if is_member(m) && !m.is_call_router() {
                pool.members.push(PoolMember {
                    name: m.name.clone(),
                    node_id: m.node_id,
                    service_addr: m.service_addr.clone(),
                    fingerprint: m.fingerprint,
                });
            }
        }
        pool.members.sort_by(|a, b| a.name.cmp(&b.name));
        pool.dependents.sort_by(|a, b| a.name.cmp(&b.name));
        if self.machines[&lb_id].pool.as_ref() == Some(&pool) {
            return;
        }
        // At the channel's bound the pool waits: `acked` recomputes it, so only the newest
        // is sent.
        let _ = self.publish(lb_id, &Body::Pool(pool), now_ms);
    }

    /// The call router the load balancer named `lb` serves: of the admitted call routers
    /// naming it, the first admitted (then by name), so that one joining later never takes
    /// it from another. The others are told they have no load balancer.
    fn router_of(&self, lb: &str) -> Option<&MachineRecord> {
        self.machines
            .values()
            .filter(|m| {
                m.key_status == KeyStatus::Admitted
                    && m.is_call_router()
                    && m.load_balancer.as_deref() == Some(lb)
            })
            .min_by(|a, b| (a.first_seen_ms, &a.name).cmp(&(b.first_seen_ms, &b.name)))
    }

    /// Brings the coupling around the load balancer named `lb` up to date: publishes to it
    /// the call router it serves, and to every call router naming it its endpoint (name, keys,
    /// addresses, whether it is up), each only when it changed. Called wherever the load
    /// balancer's or a router's record changes (join, admission, up or down, reject, remove).
    fn recouple(&mut self, lb: &str, now_ms: u64) {
        let owner = self.router_of(lb).map(|r| RouterPeer {
            name: r.name.clone(),
            node_id: r.node_id,
            service_addr: r.service_addr.clone(),
            fingerprint: r.fingerprint,
        });
        let endpoint = self.lb_record(lb).map(|l| LbEndpoint {
            name: l.name.clone(),
            node_id: l.node_id,
            service_addr: l.service_addr.clone(),
            relay_addr: l.relay_addr.clone(),
            fingerprint: l.fingerprint,
            up: l.up,
        });
        if let Some(lb_id) = endpoint.as_ref().map(|e| e.node_id) {
            let sent = &self.machines[&lb_id].balancing.router;
            // A load balancer never told of a router and that has none is left alone.
            if sent.as_ref() != Some(&owner) && !(sent.is_none() && owner.is_none()) {
                // At the channel's bound it waits, like a pool.
                let _ = self.publish(lb_id, &Body::Router(owner.clone()), now_ms);
            }
        }
        let routers: Vec<NodeId> = self
            .machines
            .values()
            .filter(|m| {
                m.key_status == KeyStatus::Admitted
                    && m.is_call_router()
                    && m.load_balancer.as_deref() == Some(lb)
            })
            .map(|m| m.node_id)
            .collect();
        for r in routers {
            let mine = owner.as_ref().is_some_and(|o| o.node_id == r);
            let want = if mine { endpoint.clone() } else { None };
            let sent = &self.machines[&r].balancing.endpoint;
            // A router never told anything and that has nothing is left alone.
            if sent.as_ref() != Some(&want) && !(sent.is_none() && want.is_none()) {
                let _ = self.publish(r, &Body::Coupled(want), now_ms);
            }
        }
    }

    /// Publishes the machine's effective configuration when it differs from what it was last
    /// sent (a machine that never had any and has none now is sent nothing). `Ok(true)`:
    /// published.
    fn update_config(&mut self, node: NodeId, now_ms: u64) -> Result<bool, NotPublished> {
        let m = &self.machines[&node];
        if m.key_status != KeyStatus::Admitted {
            return Ok(false);
        }
        let doc = match self.effective_config(node) {
            Some(v) => configdata::canonical(&v),
            None if m.config.version == 0 => return Ok(false),
            // Every document that applied to it was deleted: it is sent an empty one.
            None => "{}".to_owned(),
        };
        if *blake3::hash(doc.as_bytes()).as_bytes() == m.config.digest {
            return Ok(false);
        }
        let order = ConfigOrder {
            version: self.configs.last_version(),
            doc,
        };
        self.publish(node, &Body::Config(order), now_ms)?;
        Ok(true)
    }

    /// Publishes a dependent's route to its load balancer when it changed.
    fn update_route(&mut self, node: NodeId, now_ms: u64) {
        let m = &self.machines[&node];
        let route = m.load_balancer.as_deref().and_then(|lb| {
            let l = self.lb_record(lb)?;
            Some(LbRoute {
                name: l.name.clone(),
                node_id: l.node_id,
                addr: l.relay_addr.clone()?,
                fingerprint: l.fingerprint,
            })
        });
        if m.route != route {
            // At the channel's bound the route waits, like a pool.
            let _ = self.publish(node, &Body::LoadBalancer(route), now_ms);
        }
    }

    fn reroute_dependents(&mut self, lb: &str, now_ms: u64) {
        let deps: Vec<NodeId> = self
            .machines
            .values()
            .filter(|m| {
                m.key_status == KeyStatus::Admitted && m.load_balancer.as_deref() == Some(lb)
            })
            .map(|m| m.node_id)
            .collect();
        for d in deps {
            self.update_route(d, now_ms);
        }
    }

    /// Sends publication `seq` of `node`'s channel: through its load balancer on a first send
    /// when the dependent has applied its route and the load balancer is up and connected;
    /// directly otherwise (and always on a resend).
    fn send_publication(&mut self, node: NodeId, seq: u64, resend: bool, now_ms: u64) {
        let Some(p) = self.unacked.get(&node).and_then(|c| c.get(&seq)).cloned() else {
            return;
        };
        let m = &self.machines[&node];
        let via_lb = if resend || m.route.is_none() || m.pub_acked < m.route_seq {
            None
        } else {
            m.load_balancer
                .as_deref()
                .and_then(|lb| self.lb_record(lb))
                .filter(|l| l.up)
                .and_then(|l| self.by_node.get(&l.node_id).copied())
                .filter(|c| self.conns.get(c).is_some_and(|c| c.admitted))
        };
        let direct = self
            .by_node
            .get(&node)
            .copied()
            .filter(|c| self.conns.get(c).is_some_and(|c| c.admitted));
        match (via_lb, direct) {
            (Some(lb_conn), _) => self.send(
                lb_conn,
                Message::Relay(Relay {
                    to: node,
                    publication: p,
                }),
            ),
            (None, Some(conn)) => self.send(conn, Message::Publication(p)),
            (None, None) => return,
        }
        self.sent_at.insert((node, seq), now_ms);
    }
}

/// In its load balancer's pool: admitted, up, not drained by a rollout, and its software not
/// failed or stopped.
fn is_member(m: &MachineRecord) -> bool {
    m.key_status == KeyStatus::Admitted
        && m.up
        && m.balancing.draining.is_none()
        && !m
            .report
            .as_ref()
            .is_some_and(|r| matches!(r.state.as_str(), "failed" | "stopped"))
}

fn check_join(j: &Join) -> Result<(), String> {
    if j.protocol != CLUSTER_PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (this controller speaks {CLUSTER_PROTOCOL_VERSION})",
            j.protocol
        ));
    }
    config::check_name(&j.name).map_err(|e| format!("name: {e}"))?;
    if !config::SERVICES.contains(&j.service.as_str()) {
        return Err(format!("service: unknown {:?}", short(&j.service)));
    }
    if !config::COMPONENTS.contains(&j.component.as_str()) {
        return Err(format!("component: unknown {:?}", short(&j.component)));
    }
    if let Some(lb) = &j.load_balancer {
        config::check_name(lb).map_err(|e| format!("load_balancer: {e}"))?;
        if j.component == LOAD_BALANCER || lb == &j.name {
            return Err("load_balancer: a load balancer has none in front of it".into());
        }
    }
    for (field, v) in [
        ("service_addr", &j.service_addr),
        ("relay_addr", &j.relay_addr),
    ] {
        if let Some(a) = v {
            a.parse::<std::net::SocketAddr>()
                .map_err(|_| format!("{field}: {:?} is not host:port", short(a)))?;
        }
    }
    if j.seal_key.len() > REPORT_TEXT_MAX {
        return Err("seal_key: too long".into());
    }
    keys::parse_recipient(&j.seal_key).map_err(|e| format!("seal_key: {e}"))?;
    Ok(())
}

fn check_report(r: &MachineReport) -> Result<(), String> {
    if r.state.is_empty() || r.state.len() > REPORT_TEXT_MAX {
        return Err("state: empty or too long".into());
    }
    if r.detail
        .as_ref()
        .is_some_and(|d| d.len() > REPORT_DETAIL_MAX)
    {
        return Err(format!("detail: more than {REPORT_DETAIL_MAX} bytes"));
    }
    if let Some(sw) = &r.software {
        if [&sw.service, &sw.bundle_id, &sw.version]
            .iter()
            .any(|v| v.len() > REPORT_TEXT_MAX)
        {
            return Err("software: a field is too long".into());
        }
    }
    Ok(())
}

fn check_config_report(r: &ConfigReport) -> Result<(), String> {
    if !matches!(r.state.as_str(), "applied" | "rolled_back" | "failed") {
        return Err(format!("state: unknown {:?}", short(&r.state)));
    }
    if r.detail
        .as_ref()
        .is_some_and(|d| d.len() > REPORT_DETAIL_MAX)
    {
        return Err(format!("detail: more than {REPORT_DETAIL_MAX} bytes"));
    }
    Ok(())
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}
