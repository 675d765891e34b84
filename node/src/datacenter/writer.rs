//! The one thread that owns redb write transactions. Work arrives over a bounded channel with a
//! reply channel per request; whatever has queued is committed together (group commit), so many
//! concurrent clients and peers share one fsync. Replies go out only after the commit is durable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::ids::NodeId;
use crate::model::Event;
use crate::replication::{Core, IngestError, Ingested, LogRead, Received, StoreError, Tables};
use crate::store::{FlushPlan, Round, Store};
use crate::wire::{CatchUpBatch, CatchUpRequest, Elements, SnapshotChunk};

use super::Shared;
use crate::limits::{
    STATE_DIRTY_BYTES_MAX, STATE_DIRTY_BYTES_TARGET, STATE_FLUSH_CHUNK_MIN, STATE_FLUSH_INTERVAL,
    STATE_FLUSH_ROUND_COMMITS, STATE_REPLAY_RECORDS_MAX, STORE_REOPEN_WAIT_MAX,
    WRITER_RETRY_AFTER_FAILURE,
};

pub enum Cmd {
    Ingest {
        events: Vec<Event>,
        reply: oneshot::Sender<Result<Vec<Ingested>, IngestError>>,
    },
    Receive {
        from: NodeId,
        frame: Elements,
        els: Vec<Value>,
        /// The connection's: see [`Cmd::broken`].
        broken: Arc<AtomicBool>,
        reply: oneshot::Sender<Result<Received, StoreError>>,
    },
    Snapshot {
        from: NodeId,
        chunk: SnapshotChunk,
        els: Vec<Value>,
        /// The connection's: see [`Cmd::broken`].
        broken: Arc<AtomicBool>,
        reply: oneshot::Sender<Result<Received, StoreError>>,
    },
    /// Records of our own log a peer sent back after a restore (or of any origin we asked for).
    CatchUp {
        from: NodeId,
        batch: CatchUpBatch,
        els: Vec<Value>,
        reply: oneshot::Sender<Result<Option<CatchUpRequest>, StoreError>>,
    },
    /// The node caught up its own log after a restore: clear the database's restored mark.
    ClearRestored {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Acked {
        from: NodeId,
        epoch: u64,
        upto: u64,
        peer_epoch: u64,
    },
    Trim {
        cutoff_ms: u64,
        keep_max: u64,
    },
    /// Commit what is queued, then end the thread. Links may still hold senders.
    Stop,
    /// Answered once the commits queued before it are done, without committing anything: the
    /// watchdog's proof that this thread still goes round.
    Ping {
        reply: oneshot::Sender<()>,
    },
    /// Write the state overlay's dirty entries to the state table. With a reply (a reader of the
    /// whole table, such as the digest, waits for it): everything, answered after the commit.
    /// Without (the periodic tick): everything if there is no other work, else a chunk by the
    /// usual policy.
    Flush {
        reply: Option<oneshot::Sender<Result<(), StoreError>>>,
    },
}

impl Cmd {
    fn weight(&self) -> usize {
        match self {
            Cmd::Ingest { events, .. } => events.len(),
            Cmd::Receive { frame, .. } => frame.items.len().max(1),
            Cmd::Snapshot { chunk, .. } => chunk.entries.len().max(1),
            Cmd::CatchUp { batch, .. } => batch.items.len().max(1),
            Cmd::Acked { .. } | Cmd::Trim { .. } | Cmd::Stop => 1,
            Cmd::Ping { .. } | Cmd::ClearRestored { .. } | Cmd::Flush { .. } => 0,
        }
    }
}

impl Cmd {
    /// Whether a frame's connection already had a commit of its frames fail. Then none of its
    /// later frames is applied: the connection is ending, and the peer resends from our
    /// cursor after the next Hello. Elements would be refused as a gap anyway, but a
    /// snapshot's end would raise our marks and move our cursor over a chunk that was never
    /// applied (found by the simulation's failed-commit fault).
    fn broken(&self) -> bool {
        match self {
            Cmd::Receive { broken, .. } | Cmd::Snapshot { broken, .. } => {
                broken.load(Ordering::Relaxed)
            }
            _ => false,
        }
    }
}

enum Outcome {
    Ingest(Result<Vec<Ingested>, IngestError>),
    Receive(Result<Received, StoreError>),
    CatchUp(Result<Option<CatchUpRequest>, StoreError>),
    None,
}

/// The writer's side of the flush policy: when the last round ended, and the chunk size of
/// the current one.
struct Flusher {
    last_end: Instant,
    chunk_max: usize,
}

impl Flusher {
    fn new() -> Flusher {
        Flusher {
            last_end: Instant::now(),
            chunk_max: STATE_FLUSH_CHUNK_MIN,
        }
    }

