//! The worker's state machine: admission, its publication channel (applied exactly once, in
//! order, whichever path a publication took) and its notification channel. Pure like the
//! controller's core; the runtime (`worker::run`) and the simulation drive it:
//!
//! 1. feed what arrived with [`WorkerCore::from_controller`] / [`WorkerCore::from_relay`], and
//!    new reports of its own with [`WorkerCore::report`],
//! 2. [`WorkerCore::take`]: the record to commit (if changed) and the outputs,
//! 3. commit the record, then perform the outputs (an ack is sent only for what is committed;
//!    effects are applied after the commit, and again after a restart from the record).

use serde::{Deserialize, Serialize};

use crate::cluster::body::{Body, LbRoute, Pool};
use crate::cluster::keys::{ControllerVerifier, KeyError, SealKey};
use crate::ids::NodeId;
use crate::wire::{Admission, Join, MachineReport, Message, Notify, Publication};

/// What the worker keeps in its database (one postcard record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The controller's Ed25519 key, received on admission.
    pub controller_key: Option<[u8; 32]>,
    pub heartbeat_ms: u64,
    /// Highest publication sequence applied.
    pub applied: u64,
    /// A load balancer: its current pool.
    pub pool: Option<Pool>,
    /// A dependent: where its load balancer is.
    pub route: Option<LbRoute>,
    /// Its latest report and that report's sequence; `report_acked` is the highest the
    /// controller acknowledged.
    pub report: Option<MachineReport>,
    pub report_seq: u64,
    pub report_acked: u64,
}

/// Where the worker stands with its controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Not yet answered, or pending an operator.
    Waiting,
    Pending,
    Admitted,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A load balancer's pool changed: write it, signal the software.
    Pool(Pool),
    /// A dependent's load balancer is (now) here: dial it (or stop, with `None`).
    Route(Option<LbRoute>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerOutput {
    /// To the controller, on the direct connection.
    ToController(Message),
    /// Apply after the commit.
    Apply(Effect),
}

/// Why something that arrived was refused. `Hostile` closes the connection it came on;
/// nothing is stored either way.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkerRefusal {
    #[error("hostile: {0}")]
    Hostile(String),
    #[error("rejected by the controller: {0}")]
    Rejected(String),
}

impl From<KeyError> for WorkerRefusal {
    fn from(e: KeyError) -> Self {
        WorkerRefusal::Hostile(e.to_string())
    }
}

/// The parts of a Join that come from the config and identity.
#[derive(Clone, Debug)]
pub struct JoinInfo {
    pub node_id: NodeId,
    pub name: String,
    pub service: String,
    pub component: String,
    pub load_balancer: Option<String>,
    pub service_addr: Option<String>,
    pub relay_addr: Option<String>,
    pub token_proof: Option<[u8; 32]>,
}

pub struct WorkerCore {
    info: JoinInfo,
    seal: SealKey,
    verifier: Option<ControllerVerifier>,
    rec: WorkerRecord,
    standing: Standing,
    dirty: bool,
    out: Vec<WorkerOutput>,
}

impl WorkerCore {
    /// From the stored record; the effects of the stored state are re-applied with the first
    /// `take` (the pool file rewritten, the load balancer dialled), and an unacknowledged
    /// report is sent again once connected.
    pub fn open(info: JoinInfo, seal: SealKey, rec: WorkerRecord) -> Result<WorkerCore, KeyError> {
        let _ = (info, seal, rec);
        todo!()
    }

    /// The first frame of a new connection to the controller.
    pub fn join(&self) -> Join {
        todo!()
    }

    /// A new connection to the controller is up (after `join` was sent): resend the
    /// unacknowledged report once admitted.
    pub fn connected(&mut self) {
        todo!()
    }

    /// A frame from the controller: Admission, Publication, NotifyAck.
    pub fn from_controller(&mut self, msg: Message) -> Result<(), WorkerRefusal> {
        let _ = msg;
        todo!()
    }

    /// A publication relayed by its load balancer: the same checks as a direct one (signature
    /// first, then the machine, the sequence, then decryption); the LB's connection is closed
    /// on `Hostile`.
    pub fn from_relay(&mut self, p: Publication) -> Result<(), WorkerRefusal> {
        let _ = p;
        todo!()
    }

    /// A new report about itself: numbered and sent (when admitted and connected; otherwise on
    /// the next connection).
    pub fn report(&mut self, report: MachineReport) {
        let _ = report;
        todo!()
    }

    /// The record to commit (when changed) and the outputs to perform after the commit.
    pub fn take(&mut self) -> (Option<WorkerRecord>, Vec<WorkerOutput>) {
        let rec = if std::mem::take(&mut self.dirty) {
            Some(self.rec.clone())
        } else {
            None
        };
        (rec, std::mem::take(&mut self.out))
    }

    pub fn standing(&self) -> Standing {
        self.standing
    }

    pub fn record(&self) -> &WorkerRecord {
        &self.rec
    }

    pub fn node_id(&self) -> NodeId {
        self.info.node_id
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The latest report's Notify, if not acknowledged yet.
    pub fn unacked_report(&self) -> Option<Notify> {
        todo!()
    }

    #[doc(hidden)]
    pub fn seal_recipient(&self) -> String {
        self.seal.recipient()
    }

    #[allow(dead_code)]
    fn decode(&self, p: &Publication) -> Result<Body, WorkerRefusal> {
        let _ = (p, &self.verifier, Admission::Pending);
        todo!()
    }
}
