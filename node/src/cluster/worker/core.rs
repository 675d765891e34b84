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

use crate::cluster::body::{Body, ConfigOrder, DeployOrder, LbEndpoint, LbRoute, Pool, RouterPeer};
use crate::cluster::keys::{ControllerVerifier, KeyError, SealKey};
use crate::ids::NodeId;
use crate::wire::{
    Admission, ConfigNotify, ConfigReport, Join, MachineReport, Message, Notify, Publication,
    CLUSTER_PROTOCOL_VERSION,
};

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
    /// A deployment received and not finished yet (resumed after a restart).
    pub deploy: Option<DeployOrder>,
    /// The highest deployment finished (running, rolled back or failed); an order not above it
    /// is a replay and is refused.
    pub last_deployment: u64,
    /// Its configuration data. Not in the record's postcard encoding: the store appends it
    /// (see [`WorkerRecord::encode`]), so records written before it existed still decode.
    #[serde(skip)]
    pub config: WorkerConfig,
    /// Its coupling; stored after `config`, like it.
    #[serde(skip)]
    pub coupling: WorkerCoupling,
}

/// A call router's load balancer, or a load balancer's call router, as last published.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCoupling {
    /// A call router: the load balancer that takes its jobs.
    pub endpoint: Option<LbEndpoint>,
    /// A load balancer: the call router it serves.
    pub router: Option<RouterPeer>,
}

/// The worker's configuration data and its report channel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// The configuration in effect: the last one applied with the software healthy after it.
    pub current: Option<ConfigOrder>,
    /// Received and not yet applied (applied again after a restart).
    pub pending: Option<ConfigOrder>,
    /// The latest configuration report, its sequence, and the highest the controller
    /// acknowledged.
    pub report: Option<ConfigReport>,
    pub report_seq: u64,
    pub report_acked: u64,
}

impl WorkerRecord {
    /// The stored bytes: the record, then its [`WorkerConfig`], then its [`WorkerCoupling`]
    /// (all postcard).
    pub fn encode(&self) -> Vec<u8> {
        crate::wire::encode_with_tail(self, &(&self.config, &self.coupling))
    }

