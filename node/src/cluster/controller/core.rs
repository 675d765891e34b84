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

use crate::cluster::body::{Body, LbRoute, Pool};
use crate::cluster::keys::ControllerKey;
use crate::ids::{Fingerprint, NodeId};
use crate::wire::{Join, MachineReport, Message, Publication};

/// A connection, numbered by the runtime (never reused within a run).
pub type ConnId = u64;

/// The component that load-balances for others.
pub const LOAD_BALANCER: &str = "load-balancer";

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
}

impl Settings {
    pub fn new(down_after_ms: u64) -> Settings {
        Settings {
            down_after_ms,
            heartbeat_ms: (down_after_ms / 4).max(50),
            pending_max: 1024,
            resend_after_ms: 1000,
            join_token: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyStatus {
    Pending,
    Admitted,
    Rejected,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Pending => "pending",
            KeyStatus::Admitted => "admitted",
            KeyStatus::Rejected => "rejected",
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
    /// A dependent: the route last published to it.
    pub route: Option<LbRoute>,
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
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.machines.is_empty() && self.publications.is_empty() && self.acked.is_empty()
    }
}

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
}

#[derive(Debug, Clone)]
struct Conn {
    node: NodeId,
    fingerprint: Fingerprint,
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
        let _ = (settings, key, machines, publications, now_ms);
        todo!()
    }

    /// A worker completed the handshake (with certificate `fingerprint`) and sent its Join.
    /// Admits it (join token), records it as pending, or refuses it; an admitted machine is
    /// sent its Admission and every publication above `join.resume`.
    pub fn joined(&mut self, conn: ConnId, fingerprint: Fingerprint, join: Join, now_ms: u64) {
        let _ = (conn, fingerprint, join, now_ms);
        todo!()
    }

    /// A frame after the Join on connection `conn`. A frame the machine may not send closes
    /// the connection and changes nothing.
    pub fn frame(&mut self, conn: ConnId, msg: Message, now_ms: u64) {
        let _ = (conn, msg, now_ms);
        todo!()
    }

    /// The connection is gone (the machine is marked down only after `down_after`).
    pub fn closed(&mut self, conn: ConnId, now_ms: u64) {
        let _ = (conn, now_ms);
        todo!()
    }

    /// Marks silent machines down (and recomputes their pools) and resends publications left
    /// unacknowledged for `resend_after`. Call it every few hundred milliseconds.
    pub fn tick(&mut self, now_ms: u64) {
        let _ = now_ms;
        todo!()
    }

    /// `outpost keys accept`: a pending (or rejected) key becomes admitted; a connected
    /// machine is told at once. `key` is a node id (or a unique prefix of at least 8 hex
    /// characters) or a machine name.
    pub fn accept(&mut self, key: &str, now_ms: u64) -> Result<NodeId, KeyActionError> {
        let _ = (key, now_ms);
        todo!()
    }

    /// `outpost keys reject`: the key is refused from now on, its connection closed, and it
    /// leaves any pool.
    pub fn reject(&mut self, key: &str, now_ms: u64) -> Result<NodeId, KeyActionError> {
        let _ = (key, now_ms);
        todo!()
    }

    /// Publishes `body` to `machine`: stored in its channel with the next sequence and sent
    /// (through its load balancer when that is up and connected, else directly). Many calls
    /// between two `take`s commit together.
    pub fn publish(&mut self, machine: NodeId, body: &Body, now_ms: u64) {
        let _ = (machine, body, now_ms);
        todo!()
    }

    /// What changed since the last call (commit it), and what to send (after the commit).
    pub fn take(&mut self) -> (Dirty, Vec<Output>) {
        let mut dirty = std::mem::take(&mut self.dirty);
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

    pub fn machine_by_name(&self, name: &str) -> Option<&MachineRecord> {
        self.machines.values().find(|m| m.name == name)
    }

    /// Fingerprints of rejected keys: the handshake refuses them.
    pub fn rejected_fingerprints(&self) -> Vec<Fingerprint> {
        self.machines
            .values()
            .filter(|m| m.key_status == KeyStatus::Rejected)
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
}
