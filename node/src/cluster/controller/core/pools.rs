//! Load balancers and their dependents in the controller core: pools, drains, a call router's
//! coupling, routes and configuration published to each machine, and the publication channel.

use super::*;

impl ControllerCore {
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
    pub(super) fn lb_of(&self, node: NodeId) -> Option<&MachineRecord> {
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
    pub(super) fn lb_record(&self, lb: &str) -> Option<&MachineRecord> {
        self.machines
            .values()
            .find(|m| m.name == lb && m.key_status == KeyStatus::Admitted && m.is_load_balancer())
    }

    /// Computes the pool of the load balancer named `lb` and publishes it when it changed.
    pub(super) fn recompute_pool(&mut self, lb: &str, now_ms: u64) {
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
    pub(super) fn router_of(&self, lb: &str) -> Option<&MachineRecord> {
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
    pub(super) fn recouple(&mut self, lb: &str, now_ms: u64) {
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
    pub(super) fn update_config(
        &mut self,
        node: NodeId,
        now_ms: u64,
    ) -> Result<bool, NotPublished> {
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
    pub(super) fn update_route(&mut self, node: NodeId, now_ms: u64) {
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

    pub(super) fn reroute_dependents(&mut self, lb: &str, now_ms: u64) {
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
    pub(super) fn send_publication(&mut self, node: NodeId, seq: u64, resend: bool, now_ms: u64) {
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