    /// How the next commit writes the state. `committed_tail` and `state_upto` are as committed
    /// before it; `all`: a reader waits for the whole table (or the node is idle or stopping);
    /// `through`: the commit carries state that is not in the log (a snapshot chunk).
    fn plan(
        &mut self,
        store: &Store,
        committed_tail: u64,
        state_upto: u64,
        all: bool,
        through: bool,
        log_records_max: u64,
    ) -> FlushPlan {
        let o = store.overlay();
        let dirty_bytes = o.dirty_bytes();
        if all || dirty_bytes >= STATE_DIRTY_BYTES_MAX {
            return FlushPlan::all(committed_tail);
        }
        let round = match o.round() {
            Some(r) => Some(r),
            None => {
                // Retention keeps what follows state_upto: a round is due before that holds
                // back more than half of what `limits.log_records_max` lets it keep.
                let replay_max = STATE_REPLAY_RECORDS_MAX.min(log_records_max / 2).max(1);
                let due = dirty_bytes >= STATE_DIRTY_BYTES_TARGET
                    || committed_tail.saturating_sub(state_upto) >= replay_max
                    || self.last_end.elapsed() >= STATE_FLUSH_INTERVAL;
                if due && o.dirty_len() > 0 {
                    self.chunk_max =
                        STATE_FLUSH_CHUNK_MIN.max(o.dirty_len() / STATE_FLUSH_ROUND_COMMITS);
                    Some(Round {
                        upto: committed_tail,
                        after: None,
                    })
                } else {
                    None
                }
            }
        };
        FlushPlan {
            through,
            round,
            chunk_max: self.chunk_max,
        }
    }

