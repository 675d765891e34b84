//! The simulated connections and workers: dialling, cutting, the load balancer's relay, each
//! worker's core and software lifecycle driven the way its runtime drives them, and the checks
//! of what a worker applies.

use super::*;

impl Sim {
    // ---- connections ----

    /// Cuts a connection: both ends learn it is gone, everything in flight is lost.
    pub(crate) fn cut(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if c.ctrl_open {
            if let Some(core) = self.ctrl.core.as_mut() {
                core.closed(conn, self.now);
            }
        }
        let w = c.worker;
        if self.workers[w].conn == Some(conn) {
            self.workers[w].conn = None;
            self.workers[w].reconnect_at = self.now + self.rng.between(10, 800);
        }
        self.ctrl_flush();
    }

    pub(crate) fn cut_relay(&mut self, dep: usize) {
        self.relays.remove(&dep);
        self.workers[dep].relay_retry_at = self.now + self.rng.between(10, 500);
    }

    pub(crate) fn connect(&mut self, i: usize) {
        let id = self.next_conn;
        self.next_conn += 1;
        let lat = self.latency();
        let w = &mut self.workers[i];
        let core = w.core.as_mut().expect("running");
        let join = core.join();
        let mut bad = Vec::new();
        if join.resume != core.record().applied || join.node_id != w.info.node_id {
            bad.push(format!(
                "{}'s Join resumes at {} with {} applied",
                w.info.name,
                join.resume,
                core.record().applied
            ));
        }
        self.conns.insert(
            id,
            Conn {
                worker: i,
                ctrl_open: true,
                to_ctrl: VecDeque::from([(self.now + lat, ToCtrl::Join(join))]),
                to_worker: VecDeque::new(),
                due_ctrl: self.now + lat,
                due_worker: 0,
                abandoned_until: None,
            },
        );
        w.conn = Some(id);
        core.connected();
        for b in bad {
            self.fail(b);
        }
        self.worker_flush(i);
    }

    // ---- workers ----

    pub(crate) fn start_worker(&mut self, i: usize) {
        if self.faults_on && self.rng.chance(self.faults.readdress) {
            let port = 5000 + self.rng.below(1000);
            let w = &mut self.workers[i];
            if w.kind == Kind::LoadBalancer && self.rng.chance(500) {
                w.info.relay_addr = Some(format!("10.0.0.1:{}", port + 2000));
            } else {
                w.info.service_addr = Some(format!("10.0.0.{}:{port}", i + 1));
            }
        }
        let w = &mut self.workers[i];
        let seal = SealKey::from_secret(&w.seal_secret).expect("own secret");
        match WorkerCore::open(w.info.clone(), seal, w.disk.clone()) {
            Ok(core) => {
                let same = core.record() == &w.disk;
                w.core = Some(core);
                w.reconnect_at = self.now;
                w.next_heartbeat = self.now;
                w.relay_retry_at = self.now;
                let boot = match &w.installed.current {
                    None => Boot::Nothing,
                    Some(sw) => Boot::Healthy(sw.clone()),
                };
                // The software task boots what is installed (always healthy here; an unhealthy
                // boot's report waits behind an unacknowledged deployment outcome: the
                // lifecycle's unit tests).
                let mut life = Lifecycle::new();
                life.booted(boot, &w.disk, self.now);
                w.life = Some(life);
                if !same {
                    let name = w.info.name.clone();
                    self.fail(format!(
                        "{name} reopened with another record than committed"
                    ));
                }
                self.life_perform(i);
                // The first take re-applies the stored state's effects.
                self.worker_flush(i);
            }
            Err(e) => {
                let name = w.info.name.clone();
                w.restart_at = u64::MAX;
                self.fail(format!("{name} cannot reopen its record: {e}"));
            }
        }
    }

