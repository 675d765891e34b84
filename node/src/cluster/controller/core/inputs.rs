//! What the controller core does with what its connections bring: a Join, a frame, a closed
//! connection, and the tick that marks silent machines down and resends.

use super::*;

impl ControllerCore {
    /// A worker completed the handshake (its certificate proved `peer`) and sent its Join.
    /// Admits it (join token), records it as pending, or refuses it (and tells it why, in an
    /// [`Admission::Refused`] before the close); an admitted machine is sent its Admission and
    /// every publication above `join.resume`.
    ///
    /// A pending key never blocks a key with a valid join token: a pending record holding the
    /// name or the node id of a Join with the token is dropped (its connection told and
    /// closed), and the pending table's bound does not apply to it.
    pub fn joined(&mut self, conn: ConnId, peer: Peer, join: Join, now_ms: u64) {
        if self.conns.contains_key(&conn) {
            return self.close(conn, close::PROTOCOL, "a second Join on one connection");
        }
        if let Err(reason) = check_join(&join) {
            return self.close(conn, close::PROTOCOL, &format!("bad Join: {reason}"));
        }
        let node = join.node_id;
        let fingerprint = peer.fingerprint;
        if peer.node_id != Some(node) {
            return self.refuse_join(
                conn,
                JoinRefusal::NodeIdNotProven,
                &format!("the Join says node id {node}, its certificate does not"),
            );
        }
        if self.settings.controller_node_id == Some(node) {
            return self.refuse_join(
                conn,
                JoinRefusal::NodeIdNotProven,
                "the Join carries the controller's own node id",
            );
        }
        let token_ok = match (&self.settings.join_token, &join.token_proof) {
            (Some(token), Some(proof)) => keys::token_proof_matches(token, &fingerprint, proof),
            _ => false,
        };
        // Pending keys that give way if this Join carries the token.
        let mut squatters = Vec::new();
        match self.machines.get(&node) {
            Some(m) if m.fingerprint != fingerprint => {
                if !(token_ok && m.key_status == KeyStatus::Pending) {
                    return self.refuse_join(
                        conn,
                        JoinRefusal::NodeIdTaken,
                        &format!("node id {node} belongs to another key"),
                    );
                }
                squatters.push((node, JoinRefusal::NodeIdTaken));
            }
            Some(m) if m.key_status == KeyStatus::Rejected => {
                self.send(
                    conn,
                    Message::Admission(Admission::Rejected {
                        reason: "this machine's key was rejected".into(),
                    }),
                );
                return self.close(conn, close::UNKNOWN_PEER, "key rejected");
            }
            Some(m) if m.key_status == KeyStatus::Removed => {
                self.send(
                    conn,
                    Message::Admission(Admission::Rejected {
                        reason: "this machine was removed from the cluster".into(),
                    }),
                );
                return self.close(conn, close::UNKNOWN_PEER, "key removed");
            }
            _ => {}
        }
        for m in self.machines.values() {
            if m.node_id == node
                || m.name != join.name
                || matches!(m.key_status, KeyStatus::Rejected | KeyStatus::Removed)
            {
                continue;
            }
            if m.key_status == KeyStatus::Admitted || !token_ok {
                return self.refuse_join(
                    conn,
                    JoinRefusal::NameTaken,
                    &format!("the name {:?} belongs to another machine key", join.name),
                );
            }
            squatters.push((m.node_id, JoinRefusal::NameTaken));
        }
        for (squatter, why) in squatters {
            self.drop_pending(squatter, why);
        }
        // A previous connection of the same machine is replaced by this one.
        if let Some(old) = self.by_node.insert(node, conn) {
            self.conns.remove(&old);
            self.close(old, close::DUPLICATE, "replaced by a newer connection");
        }
        self.conns.insert(
            conn,
            Conn {
                node,
                admitted: false,
            },
        );
        let existing = self.machines.get(&node).map(|m| m.key_status);
        match existing {
            None => {
                let pending = self
                    .machines
                    .values()
                    .filter(|m| m.key_status == KeyStatus::Pending)
                    .count();
                if !token_ok && pending >= self.settings.pending_max {
                    self.conns.remove(&conn);
                    self.by_node.remove(&node);
                    return self.refuse_join(
                        conn,
                        JoinRefusal::TooManyWaiting,
                        &format!("{pending} machines wait for an operator already"),
                    );
                }
                let rec = MachineRecord {
                    node_id: node,
                    name: join.name.clone(),
                    fingerprint,
                    seal_key: join.seal_key.clone(),
                    key_status: KeyStatus::Pending,
                    service: join.service.clone(),
                    component: join.component.clone(),
                    load_balancer: join.load_balancer.clone(),
                    service_addr: join.service_addr.clone(),
                    relay_addr: join.relay_addr.clone(),
                    up: false,
                    report: None,
                    first_seen_ms: now_ms,
                    last_seen_ms: now_ms,
                    notify_seq: 0,
                    pub_seq: 0,
                    pub_acked: 0,
                    pool: None,
                    route: None,
                    route_seq: 0,
                    deploys: Vec::new(),
                    config: MachineConfig::default(),
                    balancing: Balancing::default(),
                };
                self.machines.insert(node, rec);
                self.dirty_machines.insert(node);
            }
            Some(_) => {
                let m = self.machines.get_mut(&node).expect("exists");
                let changed = m.name != join.name
                    || m.seal_key != join.seal_key
                    || m.service != join.service
                    || m.component != join.component
                    || m.load_balancer != join.load_balancer
                    || m.service_addr != join.service_addr
                    || m.relay_addr != join.relay_addr;
                let old_lb = m.load_balancer.clone();
                if changed {
                    m.name = join.name.clone();
                    m.seal_key = join.seal_key.clone();
                    m.service = join.service.clone();
                    m.component = join.component.clone();
                    m.load_balancer = join.load_balancer.clone();
                    m.service_addr = join.service_addr.clone();
                    m.relay_addr = join.relay_addr.clone();
                    self.dirty_machines.insert(node);
                }
                m.last_seen_ms = now_ms;
                if m.key_status == KeyStatus::Admitted && changed {
                    if let Some(lb) = old_lb {
                        self.recompute_pool(&lb, now_ms);
                    }
                }
            }
        }
        let status = self.machines[&node].key_status;
        match status {
            KeyStatus::Admitted => self.admitted(node, join.resume, now_ms),
            KeyStatus::Pending if token_ok => self.admit(node, join.resume, now_ms),
            // A proof that does not match (a wrong token, or none configured here) is no proof;
            // the machine is told, so that its operator can fix the token.
            _ if join.token_proof.is_some() => {
                self.send(conn, Message::Admission(Admission::PendingTokenNotAccepted))
            }
            _ => self.send(conn, Message::Admission(Admission::Pending)),
        }
    }

