//! One connection's streams: the reader (frames in -> writer thread, within the pending frame
//! and byte budgets), the acker (acks out in order once applied) and the sender (the local log
//! -> Elements frames or a snapshot, as far as the session's window allows).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, Notify};

use super::{restore_peer_done, send, SessionError};
use crate::clock::now_ms;
use crate::datacenter::writer::Cmd;
use crate::datacenter::Shared;
use crate::ids::NodeId;
use crate::limits::PEER_CONTROL_QUEUE_MAX;
use crate::limits::PEER_PENDING_FRAMES_MAX;
use crate::replication::session::{self, Built, OwnLogStep, Session};
use crate::replication::{Core, Received, StoreError};
use crate::wire::{read_frame, write_frame, CatchUpRequest, Message};

pub(super) async fn run_link(
    shared: &Arc<Shared>,
    i: usize,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: Arc<Mutex<Session>>,
    own_request: Option<CatchUpRequest>,
) -> Result<(), SessionError> {
    let (peer_id, peer_epoch) = {
        let s = session.lock().expect("session lock");
        (s.peer(), s.peer_epoch())
    };
    let notify = Arc::new(Notify::new());
    let (ctl_tx, ctl_rx) = mpsc::channel::<Message>(PEER_CONTROL_QUEUE_MAX);
    if let Some(req) = own_request {
        ctl_tx
            .send(Message::CatchUpRequest(req))
            .await
            .map_err(|_| SessionError::Shutdown)?;
    }
    let (pending_tx, pending_rx) = mpsc::channel(PEER_PENDING_FRAMES_MAX);
    let reader = read_loop(
        shared,
        i,
        peer_id,
        peer_epoch,
        recv,
        &session,
        &notify,
        pending_tx,
        ctl_tx.clone(),
    );
    let acker = ack_loop(pending_rx, ctl_tx);
    let sender = send_loop(shared, peer_id, send, &session, &notify, ctl_rx);
    tokio::select! {
        r = reader => r,
        r = acker => r,
        r = sender => r,
    }
}

type Pending = (
    u64,
    oneshot::Receiver<Result<Received, StoreError>>,
    tokio::sync::OwnedSemaphorePermit,
);