    pub(crate) fn crash_worker(&mut self, i: usize, downtime: u64) {
        self.stats.crashes += 1;
        let w = &mut self.workers[i];
        w.core = None;
        w.route = None;
        w.config_due = None;
        w.life = None;
        w.life_due.clear();
        w.frozen_until = 0;
        w.restart_at = self.now + downtime;
        if let Some(c) = w.conn.take() {
            self.cut(c);
        }
        self.cut_relay(i);
        if self.workers[i].kind == Kind::LoadBalancer {
            let deps: Vec<usize> = self
                .relays
                .iter()
                .filter(|(_, l)| l.lb == i)
                .map(|(d, _)| *d)
                .collect();
            for d in deps {
                self.cut_relay(d);
            }
        }
    }

    /// Performs what worker `i`'s lifecycle core asks, as the software task does: installer
    /// steps answered later (failing by seed), reports and outcomes into the worker core.
    pub(crate) fn life_perform(&mut self, i: usize) {
        let Some(life) = self.workers[i].life.as_mut() else {
            return;
        };
        let cmds = life.take();
        let f = self.faults.clone();
        let on = self.faults_on;
        for c in cmds {
            let now = self.now;
            let later = now + self.rng.between(1, 150);
            let w = &mut self.workers[i];
            match c {
                LifeCommand::Fetch(o) => {
                    let r = if on && self.rng.chance(f.fetch_fail) {
                        Err(
                            "the sealed bundle's hash does not match the signed one (simulated)"
                                .into(),
                        )
                    } else {
                        Ok(())
                    };
                    w.life_due.push((later, LifeDone::Fetched(o.deployment, r)));
                }
                LifeCommand::CancelFetch(d) => w
                    .life_due
                    .retain(|(_, x)| !matches!(x, LifeDone::Fetched(e, _) if *e == d)),
                LifeCommand::Install(o) => {
                    let r = if on && self.rng.chance(f.install_fail) {
                        Err("the bundle is not sealed to this machine (simulated)".into())
                    } else {
                        Ok(Software {
                            service: o.service.clone(),
                            bundle_id: o.bundle_id.clone(),
                            version: o.version.clone(),
                        })
                    };
                    w.life_due
                        .push((later, LifeDone::Installed(o.deployment, r)));
                }
                LifeCommand::Discard(_) => {}
                LifeCommand::Switch {
                    deployment,
                    software,
                } => {
                    // Activated at once (the link switch is atomic); then started and checked.
                    if w.installed.current.as_ref() != Some(&software) {
                        w.installed.previous = w.installed.current.replace(software);
                    }
                    let r = if on && self.rng.chance(f.unhealthy) {
                        Switched::Unhealthy("the health check failed (simulated)".into())
                    } else {
                        Switched::Healthy
                    };
                    w.life_due.push((later, LifeDone::Switched(deployment, r)));
                }
                LifeCommand::RollBack { deployment } => {
                    let r = match w.installed.previous.take() {
                        Some(prev) => {
                            w.installed.current = Some(prev.clone());
                            RolledBack::Healthy(prev)
                        }
                        None => {
                            w.installed.current = None;
                            RolledBack::NoPrevious
                        }
                    };
                    w.life_due
                        .push((later, LifeDone::RolledBack(deployment, r)));
                }
                LifeCommand::Restart(_) => w.life_due.push((later, LifeDone::Restarted(Ok(())))),
                LifeCommand::Report(r) => {
                    if let Some(core) = w.core.as_mut() {
                        core.report(r);
                    }
                }
                LifeCommand::Deployed(d, r) => {
                    match r.state.as_str() {
                        "running" => self.stats.deploys_run += 1,
                        "rolled_back" => self.stats.deploys_rolled_back += 1,
                        _ => self.stats.deploys_failed += 1,
                    }
                    if let Some(core) = w.core.as_mut() {
                        core.deployed(d, r);
                    }
                }
            }
        }
    }

