//! The controller core's handling of one machine: sending to it, refusing and closing, admission
//! and what follows it, liveness and acknowledgements.

use super::*;

impl ControllerCore {
    pub(super) fn send(&mut self, conn: ConnId, msg: Message) {
        self.out.push(Output::Send { conn, msg });
    }

    pub(super) fn close(&mut self, conn: ConnId, code: u32, reason: &str) {
        self.out.push(Output::Close {
            conn,
            code,
            reason: reason.to_owned(),
        });
    }

    /// A Join refused before anything is recorded: the worker is told `why` (only that), and
    /// the connection is closed with `why` and `detail` (which repeats only what the Join said).
    pub(super) fn refuse_join(&mut self, conn: ConnId, why: JoinRefusal, detail: &str) {
        self.send(conn, Message::Admission(Admission::Refused(why)));
        self.close(conn, close::UNKNOWN_PEER, &format!("{why}: {detail}"));
    }

    /// A pending key gives way to a key with the join token: its record is deleted and its
    /// connection, if any, told `why` and closed. It was never admitted, so nothing was
    /// published to it and it is in no pool.
    pub(super) fn drop_pending(&mut self, node: NodeId, why: JoinRefusal) {
        let Some(m) = self.machines.remove(&node) else {
            return;
        };
        debug_assert_eq!(m.key_status, KeyStatus::Pending);
        self.events.push(CoreEvent::PendingGaveWay {
            name: m.name.clone(),
            node,
            fingerprint: m.fingerprint,
            why,
        });
        self.dirty_machines.remove(&node);
        self.dirty.removed.push(node);
        self.unacked.remove(&node);
        self.sent_at.retain(|(n, _), _| *n != node);
        if let Some(conn) = self.by_node.remove(&node) {
            self.conns.remove(&conn);
            self.refuse_join(conn, why, "a machine with the join token took its place");
        }
    }

    /// A frame the machine may not send: its connection is closed, nothing is stored.
    pub(super) fn refuse(&mut self, conn: ConnId, reason: &str) {
        if let Some(c) = self.conns.remove(&conn) {
            if self.by_node.get(&c.node) == Some(&conn) {
                self.by_node.remove(&c.node);
            }
        }
        self.close(conn, close::PROTOCOL, reason);
    }

    pub(super) fn resolve(&self, key: &str) -> Result<NodeId, KeyActionError> {
        let key = key.trim();
        if let Ok(id) = key.parse::<NodeId>() {
            if self.machines.contains_key(&id) {
                return Ok(id);
            }
        }
        // A name a removed machine had may belong to a newer key now: that one is meant.
        if let Some(m) = self
            .machines
            .values()
            .filter(|m| m.name == key)
            .min_by_key(|m| m.key_status == KeyStatus::Removed)
        {
            return Ok(m.node_id);
        }
        let lower = key.to_ascii_lowercase();
        if lower.len() >= 8 && lower.chars().all(|c| c.is_ascii_hexdigit()) {
            let hits: Vec<NodeId> = self
                .machines
                .keys()
                .filter(|id| id.to_string().starts_with(&lower))
                .copied()
                .collect();
            return match hits.as_slice() {
                [one] => Ok(*one),
                [] => Err(KeyActionError::NotFound(key.to_owned())),
                _ => Err(KeyActionError::Ambiguous(key.to_owned())),
            };
        }
        Err(KeyActionError::NotFound(key.to_owned()))
    }

    /// Pending (or rejected) -> admitted.
    pub(super) fn admit(&mut self, node: NodeId, resume: u64, now_ms: u64) {
        let m = self.machines.get_mut(&node).expect("admit a known machine");
        m.key_status = KeyStatus::Admitted;
        m.last_seen_ms = now_ms;
        self.dirty_machines.insert(node);
        self.admitted(node, resume, now_ms);
    }

