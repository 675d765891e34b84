//! The simulated writer thread: each queued piece of work is one transaction over the storage
//! model, run when its commit latency has passed; it commits, or fails and leaves nothing (the
//! connection that sent it breaks), or commits just before the node crashes. And the reader's
//! pending budget, which holds frames back until the writer has applied earlier ones.

use super::*;

impl Sim {
    /// Runs node i's commits that are due. Each is one transaction: it commits, or fails and
    /// leaves nothing, or commits and the node crashes before answering.
    pub(super) fn run_writer(&mut self, i: usize) {
        loop {
            let now = self.now_ms;
            let node = &mut self.nodes[i];
            let Some((&key, _)) = node.writer.first_key_value() else {
                return;
            };
            if key.0 > now || node.core.is_none() {
                return;
            }
            let work = node.writer.remove(&key).unwrap();
            let trace_before = self.trace_state(i);
            let node = &mut self.nodes[i];
            let trace_what = match &work {
                Work::Ingest(_) => "ingest".to_string(),
                Work::Receive(f, _, m, _) => format!("{} from {f:?}", m.kind()),
            };
            if let Work::Receive(from, generation, _, permits) = &work {
                if self.broken.contains(generation) {
                    // A commit of this connection's frames failed before: the writer answers
                    // the later ones failed without applying them.
                    if let Some(l) = node.links.get_mut(from) {
                        if l.generation == *generation {
                            l.budget.release(*permits);
                        }
                    }
                    continue;
                }
            }
            let fail = self.rng.chance(self.faults.commit_fail);
            let crash_after = !fail && self.rng.chance(self.faults.crash_after_commit);
            let node = &mut self.nodes[i];
            let me = node.id;
            let core = node.core.as_mut().unwrap();
            node.store.begin();
            match work {
                Work::Ingest(ev) => {
                    if node.restore.waiting().is_some() {
                        node.store.commit();
                        continue;
                    }
                    let got = core.ingest(&mut node.store, now, &ev).unwrap();
                    if fail {
                        node.store.abort();
                        core.reload(&node.store).unwrap();
                        self.stats.failed_commits += 1;
                        continue; // the client gets an error: nothing acknowledged
                    }
                    node.store.commit();
                    self.trace_change(i, &trace_before, &trace_what);
                    if crash_after {
                        // Committed, but the client never heard: it may exist anywhere.
                        self.unacked.insert(got.msg_id);
                        self.stats.crashes_after_commit += 1;
                        self.crash(i);
                        return;
                    }
                    self.acked
                        .insert(got.msg_id, MsgKey::new(me, got.oseq, &got.msg_id));
                }
                Work::Receive(from, generation, msg, permits) => {
                    let snapshot_ended = matches!(&*msg, Message::Snapshot(c) if c.end.is_some());
                    let mut reply = None;
                    let mut own_log = None;
                    match *msg {
                        Message::Elements(frame) => {
                            let els = Core::check_elements(&frame)
                                .expect("honest peers send valid frames");
                            let got = core
                                .receive(&mut node.store, now, from, &frame, &els)
                                .unwrap();
                            self.stats.duplicates += got.duplicate as u64;
                            reply = Some(Message::Ack {
                                epoch: frame.epoch,
                                upto: got.ack,
                            });
                        }
                        Message::Snapshot(chunk) => {
                            let els = Core::check_snapshot(&chunk)
                                .expect("honest peers send valid snapshots");
                            let got = core
                                .apply_snapshot(&mut node.store, now, from, &chunk, &els)
                                .unwrap();
                            if chunk.end.is_some() && !fail {
                                // What this node lacks now it may only ever hold through the
                                // snapshot: no message record, so no count.
                                // And the snapshot moved this node's cursor past the
                                // sender's relays it had not got: their counts never come.
                                for (id, key) in &self.acked {
                                    if held(&node.store, *key, id)
                                        .is_none_or(|m| !m.senders.contains(&from))
                                    {
                                        self.via_snapshot.insert(*id);
                                    }
                                }
                                self.via_snapshot.extend(self.unacked.iter().copied());
                                self.stats.snapshots += 1;
                            }
                            reply = Some(Message::Ack {
                                epoch: chunk.epoch,
                                upto: got.ack,
                            });
                        }
                        Message::CatchUpBatch(batch) => {
                            let els = Core::check_catch_up(&batch)
                                .expect("honest peers send valid batches");
                            own_log = Some(
                                core.apply_catch_up(&mut node.store, now, from, &batch, &els)
                                    .unwrap(),
                            );
                        }
                        other => panic!("not writer work: {other:?}"),
                    }
                    if let Some(l) = node
                        .links
                        .get_mut(&from)
                        .filter(|l| l.generation == generation)
                    {
                        l.budget.release(permits);
                    }
                    if fail {
                        node.store.abort();
                        core.reload(&node.store).unwrap();
                        self.stats.failed_commits += 1;
                        // The writer's error ends the connection; the sender resends after
                        // the next Hello.
                        // As the node's writer: nothing more of that connection is applied.
                        self.broken.insert(generation);
                        if node
                            .links
                            .get(&from)
                            .is_some_and(|l| l.generation == generation)
                        {
                            self.drop_link(i, from);
                        }
                        continue;
                    }
                    node.store.commit();
                    self.trace_change(i, &trace_before, &trace_what);
                    let node = &mut self.nodes[i];
                    if crash_after {
                        self.stats.crashes_after_commit += 1;
                        self.crash(i);
                        return;
                    }
                    if snapshot_ended {
                        // As the driver's writer: every link checks again whether its peer
                        // lacks what we now hold only in state.
                        let marks = node.store.marks().unwrap();
                        for l in node.links.values_mut() {
                            l.session.check_peer_marks(&node.store, &marks).unwrap();
                        }
                    }
                    let Some(link) = node
                        .links
                        .get_mut(&from)
                        .filter(|l| l.generation == generation)
                    else {
                        continue; // that connection is gone: its acks with it
                    };
                    if let Some(next) = own_log {
                        match link.session.on_own_log_batch(next) {
                            OwnLogStep::Ask(r) => reply = Some(Message::CatchUpRequest(r)),
                            OwnLogStep::Done => self.own_log_done(i, from),
                        }
                    }
                    self.admit(i, from);
                    if let Some(r) = reply {
                        self.send(me, from, r);
                    }
                }
            }
        }
    }