    /// Worker `i`'s software task: results that are due, the restart timer, and a death now
    /// and then (also right after a deployment's outcome, before the controller heard it:
    /// the lifecycle holds what the death says until then; seed 3238338651).
    pub(crate) fn life_step(&mut self, i: usize) {
        let now = self.now;
        let w = &mut self.workers[i];
        let Some(life) = w.life.as_mut() else {
            return;
        };
        let (due, rest): (Vec<_>, Vec<_>) = w.life_due.drain(..).partition(|(t, _)| *t <= now);
        w.life_due = rest;
        for (_, done) in due {
            match done {
                LifeDone::Fetched(d, r) => life.fetched(d, r, now),
                LifeDone::Installed(d, r) => life.installed(d, r, now),
                LifeDone::Switched(d, r) => life.switched(d, r, now),
                LifeDone::RolledBack(d, r) => life.rolled_back(d, r, now),
                LifeDone::Restarted(r) => life.restarted(r, now),
            }
        }
        if life.poll_timeout().is_some_and(|t| t <= now) {
            life.timeout(now);
        }
        if self.faults_on && life.running().is_some() && self.rng.chance(self.faults.death) {
            self.stats.deaths += 1;
            life.exited("signal 9 (simulated)", now);
        }
        self.life_perform(i);
        self.worker_flush(i);
    }

    pub(crate) fn worker_flush(&mut self, i: usize) {
        loop {
            let Some(core) = self.workers[i].core.as_mut() else {
                return;
            };
            let (rec, outs) = core.take();
            if rec.is_none() && outs.is_empty() {
                return;
            }
            if let Some(rec) = rec {
                let old = &self.workers[i].disk;
                let name = self.workers[i].name().to_string();
                let mut bad = Vec::new();
                if rec.applied < old.applied {
                    bad.push(format!(
                        "{name} committed applied {} after {}",
                        rec.applied, old.applied
                    ));
                }
                if rec.report_seq < old.report_seq || rec.report_acked > rec.report_seq {
                    bad.push(format!(
                        "{name} committed report seq {} acked {} after {}",
                        rec.report_seq, rec.report_acked, old.report_seq
                    ));
                }
                if rec.applied > 0 && rec.controller_key.is_none() {
                    bad.push(format!("{name} applied publications before admission"));
                }
                if let Some(life) = self.workers[i].life.as_mut() {
                    life.record(&rec);
                }
                self.workers[i].disk = rec;
                for b in bad {
                    self.fail(b);
                }
                self.life_perform(i);
            }
            let crash_at =
                (self.faults_on && !outs.is_empty() && self.rng.chance(self.faults.crash_mid))
                    .then(|| self.rng.below(outs.len() as u64) as usize);
            for (k, o) in outs.into_iter().enumerate() {
                if Some(k) == crash_at {
                    let downtime = self.rng.between(10, 2000);
                    self.crash_worker(i, downtime);
                    return;
                }
                self.worker_perform(i, o);
            }
        }
    }

