//! Simulated time and the outside world: a step of every node, the faults, the operators
//! (accepting and rejecting keys, deployments, configuration data), and healing at the end.

use super::*;

impl Sim {
    // ---- time ----

    pub(crate) fn step(&mut self) {
        self.now += self.rng.between(1, 20);
        let now = self.now;
        if self.ctrl.core.is_none() && now >= self.ctrl.restart_at {
            self.start_ctrl();
        }
        self.ctrl_unstall();
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            if w.core.is_none() && !w.stopped && now >= w.restart_at {
                self.start_worker(i);
            }
        }
        // Deliveries, connection by connection, in order.
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in ids {
            while let Some(c) = self.conns.get_mut(&conn) {
                if !c.ctrl_open || self.ctrl.core.is_none() || self.ctrl.stalled_until > now {
                    break;
                }
                match c.to_ctrl.front() {
                    Some((due, _)) if *due <= now => {}
                    _ => break,
                }
                let (_, item) = c.to_ctrl.pop_front().expect("front");
                self.deliver_to_ctrl(conn, item);
            }
            while let Some(c) = self.conns.get_mut(&conn) {
                let w = c.worker;
                if self.workers[w].core.is_none() || self.workers[w].frozen_until > now {
                    break;
                }
                match c.to_worker.front() {
                    Some((due, _)) if *due <= now => {}
                    _ => break,
                }
                let (_, item) = c.to_worker.pop_front().expect("front");
                if c.abandoned_until.is_some() {
                    // Nobody reads it at the worker.
                    if matches!(item, ToWorker::Close) {
                        self.conns.remove(&conn);
                    }
                    continue;
                }
                self.deliver_to_worker(w, conn, item);
            }
        }
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.abandoned_until.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for c in expired {
            self.cut(c);
        }
        let deps: Vec<usize> = self.relays.keys().copied().collect();
        for d in deps {
            loop {
                if !self.running(d) {
                    break;
                }
                let Some(link) = self.relays.get_mut(&d) else {
                    break;
                };
                match link.queue.front() {
                    Some((due, _, _)) if *due <= now => {}
                    _ => break,
                }
                let (_, p, tampered) = link.queue.pop_front().expect("front");
                self.deliver_relay(d, p, tampered);
            }
        }
        // The workers' runtimes: connect, heartbeat, dial the load balancer.
        for i in 0..self.workers.len() {
            if !self.running(i) {
                continue;
            }
            if self.workers[i].conn.is_none()
                && self.ctrl.core.is_some()
                && now >= self.workers[i].reconnect_at
            {
                self.connect(i);
            }
            if !self.running(i) {
                continue;
            }
            let core = self.workers[i].core.as_ref().expect("running");
            if self.workers[i].conn.is_some()
                && core.standing() == Standing::Admitted
                && now >= self.workers[i].next_heartbeat
            {
                let hb = match core.record().heartbeat_ms {
                    0 => self.ctrl.settings.heartbeat_ms,
                    hb => hb,
                };
                self.workers[i].next_heartbeat = now + hb;
                self.worker_send(i, Message::Heartbeat);
            }
            self.dial_lb(i);
            if self.workers[i]
                .config_due
                .as_ref()
                .is_some_and(|(due, _)| *due <= now)
            {
                let (_, order) = self.workers[i].config_due.take().expect("due");
                let report = ConfigReport {
                    version: order.version,
                    state: "applied".into(),
                    detail: None,
                };
                let core = self.workers[i].core.as_mut().expect("running");
                core.configured(order.version, report);
                self.stats.configs_applied += 1;
                self.worker_flush(i);
            }
            self.life_step(i);
        }
        if let Some(core) = self.ctrl.core.as_mut() {
            if now >= self.ctrl.next_tick && self.ctrl.stalled_until <= now {
                core.tick(now);
                self.ctrl.deploy.tick(core, now);
                self.ctrl.next_tick = now + self.rng.between(100, 300);
                self.ctrl_flush();
            }
        }
        if self.ctrl.core.is_some() && !self.ctrl_stalled() {
            self.seal_next();
        }
    }

    /// A dependent with a route dials its load balancer, which accepts only its own
    /// dependents (by its pool's list).
    pub(crate) fn dial_lb(&mut self, d: usize) {
        let w = &self.workers[d];
        if w.info.load_balancer.is_none()
            || self.relays.contains_key(&d)
            || self.now < w.relay_retry_at
        {
            return;
        }
        let Some(route) = w.route.clone() else {
            return;
        };
        let Some(lb) = self.worker_by_id(route.node_id) else {
            self.fail(format!(
                "{} routed to unknown {:?}",
                w.info.name, route.node_id
            ));
            return;
        };
        let (id, fp) = (w.id(), w.fingerprint);
        let accepted = self.running(lb)
            && route.fingerprint == self.workers[lb].fingerprint
            && self.workers[lb]
                .core
                .as_ref()
                .and_then(|c| c.record().pool.as_ref())
                .is_some_and(|p| {
                    p.dependents
                        .iter()
                        .any(|x| x.node_id == id && x.fingerprint == fp)
                });
        if accepted {
            self.relays.insert(
                d,
                RelayLink {
                    lb,
                    queue: VecDeque::new(),
                    due: 0,
                },
            );
        } else {
            self.workers[d].relay_retry_at = self.now + self.rng.between(50, 500);
        }
    }

    /// Operators, reports, extra publications, and faults.
    pub(crate) fn act(&mut self) {
        let n = self.workers.len() as u64;
        if self.rng.chance(30) {
            let i = self.rng.below(n) as usize;
            // Not over a deployment's report the controller has not acknowledged: reports are
            // the latest state, not a log, so it would never learn that deployment's outcome.
            // These random reports go straight into the worker core; the production reports
            // (the lifecycle's) wait for that acknowledgement the same way.
            let deploy_unacked = self.workers[i].core.as_ref().is_some_and(|c| {
                let r = c.record();
                r.report_seq > r.report_acked
                    && r.report.as_ref().is_some_and(|p| p.deployment.is_some())
            });
            if self.running(i) && !deploy_unacked {
                let r = report(&mut self.rng);
                let core = self.workers[i].core.as_mut().expect("running");
                core.report(r);
                self.worker_flush(i);
            }
        }
        if self.rng.chance(20) {
            self.accept_one();
        }
        let due: Vec<NodeId> = self
            .reaccept
            .iter()
            .filter(|(_, t)| **t <= self.now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.accept_again(id);
        }
        if self.rng.chance(10) {
            self.publish_again();
        }
        if self.rng.chance(12) {
            self.set_config_random();
        }
        if self.plan_rollouts > self.ctrl.deployments_made && self.rng.chance(3) {
            self.create_deployment();
        }
        if !self.faults_on {
            return;
        }
        let f = self.faults.clone();
        if self.rng.chance(f.cut) && !self.conns.is_empty() {
            let k = self.rng.below(self.conns.len() as u64) as usize;
            let conn = *self.conns.keys().nth(k).expect("k < len");
            self.stats.cuts += 1;
            self.cut(conn);
        }
        if self.rng.chance(f.cut_relay) && !self.relays.is_empty() {
            let k = self.rng.below(self.relays.len() as u64) as usize;
            let d = *self.relays.keys().nth(k).expect("k < len");
            self.cut_relay(d);
        }
        if self.rng.chance(f.crash_ctrl) && self.ctrl.core.is_some() {
            self.crash_ctrl();
        }
        if self.rng.chance(f.crash_worker) {
            let i = self.rng.below(n) as usize;
            if self.workers[i].core.is_some() {
                // Sometimes longer than down_after: it leaves its pool and comes back.
                let down = self.ctrl.settings.down_after_ms;
                let downtime = self.rng.between(10, down * 3);
                self.crash_worker(i, downtime);
            }
        }
        if self.rng.chance(f.abandon) {
            let i = self.rng.below(n) as usize;
            if let Some(conn) = self.workers[i].conn.take() {
                let until = self.now + self.rng.between(50, 3000);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.abandoned_until = Some(until);
                }
                self.workers[i].reconnect_at = self.now + self.rng.between(0, 300);
            }
        }
        if self.rng.chance(f.reject) {
            self.reject_one();
        }
        if self.rng.chance(f.freeze) {
            let i = self.rng.below(n) as usize;
            if self.running(i) {
                let down = self.ctrl.settings.down_after_ms;
                self.workers[i].frozen_until = self.now + self.rng.between(100, down * 3);
            }
        }
    }

    /// An operator rejects an admitted key, to accept it again later.
    pub(crate) fn reject_one(&mut self) {
        // An operator's request waits behind a slow commit.
        if self.ctrl_stalled() {
            return;
        }
        let Some(core) = self.ctrl.core.as_ref() else {
            return;
        };
        let admitted: Vec<(NodeId, String)> = core
            .machines()
            .filter(|m| m.key_status == KeyStatus::Admitted)
            .map(|m| (m.node_id, m.name.clone()))
            .collect();
        if admitted.is_empty() {
            return;
        }
        let (id, name) = admitted[self.rng.below(admitted.len() as u64) as usize].clone();
        let now = self.now;
        match self.ctrl.core.as_mut().expect("up").reject(&name, now) {
            Ok(got) if got == id => self.stats.rejects += 1,
            other => self.fail(format!("reject {name:?}: {other:?}")),
        }
        self.ctrl_flush();
        let later = self.now + self.rng.between(200, 5000);
        self.reaccept.insert(id, later);
    }

    pub(crate) fn accept_again(&mut self, id: NodeId) {
        // An operator's request waits behind a slow commit.
        if self.ctrl_stalled() {
            return;
        }
        if self.ctrl.core.is_none() {
            return;
        }
        self.reaccept.remove(&id);
        let now = self.now;
        let key = id.to_string();
        match self.ctrl.core.as_mut().expect("up").accept(&key, now) {
            Ok(got) if got == id => self.stats.accepts += 1,
            other => self.fail(format!("accept again {key}: {other:?}")),
        }
        self.ctrl_flush();
        // A failed commit answered the operator an error: asked again later.
        let committed = self
            .ctrl
            .disk
            .machines
            .get(&id)
            .is_some_and(|m| m.key_status == KeyStatus::Admitted);
        if !committed {
            let later = self.now + self.rng.between(200, 2000);
            self.reaccept.insert(id, later);
        }
    }

    /// An operator accepts a pending key, by name, full id or id prefix.
    pub(crate) fn accept_one(&mut self) {
        // An operator's request waits behind a slow commit.
        if self.ctrl_stalled() {
            return;
        }
        let Some(core) = self.ctrl.core.as_ref() else {
            return;
        };
        let pending: Vec<(NodeId, String)> = core
            .machines()
            .filter(|m| m.key_status == KeyStatus::Pending)
            .map(|m| (m.node_id, m.name.clone()))
            .collect();
        if pending.is_empty() {
            return;
        }
        let (id, name) = pending[self.rng.below(pending.len() as u64) as usize].clone();
        let key = match self.rng.below(3) {
            0 => name,
            1 => id.to_string(),
            _ => id.to_string()[..12].to_string(),
        };
        let now = self.now;
        let r = self.ctrl.core.as_mut().expect("up").accept(&key, now);
        match r {
            Ok(got) if got == id => self.stats.accepts += 1,
            other => self.fail(format!("accept {key:?} of {id:?}: {other:?}")),
        }
        self.ctrl_flush();
    }

    /// The same state published once more (a new sequence, nothing new to apply).
    pub(crate) fn publish_again(&mut self) {
        // An operator's request waits behind a slow commit.
        if self.ctrl_stalled() {
            return;
        }
        let Some(core) = self.ctrl.core.as_ref() else {
            return;
        };
        let admitted: Vec<MachineRecord> = core
            .machines()
            .filter(|m| m.key_status == KeyStatus::Admitted)
            .cloned()
            .collect();
        if admitted.is_empty() {
            return;
        }
        let m = &admitted[self.rng.below(admitted.len() as u64) as usize];
        let body = if m.is_load_balancer() {
            match &m.pool {
                Some(p) => Body::Pool(p.clone()),
                None => return,
            }
        } else {
            // Today a dependent is only ever sent its route, and a route is always sent
            // directly (the dependent may not reach that load balancer yet). So that the
            // relay path carries something, a dependent also gets bodies it does not act on:
            // a (meaningless) pool, relayed when its route is applied and the LB is up.
            if self.rng.chance(500) {
                Body::LoadBalancer(m.route.clone())
            } else {
                Body::Pool(Pool::default())
            }
        };
        let now = self.now;
        let published = self
            .ctrl
            .core
            .as_mut()
            .expect("up")
            .publish(m.node_id, &body, now);
        // A machine away for long may have a full channel: a defined outcome, nothing stored.
        if let Err(e) = published {
            assert!(matches!(e, NotPublished::ChannelFull(_)), "{}: {e}", m.name);
        }
        self.ctrl_flush();
    }

    /// An operator deploys software to every admitted machine, in waves with a random gate and
    /// drain, as `POST /v1/deployments` does (`DeployBook::create`, then its first step).
    pub(crate) fn create_deployment(&mut self) {
        if self.ctrl_stalled() {
            return;
        }
        let Some(core) = self.ctrl.core.as_ref() else {
            return;
        };
        if !core.machines().any(|m| m.key_status == KeyStatus::Admitted) {
            return;
        }
        let spec = RolloutSpec {
            waves: if self.rng.chance(500) {
                vec![
                    WaveSize::Count(1),
                    WaveSize::Percent(50),
                    WaveSize::Percent(100),
                ]
            } else {
                Vec::new()
            },
            max_parallel: self
                .rng
                .chance(500)
                .then(|| self.rng.between(1, 3) as usize),
            healthy_for_ms: Some(self.rng.below(500)),
            failure_threshold: Some(0),
            drain_ms: self.rng.chance(700).then(|| self.rng.below(300)),
        };
        let spec = if !spec.waves.is_empty() && spec.max_parallel.is_some() {
            RolloutSpec {
                max_parallel: None,
                ..spec
            }
        } else {
            spec
        };
        let id = self.ctrl.deploy.next_id();
        let req = NewDeployment {
            service: "voice".into(),
            bundle_id: format!("{id:064x}"),
            version: format!("{id}.0"),
            machines: None,
            bundle_path: std::path::PathBuf::new(),
            rollout: spec,
        };
        let now = self.now;
        let core = self.ctrl.core.as_mut().expect("up");
        match self.ctrl.deploy.create(core, req, now) {
            Ok(made) => assert_eq!(made, id),
            Err(e) => return self.fail(format!("deployment refused: {e}")),
        }
        self.ctrl_flush();
        // Created once its record committed (a failed commit created nothing: the operator
        // asks again later).
        if self.ctrl.disk.deployments.contains_key(&id) {
            self.ctrl.deployments_made += 1;
        }
    }

    /// An operator sets (or deletes) the document of a random scope.
    pub(crate) fn set_config_random(&mut self) {
        // The operator's request waits behind a slow commit.
        if self.ctrl.core.is_none() || self.ctrl_stalled() {
            return;
        }
        let w = &self.workers[self.rng.below(self.workers.len() as u64) as usize];
        let scope = match self.rng.below(3) {
            0 => Scope::Service("voice".into()),
            1 => Scope::Component {
                service: "voice".into(),
                component: w.info.component.clone(),
            },
            _ => Scope::Machine(w.info.name.clone()),
        };
        self.config_changes += 1;
        let n = self.config_changes;
        let doc = (!self.rng.chance(200)).then(|| {
            let mut d = json!({ "n": n, "limits": { scope.key(): n } });
            if self.rng.chance(300) {
                // Removes what a wider scope set.
                d["log"] = Value::Null;
            } else {
                d["log"] = json!(format!("level-{n}"));
            }
            d
        });
        let now = self.now;
        let core = self.ctrl.core.as_mut().expect("up");
        let change = match core.set_config(&scope, doc.clone(), None, now) {
            Ok(set) => Some(set.change),
            // Deleting what is not there: nothing changed.
            Err(_) => {
                assert!(doc.is_none());
                None
            }
        };
        // The change is committed before anything it caused is sent.
        self.ctrl_flush();
        // What the operator set is what committed (a failed commit answered an error).
        if let Some(c) = change {
            let key = (c.scope.clone(), c.version);
            if self.ctrl.disk.config.get(&key) == Some(&c) {
                self.config_set.insert(scope.key(), doc);
            }
        }
    }

    /// The effective configuration of worker `i` from what the operator set.
    pub(crate) fn expected_config(&self, i: usize) -> Option<Value> {
        let info = &self.workers[i].info;
        let layers = [
            format!("service/{}", info.service),
            format!("component/{}/{}", info.service, info.component),
            format!("machine/{}", info.name),
        ];
        let mut out: Option<Value> = None;
        for l in layers {
            if let Some(Some(doc)) = self.config_set.get(&l) {
                configdata::merge(out.get_or_insert_with(|| json!({})), doc);
            }
        }
        out
    }

    /// Stops the faults, stops some dependents for good, wakes everything else, accepts
    /// every pending key, gives each running worker a last report, and lets time pass.
    pub(crate) fn heal(&mut self, stop_some: bool) {
        self.faults_on = false;
        for i in 0..self.workers.len() {
            if stop_some && self.workers[i].kind == Kind::Dependent && self.rng.chance(300) {
                self.workers[i].stopped = true;
                if self.workers[i].core.is_some() {
                    self.crash_worker(i, 0);
                }
            }
        }
        for w in &mut self.workers {
            w.frozen_until = 0;
            if !w.stopped {
                w.restart_at = w.restart_at.min(self.now);
            }
        }
        self.ctrl.restart_at = self.ctrl.restart_at.min(self.now);
        for t in self.reaccept.values_mut() {
            *t = self.now;
        }
        for w in &self.workers {
            self.stats.stopped += w.stopped as u64;
        }
        // Every running worker admitted, then its last report.
        let deadline = self.now + 120_000;
        let mut reported = false;
        while self.now < deadline && self.violations.is_empty() {
            self.step();
            self.accept_one();
            let due: Vec<NodeId> = self.reaccept.keys().copied().collect();
            for id in due {
                self.accept_again(id);
            }
            if !reported && self.all_running_admitted() {
                for i in 0..self.workers.len() {
                    if let Some(core) = self.workers[i].core.as_mut() {
                        // After a deployment, its outcome said once more, as it was (running,
                        // rolled back or failed, and why).
                        let r = match core
                            .record()
                            .report
                            .as_ref()
                            .filter(|p| p.deployment.is_some())
                        {
                            Some(p) => p.clone(),
                            None => running_report(),
                        };
                        core.report(r);
                        self.worker_flush(i);
                    }
                }
                reported = true;
            }
            if reported {
                break;
            }
        }
        if !reported {
            self.fail("the running workers were not all admitted within 120 s".into());
            return;
        }
        let s = &self.ctrl.settings;
        let settle = 3 * s.down_after_ms + 4 * s.resend_after_ms + 5_000;
        // Software waiting for its restart (backoff up to a minute) is started first.
        let restart = self
            .workers
            .iter()
            .filter_map(|w| w.life.as_ref().and_then(|l| l.poll_timeout()))
            .max()
            .unwrap_or(0);
        let until = (self.now + settle).max(restart + settle);
        while self.now < until {
            self.step();
        }
    }

    pub(crate) fn all_running_admitted(&self) -> bool {
        self.ctrl.core.is_some()
            && self.workers.iter().all(|w| {
                w.stopped
                    || w.core
                        .as_ref()
                        .is_some_and(|c| c.standing() == Standing::Admitted)
            })
    }
}