    /// An admitted machine is (re)connected, or was just admitted: tell it, resume its
    /// channel, and bring everything that depends on it up to date.
    pub(super) fn admitted(&mut self, node: NodeId, resume: u64, now_ms: u64) {
        if let Some(&conn) = self.by_node.get(&node) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.admitted = true;
            }
            let heartbeat_ms = self.settings.heartbeat_ms;
            let controller_key = self.key.public();
            self.send(
                conn,
                Message::Admission(Admission::Admitted {
                    controller_key,
                    heartbeat_ms,
                }),
            );
            // The worker applied up to `resume`: that is an acknowledgement (the ack itself may
            // have been lost). A worker ahead of this channel (the controller restored from an
            // older backup) moves the channel forward, so that new publications are not taken
            // for replays.
            let m = self.machines.get_mut(&node).expect("known");
            if resume > m.pub_seq {
                self.events.push(CoreEvent::ChannelMovedForward {
                    machine: node,
                    resume,
                    published: m.pub_seq,
                });
                m.pub_seq = resume;
                // What this controller remembers publishing is older than what the machine
                // applied: forget it, so that its pool and route are published again below
                // (with sequences above `resume`) even when they look unchanged from here.
                m.pool = None;
                m.route = None;
                m.balancing = Balancing::default();
                self.dirty_machines.insert(node);
            }
            if resume > self.machines[&node].pub_acked {
                self.acked(node, resume, now_ms);
            }
            // Everything still unacknowledged, directly and in order.
            let seqs: Vec<u64> = self
                .unacked
                .get(&node)
                .map(|c| c.keys().copied().collect())
                .unwrap_or_default();
            for seq in seqs {
                self.send_publication(node, seq, true, now_ms);
            }
        }
        self.set_up(node, true, now_ms);
        let m = &self.machines[&node];
        let (lb, is_lb, name) = (
            m.load_balancer.clone(),
            m.is_load_balancer(),
            m.name.clone(),
        );
        if let Some(lb) = lb {
            self.recompute_pool(&lb, now_ms);
            self.update_route(node, now_ms);
        }
        if is_lb {
            self.recompute_pool(&name, now_ms);
            self.reroute_dependents(&name, now_ms);
        }
        // At the channel's bound it waits, like a pool.
        let _ = self.update_config(node, now_ms);
    }

    pub(super) fn seen(&mut self, node: NodeId, now_ms: u64) {
        let up = {
            let m = self.machines.get_mut(&node).expect("known");
            m.last_seen_ms = now_ms;
            m.up
        };
        if !up {
            self.set_up(node, true, now_ms);
        }
    }

    pub(super) fn set_up(&mut self, node: NodeId, up: bool, now_ms: u64) {
        let m = self.machines.get_mut(&node).expect("known");
        if m.up == up {
            return;
        }
        m.up = up;
        if up {
            m.last_seen_ms = now_ms;
        }
        self.dirty_machines.insert(node);
        let (lb, own) = (
            m.load_balancer.clone(),
            m.is_load_balancer().then(|| m.name.clone()),
        );
        if let Some(lb) = lb {
            self.recompute_pool(&lb, now_ms);
        }
        // Its router is told that its load balancer went down or came back.
        if let Some(name) = own {
            self.recouple(&name, now_ms);
        }
    }

    pub(super) fn acked(&mut self, node: NodeId, upto: u64, now_ms: u64) {
        let m = self.machines.get_mut(&node).expect("known");
        if upto <= m.pub_acked {
            return;
        }
        m.pub_acked = upto;
        for d in &mut m.deploys {
            if d.seq <= upto && d.state == DeployPhase::Pending {
                d.state = DeployPhase::Reported(ReportState::Delivering);
            }
        }
        if m.config.seq <= upto && m.config.state == "pending" {
            m.config.state = "applying".into();
        }
        self.dirty_machines.insert(node);
        self.dirty.acked.push((node, upto));
        if let Some(chan) = self.unacked.get_mut(&node) {
            *chan = chan.split_off(&(upto + 1));
            if chan.is_empty() {
                self.unacked.remove(&node);
            }
        }
        self.sent_at.retain(|(n, seq), _| *n != node || *seq > upto);
        if self.full.remove(&node) {
            // Its channel has room again: what waited is computed now, once.
            let m = &self.machines[&node];
            self.events.push(CoreEvent::ChannelHasRoom {
                name: m.name.clone(),
            });
            let (name, is_lb, lb, is_router) = (
                m.name.clone(),
                m.is_load_balancer(),
                m.load_balancer.clone(),
                m.is_call_router(),
            );
            if is_lb {
                self.recompute_pool(&name, now_ms);
            }
            if let Some(lb) = lb {
                self.update_route(node, now_ms);
                if is_router {
                    self.recouple(&lb, now_ms);
                }
            }
            let _ = self.update_config(node, now_ms);
        }
    }
}