    pub(crate) fn worker_perform(&mut self, i: usize, o: WorkerOutput) {
        let name = self.workers[i].name().to_string();
        match o {
            WorkerOutput::ToController(msg) => {
                let standing = self.workers[i].core.as_ref().map(|c| c.standing());
                match &msg {
                    Message::PublicationAck { upto } => {
                        if *upto > self.workers[i].disk.applied {
                            let committed = self.workers[i].disk.applied;
                            self.fail(format!(
                                "{name} acks {upto} with only {committed} committed"
                            ));
                        }
                        // A relayed publication may arrive between a reconnect and the
                        // Admission; it was still admitted to get the controller's key.
                        if self.workers[i].disk.controller_key.is_none() {
                            self.fail(format!("{name} acks while {standing:?}"));
                        }
                    }
                    Message::ConfigNotify(n) if n.seq > self.workers[i].disk.config.report_seq => {
                        let committed = self.workers[i].disk.config.report_seq;
                        self.fail(format!(
                            "{name} sends configuration report {} with only {committed} committed",
                            n.seq
                        ));
                    }
                    Message::Notify(n) => {
                        if n.machine != self.workers[i].id() {
                            self.fail(format!("{name} notifies for {:?}", n.machine));
                        }
                        if standing != Some(Standing::Admitted) {
                            self.fail(format!("{name} notifies while {standing:?}"));
                        }
                        if n.seq > self.workers[i].disk.report_seq {
                            let committed = self.workers[i].disk.report_seq;
                            self.fail(format!(
                                "{name} sends report {} with only {committed} committed",
                                n.seq
                            ));
                        }
                    }
                    _ => {}
                }
                self.worker_send(i, msg);
            }
            // Also on a worker that is not a load balancer: see `publish_again`.
            WorkerOutput::Apply(Effect::Pool(p)) => {
                if self.workers[i].kind == Kind::LoadBalancer {
                    self.stats.pools += 1;
                }
                self.workers[i].pool_file = Some(p);
                self.write_doc(i);
            }
            WorkerOutput::Apply(Effect::Coupling) => self.write_doc(i),
            WorkerOutput::Apply(Effect::Config(order)) => {
                // (f) in order: a replay after a crash is the version it had, never older.
                let w = &mut self.workers[i];
                if order.version < w.config_seen {
                    let seen = w.config_seen;
                    self.fail(format!(
                        "{name} handed configuration {} after {seen}",
                        order.version
                    ));
                }
                let w = &mut self.workers[i];
                if order.version == w.config_seen {
                    self.stats.configs_replayed += 1;
                }
                let w = &mut self.workers[i];
                w.config_seen = order.version;
                let due = self.now + self.rng.between(1, 300);
                self.workers[i].config_due = Some((due, order));
            }
            // Its software runs the order after a while (and says so).
            WorkerOutput::Apply(Effect::Deploy(order)) => {
                let now = self.now;
                if let Some(life) = self.workers[i].life.as_mut() {
                    life.orders(vec![order], now);
                }
                self.life_perform(i);
            }
            WorkerOutput::Apply(Effect::Route(r)) => {
                let lb = self.relays.get(&i).map(|l| self.workers[l.lb].id());
                if lb.is_some() && r.as_ref().map(|r| r.node_id) != lb {
                    self.cut_relay(i);
                }
                self.workers[i].route = r;
            }
        }
    }

    /// What the driver does for a pool or a coupling: the file written from the committed
    /// record.
    pub(crate) fn write_doc(&mut self, i: usize) {
        let w = &mut self.workers[i];
        let doc = pool_file::document(&w.info.name, &w.info.component, &w.disk);
        if doc.is_some() {
            w.doc_file = doc;
        }
    }

    pub(crate) fn worker_send(&mut self, i: usize, msg: Message) {
        let Some(conn) = self.workers[i].conn else {
            return;
        };
        let lat = self.latency();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.ctrl_open {
            return;
        }
        c.due_ctrl = c.due_ctrl.max(self.now + lat);
        c.to_ctrl.push_back((c.due_ctrl, ToCtrl::Frame(msg)));
    }

    pub(crate) fn deliver_to_worker(&mut self, i: usize, conn: ConnId, item: ToWorker) {
        match item {
            ToWorker::Close => {
                self.conns.remove(&conn);
                if self.workers[i].conn == Some(conn) {
                    let rejected = self.workers[i]
                        .core
                        .as_ref()
                        .is_some_and(|c| c.standing() == Standing::Rejected);
                    // A rejected worker keeps asking, slowly (it may be accepted again).
                    let delay = if rejected {
                        self.rng.between(500, 3000)
                    } else {
                        self.rng.between(10, 800)
                    };
                    self.workers[i].conn = None;
                    self.workers[i].reconnect_at = self.now + delay;
                }
            }
            ToWorker::Frame(msg) if matches!(*msg, Message::Relay(_)) => {
                let Message::Relay(r) = *msg else {
                    unreachable!()
                };
                self.forward(i, r.to, r.publication)
            }
            ToWorker::Frame(msg) => {
                let msg = *msg;
                let core = self.workers[i].core.as_mut().expect("running");
                let before = core.record().clone();
                let r = core.from_controller(msg.clone());
                if let Message::Publication(p) = &msg {
                    self.check_apply(i, p, &before, &r, false, false);
                } else if let Err(e) = &r {
                    let name = self.workers[i].name().to_string();
                    if matches!(e, WorkerRefusal::Hostile(_)) {
                        self.fail(format!("{name} refused {} as hostile: {e}", msg.kind()));
                    }
                }
                self.worker_flush(i);
            }
        }
    }