    /// With `OUTPOST_SIM_TRACE=<account>`: the traced account's state entries at node i.
    pub(super) fn trace_state(&self, i: usize) -> Option<String> {
        let acct = trace_account()?;
        let s = &self.nodes[i].store;
        let entries: Vec<_> = s
            .entries
            .iter()
            .filter(|(k, _)| k.0 == acct)
            .map(|(k, e)| {
                (
                    k.1,
                    e.version,
                    String::from_utf8_lossy(&e.element).into_owned(),
                )
            })
            .collect();
        Some(format!("{entries:?}"))
    }

    /// Prints node i's traced entries, marks and log bounds if `what` changed them.
    pub(super) fn trace_change(&self, i: usize, before: &Option<String>, what: &str) {
        let Some(after) = self.trace_state(i).filter(|a| Some(a) != before.as_ref()) else {
            return;
        };
        let s = &self.nodes[i].store;
        let marks: Vec<_> = s
            .marks
            .iter()
            .map(|(o, m)| (*o, m.contiguous, &m.above))
            .collect();
        eprintln!(
            "t={} {:?} {what}: {after} marks {marks:?} log ({:?}..={}]",
            self.now_ms,
            self.nodes[i].id,
            s.log.keys().next(),
            s.tail
        );
    }

    /// Peer p has no more of node i's own log.
    pub(super) fn own_log_done(&mut self, i: usize, p: NodeId) {
        let node = &mut self.nodes[i];
        if node.restore.peer_done(&p) {
            // The driver clears the durable mark, then takes events again.
            node.restored = false;
            node.restore.finish();
        }
    }

    /// Moves frames from peer p that wait for room into node i's writer queue, while the
    /// link's pending budgets allow.
    pub(super) fn admit(&mut self, i: usize, p: NodeId) {
        loop {
            let node = &mut self.nodes[i];
            let Some(link) = node.links.get_mut(&p) else {
                return;
            };
            let Some(msg) = link.held.first() else {
                return;
            };
            let weight = match msg {
                Message::Elements(f) => session::frame_weight(
                    f.items
                        .iter()
                        .map(|(_, r)| (r.account.as_str(), r.element.as_slice())),
                ),
                Message::Snapshot(c) => session::frame_weight(
                    c.entries
                        .iter()
                        .map(|e| (e.account.as_str(), e.element.as_slice())),
                ),
                _ => 0,
            };
            let Some(permits) = link.budget.try_take(weight) else {
                self.stats.held_frames += 1;
                return;
            };
            let msg = link.held.remove(0);
            let generation = link.generation;
            self.queue(i, Work::Receive(p, generation, Box::new(msg), permits));
        }
    }
}

/// The account `OUTPOST_SIM_TRACE` names: a replayed seed then prints every change to it, every
/// snapshot and every restore (how the restore gaps of issue 12 were traced).
pub(super) fn trace_account() -> Option<&'static str> {
    static TRACE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    TRACE
        .get_or_init(|| std::env::var("OUTPOST_SIM_TRACE").ok())
        .as_deref()
}