    /// A frame after the Join on connection `conn`. A frame the machine may not send closes
    /// the connection and changes nothing.
    pub fn frame(&mut self, conn: ConnId, msg: Message, now_ms: u64) {
        let Some(c) = self.conns.get(&conn).cloned() else {
            return;
        };
        if !c.admitted {
            return match msg {
                Message::Heartbeat => {}
                other => self.refuse(
                    conn,
                    &format!("{} from a machine that is not admitted", other.kind()),
                ),
            };
        }
        let node = c.node;
        self.seen(node, now_ms);
        match msg {
            Message::Heartbeat => {}
            Message::PublicationAck { upto } => {
                let m = &self.machines[&node];
                if upto > m.pub_seq {
                    return self.refuse(
                        conn,
                        &format!(
                            "acknowledges publication {upto}, only {} were sent",
                            m.pub_seq
                        ),
                    );
                }
                self.acked(node, upto, now_ms);
            }
            Message::Notify(n) => {
                if n.machine != node {
                    return self.refuse(
                        conn,
                        &format!("a notification for machine {} on {node}'s key", n.machine),
                    );
                }
                let state = match check_report(&n.report) {
                    Ok(state) => state,
                    Err(reason) => return self.refuse(conn, &format!("bad report: {reason}")),
                };
                let m = self.machines.get_mut(&node).expect("admitted machine");
                if n.seq > m.notify_seq {
                    let was_member = is_member(m);
                    if let Some(d) = n.report.deployment {
                        if let Some(ds) = m.deploys.iter_mut().find(|x| x.deployment == d) {
                            ds.state = DeployPhase::Reported(state);
                            ds.detail = n.report.detail.clone();
                        }
                    }
                    m.notify_seq = n.seq;
                    m.report = Some(n.report);
                    self.dirty_machines.insert(node);
                    if was_member != is_member(m) {
                        if let Some(lb) = m.load_balancer.clone() {
                            self.recompute_pool(&lb, now_ms);
                        }
                    }
                }
                let upto = self.machines[&node].notify_seq;
                self.send(conn, Message::NotifyAck { upto });
            }
            Message::ConfigNotify(n) => {
                if n.machine != node {
                    return self.refuse(
                        conn,
                        &format!(
                            "a configuration report for machine {} on {node}'s key",
                            n.machine
                        ),
                    );
                }
                if let Err(reason) = check_config_report(&n.report) {
                    return self.refuse(conn, &format!("bad configuration report: {reason}"));
                }
                let sent = self.machines[&node].config.version;
                if n.report.version > sent {
                    return self.refuse(
                        conn,
                        &format!(
                            "reports configuration version {}, only {sent} was sent",
                            n.report.version
                        ),
                    );
                }
                let m = self.machines.get_mut(&node).expect("admitted machine");
                if n.seq > m.config.notify_seq {
                    let r = n.report;
                    if r.state == "applied" {
                        m.config.applied = m.config.applied.max(r.version);
                    }
                    if r.version == m.config.version {
                        m.config.state = r.state;
                        m.config.detail = r.detail;
                    }
                    m.config.notify_seq = n.seq;
                    self.dirty_machines.insert(node);
                }
                let upto = self.machines[&node].config.notify_seq;
                self.send(conn, Message::ConfigNotifyAck { upto });
            }
            other => self.refuse(conn, &format!("unexpected {} from a worker", other.kind())),
        }
    }

