//! The invariants (design.md, 1-4) checked after a run has healed and drained.

use super::*;

impl Sim {
    /// How many copies of message `id` from `origin` node `x` must have counted: the origin's,
    /// and each other node's relay that the fan-out sends to x.
    fn want_count(&self, id: &MsgId, origin: NodeId, x: usize) -> usize {
        let n = self.nodes.len();
        if self.fanout == 0 {
            return n - 1;
        }
        let target = &self.nodes[x].name;
        1 + (0..n)
            .filter(|&r| r != x && self.nodes[r].id != origin)
            .filter(|&r| session::chosen_for_relay(&id.0, target, &self.peer_names(r), self.fanout))
            .count()
    }

    pub(super) fn check(&self) -> Result<(), String> {
        let n = self.nodes.len();
        // Invariant 2: convergence.
        let digests: Vec<(String, u64)> =
            self.nodes.iter().map(|x| digest(x.store.state())).collect();
        if digests.iter().any(|d| *d != digests[0]) {
            let mut diff = String::new();
            for (k, e) in &self.nodes[0].store.entries {
                for n in &self.nodes[1..] {
                    let other = n.store.entries.get(k);
                    if other.map(|o| (&o.version, &o.element)) != Some((&e.version, &e.element)) {
                        diff += &format!(
                            "\n  {k:?}: {:?} {:?} {} | {:?} {:?} {}",
                            self.nodes[0].id,
                            e.version,
                            String::from_utf8_lossy(&e.element),
                            n.id,
                            n.store.entries.get(k).map(|x| x.version),
                            n.store
                                .entries
                                .get(k)
                                .map(|x| String::from_utf8_lossy(&x.element).into_owned())
                                .unwrap_or_default()
                        );
                    }
                }
            }
            return Err(format!("digests differ: {digests:?}{diff}"));
        }
        for (x, node) in self.nodes.iter().enumerate() {
            // Invariant 1: every acknowledged event is everywhere (its element is, through a
            // snapshot, without a message record: the digest checks that).
            for (id, key) in &self.acked {
                let origin = &key.origin;
                let found = held(&node.store, *key, id);
                if found.is_none() && self.via_snapshot.contains(id) {
                    continue;
                }
                let Some(m) = found else {
                    let holders: Vec<_> = self
                        .nodes
                        .iter()
                        .filter(|n| held(&n.store, *key, id).is_some())
                        .map(|n| n.id)
                        .collect();
                    let oseqs: Vec<_> = self
                        .nodes
                        .iter()
                        .map(|n| {
                            (
                                n.id,
                                n.store
                                    .marks
                                    .get(origin)
                                    .map(|m| (m.contiguous, m.above.len())),
                            )
                        })
                        .collect();
                    let rec = self
                        .nodes
                        .iter()
                        .find_map(|n| {
                            held(&n.store, *key, id).and_then(|m| n.store.log.get(&m.lseq))
                        })
                        .map(|r| {
                            format!("{} {} oseq {} {:?}", r.account, r.etype, r.oseq, r.version)
                        });
                    return Err(format!(
                        "{:?} lacks acknowledged {id:?} from {origin:?} ({}); held by {holders:?}; marks of origin {oseqs:?}",
                        node.id,
                        rec.unwrap_or_default()
                    ));
                };
                // Invariant 4: counted once per distinct sender; n-1 away from the origin
                // (fewer under a fan-out: the origin's copy and the relays sent here).
                let distinct: BTreeSet<_> = m.senders.iter().collect();
                if distinct.len() != m.senders.len() {
                    return Err(format!("{:?} counted a sender twice for {id:?}", node.id));
                }
                let want = if *origin == node.id {
                    0
                } else {
                    self.want_count(id, *origin, x)
                };
                if self.via_snapshot.contains(id) {
                    // Held through a snapshot somewhere: relays of it may never happen.
                    if m.senders.len() > n - 1 {
                        return Err(format!("{:?}: {id:?} counted over n-1", node.id));
                    }
                } else if m.senders.len() != want {
                    return Err(format!(
                        "{:?}: {id:?} from {origin:?} has count {} (senders {:?}), want {want}",
                        node.id,
                        m.senders.len(),
                        m.senders
                    ));
                }
            }
            // Invariant 3 and "a later copy never re-applies or re-relays": each message is
            // logged (applied and relayed) exactly once at every node, with the origin's bytes.
            let mut seen = BTreeSet::new();
            for rec in node.store.log.values() {
                if !seen.insert(rec.msg_id) {
                    return Err(format!("{:?} logged {:?} twice", node.id, rec.msg_id));
                }
                if rec.expected_id() != rec.msg_id {
                    return Err(format!("{:?} holds an altered element", node.id));
                }
            }
            if let Some(extra) = seen.iter().find(|id| {
                !self.acked.contains_key(id)
                    && !self.maybe_lost.contains(id)
                    && !self.unacked.contains(id)
            }) {
                return Err(format!(
                    "{:?} logged {extra:?}, never acknowledged",
                    node.id
                ));
            }
        }
        Ok(())
    }
}

/// The record of message `id` at `store`, found where its key says.
pub(super) fn held<'a>(store: &'a MemStore, key: MsgKey, id: &MsgId) -> Option<&'a MsgRecord> {
    store.messages.get(&key).filter(|m| m.msg_id == *id)
}
