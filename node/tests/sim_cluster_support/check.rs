//! The checks once healed ((b) to (i) of the simulation's doc) and a seed's summary.

use super::*;

impl Sim {
    /// (b), (c), (d) once healed, and the controller's disk against its memory.
    pub(crate) fn check_end(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        let core = self.ctrl.core.as_ref().ok_or("the controller is down")?;
        let by_id: BTreeMap<NodeId, &MachineRecord> =
            core.machines().map(|m| (m.node_id, m)).collect();
        let disk = &self.ctrl.disk;
        // Memory and disk agree (the controller committed everything it changed).
        let mem: Vec<&MachineRecord> = by_id.values().copied().collect();
        let stored: Vec<&MachineRecord> = disk.machines.values().collect();
        let strip = |m: &MachineRecord| {
            let mut m = m.clone();
            m.last_seen_ms = 0;
            m
        };
        if mem.iter().map(|m| strip(m)).collect::<Vec<_>>()
            != stored.iter().map(|m| strip(m)).collect::<Vec<_>>()
        {
            bad.push("the controller's records differ from what it committed".to_string());
        }
        if core.unacked_len() != disk.publications.len() {
            bad.push(format!(
                "{} unacked in memory, {} stored",
                core.unacked_len(),
                disk.publications.len()
            ));
        }
        for (m, seq) in disk.publications.keys() {
            if let Some(r) = by_id.get(m) {
                if *seq <= r.pub_acked || *seq > r.pub_seq {
                    bad.push(format!(
                        "{}: stored publication {seq} outside ({}, {}]",
                        r.name, r.pub_acked, r.pub_seq
                    ));
                }
            }
        }
        let lb = &self.workers[0];
        let lb_name = lb.name().to_string();
        let mut running_deps = BTreeSet::new();
        let mut all_deps = BTreeSet::new();
        for w in &self.workers {
            let name = w.name();
            let Some(m) = by_id.get(&w.id()) else {
                bad.push(format!("{name}: unknown to the controller"));
                continue;
            };
            // A coupled call router is among the dependents (it may dial the load balancer)
            // but never a member.
            if w.info.load_balancer.is_some() && m.key_status == KeyStatus::Admitted {
                all_deps.insert(w.id());
            }
            if w.stopped {
                if w.disk.applied > m.pub_seq || m.pub_acked > w.disk.applied {
                    bad.push(format!(
                        "{name} (stopped): applied {} against published {} acked {}",
                        w.disk.applied, m.pub_seq, m.pub_acked
                    ));
                }
                if m.up {
                    bad.push(format!("{name} stopped but the controller says up"));
                }
                if m.notify_seq > w.disk.report_seq {
                    bad.push(format!(
                        "{name} (stopped): notify {} > report {}",
                        m.notify_seq, w.disk.report_seq
                    ));
                }
                continue;
            }
            let Some(c) = w.core.as_ref() else {
                bad.push(format!("{name} is not running"));
                continue;
            };
            // Its software said it failed (a deployment without previous software to roll
            // back to): out of the pool.
            let failed = c
                .record()
                .report
                .as_ref()
                .is_some_and(|r| r.state == "failed");
            if w.kind == Kind::Dependent && !failed {
                running_deps.insert(w.id());
            }
            let rec = c.record();
            if m.key_status != KeyStatus::Admitted || c.standing() != Standing::Admitted {
                bad.push(format!(
                    "{name}: {:?} at the controller, {:?} at the worker",
                    m.key_status,
                    c.standing()
                ));
            }
            if !m.up {
                bad.push(format!("{name} runs but the controller says down"));
            }
            // (b)
            if rec.applied != m.pub_seq || m.pub_acked != m.pub_seq {
                bad.push(format!(
                    "(b) {name}: applied {} published {} acked {}",
                    rec.applied, m.pub_seq, m.pub_acked
                ));
            }
            if rec != &w.disk {
                bad.push(format!("{name}: its record is not all committed"));
            }
            if disk.publications.keys().any(|(n, _)| *n == w.id()) {
                bad.push(format!("(b) {name}: publications left unacked"));
            }
            // (d)
            if rec.report != m.report
                || rec.report_seq != m.notify_seq
                || rec.report_acked != rec.report_seq
                || c.unacked_report().is_some()
            {
                bad.push(format!(
                    "(d) {name}: report {:?} seq {} acked {} at the worker, {:?} seq {} at the controller",
                    rec.report.as_ref().map(|r| &r.state),
                    rec.report_seq,
                    rec.report_acked,
                    m.report.as_ref().map(|r| &r.state),
                    m.notify_seq
                ));
            }
            // The final report, or a deployment's outcome (running, rolled back or failed).
            let outcome = rec.report.as_ref().is_some_and(|r| {
                r.deployment.is_some() && matches!(r.state.as_str(), "rolled_back" | "failed")
            });
            if rec.report.as_ref().map(|r| r.state.as_str()) != Some("running") && !outcome {
                bad.push(format!("(d) {name}: its last report is not the final one"));
            }
            // Routes.
            if w.info.load_balancer.is_some() {
                let want = Some(LbRoute {
                    name: lb_name.clone(),
                    node_id: lb.id(),
                    addr: lb.info.relay_addr.clone().expect("an LB has one"),
                    fingerprint: lb.fingerprint,
                });
                if rec.route != want || m.route != want || w.route != want {
                    bad.push(format!(
                        "{name}: route {:?} (record), {:?} (dialled), {:?} (controller), want {want:?}",
                        rec.route, w.route, m.route
                    ));
                }
            } else if rec.route.is_some() {
                bad.push(format!("{name} has a route: {:?}", rec.route));
            }
        }
        for w in &self.workers {
            if let Some(c) = w.core.as_ref() {
                if w.pool_file.as_ref() != c.record().pool.as_ref() {
                    bad.push(format!(
                        "{}: the pool file is not the recorded pool",
                        w.name()
                    ));
                }
            }
        }
        // (c)
        if let (Some(c), Some(m)) = (lb.core.as_ref(), by_id.get(&lb.id())) {
            let pool = c.record().pool.clone().unwrap_or_default();
            let members: BTreeSet<NodeId> = pool.members.iter().map(|p| p.node_id).collect();
            let dependents: BTreeSet<NodeId> = pool.dependents.iter().map(|p| p.node_id).collect();
            for member in &pool.members {
                let addr = self
                    .worker_by_id(member.node_id)
                    .map(|d| self.workers[d].info.service_addr.clone());
                if addr != Some(member.service_addr.clone()) || member.node_id == lb.id() {
                    bad.push(format!(
                        "(c) pool member {} at {:?}, its address is {addr:?}",
                        member.name, member.service_addr
                    ));
                }
            }
            if members != running_deps {
                bad.push(format!(
                    "(c) the pool holds {members:?}, the running dependents are {running_deps:?}"
                ));
            }
            if dependents != all_deps {
                bad.push(format!(
                    "(c) the pool lists dependents {dependents:?}, admitted are {all_deps:?}"
                ));
            }
            if m.pool.as_ref() != c.record().pool.as_ref() {
                bad.push("(c) the load balancer's pool is not the controller's".to_string());
            }
        }
        // (g) coupling: the call router knows its load balancer (up, as it is at the end) and
        // the load balancer its router, at the controller, in the record and in the file.
        for w in &self.workers {
            let (Some(c), Some(m)) = (w.core.as_ref(), by_id.get(&w.id())) else {
                continue;
            };
            if let Some(doc) = pool_file::document(w.name(), &w.info.component, c.record()) {
                if w.doc_file.as_ref() != Some(&doc) {
                    bad.push(format!(
                        "(g) {}: its file holds {:?}, its record says {doc}",
                        w.name(),
                        w.doc_file
                    ));
                }
            }
            let coupled = self.workers.iter().find(|r| {
                r.kind == Kind::Standalone && r.info.load_balancer.as_deref() == Some(&lb_name)
            });
            let (want, sent) = match w.kind {
                Kind::Standalone => {
                    let want = coupled.map(|_| LbEndpoint {
                        name: lb_name.clone(),
                        node_id: lb.id(),
                        service_addr: lb.info.service_addr.clone(),
                        relay_addr: lb.info.relay_addr.clone(),
                        fingerprint: lb.fingerprint,
                        up: true,
                    });
                    (
                        format!("{want:?}"),
                        (
                            format!("{:?}", c.record().coupling.endpoint),
                            format!("{:?}", m.balancing.endpoint.clone().flatten()),
                        ),
                    )
                }
                Kind::LoadBalancer => {
                    let want = coupled.map(|r| RouterPeer {
                        name: r.info.name.clone(),
                        node_id: r.id(),
                        service_addr: r.info.service_addr.clone(),
                        fingerprint: r.fingerprint,
                    });
                    (
                        format!("{want:?}"),
                        (
                            format!("{:?}", c.record().coupling.router),
                            format!("{:?}", m.balancing.router.clone().flatten()),
                        ),
                    )
                }
                Kind::Dependent => continue,
            };
            if sent.0 != want || sent.1 != want {
                bad.push(format!(
                    "(g) {}: coupling {} (record), {} (controller), want {want}",
                    w.name(),
                    sent.0,
                    sent.1
                ));
            }
        }
        // (h) rollouts: the newest deployment ran on every target not stopped (or says why not),
        // its rollout is done unless a stopped machine holds a wave, an older one is done or
        // halted as superseded, and no machine is left out of its pool.
        if let Some((&newest, d)) = disk.deployments.iter().next_back() {
            let stopped: BTreeSet<NodeId> = self
                .workers
                .iter()
                .filter(|w| w.stopped)
                .map(|w| w.id())
                .collect();
            let blocked = d.targets.iter().any(|(n, _)| stopped.contains(n));
            if !blocked && d.rollout.state != RolloutState::Done {
                bad.push(format!(
                    "(h) deployment {newest}: rollout {} at wave {} of {} ({:?})",
                    d.rollout.state.as_str(),
                    d.rollout.wave + 1,
                    d.rollout.waves.len(),
                    d.rollout.reason
                ));
            }
            if d.rollout.wave_started_ms.windows(2).any(|w| w[1] < w[0]) {
                bad.push(format!(
                    "(h) deployment {newest}: waves started out of order"
                ));
            }
            for (n, name) in &d.targets {
                if stopped.contains(n) || d.failures.iter().any(|(f, _)| f == n) {
                    continue;
                }
                let Some(w) = self.worker_by_id(*n).map(|i| &self.workers[i]) else {
                    continue;
                };
                let ran = w.core.as_ref().map(|c| c.record().last_deployment);
                if !blocked && ran != Some(newest) {
                    bad.push(format!(
                        "(h) {name}: last ran deployment {ran:?}, the newest is {newest}"
                    ));
                }
                // (i) software lifecycle: it runs the newest deployment's bundle, or the
                // controller recorded that it rolled back or failed, and why.
                let recorded = by_id
                    .get(n)
                    .and_then(|m| m.deploys.iter().find(|x| x.deployment == newest));
                let running = w.life.as_ref().and_then(|l| l.running());
                let runs_new = running.is_some_and(|s| s.bundle_id == d.bundle_id);
                let problem = match recorded.map(|x| (x.state.as_str(), x.detail.as_deref())) {
                    Some(("running", _)) => (!runs_new || w.installed.current.as_ref() != running)
                        .then(|| {
                            format!(
                                "(i) {name}: deployment {newest} recorded running, yet it runs {running:?} (installed {:?})",
                                w.installed.current
                            )
                        }),
                    Some(("rolled_back" | "failed", Some(why))) if !why.is_empty() => runs_new
                        .then(|| {
                            format!(
                                "(i) {name}: deployment {newest} recorded as not run, yet it runs"
                            )
                        }),
                    other => (!blocked).then(|| {
                        format!(
                            "(i) {name}: deployment {newest} ends as {other:?}, neither running nor rolled back or failed with a reason"
                        )
                    }),
                };
                bad.extend(problem);
            }
            for (id, old) in disk.deployments.range(..newest) {
                let superseded = old.rollout.state == RolloutState::Halted
                    && old
                        .rollout
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.starts_with("superseded"));
                if !blocked && old.rollout.state != RolloutState::Done && !superseded {
                    bad.push(format!(
                        "(h) deployment {id}: rollout {} ({:?}), neither done nor superseded",
                        old.rollout.state.as_str(),
                        old.rollout.reason
                    ));
                }
            }
        }
        for m in core.machines() {
            let stopped = self
                .worker_by_id(m.node_id)
                .is_some_and(|i| self.workers[i].stopped);
            if m.balancing.draining.is_some() && !stopped {
                bad.push(format!(
                    "(h) {} is still drained by deployment {:?}",
                    m.name, m.balancing.draining
                ));
            }
        }
        // (f) configuration data.
        for (i, w) in self.workers.iter().enumerate() {
            let (Some(c), Some(m)) = (w.core.as_ref(), by_id.get(&w.id())) else {
                continue;
            };
            if w.stopped || m.key_status != KeyStatus::Admitted {
                continue;
            }
            let want = match self.expected_config(i) {
                Some(v) => Some(configdata::canonical(&v)),
                None if m.config.version == 0 => None,
                None => Some("{}".to_owned()),
            };
            let have = c.record().config.current.as_ref();
            if have.map(|o| &o.doc) != want.as_ref() {
                bad.push(format!(
                    "(f) {} applied configuration {:?}, its effective one is {want:?}",
                    w.name(),
                    have.map(|o| &o.doc)
                ));
            }
            let version = have.map_or(0, |o| o.version);
            if version != m.config.version
                || (version > 0 && (m.config.applied != version || m.config.state != "applied"))
            {
                bad.push(format!(
                    "(f) {} applied configuration version {version}; the controller sent {} and recorded {} {:?}",
                    w.name(),
                    m.config.version,
                    m.config.applied,
                    m.config.state
                ));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("\n"))
        }
    }

    pub(crate) fn summary(&self) -> String {
        format!(
            "seed {}: {} workers, {:?}, faults {:?}",
            self.seed,
            self.workers.len(),
            self.stats,
            self.faults
        )
    }
}
