//! What an operator (or an outside system) asks of the controller core: accept, reject or remove
//! a key, publish to machines, set configuration data, and the reads behind them.

use super::*;

impl ControllerCore {
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
        let leaving = Leaving {
            was: m.key_status,
            load_balancer: m.load_balancer.clone(),
            is_lb: m.is_load_balancer(),
            name: m.name.clone(),
        };
        m.key_status = KeyStatus::Rejected;
        m.up = false;
        self.dirty_machines.insert(node);
        // Its channel stays as it is: nothing is sent to a rejected key, and if an operator
        // accepts it again it resumes where it stopped.
        self.sent_at.retain(|(n, _), _| *n != node);
        self.shut_out(
            node,
            leaving,
            "rejected by an operator",
            "key rejected",
            now_ms,
        );
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
        let leaving = Leaving {
            was: m.key_status,
            load_balancer: m.load_balancer.take(),
            is_lb: m.is_load_balancer(),
            name: m.name.clone(),
        };
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
        let reason = "removed from the cluster by an operator";
        self.shut_out(node, leaving, reason, "key removed", now_ms);
        Ok(node)
    }

    /// The tail `reject` and `remove` share: the machine's connection is told `reason` and
    /// closed (`close_reason`); if it was admitted, its load balancer's pool is recomputed
    /// without it and, a load balancer itself, its dependents are rerouted and its router
    /// recoupled.
    fn shut_out(
        &mut self,
        node: NodeId,
        leaving: Leaving,
        reason: &str,
        close_reason: &str,
        now_ms: u64,
    ) {
        if let Some(conn) = self.by_node.remove(&node) {
            self.conns.remove(&conn);
            self.send(
                conn,
                Message::Admission(Admission::Rejected {
                    reason: reason.into(),
                }),
            );
            self.close(conn, close::UNKNOWN_PEER, close_reason);
        }
        if leaving.was != KeyStatus::Admitted {
            return;
        }
        if let Some(lb) = leaving.load_balancer {
            self.recompute_pool(&lb, now_ms);
        }
        if leaving.is_lb {
            self.reroute_dependents(&leaving.name, now_ms);
            self.recouple(&leaving.name, now_ms);
        }
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
                self.events.push(CoreEvent::ChannelFull {
                    name: m.name.clone(),
                    node: machine,
                    unacknowledged: held,
                });
            }
            return Err(NotPublished::ChannelFull(held));
        }
        let seq = m.pub_seq + 1;
        let sealed = match self.sealer.seal(&m.seal_key, &body.encode()) {
            Ok(sealed) => sealed,
            Err(e) => {
                // The seal key was checked at Join; this cannot happen with a stored record.
                self.events.push(CoreEvent::SealFailed {
                    machine,
                    error: e.to_string(),
                });
                return Err(NotPublished::Seal(e.to_string()));
            }
        };
        let p = self.key.sign_publication(machine, seq, sealed);
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
                    state: DeployPhase::Pending,
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
}

/// What a machine leaving (rejected or removed) was, taken before its record changes.
struct Leaving {
    was: KeyStatus,
    load_balancer: Option<String>,
    is_lb: bool,
    name: String,
}