    /// The connection is gone (the machine is marked down only after `down_after`).
    pub fn closed(&mut self, conn: ConnId, now_ms: u64) {
        let _ = now_ms;
        if let Some(c) = self.conns.remove(&conn) {
            if self.by_node.get(&c.node) == Some(&conn) {
                self.by_node.remove(&c.node);
            }
        }
    }

    /// Marks silent machines down (and recomputes their pools) and resends publications left
    /// unacknowledged for `resend_after`. Call it every few hundred milliseconds.
    pub fn tick(&mut self, now_ms: u64) {
        let down_after = self.settings.down_after_ms;
        let silent: Vec<NodeId> = self
            .machines
            .values()
            .filter(|m| {
                m.key_status == KeyStatus::Admitted
                    && m.up
                    && now_ms.saturating_sub(m.last_seen_ms) > down_after
            })
            .map(|m| m.node_id)
            .collect();
        for node in silent {
            self.set_up(node, false, now_ms);
        }
        let resend_after = self.settings.resend_after_ms;
        let mut due = Vec::new();
        for (node, chan) in &self.unacked {
            if !self.by_node.contains_key(node) {
                continue;
            }
            for seq in chan.keys() {
                let last = self.sent_at.get(&(*node, *seq)).copied();
                if last.is_none_or(|t| now_ms.saturating_sub(t) >= resend_after) {
                    due.push((*node, *seq));
                }
            }
        }
        for (node, seq) in due {
            self.send_publication(node, seq, true, now_ms);
        }
    }
}