/// Waits until the connection's pending byte budget has room for a frame of `weight` (a frame
/// over the whole budget waits for all of it: [`session::weight_permits`]).
async fn reserve(
    budget: &Arc<tokio::sync::Semaphore>,
    weight: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, SessionError> {
    budget
        .clone()
        .acquire_many_owned(session::weight_permits(weight))
        .await
        .map_err(|_| SessionError::Shutdown)
}

/// Hands a checked frame (`cmd` given its reply channel) to the writer, and its answer, with
/// the budget it holds, to the acker, in the order read.
async fn to_writer(
    shared: &Shared,
    pending: &mpsc::Sender<Pending>,
    epoch: u64,
    permit: tokio::sync::OwnedSemaphorePermit,
    cmd: impl FnOnce(oneshot::Sender<Result<Received, StoreError>>) -> Cmd,
) -> Result<(), SessionError> {
    let (tx, rx) = oneshot::channel();
    shared
        .writer
        .send(cmd(tx))
        .await
        .map_err(|_| SessionError::Shutdown)?;
    pending
        .send((epoch, rx, permit))
        .await
        .map_err(|_| SessionError::Shutdown)
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    shared: &Arc<Shared>,
    i: usize,
    peer_id: NodeId,
    peer_epoch: u64,
    mut recv: quinn::RecvStream,
    session: &Mutex<Session>,
    notify: &Notify,
    pending: mpsc::Sender<Pending>,
    ctl: mpsc::Sender<Message>,
) -> Result<(), SessionError> {
    let max = shared.config.limits.frame_bytes_max;
    let epoch = shared.meta.log_epoch;
    // Set by the writer when a commit of this connection's frames fails: it applies none of
    // the later ones.
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let budget = Arc::new(tokio::sync::Semaphore::new(
        session::PENDING_PERMITS as usize,
    ));
    loop {
        let Some(msg) = read_frame(&mut recv, max).await? else {
            return Ok(());
        };
        shared
            .peers
            .get(i)
            .last_contact_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        match msg {
            Message::Elements(frame) => {
                let weight = session::frame_weight(
                    frame
                        .items
                        .iter()
                        .map(|(_, r)| (r.account.as_str(), r.element.as_slice())),
                );
                let permit = reserve(&budget, weight).await?;
                let els = Core::check_elements(&frame)
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                let frame_epoch = frame.epoch;
                let broken = broken.clone();
                to_writer(shared, &pending, frame_epoch, permit, |reply| {
                    Cmd::Receive {
                        from: peer_id,
                        frame,
                        els,
                        broken,
                        reply,
                    }
                })
                .await?;
            }
            Message::Snapshot(chunk) => {
                let weight = session::frame_weight(
                    chunk
                        .entries
                        .iter()
                        .map(|e| (e.account.as_str(), e.element.as_slice())),
                );
                let permit = reserve(&budget, weight).await?;
                let els = Core::check_snapshot(&chunk)
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                if let Some(end) = &chunk.end {
                    // The peer holds what its snapshot reflects.
                    session
                        .lock()
                        .expect("session lock")
                        .on_snapshot_end(&end.marks);
                }
                let chunk_epoch = chunk.epoch;
                let broken = broken.clone();
                to_writer(shared, &pending, chunk_epoch, permit, |reply| {
                    Cmd::Snapshot {
                        from: peer_id,
                        chunk,
                        els,
                        broken,
                        reply,
                    }
                })
                .await?;
            }
            Message::Ack { epoch: e, upto } => {
                let progressed = session
                    .lock()
                    .expect("session lock")
                    .on_ack(e, upto, now_ms());
                if progressed {
                    notify.notify_one();
                    // Persisting acks is an optimisation (the peer's Hello also says where it
                    // is), so a full queue just skips this one.
                    let _ = shared.writer.try_send(Cmd::Acked {
                        from: peer_id,
                        epoch,
                        upto,
                        peer_epoch,
                    });
                }
            }
            Message::CatchUpRequest(req) => {
                let s = shared.clone();
                let (req, batch, ours) = tokio::task::spawn_blocking(move || {
                    let r = s.store.read()?;
                    let batch = Core::answer_catch_up(&r, &req)?;
                    let ours = r.mark(req.origin)?;
                    Ok::<_, StoreError>((req, batch, ours))
                })
                .await
                .map_err(|_| SessionError::Shutdown)??;
                session
                    .lock()
                    .expect("session lock")
                    .on_catch_up_answered(&req, &batch, &ours);
                // The sender may now owe the peer a snapshot.
                notify.notify_one();
                ctl.send(Message::CatchUpBatch(batch))
                    .await
                    .map_err(|_| SessionError::Shutdown)?;
            }
            Message::CatchUpBatch(batch) => {
                let els = Core::check_catch_up(&batch)
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                let (tx, rx) = oneshot::channel();
                shared
                    .writer
                    .send(Cmd::CatchUp {
                        from: peer_id,
                        batch,
                        els,
                        reply: tx,
                    })
                    .await
                    .map_err(|_| SessionError::Shutdown)?;
                let next = rx.await.map_err(|_| SessionError::Shutdown)??;
                let step = session.lock().expect("session lock").on_own_log_batch(next);
                match step {
                    OwnLogStep::Ask(next) => ctl
                        .send(Message::CatchUpRequest(next))
                        .await
                        .map_err(|_| SessionError::Shutdown)?,
                    OwnLogStep::Done => restore_peer_done(shared, i).await,
                }
            }
            Message::Goodbye(g) => return Err(SessionError::Goodbye(g.reason)),
            Message::Hello(_) => return Err(SessionError::Protocol("a second Hello".into())),
            other => {
                return Err(SessionError::Protocol(format!(
                    "a cluster message between datacenters ({})",
                    other.kind()
                )))
            }
        }
    }
}

async fn ack_loop(
    mut pending: mpsc::Receiver<Pending>,
    ctl: mpsc::Sender<Message>,
) -> Result<(), SessionError> {
    while let Some((epoch, rx, permit)) = pending.recv().await {
        let got = rx.await.map_err(|_| SessionError::Shutdown)??;
        // Applied: its bytes are no longer held.
        drop(permit);
        ctl.send(Message::Ack {
            epoch,
            upto: got.ack,
        })
        .await
        .map_err(|_| SessionError::Shutdown)?;
    }
    Ok(())
}

async fn send_loop(
    shared: &Arc<Shared>,
    peer_id: NodeId,
    mut send: quinn::SendStream,
    session: &Mutex<Session>,
    notify: &Notify,
    mut ctl: mpsc::Receiver<Message>,
) -> Result<(), SessionError> {
    let mut tail_rx = shared.tail.clone();
    let mut snapshots_rx = shared.snapshots_applied.subscribe();
    let frame_budget = session::frame_budget(shared.config.limits.frame_bytes_max);
    loop {
        while let Ok(m) = ctl.try_recv() {
            write_frame(&mut send, &m).await?;
        }
        let tail = *tail_rx.borrow_and_update();
        if session.lock().expect("session lock").poll_snapshot() {
            let end = send::send_snapshot(shared, peer_id, &mut send, frame_budget).await?;
            let mut s = session.lock().expect("session lock");
            s.on_snapshot_end(&end.marks);
            s.on_sent(end.resume_after, now_ms());
            continue;
        }
        let range = session.lock().expect("session lock").poll_range(tail);
        if let Some((after, upto)) = range {
            let s = shared.clone();
            let built = tokio::task::spawn_blocking(move || {
                send::build_elements(&s, peer_id, after, upto, frame_budget)
            })
            .await
            .map_err(|_| SessionError::Shutdown)??;
            let sent_upto = match built {
                Built::Elements(frame) => {
                    let (upto, n) = (frame.upto, frame.items.len() as u64);
                    write_frame(&mut send, &Message::Elements(frame)).await?;
                    shared
                        .metrics
                        .elements_sent
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    upto
                }
                Built::Trimmed => {
                    let end = send::send_snapshot(shared, peer_id, &mut send, frame_budget).await?;
                    session
                        .lock()
                        .expect("session lock")
                        .on_snapshot_end(&end.marks);
                    end.resume_after
                }
            };
            session
                .lock()
                .expect("session lock")
                .on_sent(sent_upto, now_ms());
            continue;
        }
        tokio::select! {
            m = ctl.recv() => match m {
                Some(m) => write_frame(&mut send, &m).await?,
                None => return Ok(()),
            },
            r = tail_rx.changed() => if r.is_err() { return Err(SessionError::Shutdown) },
            _ = notify.notified() => {}
            r = snapshots_rx.changed() => {
                if r.is_err() {
                    return Err(SessionError::Shutdown);
                }
                recheck_peer_marks(shared, session).await?;
            }
        }
    }
}

/// A snapshot raised our marks: whether the peer (by its Hello's marks) now lacks something we
/// hold only in state. Reads on the blocking pool (up to `HELLO_LACKS_CHECK_MAX` lookups per
/// origin).
async fn recheck_peer_marks(
    shared: &Arc<Shared>,
    session: &Mutex<Session>,
) -> Result<(), SessionError> {
    let theirs = session.lock().expect("session lock").their_marks().to_vec();
    let store = shared.clone();
    let lacks = tokio::task::spawn_blocking(move || {
        let r = store.store.read()?;
        session::lacks_snapshot_only(&r, &r.marks()?, &theirs)
    })
    .await
    .map_err(|_| SessionError::Shutdown)??;
    if lacks {
        session.lock().expect("session lock").want_snapshot();
    }
    Ok(())
}

#[cfg(test)]
mod pending_budget_tests {
    use futures_util::FutureExt as _;

    use super::*;
    use crate::limits::PEER_PENDING_BYTES_MAX;
    use crate::replication::session::PENDING_PERMITS;

    /// Bounded memory: frames read from a peer and not yet applied hold at most
    /// `PEER_PENDING_BYTES_MAX` of the connection's budget; the next frame waits until one is
    /// applied, and a frame over the whole budget waits for all of it.
    #[tokio::test]
    async fn frames_waiting_for_the_writer_stay_within_the_byte_budget() {
        let budget = Arc::new(tokio::sync::Semaphore::new(PENDING_PERMITS as usize));
        let frame = PEER_PENDING_BYTES_MAX / 8;
        let mut held = Vec::new();
        for _ in 0..8 {
            let p = reserve(&budget, frame).now_or_never();
            held.push(p.expect("room in the budget").unwrap());
        }
        assert!(
            reserve(&budget, 1).now_or_never().is_none(),
            "a ninth frame must wait"
        );
        drop(held.pop());
        let p = reserve(&budget, frame).now_or_never();
        held.push(p.expect("room again once one is applied").unwrap());
        held.clear();
        let huge = reserve(&budget, 10 * PEER_PENDING_BYTES_MAX).now_or_never();
        let huge = huge
            .expect("a frame over the budget takes all of it")
            .unwrap();
        assert_eq!(budget.available_permits(), 0);
        drop(huge);
        // The weight counts records and their parsed elements.
        assert_eq!(
            session::frame_weight([("alice", &[0u8; 100][..])].into_iter()),
            5 + 300 + 160
        );
    }
}