    /// After a commit: a round that is no longer in progress ended.
    fn committed(&mut self, store: &Store, plan: &FlushPlan) {
        if plan.round.is_some() && store.overlay().round().is_none() {
            self.last_end = Instant::now();
        }
    }
}

/// Runs until every sender of `rx` is gone and the queue is drained: in-flight commits finish.
pub fn run(
    shared: Arc<Shared>,
    store: Arc<Store>,
    mut core: Core,
    mut rx: mpsc::Receiver<Cmd>,
    tail_tx: watch::Sender<u64>,
) {
    let mut store = Some(store);
    let mut flusher = Flusher::new();
    let mut failed: Option<(Instant, StoreError)> = None;
    let mut stopping = false;
    while !stopping {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        // Read per group: SIGHUP may have changed them.
        let limits = shared.limits();
        let commit_max = limits.commit_events_max;
        let mut group = Vec::new();
        let mut pings = Vec::new();
        let mut clear_restored = Vec::new();
        let mut flushes = Vec::new();
        let mut flush_tick = false;
        let mut weight = 0;
        let mut next = Some(first);
        while let Some(c) = next.take() {
            if matches!(c, Cmd::Stop) {
                // Whatever queued before the stop is still committed below.
                stopping = true;
                rx.close();
            } else if let Cmd::Ping { reply } = c {
                pings.push(reply);
            } else if let Cmd::ClearRestored { reply } = c {
                clear_restored.push(reply);
            } else if let Cmd::Flush { reply } = c {
                match reply {
                    Some(r) => flushes.push(r),
                    None => flush_tick = true,
                }
            } else if c.broken() {
                answer_failed(
                    vec![c],
                    &StoreError::Io("an earlier frame of this connection was not applied".into()),
                );
            } else {
                weight += c.weight();
                group.push(c);
            }
            if weight < commit_max {
                next = rx.try_recv().ok();
            }
        }
        shared
            .metrics
            .writer_queue
            .store(rx.len() as u64, Ordering::Relaxed);
        // A reader waiting for the whole table, an idle tick or the stop: everything dirty is
        // written now (in a commit of its own when there is no other work).
        let flush_all = !flushes.is_empty() || stopping || (flush_tick && group.is_empty());
        let dirty = store.as_ref().is_some_and(|s| s.overlay().dirty_len() > 0);
        if flush_all && dirty && group.is_empty() {
            group.push(Cmd::Flush { reply: None });
        }
        // Retention rides along with every commit (a few reads when there is nothing to trim);
        // idle nodes are trimmed by the periodic Trim command.
        if !group.is_empty() {
            group.push(Cmd::Trim {
                cutoff_ms: crate::clock::now_ms()
                    .saturating_sub(limits.log_retention.as_millis() as u64),
                keep_max: limits.log_records_max,
            });
        }
        if !group.is_empty() {
            match &failed {
                Some((at, e)) if at.elapsed() < WRITER_RETRY_AFTER_FAILURE => {
                    answer_failed(group, e)
                }
                _ => {
                    if store.is_none() {
                        reopen(&shared, &mut store, &mut core);
                        flusher = Flusher::new();
                    }
                    match &store {
                        None => answer_failed(
                            group,
                            &failed.as_ref().map_or_else(
                                || StoreError::Io("the database is not open".into()),
                                |(_, e)| e.clone(),
                            ),
                        ),
                        Some(s) => {
                            let run = GroupRun {
                                flusher: &mut flusher,
                                flush_all,
                                log_records_max: limits.log_records_max,
                            };
                            match commit_group(&shared, s, &mut core, run, group, &tail_tx) {
                                Some((e, group)) => {
                                    // redb refuses everything after a failed write until reopened.
                                    // Reopened before the requests are answered, so that a client
                                    // told 503 can read again at once.
                                    reopen(&shared, &mut store, &mut core);
                                    flusher = Flusher::new();
                                    answer_failed(group, &e);
                                    failed = Some((Instant::now(), e));
                                }
                                None => failed = None,
                            }
                        }
                    }
                }
            }
        }
        for reply in pings {
            let _ = reply.send(());
        }
        // Answered after the group's commit, which wrote everything dirty (or failed: then the
        // reader is told, and reads what the table holds).
        for reply in flushes {
            let r = match (&store, &failed) {
                (Some(_), None) => Ok(()),
                (_, Some((_, e))) => Err(e.clone()),
                (None, None) => Err(StoreError::Io("the database is not open".into())),
            };
            let _ = reply.send(r);
        }
        // Its own write transaction, after the group's.
        for reply in clear_restored {
            let r = match &store {
                Some(s) => s.clear_restored(),
                None => Err(StoreError::Io("the database is not open".into())),
            };
            let _ = reply.send(r);
        }
    }
    tracing::debug!("writer stopped");
}

/// Replaces the database after a failed write. The old one must be gone first (redb locks its
/// file), so readers briefly get "being reopened"; if the new one cannot be opened (the disk is
/// still full), `store` stays `None` and the next group tries again.
fn reopen(shared: &Shared, store: &mut Option<Arc<Store>>, core: &mut Core) {
    let old = shared.store.take();
    drop(store.take());
    if let Some(old) = old {
        // Readers hold it only while they begin a transaction; a backup holds it longer.
        let deadline = Instant::now() + STORE_REOPEN_WAIT_MAX;
        while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(old);
    }
    match Store::open(&shared.config.data_dir) {
        Ok(s) => {
            let s = Arc::new(s);
            if let Ok(txn) = s.begin() {
                if let Ok(t) = txn.tables() {
                    let _ = core.reload(&t);
                }
            }
            shared.store.put(s.clone());
            *store = Some(s);
            tracing::info!("database reopened after a failed write");
        }
        Err(e) => shared.note_error(format!("cannot reopen the database yet: {e}")),
    }
}

/// Answers every request of a group that cannot be committed.
fn answer_failed(group: Vec<Cmd>, e: &StoreError) {
    for cmd in group {
        match cmd {
            Cmd::Ingest { reply, .. } => {
                let _ = reply.send(Err(IngestError::Store(e.clone())));
            }
            Cmd::Receive { reply, broken, .. } | Cmd::Snapshot { reply, broken, .. } => {
                broken.store(true, Ordering::Relaxed);
                let _ = reply.send(Err(e.clone()));
            }
            Cmd::CatchUp { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Cmd::ClearRestored { reply } => {
                let _ = reply.send(Err(e.clone()));
            }
            Cmd::Ping { reply } => {
                let _ = reply.send(());
            }
            Cmd::Flush { reply } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Cmd::Acked { .. } | Cmd::Trim { .. } | Cmd::Stop => {}
        }
    }
}

/// Commits `group` and answers its requests; on a storage error that needs the database
/// reopened (a full disk, an I/O error) returns it with the requests, unanswered.
/// How one group's commits write the state.
struct GroupRun<'a> {
    flusher: &'a mut Flusher,
    flush_all: bool,
    log_records_max: u64,
}

fn commit_group(
    shared: &Shared,
    store: &Store,
    core: &mut Core,
    mut run: GroupRun<'_>,
    mut group: Vec<Cmd>,
    tail_tx: &watch::Sender<u64>,
) -> Option<(StoreError, Vec<Cmd>)> {
    loop {
        let started = Instant::now();
        let now_ms = crate::clock::now_ms();
        match try_group(store, core, &mut run, now_ms, &group) {
            // A request refused for its own content is answered alone, and the group is
            // redone without it, so nothing of that request is committed.
            Err(GroupError::Refused(i, e)) => {
                if let Cmd::Ingest { reply, .. } = group.remove(i) {
                    let _ = reply.send(Err(IngestError::Event(e)));
                }
                if group.is_empty() {
                    return None;
                }
                if let Ok(txn) = store.begin() {
                    if let Ok(t) = txn.tables() {
                        let _ = core.reload(&t);
                    }
                }
                continue;
            }
            Err(GroupError::Store(e)) => {
                // Whether the commit reached the disk may be unknown: the overlay took nothing
                // of it (it takes a transaction's state only after its commit succeeded), and
                // a reopen replays whatever of it is on disk from the log.
                shared.note_error(format!("commit failed: {e}"));
                shared
                    .metrics
                    .commit_failures
                    .fetch_add(1, Ordering::Relaxed);
                shared
                    .disk_full
                    .store(matches!(e, StoreError::Full(_)), Ordering::Relaxed);
                if let Ok(txn) = store.begin() {
                    if let Ok(t) = txn.tables() {
                        let _ = core.reload(&t);
                    }
                }
                if matches!(e, StoreError::Full(_) | StoreError::Io(_)) {
                    return Some((e, group));
                }
                answer_failed(group, &e);
                return None;
            }
            Ok((outcomes, tail)) => {
                shared.disk_full.store(false, Ordering::Relaxed);
                if group
                    .iter()
                    .any(|c| matches!(c, Cmd::Snapshot { chunk, .. } if chunk.end.is_some()))
                {
                    shared.snapshots_applied.send_modify(|n| *n += 1);
                }
                let m = &shared.metrics;
                m.commit_latency.observe(started.elapsed());
                m.commits.fetch_add(1, Ordering::Relaxed);
                for (cmd, outcome) in group.into_iter().zip(outcomes) {
                    match (cmd, outcome) {
                        (Cmd::Ingest { reply, .. }, Outcome::Ingest(r)) => {
                            if let Ok(v) = &r {
                                m.events_ingested
                                    .fetch_add(v.len() as u64, Ordering::Relaxed);
                            }
                            let _ = reply.send(r);
                        }
                        (Cmd::Receive { reply, frame, .. }, Outcome::Receive(Ok(got)))
                            if got.first as usize == frame.items.len() =>
                        {
                            // Every copy was a first one: origin ingest (its HLC time) to here.
                            m.observe_replication(frame.items.iter().map(|(_, e)| e.version.ms));
                            m.elements_applied
                                .fetch_add(got.first as u64, Ordering::Relaxed);
                            let _ = reply.send(Ok(got));
                        }
                        (
                            Cmd::Receive { reply, .. } | Cmd::Snapshot { reply, .. },
                            Outcome::Receive(r),
                        ) => {
                            if let Ok(got) = &r {
                                m.elements_applied
                                    .fetch_add(got.first as u64, Ordering::Relaxed);
                                m.copies_counted
                                    .fetch_add(got.counted as u64, Ordering::Relaxed);
                                m.copies_duplicate
                                    .fetch_add(got.duplicate as u64, Ordering::Relaxed);
                            }
                            let _ = reply.send(r);
                        }
                        (Cmd::CatchUp { reply, .. }, Outcome::CatchUp(r)) => {
                            let _ = reply.send(r);
                        }
                        _ => {}
                    }
                }
                tail_tx.send_if_modified(|t| {
                    let moved = *t != tail;
                    *t = tail;
                    moved
                });
                return None;
            }
        }
    }
}

enum GroupError {
    Refused(usize, crate::model::EventError),
    Store(StoreError),
}

impl From<StoreError> for GroupError {
    fn from(e: StoreError) -> Self {
        GroupError::Store(e)
    }
}

fn try_group(
    store: &Store,
    core: &mut Core,
    run: &mut GroupRun<'_>,
    now_ms: u64,
    group: &[Cmd],
) -> Result<(Vec<Outcome>, u64), GroupError> {
    let txn = store.begin()?;
    let mut outcomes = Vec::with_capacity(group.len());
    let tail;
    let plan;
    {
        let mut t = txn.tables_write_back()?;
        let committed_tail = Tables::log_tail(&t)?;
        for (i, cmd) in group.iter().enumerate() {
            let outcome = match cmd {
                Cmd::Ingest { events, .. } => {
                    let mut answers = Vec::with_capacity(events.len());
                    for ev in events {
                        match core.ingest(&mut t, now_ms, ev) {
                            Ok(a) => answers.push(a),
                            Err(IngestError::Event(e)) => return Err(GroupError::Refused(i, e)),
                            Err(IngestError::Store(e)) => return Err(e.into()),
                            Err(e @ IngestError::NotReady(_)) => {
                                return Err(GroupError::Store(StoreError::Io(e.to_string())))
                            }
                        }
                    }
                    Outcome::Ingest(Ok(answers))
                }
                Cmd::Receive {
                    from, frame, els, ..
                } => Outcome::Receive(Ok(core.receive(&mut t, now_ms, *from, frame, els)?)),
                Cmd::Snapshot {
                    from, chunk, els, ..
                } => Outcome::Receive(Ok(core.apply_snapshot(&mut t, now_ms, *from, chunk, els)?)),
                Cmd::Acked {
                    from,
                    epoch,
                    upto,
                    peer_epoch,
                } => {
                    core.acked(&mut t, *from, *epoch, *upto, *peer_epoch)?;
                    Outcome::None
                }
                Cmd::Trim {
                    cutoff_ms,
                    keep_max,
                } => {
                    t.trim_log(*cutoff_ms, *keep_max, 10_000)?;
                    Outcome::None
                }
                Cmd::CatchUp {
                    from, batch, els, ..
                } => Outcome::CatchUp(Ok(core.apply_catch_up(&mut t, now_ms, *from, batch, els)?)),
                Cmd::Stop | Cmd::Ping { .. } | Cmd::ClearRestored { .. } | Cmd::Flush { .. } => {
                    Outcome::None
                }
            };
            outcomes.push(outcome);
        }
        tail = Tables::log_tail(&t)?;
        // Snapshot entries are not in the log (nothing could replay them): they go to the
        // table in the commit that brings them.
        let through = group.iter().any(|c| matches!(c, Cmd::Snapshot { .. }));
        plan = run.flusher.plan(
            store,
            committed_tail,
            t.state_upto(),
            run.flush_all,
            through,
            run.log_records_max,
        );
        t.finish_with(&plan)?;
    }
    txn.commit()?;
    run.flusher.committed(store, &plan);
    Ok((outcomes, tail))
}

/// Convenience for LogRead users that need the tail of a read transaction.
pub fn read_tail(store: &Store) -> Result<u64, StoreError> {
    LogRead::log_tail(&store.read()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Convergence (invariant 2): once a commit of a connection's frames failed, the writer
    /// applies none of its later frames, so a snapshot's end never raises our marks over a
    /// chunk that was not applied.
    #[test]
    fn convergence_no_frame_of_a_connection_applies_after_one_failed() {
        let broken = Arc::new(AtomicBool::new(false));
        let chunk = |broken: &Arc<AtomicBool>| {
            let (reply, rx) = oneshot::channel();
            let cmd = Cmd::Snapshot {
                from: NodeId(2),
                chunk: SnapshotChunk {
                    epoch: 1,
                    entries: Vec::new(),
                    end: None,
                },
                els: Vec::new(),
                broken: broken.clone(),
                reply,
            };
            (cmd, rx)
        };
        let (first, mut first_rx) = chunk(&broken);
        assert!(!first.broken());
        answer_failed(vec![first], &StoreError::Io("disk".into()));
        assert!(first_rx.try_recv().unwrap().is_err());
        let (later, _rx) = chunk(&broken);
        assert!(
            later.broken(),
            "a later chunk of that connection is refused"
        );
        let (other, _rx) = chunk(&Arc::new(AtomicBool::new(false)));
        assert!(!other.broken(), "another connection is not");
    }
}
