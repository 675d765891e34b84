//! The software lifecycle of a worker as a state machine: which deployment order is taken up
//! (the newest; an older one still fetching, or queued behind a newer one, is superseded), the
//! stages of a deployment (fetch, install, switch, roll back), the outcome reported for it,
//! and the supervision of the running software (a death is reported and restarted with
//! backoff; deadlines are computed from the `now` passed in).
//!
//! It performs nothing and reads no clock: each input returns through [`Lifecycle::take`] the
//! [`Command`]s its driver performs (fetch, install, stop and start software, report), and
//! the driver feeds each result back (`fetched`, `installed`, `switched`, `rolled_back`,
//! `restarted`, `exited`) and calls [`Lifecycle::timeout`] at [`Lifecycle::poll_timeout`].
//! The cluster simulation drives it with a simulated installer whose steps fail by seed.

use std::collections::VecDeque;

use crate::cluster::body::DeployOrder;
use crate::limits::REPORT_DETAIL_MAX;
use crate::limits::{
    SOFTWARE_RESTART_BACKOFF_MAX as BACKOFF_MAX, SOFTWARE_RESTART_BACKOFF_MIN as BACKOFF_MIN,
    SOFTWARE_RESTART_BACKOFF_RESET_AFTER as BACKOFF_RESET_AFTER,
};
use crate::wire::{MachineReport, ReportState, Software};

use super::core::WorkerRecord;
use crate::limits::SOFTWARE_ORDERS_MAX;

/// What the driver performs for the lifecycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Fetch the sealed bundle of this order; answer with [`Lifecycle::fetched`].
    Fetch(DeployOrder),
    /// Stop fetching this deployment's bundle (a newer order superseded it).
    CancelFetch(u64),
    /// Open the fetched bundle with this machine's key and install it; answer with
    /// [`Lifecycle::installed`] (the manifest's software).
    Install(DeployOrder),
    /// Remove this installed bundle: it will not run.
    Discard(String),
    /// Stop what runs, activate this software, start it and check its health; answer with
    /// [`Lifecycle::switched`].
    Switch { deployment: u64, software: Software },
    /// Roll the installer back to the previous software and start it; answer with
    /// [`Lifecycle::rolled_back`].
    RollBack { deployment: u64 },
    /// Start the current software again (its backoff passed); answer with
    /// [`Lifecycle::restarted`].
    Restart(Software),
    /// Tell the controller (the worker core's `report`).
    Report(MachineReport),
    /// The deployment is over: its final report (the worker core's `deployed`).
    Deployed(u64, MachineReport),
}

/// How the software at boot went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Nothing is installed.
    Nothing,
    /// The current software started healthy.
    Healthy(Software),
    /// The current software did not pass its health check (it is retried with backoff).
    Unhealthy(Software, String),
    /// The installed software cannot be read or started at all.
    Broken(String),
}

/// How a switch to a deployment's software went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Switched {
    Healthy,
    /// Started, not healthy: it is stopped, and the previous software comes back.
    Unhealthy(String),
    /// It could not be activated; what was current runs again (if it could be started).
    NotActivated {
        reason: String,
        running: Option<Software>,
    },
}