    /// From [`WorkerRecord::encode`]'s bytes, or a record stored before configuration data
    /// or coupling existed (nothing, or only the configuration, after it).
    pub fn decode(bytes: &[u8]) -> Result<WorkerRecord, postcard::Error> {
        let (mut rec, config, coupling) =
            crate::wire::decode_with_tail2::<WorkerRecord, _, _>(bytes)?;
        rec.config = config;
        rec.coupling = coupling;
        Ok(rec)
    }
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
    /// Fetch, verify, install and run this software; then call [`WorkerCore::deployed`].
    Deploy(DeployOrder),
    /// Write this configuration, tell the software, check its health; then call
    /// [`WorkerCore::configured`].
    Config(ConfigOrder),
    /// The coupling changed (a call router's load balancer, a load balancer's router):
    /// rewrite the pool file from the record, signal the software.
    Coupling,
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
        let verifier = rec
            .controller_key
            .as_ref()
            .map(ControllerVerifier::from_bytes)
            .transpose()?;
        let mut out = Vec::new();
        if let Some(pool) = &rec.pool {
            out.push(WorkerOutput::Apply(Effect::Pool(pool.clone())));
        }
        if rec.route.is_some() {
            out.push(WorkerOutput::Apply(Effect::Route(rec.route.clone())));
        }
        if let Some(order) = &rec.deploy {
            out.push(WorkerOutput::Apply(Effect::Deploy(order.clone())));
        }
        if let Some(order) = &rec.config.pending {
            out.push(WorkerOutput::Apply(Effect::Config(order.clone())));
        }
        // A call router's file is written again whatever it holds: a crash between the
        // commit and the write must not leave an older load balancer there. (A load
        // balancer's router is written with its pool, above.)
        if info.component == crate::cluster::controller::core::CALL_ROUTER {
            out.push(WorkerOutput::Apply(Effect::Coupling));
        }
        Ok(WorkerCore {
            info,
            seal,
            verifier,
            rec,
            standing: Standing::Waiting,
            dirty: false,
            out,
        })
    }

    /// The first frame of a new connection to the controller.
    pub fn join(&self) -> Join {
        Join {
            protocol: CLUSTER_PROTOCOL_VERSION,
            node_id: self.info.node_id,
            name: self.info.name.clone(),
            service: self.info.service.clone(),
            component: self.info.component.clone(),
            load_balancer: self.info.load_balancer.clone(),
            service_addr: self.info.service_addr.clone(),
            relay_addr: self.info.relay_addr.clone(),
            seal_key: self.seal.recipient(),
            token_proof: self.info.token_proof,
            resume: self.rec.applied,
        }
    }

    /// A new connection to the controller is up (after `join` was sent): resend the
    /// unacknowledged report once admitted.
    pub fn connected(&mut self) {
        // The controller answers every Join with an Admission; until then nothing is sent.
        if self.standing != Standing::Rejected {
            self.standing = Standing::Waiting;
        }
    }

    /// A frame from the controller: Admission, Publication, NotifyAck.
    pub fn from_controller(&mut self, msg: Message) -> Result<(), WorkerRefusal> {
        match msg {
            Message::Admission(Admission::Pending | Admission::PendingTokenNotAccepted) => {
                self.standing = Standing::Pending;
                Ok(())
            }
            // Refused for now (the connection closes): as if not yet answered.
            Message::Admission(Admission::Refused(_)) => {
                if self.standing != Standing::Rejected {
                    self.standing = Standing::Waiting;
                }
                Ok(())
            }
            Message::Admission(Admission::Admitted {
                controller_key,
                heartbeat_ms,
            }) => {
                let v = ControllerVerifier::from_bytes(&controller_key)?;
                if let Some(known) = &self.verifier {
                    if known != &v {
                        return Err(WorkerRefusal::Hostile(
                            "the controller's signing key changed; refusing its publications \
                             (if the controller was rebuilt on purpose, re-create this worker's \
                             data directory)"
                                .into(),
                        ));
                    }
                }
                if self.rec.controller_key != Some(controller_key)
                    || self.rec.heartbeat_ms != heartbeat_ms
                {
                    self.rec.controller_key = Some(controller_key);
                    self.rec.heartbeat_ms = heartbeat_ms;
                    self.dirty = true;
                }
                self.verifier = Some(v);
                self.standing = Standing::Admitted;
                if let Some(n) = self.unacked_report() {
                    self.out
                        .push(WorkerOutput::ToController(Message::Notify(n)));
                }
                if let Some(n) = self.unacked_config_report() {
                    self.out
                        .push(WorkerOutput::ToController(Message::ConfigNotify(n)));
                }
                Ok(())
            }
            Message::Admission(Admission::Rejected { reason }) => {
                self.standing = Standing::Rejected;
                Err(WorkerRefusal::Rejected(reason))
            }
            Message::Publication(p) => {
                if self.standing != Standing::Admitted {
                    return Err(WorkerRefusal::Hostile(
                        "a publication before admission".into(),
                    ));
                }
                self.accept(p)
            }
            Message::NotifyAck { upto } => {
                if upto > self.rec.report_seq {
                    return Err(WorkerRefusal::Hostile(format!(
                        "acknowledges report {upto}, only {} were sent",
                        self.rec.report_seq
                    )));
                }
                if upto > self.rec.report_acked {
                    self.rec.report_acked = upto;
                    self.dirty = true;
                }
                Ok(())
            }
            Message::ConfigNotifyAck { upto } => {
                let c = &mut self.rec.config;
                if upto > c.report_seq {
                    return Err(WorkerRefusal::Hostile(format!(
                        "acknowledges configuration report {upto}, only {} were sent",
                        c.report_seq
                    )));
                }
                if upto > c.report_acked {
                    c.report_acked = upto;
                    self.dirty = true;
                }
                Ok(())
            }
            other => Err(WorkerRefusal::Hostile(format!(
                "unexpected {} from the controller",
                other.kind()
            ))),
        }
    }

    /// A publication relayed by its load balancer: the same checks as a direct one (signature
    /// first, then the machine, the sequence, then decryption); the LB's connection is closed
    /// on `Hostile`.
    pub fn from_relay(&mut self, p: Publication) -> Result<(), WorkerRefusal> {
        self.accept(p)
    }

    /// A new report about itself: numbered and sent (when admitted and connected; otherwise on
    /// the next connection).
    pub fn report(&mut self, report: MachineReport) {
        self.rec.report_seq += 1;
        self.rec.report = Some(report);
        self.dirty = true;
        if self.standing == Standing::Admitted {
            if let Some(n) = self.unacked_report() {
                self.out
                    .push(WorkerOutput::ToController(Message::Notify(n)));
            }
        }
    }

    /// The deployment `deployment` is finished (running, rolled back or failed): it is no longer
    /// resumed after a restart, an order not above it is refused from now on, and `report`
    /// goes to the controller.
    pub fn deployed(&mut self, deployment: u64, report: MachineReport) {
        if self
            .rec
            .deploy
            .as_ref()
            .is_some_and(|d| d.deployment == deployment)
        {
            self.rec.deploy = None;
        }
        self.rec.last_deployment = self.rec.last_deployment.max(deployment);
        self.report(report);
    }

    /// The configuration `version` was applied (or rolled back, or could not be written):
    /// `report` says which. Applied, it is the configuration in effect from now on; either
    /// way it is no longer applied again after a restart. The report goes to the controller.
    pub fn configured(&mut self, version: u64, report: ConfigReport) {
        let c = &mut self.rec.config;
        if let Some(p) = c.pending.take_if(|p| p.version == version) {
            if report.state == "applied" {
                c.current = Some(p);
            }
        }
        c.report_seq += 1;
        c.report = Some(report);
        self.dirty = true;
        if self.standing == Standing::Admitted {
            if let Some(n) = self.unacked_config_report() {
                self.out
                    .push(WorkerOutput::ToController(Message::ConfigNotify(n)));
            }
        }
    }

    /// The latest configuration report, if not acknowledged yet.
    pub fn unacked_config_report(&self) -> Option<ConfigNotify> {
        let c = &self.rec.config;
        let report = c.report.clone()?;
        (c.report_seq > c.report_acked).then_some(ConfigNotify {
            machine: self.info.node_id,
            seq: c.report_seq,
            report,
        })
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

    pub fn component(&self) -> &str {
        &self.info.component
    }

    /// The latest report's Notify, if not acknowledged yet.
    pub fn unacked_report(&self) -> Option<Notify> {
        let report = self.rec.report.clone()?;
        (self.rec.report_seq > self.rec.report_acked).then_some(Notify {
            machine: self.info.node_id,
            seq: self.rec.report_seq,
            report,
        })
    }

    #[doc(hidden)]
    pub fn seal_recipient(&self) -> String {
        self.seal.recipient()
    }

    /// The checks every publication passes, in this order: the controller's signature (before
    /// anything is decrypted), the machine, the sequence (an old one is acknowledged again and
    /// dropped; one past a gap is dropped, the controller resends in order), the seal, the body.
    fn accept(&mut self, p: Publication) -> Result<(), WorkerRefusal> {
        let Some(v) = &self.verifier else {
            return Err(WorkerRefusal::Hostile(
                "a publication before admission".into(),
            ));
        };
        v.verify_publication(&p)?;
        if p.machine != self.info.node_id {
            return Err(WorkerRefusal::Hostile(format!(
                "a publication for machine {}",
                p.machine
            )));
        }
        let applied = self.rec.applied;
        if p.seq <= applied {
            self.out
                .push(WorkerOutput::ToController(Message::PublicationAck {
                    upto: applied,
                }));
            return Ok(());
        }
        if p.seq != applied + 1 {
            return Ok(());
        }
        let plain = self.seal.open(&p.sealed)?;
        self.apply_opened(p.seq, &plain)
    }

    /// The rest of [`WorkerCore::accept`]: the opened plaintext of publication `seq`, which
    /// passed every check before it (signature, machine, sequence `applied + 1`, seal). Its
    /// own function only so that the fuzz target `worker_publication_plaintext` reaches the
    /// body's decoder and its application without the crypto; nothing else may call it.
    pub(crate) fn apply_opened(&mut self, seq: u64, plain: &[u8]) -> Result<(), WorkerRefusal> {
        let body = Body::decode(plain).map_err(|e| {
            WorkerRefusal::Hostile(format!("publication {seq} does not decode: {e}"))
        })?;
        match body {
            Body::Pool(pool) => {
                self.rec.pool = Some(pool.clone());
                self.out.push(WorkerOutput::Apply(Effect::Pool(pool)));
            }
            Body::LoadBalancer(route) => {
                self.rec.route = route.clone();
                self.out.push(WorkerOutput::Apply(Effect::Route(route)));
            }
            Body::Deploy(order) => {
                let newest = self
                    .rec
                    .deploy
                    .as_ref()
                    .map_or(self.rec.last_deployment, |d| {
                        d.deployment.max(self.rec.last_deployment)
                    });
                if order.deployment <= newest {
                    // A replay of an older deployment (the sequence is new, so the controller
                    // signed it: a controller restored from an old backup). Consumed, not run.
                    tracing::warn!(
                        deployment = order.deployment,
                        newest,
                        "refusing a deployment that is not newer than the last one"
                    );
                } else {
                    self.rec.deploy = Some(order.clone());
                    self.out.push(WorkerOutput::Apply(Effect::Deploy(order)));
                }
            }
            Body::Config(order) => {
                // A newer one replaces one not yet applied; the software task applies only
                // the newest it was handed.
                self.rec.config.pending = Some(order.clone());
                self.out.push(WorkerOutput::Apply(Effect::Config(order)));
            }
            Body::Coupled(endpoint) => {
                self.rec.coupling.endpoint = endpoint;
                self.out.push(WorkerOutput::Apply(Effect::Coupling));
            }
            Body::Router(router) => {
                self.rec.coupling.router = router;
                self.out.push(WorkerOutput::Apply(Effect::Coupling));
            }
        }
        self.rec.applied = seq;
        self.dirty = true;
        self.out
            .push(WorkerOutput::ToController(Message::PublicationAck {
                upto: seq,
            }));
        Ok(())
    }
}
