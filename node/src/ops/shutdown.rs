//! The steps every role's clean stop is made of, in the order each role takes them: the HTTP
//! API stops taking requests ([`stop_api`]), the role's own work ends (a datacenter's writer
//! thread and a controller's core thread finish what is queued, [`join_thread`]; a worker's
//! driver and software stop), QUIC connections close with a reason and their tasks end
//! ([`close_and_abort`]), and the endpoint gets a moment to tell peers ([`wait_idle`]).

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::limits::{API_STOP_WAIT, ENDPOINT_IDLE_WAIT};
use crate::net::close;

/// Tells the API server to stop and waits up to [`API_STOP_WAIT`] for requests in progress;
/// then aborts it.
pub async fn stop_api(stop: Option<oneshot::Sender<()>>, task: &mut JoinHandle<()>) {
    if let Some(stop) = stop {
        let _ = stop.send(());
    }
    if tokio::time::timeout(API_STOP_WAIT, &mut *task)
        .await
        .is_err()
    {
        task.abort();
    }
}

/// Waits up to `wait` for a task, then aborts it.
pub async fn wait_or_abort(task: &mut JoinHandle<()>, wait: Duration) {
    if tokio::time::timeout(wait, &mut *task).await.is_err() {
        task.abort();
    }
}

/// Closes every connection of `endpoint` with `reason` (peers see a shutdown, not an error),
/// then aborts the tasks that served them and waits for each to end.
pub async fn close_and_abort(
    endpoint: &quinn::Endpoint,
    reason: &str,
    tasks: &mut Vec<JoinHandle<()>>,
) {
    endpoint.close(quinn::VarInt::from_u32(close::SHUTDOWN), reason.as_bytes());
    for t in tasks.iter() {
        t.abort();
    }
    for t in tasks.drain(..) {
        let _ = t.await;
    }
}

/// Waits for a thread (the writer, the core) to end, off the async runtime.
pub async fn join_thread(thread: Option<std::thread::JoinHandle<()>>) {
    if let Some(t) = thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
}

/// Gives the endpoint up to [`ENDPOINT_IDLE_WAIT`] to deliver the close to peers.
pub async fn wait_idle(endpoint: &quinn::Endpoint) {
    let _ = tokio::time::timeout(ENDPOINT_IDLE_WAIT, endpoint.wait_idle()).await;
}