/// How a roll back went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolledBack {
    Healthy(Software),
    /// The previous software came back but is not healthy either (retried with backoff).
    Unhealthy(Software, String),
    NoPrevious,
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Stage {
    Fetching,
    Installing,
    Switching(Software),
    RollingBack { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Child {
    None,
    /// Started at `since_ms`; healthy.
    Running {
        software: Software,
        since_ms: u64,
    },
    /// Down; started again at `at_ms`.
    Down {
        software: Software,
        at_ms: u64,
    },
    Restarting {
        software: Software,
        since_ms: u64,
    },
}

/// The lifecycle (see the module's doc). In memory only: rebuilt at every start from what is
/// installed ([`Lifecycle::booted`]); an unfinished deployment is handed over again by the
/// worker core.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    /// The highest deployment taken up.
    handled: u64,
    deploying: Option<(DeployOrder, Stage)>,
    queued: VecDeque<DeployOrder>,
    child: Child,
    backoff_ms: u64,
    /// A deployment whose outcome (its last report) the controller may not have acknowledged
    /// yet. Reports are the machine's latest state, not a log: a report after the outcome
    /// replaces it, and if that happens before the controller heard it, the outcome is lost
    /// and the deployment's rollout waits for ever. So a report of the software's state
    /// (a death, a restart, a boot) waits in `held` until the outcome is acknowledged (seed
    /// 3238338651: the new software died in the step its `running` outcome was reported).
    outcome: Option<u64>,
    /// The newest such report, sent once the outcome is acknowledged (after a failed
    /// deployment while the old software kept running: `running`).
    held: Option<MachineReport>,
    out: Vec<Command>,
}

impl Default for Lifecycle {
    fn default() -> Lifecycle {
        Lifecycle::new()
    }
}

/// At most [`REPORT_DETAIL_MAX`] bytes (what the controller accepts), cut on a character boundary.
pub fn clip(mut s: String) -> String {
    if s.len() > REPORT_DETAIL_MAX {
        let mut at = REPORT_DETAIL_MAX - 3;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
    s
}

/// A report with its detail clipped; the state becomes its wire word here.
pub fn report(
    state: ReportState,
    software: Option<Software>,
    detail: Option<String>,
    deployment: Option<u64>,
) -> MachineReport {
    MachineReport::new(state, software, detail.map(clip), deployment)
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            handled: 0,
            deploying: None,
            queued: VecDeque::new(),
            child: Child::None,
            backoff_ms: ms(BACKOFF_MIN),
            outcome: None,
            held: None,
            out: Vec::new(),
        }
    }

    /// What to perform, in order.
    pub fn take(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.out)
    }

    /// When [`Lifecycle::timeout`] is due (the software's restart).
    pub fn poll_timeout(&self) -> Option<u64> {
        match &self.child {
            Child::Down { at_ms, .. } => Some(*at_ms),
            _ => None,
        }
    }

    /// The software running healthy.
    pub fn running(&self) -> Option<&Software> {
        match &self.child {
            Child::Running { software, .. } => Some(software),
            _ => None,
        }
    }

    /// The deployment being carried out.
    pub fn deploying(&self) -> Option<u64> {
        self.deploying.as_ref().map(|(o, _)| o.deployment)
    }

    /// The software at boot. `rec` is the committed record: when its last report is a
    /// deployment's outcome the controller has not acknowledged yet, what the boot says waits
    /// for that acknowledgement (the controller would otherwise never learn that outcome);
    /// a plain `running` is not said at all after a `running` or `rolled_back` outcome (it
    /// says as much), and follows a `failed` one.
    pub fn booted(&mut self, boot: Boot, rec: &WorkerRecord, now_ms: u64) {
        let unacked = rec.report_acked < rec.report_seq;
        // The stored report was made by this worker: a word it does not know is no outcome.
        let outcome = rec.report.as_ref().filter(|r| {
            unacked && r.deployment.is_some() && r.parsed_state().is_ok_and(ReportState::is_outcome)
        });
        let outcome_failed = outcome.is_some_and(|r| r.is(ReportState::Failed));
        self.outcome = outcome.and_then(|r| r.deployment);
        match boot {
            Boot::Nothing => {}
            Boot::Healthy(sw) => {
                self.child = Child::Running {
                    software: sw.clone(),
                    since_ms: now_ms,
                };
                if self.outcome.is_none() || outcome_failed {
                    self.say(report(ReportState::Running, Some(sw), None, None));
                }
            }
            Boot::Unhealthy(sw, reason) => {
                // It was current, so it ran healthy once: tried again with backoff.
                let at_ms = now_ms + self.next_delay(0);
                self.child = Child::Down {
                    software: sw.clone(),
                    at_ms,
                };
                self.say(report(ReportState::Failed, Some(sw), Some(reason), None));
            }
            Boot::Broken(reason) => {
                let why = format!("the installed software cannot be started: {reason}");
                self.say(report(ReportState::Failed, None, Some(why), None));
            }
        }
    }

    /// A report of the software's state (no deployment): sent, or held while a deployment's
    /// outcome is unacknowledged (only the newest is kept: reports are the latest state).
    fn say(&mut self, r: MachineReport) {
        debug_assert!(r.deployment.is_none());
        if self.outcome.is_some() {
            self.held = Some(r);
        } else {
            self.out.push(Command::Report(r));
        }
    }

    /// A report on the way of a newer deployment (`delivering`, `installed`): it replaces
    /// whatever the machine said before, so an older outcome and a held report are past.
    fn say_deploying(&mut self, r: MachineReport) {
        debug_assert!(r.deployment.is_some());
        self.outcome = None;
        self.held = None;
        self.out.push(Command::Report(r));
    }

    /// Deployment `d` is over, `r` its outcome: what the machine says next waits until the
    /// controller acknowledged it.
    fn deployed(&mut self, d: u64, r: MachineReport) {
        self.outcome = Some(d);
        self.held = None;
        self.out.push(Command::Deployed(d, r));
    }

    /// Deployment orders handed over (after their commit), oldest first: the newest is taken
    /// up, older ones not yet taken up are superseded.
    pub fn orders(&mut self, orders: Vec<DeployOrder>, now_ms: u64) {
        for o in orders {
            if self.queued.len() == SOFTWARE_ORDERS_MAX {
                self.queued.pop_front();
            }
            self.queued.push_back(o);
        }
        self.next_order(now_ms);
    }

    fn next_order(&mut self, _now_ms: u64) {
        // An install or a switch is not interrupted: orders wait for its end.
        if matches!(&self.deploying, Some((_, s)) if *s != Stage::Fetching) {
            return;
        }
        let orders: Vec<DeployOrder> = self.queued.drain(..).collect();
        let Some(newest) = orders.iter().map(|o| o.deployment).max() else {
            return;
        };
        for order in orders {
            if order.deployment == newest {
                self.take_order(order);
            } else if order.deployment > self.handled {
                // Queued behind a newer one: never started.
                self.handled = order.deployment;
                self.superseded(&order, newest);
            }
        }
    }

    fn take_order(&mut self, order: DeployOrder) {
        if order.deployment <= self.handled {
            return;
        }
        self.handled = order.deployment;
        if let Some((old, _)) = self.deploying.take() {
            self.out.push(Command::CancelFetch(old.deployment));
            self.superseded(&old, order.deployment);
        }
        let sw = self.running().cloned();
        // Its software already runs healthy (a deployment resumed after a crash that came
        // between the switch and its outcome, or the same bundle again): nothing to fetch.
        if sw
            .as_ref()
            .is_some_and(|s| s.bundle_id == order.bundle_id && s.service == order.service)
        {
            let r = report(ReportState::Running, sw, None, Some(order.deployment));
            self.deployed(order.deployment, r);
            return;
        }
        self.say_deploying(report(
            ReportState::Delivering,
            sw,
            None,
            Some(order.deployment),
        ));
        self.out.push(Command::Fetch(order.clone()));
        self.deploying = Some((order, Stage::Fetching));
    }

    fn superseded(&mut self, order: &DeployOrder, by: u64) {
        let why = format!("superseded by deployment {by} before it was installed");
        let r = report(
            ReportState::Failed,
            self.running().cloned(),
            Some(why),
            Some(order.deployment),
        );
        self.deployed(order.deployment, r);
    }

    fn stage_of(&self, deployment: u64) -> Option<&Stage> {
        match &self.deploying {
            Some((o, s)) if o.deployment == deployment => Some(s),
            _ => None,
        }
    }

    /// The fetch of `deployment` ended (its hash checked), or failed.
    pub fn fetched(&mut self, deployment: u64, result: Result<(), String>, now_ms: u64) {
        if self.stage_of(deployment) != Some(&Stage::Fetching) {
            return;
        }
        match result {
            Err(reason) => self.fail(reason, now_ms),
            Ok(()) => {
                let (order, stage) = self.deploying.as_mut().expect("checked");
                *stage = Stage::Installing;
                let order = order.clone();
                self.out.push(Command::Install(order));
            }
        }
    }

    /// The bundle of `deployment` is installed (the manifest's software), or was refused.
    pub fn installed(&mut self, deployment: u64, result: Result<Software, String>, now_ms: u64) {
        if self.stage_of(deployment) != Some(&Stage::Installing) {
            return;
        }
        let sw = match result {
            Err(reason) => return self.fail(reason, now_ms),
            Ok(sw) => sw,
        };
        let (order, stage) = self.deploying.as_mut().expect("checked");
        if sw.service != order.service {
            let reason = format!(
                "the bundle's manifest is for service {}, the deployment for {}; not run",
                sw.service, order.service
            );
            self.out.push(Command::Discard(sw.bundle_id));
            return self.fail(reason, now_ms);
        }
        *stage = Stage::Switching(sw.clone());
        let running = self.running().cloned();
        self.say_deploying(report(
            ReportState::Installed,
            running,
            None,
            Some(deployment),
        ));
        // What ran is stopped by the switch.
        self.child = Child::None;
        self.out.push(Command::Switch {
            deployment,
            software: sw,
        });
    }

    /// The switch to `deployment`'s software went as `result` says.
    pub fn switched(&mut self, deployment: u64, result: Switched, now_ms: u64) {
        let Some(Stage::Switching(new)) = self.stage_of(deployment).cloned() else {
            return;
        };
        let d = Some(deployment);
        match result {
            Switched::Healthy => {
                self.started(new.clone(), now_ms);
                self.finish(report(ReportState::Running, Some(new), None, d), now_ms);
            }
            Switched::NotActivated { reason, running } => {
                if let Some(sw) = &running {
                    self.started(sw.clone(), now_ms);
                }
                self.finish(
                    report(ReportState::Failed, running, Some(reason), d),
                    now_ms,
                );
            }
            Switched::Unhealthy(reason) => {
                if let Some((_, stage)) = self.deploying.as_mut() {
                    *stage = Stage::RollingBack { reason };
                }
                self.out.push(Command::RollBack { deployment });
            }
        }
    }

    /// The roll back after `deployment`'s unhealthy software went as `result` says.
    pub fn rolled_back(&mut self, deployment: u64, result: RolledBack, now_ms: u64) {
        let Some(Stage::RollingBack { reason }) = self.stage_of(deployment).cloned() else {
            return;
        };
        let d = Some(deployment);
        let r = match result {
            RolledBack::Healthy(prev) => {
                self.started(prev.clone(), now_ms);
                report(ReportState::RolledBack, Some(prev), Some(reason), d)
            }
            RolledBack::Unhealthy(prev, r2) => {
                let at_ms = now_ms + self.next_delay(0);
                self.child = Child::Down {
                    software: prev.clone(),
                    at_ms,
                };
                let why = format!(
                    "{reason}; rolled back to {} {}, which is not healthy either: {r2}",
                    prev.service, prev.version
                );
                report(ReportState::Failed, Some(prev), Some(why), d)
            }
            RolledBack::NoPrevious => {
                self.child = Child::None;
                let why = format!("{reason}; no previous software to roll back to");
                report(ReportState::Failed, None, Some(why), d)
            }
            RolledBack::Failed(e) => {
                self.child = Child::None;
                report(
                    ReportState::Failed,
                    None,
                    Some(format!("{reason}; rolling back: {e}")),
                    d,
                )
            }
        };
        self.finish(r, now_ms);
    }

    /// The deployment failed before its software was switched to: what ran keeps running.
    fn fail(&mut self, reason: String, now_ms: u64) {
        let Some((order, _)) = &self.deploying else {
            return;
        };
        let d = order.deployment;
        let r = report(
            ReportState::Failed,
            self.running().cloned(),
            Some(reason),
            Some(d),
        );
        self.finish(r, now_ms);
    }

    fn finish(&mut self, r: MachineReport, now_ms: u64) {
        let Some((order, _)) = self.deploying.take() else {
            return;
        };
        let failed = r.is(ReportState::Failed);
        self.deployed(order.deployment, r);
        // It failed while the old software kept running: once the controller has the
        // outcome, the machine says it runs.
        if let Some(sw) = self.running().cloned().filter(|_| failed) {
            self.held = Some(report(ReportState::Running, Some(sw), None, None));
        }
        self.next_order(now_ms);
    }

    fn started(&mut self, software: Software, now_ms: u64) {
        self.child = Child::Running {
            software,
            since_ms: now_ms,
        };
    }

    /// The restart delay after a run of `ran_ms`, and the next one doubled (as
    /// `bundle::Supervisor` computes it).
    fn next_delay(&mut self, ran_ms: u64) -> u64 {
        let delay = if ran_ms >= ms(BACKOFF_RESET_AFTER) {
            ms(BACKOFF_MIN)
        } else {
            self.backoff_ms
        };
        self.backoff_ms = (delay * 2).min(ms(BACKOFF_MAX));
        delay
    }

    /// The running software exited (`status` says how).
    pub fn exited(&mut self, status: &str, now_ms: u64) {
        let Child::Running { software, since_ms } = self.child.clone() else {
            return;
        };
        let delay = self.next_delay(now_ms.saturating_sub(since_ms));
        self.child = Child::Down {
            software: software.clone(),
            at_ms: now_ms + delay,
        };
        let why = format!(
            "{} {} exited ({status}); restarting it in {}",
            software.service,
            software.version,
            humantime::format_duration(std::time::Duration::from_millis(delay))
        );
        self.say(report(ReportState::Failed, Some(software), Some(why), None));
    }

    /// Time passed: a restart that is due is started.
    pub fn timeout(&mut self, now_ms: u64) {
        if let Child::Down { software, at_ms } = &self.child {
            if *at_ms <= now_ms {
                let software = software.clone();
                self.child = Child::Restarting {
                    software: software.clone(),
                    since_ms: now_ms,
                };
                self.out.push(Command::Restart(software));
            }
        }
    }

    /// The restart went as `result` says.
    pub fn restarted(&mut self, result: Result<(), String>, now_ms: u64) {
        let Child::Restarting { software, since_ms } = self.child.clone() else {
            return;
        };
        match result {
            Ok(()) => {
                self.started(software.clone(), now_ms);
                self.say(report(ReportState::Running, Some(software), None, None));
            }
            Err(_) => {
                let at_ms = now_ms + self.next_delay(now_ms.saturating_sub(since_ms));
                self.child = Child::Down { software, at_ms };
            }
        }
    }

    /// The committed record changed: once the controller acknowledged the last deployment's
    /// outcome, what the machine said since (held) is sent. `rec` may be older than the
    /// outcome (not committed yet): it counts only once it holds that deployment.
    pub fn record(&mut self, rec: &WorkerRecord) {
        let Some(d) = self.outcome else { return };
        if rec.last_deployment < d || rec.report_acked < rec.report_seq {
            return;
        }
        self.outcome = None;
        if let Some(r) = self.held.take() {
            self.out.push(Command::Report(r));
        }
    }
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