    /// The load balancer's runtime: forwards to the dependent if its link is up.
    pub(crate) fn forward(&mut self, lb: usize, to: NodeId, mut p: Publication) {
        let Some(d) = self.worker_by_id(to) else {
            self.fail(format!("a Relay for unknown {to:?}"));
            return;
        };
        let lat = self.latency();
        let tamper = self.faults_on && self.rng.chance(self.faults.tamper);
        if tamper {
            match self.rng.below(4) {
                0 if !p.sealed.is_empty() => {
                    let at = self.rng.below(p.sealed.len() as u64) as usize;
                    p.sealed[at] ^= 1 << self.rng.below(8);
                }
                1 if !p.signature.is_empty() => {
                    let at = self.rng.below(p.signature.len() as u64) as usize;
                    p.signature[at] ^= 1 << self.rng.below(8);
                }
                2 => p.seq = p.seq.wrapping_add(1 + self.rng.below(3)),
                _ => p.seq = p.seq.saturating_sub(1 + self.rng.below(3)),
            }
        }
        let Some(link) = self.relays.get_mut(&d) else {
            return;
        };
        if link.lb != lb {
            return;
        }
        link.due = link.due.max(self.now + lat);
        link.queue.push_back((link.due, p, tamper));
    }

    /// (a): a publication offered to worker `i` moved its `applied` by one, in order, and only
    /// for what the controller committed under that sequence.
    pub(crate) fn check_apply(
        &mut self,
        i: usize,
        p: &Publication,
        before: &WorkerRecord,
        r: &Result<(), WorkerRefusal>,
        relayed: bool,
        tampered: bool,
    ) {
        let name = self.workers[i].name().to_string();
        let id = self.workers[i].id();
        let after = self.workers[i]
            .core
            .as_ref()
            .expect("running")
            .record()
            .clone();
        let path = if relayed { "relayed" } else { "direct" };
        if after.applied != before.applied {
            if tampered {
                self.fail(format!(
                    "{name} applied an altered publication (seq {})",
                    p.seq
                ));
            }
            if after.applied != before.applied + 1 || p.seq != after.applied {
                self.fail(format!(
                    "{name} applied {path} publication {} moving applied {} -> {}",
                    p.seq, before.applied, after.applied
                ));
            }
            if p.machine != id {
                self.fail(format!("{name} applied {:?}'s publication", p.machine));
            }
            match self.published.get(&(p.machine, p.seq)) {
                Some(q) if q == p => {}
                Some(_) => self.fail(format!(
                    "{name} applied a publication {} that is not the committed one",
                    p.seq
                )),
                None => self.fail(format!(
                    "{name} applied publication {} that was never committed",
                    p.seq
                )),
            }
            if !self.ever_admitted.contains(&id) {
                self.fail(format!("{name} applied a publication before admission"));
            }
            self.stats.applied += 1;
            if relayed {
                self.stats.applied_relayed += 1;
            }
        } else if &after != before {
            self.fail(format!(
                "{name}'s record changed on {path} publication {} without applying it",
                p.seq
            ));
        }
        match r {
            Err(WorkerRefusal::Hostile(e)) if !tampered => {
                self.fail(format!(
                    "{name} refused an honest {path} publication {} as hostile: {e} (applied {})",
                    p.seq, before.applied
                ));
            }
            Err(WorkerRefusal::Hostile(_)) => self.stats.hostile_refused += 1,
            Err(e) => self.fail(format!("{name}: {path} publication {}: {e}", p.seq)),
            // The signature is checked first, and covers everything altered.
            Ok(()) if tampered => {
                self.fail(format!(
                    "{name} took an altered publication {} without refusing it",
                    p.seq
                ));
            }
            Ok(()) => {}
        }
    }

    pub(crate) fn deliver_relay(&mut self, d: usize, p: Publication, tampered: bool) {
        let core = self.workers[d].core.as_mut().expect("running");
        let before = core.record().clone();
        let r = core.from_relay(p.clone());
        self.check_apply(d, &p, &before, &r, true, tampered);
        if matches!(r, Err(WorkerRefusal::Hostile(_))) {
            // The dependent closes its load balancer's connection.
            self.cut_relay(d);
        }
        self.worker_flush(d);
    }
}
