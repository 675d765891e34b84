//! `GET /v1/watch` on a controller: machine and deployment changes for outside systems.
//!
//! After every batch it committed, the core thread appends what changed to a journal in memory:
//! each machine record written (joined, admitted, reported, went down, its pool changed,
//! removed) as that machine's `GET /v1/machines/{name}` view, and each deployment whose record
//! or whose targets' states changed as its `GET /v1/deployments/{id}` view. The journal keeps
//! the newest [`JOURNAL_MAX`] changes under a sequence; a cursor is `EPOCH-SEQ`, the epoch
//! drawn at start. A client that reconnects with its cursor gets every change the journal still
//! holds after it, once and in order; one whose changes are gone (a restart: another epoch, or
//! more than [`JOURNAL_MAX`] changes since) is told to re-read (`reset`), as on a datacenter.
//! The stream's bounds and lines are the datacenter's (`api::watch`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::shared::ControllerShared;
use crate::http::watch::{self as feed, Cursor, Sink};
use crate::http::ApiError;
use crate::limits::JOURNAL_MAX;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WatchQuery {
    /// `machine` or `deployment`.
    kind: Option<String>,
    /// A machine's name, or a deployment's id.
    name: Option<String>,
    cursor: Option<String>,
    from: Option<String>,
    format: Option<String>,
}

pub(super) async fn get_watch(
    State(s): State<Arc<ControllerShared>>,
    headers: HeaderMap,
    q: Result<Query<WatchQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad(format!("query: {}", e.body_text())))?;
    let kind = match q.kind.as_deref() {
        None => None,
        Some("machine") => Some("machine"),
        Some("deployment") => Some("deployment"),
        Some("config") => Some("config"),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "kind: {other:?} (machine, deployment or config)"
            )))
        }
    };
    let open = feed::Opening::of(
        q.format.as_deref(),
        q.cursor.as_deref(),
        q.from.as_deref(),
        &headers,
    )?;
    let j = &s.journal;
    let pos = match open.cursor {
        Some(c) => c,
        None if open.oldest => {
            let (first, _) = j.after(0, 0);
            Cursor {
                epoch: j.epoch,
                lseq: first.map_or(j.tail(), |f| f - 1),
            }
        }
        None => Cursor {
            epoch: j.epoch,
            lseq: j.tail(),
        },
    };
    let slow = s.clone();
    let on_slow = Box::new(move || {
        slow.metrics
            .watchers_slow_closed
            .fetch_add(1, Ordering::Relaxed);
    });
    Ok(open.stream(on_slow, move |sink| run(s, kind, q.name, sink, pos)))
}

async fn run(
    s: Arc<ControllerShared>,
    kind: Option<&'static str>,
    name: Option<String>,
    mut sink: Sink,
    mut pos: Cursor,
) {
    let j = &s.journal;
    let mut tail_rx = j.tail.subscribe();
    let mut buf = Vec::new();
    loop {
        let (first, changes) = j.after(pos.lseq, crate::limits::WATCH_PAGE_RECORDS);
        let tail = j.tail();
        let lost = if pos.epoch != j.epoch {
            Some("the controller restarted since this cursor: re-read /v1/machines and /v1/deployments".to_owned())
        } else if pos.lseq > tail {
            Some(format!(
                "the cursor is ahead of this controller's journal ({} > {tail}): re-read",
                pos.lseq
            ))
        } else if first.map_or(tail, |f| f - 1) > pos.lseq {
            Some(format!(
                "the changes after {pos} are no longer kept (the journal holds the newest {JOURNAL_MAX}): re-read"
            ))
        } else {
            None
        };
        if let Some(reason) = lost {
            pos = Cursor {
                epoch: j.epoch,
                lseq: tail,
            };
            let line = json!({"reset": true, "reason": reason, "cursor": pos.to_string()});
            buf.extend_from_slice(&sink.line("reset", &pos, &line));
            if !sink.flush(&mut buf, &pos).await {
                return;
            }
            continue;
        }
        let full = changes.len() == crate::limits::WATCH_PAGE_RECORDS;
        let mut matched = false;
        for (seq, k, n, view) in changes {
            pos.lseq = seq;
            if kind.is_some_and(|want| want != k) || name.as_ref().is_some_and(|want| *want != n) {
                continue;
            }
            matched = true;
            let mut line = json!({"cursor": pos.to_string(), "kind": k, "name": n});
            line[k] = (*view).clone();
            buf.extend_from_slice(&sink.line(k, &pos, &line));
            if buf.len() >= crate::limits::WATCH_CHUNK_BYTES && !sink.flush(&mut buf, &pos).await {
                return;
            }
        }
        if !sink.flush(&mut buf, &pos).await {
            return;
        }
        if full {
            continue;
        }
        let want = pos.lseq;
        let moved = tokio::time::timeout(crate::limits::WATCH_HEARTBEAT, async {
            tail_rx.wait_for(|t| *t != want).await.map(|_| ())
        })
        .await;
        match moved {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) if !matched => {
                let line = json!({"heartbeat": true, "cursor": pos.to_string()});
                buf.extend_from_slice(&sink.line("heartbeat", &pos, &line));
                if !sink.flush(&mut buf, &pos).await {
                    return;
                }
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::controller::journal::Journal;
    use crate::limits::JOURNAL_BYTES_MAX;

    /// Invariant: the journal is bounded by bytes as well as by count; it drops the oldest
    /// first and always keeps the newest change.
    #[test]
    fn the_journal_keeps_at_most_its_bytes_and_drops_the_oldest() {
        let j = Journal::new();
        let big = json!({ "machines": "x".repeat(1 << 20) });
        for _ in 0..40 {
            j.push("deployment", "1", big.clone());
        }
        let (first, held) = j.after(0, usize::MAX);
        let bytes: usize = held.iter().map(|e| e.3.to_string().len()).sum();
        assert!(bytes <= JOURNAL_BYTES_MAX, "{bytes}");
        assert!(held.len() >= 30 && held.len() < 40, "{}", held.len());
        assert_eq!(held.last().map(|e| e.0), Some(40));
        assert_eq!(first, held.first().map(|e| e.0));
        // One change larger than the bound is still kept, alone.
        j.push(
            "deployment",
            "2",
            json!({ "m": "y".repeat(JOURNAL_BYTES_MAX + 1) }),
        );
        let (_, held) = j.after(0, usize::MAX);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].0, 41);
    }
}
