//! The simulated cluster's set-up, its helpers and the controller: started and rebuilt from
//! its in-memory store, its batches taken, committed (or failed, or stalled) and performed,
//! the seal worker, and the checks of what it commits and sends.

use super::*;

impl Sim {
    pub(crate) fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let plan = Plan::random(&mut rng);
        Sim::with_plan(seed, rng, plan)
    }

    pub(crate) fn with_plan(seed: u64, mut rng: Rng, plan: Plan) -> Sim {
        let mut settings = Settings::new(plan.down_after_ms);
        settings.resend_after_ms = plan.resend_after_ms;
        settings.pending_max = 16;
        settings.join_token = plan.controller_has_token.then(|| TOKEN.to_vec());
        let key_secret = rng.bytes32().to_vec();
        let mut workers = Vec::new();
        let lb_name = "lb-1".to_string();
        let n = 1 + plan.dependents + plan.standalone as usize;
        for i in 0..n {
            let kind = if i == 0 {
                Kind::LoadBalancer
            } else if i <= plan.dependents {
                Kind::Dependent
            } else {
                Kind::Standalone
            };
            let node_id = NodeId(((rng.next() as u128) << 64) | rng.next() as u128);
            let fingerprint = Fingerprint(rng.bytes32());
            let seal = SealKey::generate();
            let (name, component, load_balancer, relay_addr) = match kind {
                Kind::LoadBalancer => (
                    lb_name.clone(),
                    "load-balancer".to_string(),
                    None,
                    Some("10.0.0.1:7443".to_string()),
                ),
                Kind::Dependent => (
                    format!("dep-{i}"),
                    DEPENDENT_COMPONENTS[rng.below(5) as usize].to_string(),
                    Some(lb_name.clone()),
                    None,
                ),
                // Half the seeds couple it with lb-1.
                Kind::Standalone => (
                    "router-1".into(),
                    "call-router".into(),
                    plan.coupled.then(|| lb_name.clone()),
                    None,
                ),
            };
            let info = JoinInfo {
                node_id,
                name,
                service: "voice".into(),
                component,
                load_balancer,
                service_addr: Some(format!("10.0.0.{}:5060", i + 1)),
                relay_addr,
                token_proof: plan.token[i].then(|| token_proof(TOKEN, &fingerprint)),
            };
            workers.push(Worker {
                kind,
                info,
                fingerprint,
                seal_secret: seal.secret_bytes(),
                recipient: seal.recipient(),
                core: None,
                disk: WorkerRecord::default(),
                conn: None,
                reconnect_at: 0,
                next_heartbeat: 0,
                restart_at: 0,
                frozen_until: 0,
                stopped: false,
                route: None,
                pool_file: None,
                doc_file: None,
                relay_retry_at: 0,
                config_due: None,
                life: None,
                life_due: Vec::new(),
                installed: Installed::default(),
                config_seen: 0,
            });
        }
        let mut sim = Sim {
            seed,
            rng,
            now: T0_MS,
            faults: plan.faults,
            faults_on: true,
            plan_rollouts: plan.rollouts,
            ctrl: Ctrl {
                settings,
                key_secret,
                core: None,
                disk: MemClusterStore::default(),
                restart_at: 0,
                next_tick: 0,
                deploy: DeployCore::new(),
                sealing: VecDeque::new(),
                deployments_made: 0,
                stalled_until: 0,
                stalled_outputs: Vec::new(),
            },
            workers,
            conns: BTreeMap::new(),
            next_conn: 1,
            relays: BTreeMap::new(),
            published: BTreeMap::new(),
            ever_admitted: BTreeSet::new(),
            reaccept: BTreeMap::new(),
            config_set: BTreeMap::new(),
            config_changes: 0,
            violations: Vec::new(),
            stats: Stats::default(),
        };
        sim.start_ctrl();
        for i in 0..sim.workers.len() {
            // Workers boot at different moments.
            sim.workers[i].restart_at = T0_MS + sim.rng.below(500);
        }
        sim
    }

    pub(crate) fn fail(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations
                .push(format!("t={} ms: {what}", self.now - T0_MS));
        }
    }

    pub(crate) fn check_ok(&self) -> Result<(), String> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(self.violations.join("\n"))
        }
    }

    pub(crate) fn latency(&mut self) -> u64 {
        1 + self.rng.below(self.faults.latency_max)
    }

    pub(crate) fn worker_by_id(&self, id: NodeId) -> Option<usize> {
        self.workers.iter().position(|w| w.id() == id)
    }

    pub(crate) fn running(&self, i: usize) -> bool {
        let w = &self.workers[i];
        w.core.is_some() && w.frozen_until <= self.now
    }

    pub(crate) fn ctrl_record(&self, id: NodeId) -> Option<&MachineRecord> {
        self.ctrl
            .core
            .as_ref()
            .and_then(|c| c.machines().find(|m| m.node_id == id))
    }

    pub(crate) fn admitted_in_ctrl(&self, id: NodeId) -> bool {
        self.ctrl_record(id)
            .is_some_and(|m| m.key_status == KeyStatus::Admitted)
    }

    // ---- the controller ----

    pub(crate) fn start_ctrl(&mut self) {
        let key = ControllerKey::from_secret(&self.ctrl.key_secret).expect("32 bytes");
        let disk = &self.ctrl.disk;
        let loaded = disk.load().expect("the in-memory store loads");
        let core = ControllerCore::open(
            self.ctrl.settings.clone(),
            key,
            Box::new(AgeSealer),
            loaded.machines,
            loaded.publications,
            self.now,
        )
        .with_config(loaded.config);
        // What it rebuilt is what was committed (up to the fresh `last_seen`).
        let mut rebuilt: Vec<MachineRecord> = core.machines().cloned().collect();
        for m in &mut rebuilt {
            if let Some(d) = disk.machines.get(&m.node_id) {
                m.last_seen_ms = d.last_seen_ms;
            }
        }
        let stored: Vec<MachineRecord> = disk.machines.values().cloned().collect();
        let same = rebuilt == stored;
        let (n, m) = (core.unacked_len(), disk.publications.len());
        if !same {
            self.fail("the controller rebuilt other records than it committed".into());
        }
        if n != m {
            self.fail(format!(
                "the controller rebuilt {n} unacked publications from {m} stored"
            ));
        }
        // As `DeployBook::reload`: the rollouts not over and the targets neither sent nor
        // failed, from what was committed.
        self.ctrl.deploy = DeployCore::new();
        let jobs = self.ctrl.deploy.reload(&core, &self.ctrl.disk);
        self.ctrl.core = Some(core);
        self.ctrl.next_tick = self.now;
        self.ctrl.sealing.clear();
        self.queue_seal_jobs(jobs);
        self.deploy_events();
    }

    pub(crate) fn crash_ctrl(&mut self) {
        self.stats.ctrl_crashes += 1;
        self.ctrl.core = None;
        self.ctrl.deploy = DeployCore::new();
        self.ctrl.sealing.clear();
        // A crash between a (slow) commit and its outputs: the outputs are lost.
        self.ctrl.stalled_outputs.clear();
        self.ctrl.stalled_until = 0;
        self.ctrl.restart_at = self.now + self.rng.between(50, 3000);
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in ids {
            self.cut(c);
        }
    }

    /// take, commit, perform (a crash may come in between). A failed commit applies nothing
    /// and performs nothing: as the core thread does, every connection is closed and the core
    /// and the deployments are rebuilt from the store. A slow commit stalls the controller;
    /// its outputs wait for the end of the stall.
    pub(crate) fn ctrl_flush(&mut self) {
        loop {
            if self.ctrl_stalled() {
                return;
            }
            let Some(core) = self.ctrl.core.as_mut() else {
                return;
            };
            let (dirty, outs) = core.take();
            let deployments = self.ctrl.deploy.take_writes();
            if dirty.is_empty() && outs.is_empty() && deployments.is_empty() {
                let jobs = self.ctrl.deploy.after_commit(true);
                self.queue_seal_jobs(jobs);
                self.deploy_events();
                return;
            }
            self.check_dirty(&dirty);
            if self.faults_on && self.rng.chance(self.faults.commit_fail) {
                self.ctrl.disk.inject(CommitFault::Fail);
            } else if self.faults_on && self.rng.chance(self.faults.commit_slow) {
                let ms = self.rng.between(1, 400);
                self.ctrl.disk.inject(CommitFault::LatencyMs(ms));
            }
            if self.ctrl.disk.commit(&dirty, &deployments).is_err() {
                self.stats.failed_commits += 1;
                let nothing = self.ctrl.deploy.after_commit(false);
                assert!(nothing.is_empty(), "seal jobs after a failed commit");
                self.deploy_events();
                self.rebuild_ctrl();
                return;
            }
            for p in &dirty.publications {
                match self.published.get(&(p.machine, p.seq)) {
                    Some(q) if q != p => {
                        let what = format!(
                            "the controller committed a second, different publication {} of {:?}",
                            p.seq, p.machine
                        );
                        self.fail(what);
                    }
                    _ => {
                        self.published.insert((p.machine, p.seq), p.clone());
                    }
                }
            }
            let jobs = self.ctrl.deploy.after_commit(true);
            self.queue_seal_jobs(jobs);
            self.deploy_events();
            let latency = self.ctrl.disk.take_latency_ms();
            if latency > 0 {
                self.stats.slow_commits += 1;
                self.ctrl.stalled_until = self.now + latency;
                self.ctrl.stalled_outputs = outs;
                return;
            }
            if !self.ctrl_perform_all(outs) {
                return;
            }
        }
    }

    /// Performs a committed batch's outputs; a crash may come before any of them (false).
    pub(crate) fn ctrl_perform_all(&mut self, outs: Vec<Output>) -> bool {
        let crash_at =
            (self.faults_on && !outs.is_empty() && self.rng.chance(self.faults.crash_mid))
                .then(|| self.rng.below(outs.len() as u64) as usize);
        for (k, o) in outs.into_iter().enumerate() {
            if Some(k) == crash_at {
                self.crash_ctrl();
                return false;
            }
            self.ctrl_perform(o);
        }
        true
    }

    /// Inside a slow commit: the controller takes no input.
    pub(crate) fn ctrl_stalled(&self) -> bool {
        self.ctrl.stalled_until > self.now
    }

    /// The end of a slow commit: its outputs are performed, then what came meanwhile.
    pub(crate) fn ctrl_unstall(&mut self) {
        if self.ctrl_stalled() || self.ctrl.core.is_none() {
            return;
        }
        let outs = std::mem::take(&mut self.ctrl.stalled_outputs);
        if !outs.is_empty() && self.ctrl_perform_all(outs) {
            self.ctrl_flush();
        }
    }

    /// After a failed commit, as `CoreThread::rebuild`: every connection closed, the core and
    /// the deployments rebuilt from the store at once.
    pub(crate) fn rebuild_ctrl(&mut self) {
        self.crash_ctrl();
        self.stats.ctrl_crashes -= 1;
        self.ctrl.restart_at = self.now;
        self.start_ctrl();
    }

    /// Seal jobs handed to the (simulated) seal worker once their batch committed.
    pub(crate) fn queue_seal_jobs(&mut self, jobs: Vec<SealJob>) {
        for job in jobs {
            let last = self.ctrl.sealing.back().map_or(self.now, |(due, _)| *due);
            let due = last.max(self.now) + self.rng.between(1, 60);
            self.ctrl.sealing.push_back((due, job));
        }
    }

    /// The seal worker: the next target of the first job, sealed (or not) and handed to the
    /// deployments core as `DeployCmd::Sealed` / `SealFailed` are.
    pub(crate) fn seal_next(&mut self) {
        let now = self.now;
        match self.ctrl.sealing.front() {
            Some((due, _)) if *due <= now => {}
            _ => return,
        }
        let (_, mut job) = self.ctrl.sealing.pop_front().expect("front");
        if job.targets.is_empty() {
            return;
        }
        let t = job.targets.remove(0);
        let fails = self.faults_on && self.rng.chance(self.faults.seal_fail);
        let Some(core) = self.ctrl.core.as_mut() else {
            return;
        };
        let store = &self.ctrl.disk;
        if t.recipient.is_none() {
            self.ctrl.deploy.seal_failed(
                store,
                job.deployment,
                t.node,
                "the machine is not admitted; nothing was sealed for it".into(),
            );
        } else if fails {
            self.stats.seal_failures += 1;
            self.ctrl.deploy.seal_failed(
                store,
                job.deployment,
                t.node,
                "sealing the bundle failed: simulated I/O error".into(),
            );
        } else {
            let order = DeployOrder {
                deployment: job.deployment,
                bundle_id: job.bundle_id.clone(),
                service: job.service.clone(),
                version: job.version.clone(),
                sealed_bytes: 1,
                sealed_hash: [job.deployment as u8; 32],
            };
            self.ctrl
                .deploy
                .sealed(core, store, job.deployment, t.node, order, now);
        }
        if !job.targets.is_empty() {
            let due = now + self.rng.between(1, 60);
            self.ctrl.sealing.push_front((due, job));
        }
        self.ctrl_flush();
    }

    /// What the deployments core reported (the core thread logs it).
    pub(crate) fn deploy_events(&mut self) {
        for e in self.ctrl.deploy.take_events() {
            match e {
                DeployEvent::NextWave { .. } => self.stats.waves += 1,
                DeployEvent::StoreError { what, error } => {
                    self.fail(format!("deployments: cannot read {what}: {error}"))
                }
                _ => {}
            }
        }
    }

    /// (e) on what the controller commits.
    pub(crate) fn check_dirty(&mut self, d: &Dirty) {
        let mut bad = Vec::new();
        for p in &d.publications {
            if !self.admitted_in_ctrl(p.machine) {
                bad.push(format!(
                    "publication {} committed for {:?}, not admitted",
                    p.seq, p.machine
                ));
            }
        }
        for m in &d.machines {
            if m.key_status == KeyStatus::Admitted {
                self.ever_admitted.insert(m.node_id);
            }
            if !m.up
                && self
                    .ctrl
                    .disk
                    .machines
                    .get(&m.node_id)
                    .is_some_and(|o| o.up)
            {
                self.stats.downs += 1;
            }
            if !self.ever_admitted.contains(&m.node_id)
                && (m.report.is_some() || m.notify_seq != 0 || m.pub_seq != 0)
            {
                bad.push(format!(
                    "{} is {:?} yet has a report or a channel: notify {} pub {}",
                    m.name, m.key_status, m.notify_seq, m.pub_seq
                ));
            }
            if m.pub_acked > m.pub_seq {
                bad.push(format!(
                    "{}: acked {} > published {}",
                    m.name, m.pub_acked, m.pub_seq
                ));
            }
        }
        for b in bad {
            self.fail(b);
        }
    }

    pub(crate) fn ctrl_perform(&mut self, o: Output) {
        match o {
            Output::Send { conn, msg } => {
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                if !c.ctrl_open {
                    return;
                }
                let w = c.worker;
                self.check_send(w, &msg);
                let lat = self.latency();
                let c = self.conns.get_mut(&conn).expect("exists");
                c.due_worker = c.due_worker.max(self.now + lat);
                c.to_worker
                    .push_back((c.due_worker, ToWorker::Frame(Box::new(msg))));
            }
            Output::Close { conn, .. } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if c.ctrl_open {
                        c.ctrl_open = false;
                        c.to_ctrl.clear();
                        c.due_worker = c.due_worker.max(self.now + 1);
                        c.to_worker.push_back((c.due_worker, ToWorker::Close));
                    }
                }
                // The runtime learns the connection is gone.
                if let Some(core) = self.ctrl.core.as_mut() {
                    core.closed(conn, self.now);
                }
            }
        }
    }

    /// (e) on what the controller sends.
    pub(crate) fn check_send(&mut self, w: usize, msg: &Message) {
        let id = self.workers[w].id();
        let name = self.workers[w].name().to_string();
        match msg {
            Message::Publication(p) => {
                if p.machine != id {
                    self.fail(format!(
                        "{:?}'s publication {} sent to {name}",
                        p.machine, p.seq
                    ));
                }
                if !self.admitted_in_ctrl(id) {
                    self.fail(format!(
                        "publication {} sent to {name}, not admitted",
                        p.seq
                    ));
                }
            }
            Message::Relay(r) => {
                if self.workers[w].kind != Kind::LoadBalancer || !self.admitted_in_ctrl(id) {
                    self.fail(format!(
                        "a Relay sent to {name}, not an admitted load balancer"
                    ));
                }
                let ok = self.worker_by_id(r.to).is_some_and(|d| {
                    self.workers[d].info.load_balancer.as_deref() == Some(name.as_str())
                });
                if !ok || r.publication.machine != r.to || !self.admitted_in_ctrl(r.to) {
                    self.fail(format!(
                        "a Relay to {:?} of {:?}'s publication through {name}",
                        r.to, r.publication.machine
                    ));
                }
            }
            Message::Admission(Admission::Admitted { .. }) | Message::NotifyAck { .. }
                if !self.admitted_in_ctrl(id) =>
            {
                self.fail(format!("{msg:?} sent to {name}, not admitted"));
            }
            _ => {}
        }
    }

    pub(crate) fn deliver_to_ctrl(&mut self, conn: ConnId, item: ToCtrl) {
        let w = self.conns[&conn].worker;
        let fp = self.workers[w].fingerprint;
        let now = self.now;
        let Some(core) = self.ctrl.core.as_mut() else {
            return;
        };
        match item {
            // The simulated certificate carries the node id the worker joins with.
            ToCtrl::Join(j) => {
                let id = j.node_id;
                core.joined(conn, Peer::new(fp, id), j, now)
            }
            ToCtrl::Frame(m) => core.frame(conn, m, now),
        }
        self.ctrl_flush();
    }
}
