//! `GET /v1/watch` on a datacenter: a stream of state changes for outside systems, in the
//! manner of Consul's blocking queries and Corrosion's subscriptions.
//!
//! Every element this datacenter applies (its own and its peers') is appended to its local log
//! under a local sequence (`lseq`), so the log *is* the change feed: a watcher reads it after a
//! cursor, filters by account and event type, and waits on the writer's tail for more. A cursor
//! is `EPOCH-LSEQ` (the log's epoch changes when the log is replaced: a snapshot, a restore), so
//! a client that reconnects with its last cursor gets every change the node still retains,
//! in order, once. When the records after its cursor were trimmed (retention) or the epoch is
//! another, it is told to re-read from scratch: one `reset` line with the cursor to go on from.
//!
//! Bounded: each watcher holds at most [`WATCH_QUEUE_CHUNKS`](crate::limits::WATCH_QUEUE_CHUNKS) chunks of at most about [`WATCH_CHUNK_BYTES`]; one
//! that does not read for [`WATCH_SLOW_AFTER`] is disconnected with a last line saying why (a slot is
//! always kept free for it), and at most [`WATCHERS_MAX`] watch at once (503 beyond).
//!
//! Lines (NDJSON, or with `?format=sse` / `Accept: text/event-stream` server-sent events whose
//! `id` is the cursor, so that `Last-Event-ID` resumes):
//!
//! ```text
//! {"cursor","account","type","origin","oseq","version","message_id","element"}   a change
//! {"reset":true,"reason","cursor"}   re-read state (GET /v1/state/...), then go on from cursor
//! {"heartbeat":true,"cursor"}        nothing matched for a while; the cursor still moves
//! {"error","cursor"}                 the last line: why the stream ends
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiResult};
use crate::datacenter::Shared;
use crate::model::events::view;
use crate::model::{ElementRecord, EventType};
use crate::replication::LogRead;

use crate::clock::now_ms;
use crate::http::watch::*;
use crate::limits::{WATCH_CHUNK_BYTES, WATCH_HEARTBEAT, WATCH_PAGE_RECORDS};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WatchQuery {
    account: Option<String>,
    #[serde(rename = "type")]
    etype: Option<String>,
    cursor: Option<String>,
    /// `oldest`: from the oldest retained record; `now` (default): only what comes next.
    from: Option<String>,
    format: Option<String>,
}

struct Filter {
    account: Option<String>,
    etype: Option<EventType>,
}

impl Filter {
    fn matches(&self, r: &ElementRecord) -> bool {
        self.account.as_ref().is_none_or(|a| *a == r.account)
            && self.etype.is_none_or(|t| t == r.etype)
    }
}

pub(super) async fn get_watch(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    q: Result<Query<WatchQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad(format!("query: {}", e.body_text())))?;
    if let Some(a) = &q.account {
        crate::model::events::validate_account(a)
            .map_err(|e| ApiError::bad(format!("account: {e}")))?;
    }
    let etype = match &q.etype {
        None => None,
        Some(t) => Some(
            t.parse::<EventType>()
                .map_err(|e| ApiError::bad(format!("type: {e}")))?,
        ),
    };
    let open = Opening::of(
        q.format.as_deref(),
        q.cursor.as_deref(),
        q.from.as_deref(),
        &headers,
    )?;
    // Where to start, read now so that an error is an answer, not a broken stream.
    let (epoch, first, tail) = super::read(&s, |s| {
        let r = s.store.read()?;
        Ok((r.log_epoch()?, r.log_first()?, r.log_tail()?))
    })
    .await?;
    let start = match open.cursor {
        Some(c) => Start::Cursor(c),
        None if open.oldest => Start::At(Cursor {
            epoch,
            lseq: first.map_or(tail, |f| f - 1),
        }),
        None => Start::At(Cursor { epoch, lseq: tail }),
    };
    let filter = Filter {
        account: q.account,
        etype,
    };
    let slow = s.clone();
    let on_slow = Box::new(move || {
        slow.metrics
            .watchers_slow_closed
            .fetch_add(1, Ordering::Relaxed);
    });
    Ok(open.stream(on_slow, move |sink| async move {
        Watcher { s, filter, sink }.run(start).await;
    }))
}

enum Start {
    /// The client's cursor.
    Cursor(Cursor),
    /// A position read just now.
    At(Cursor),
}

struct Watcher {
    s: Arc<Shared>,
    filter: Filter,
    sink: Sink,
}

/// What one read of the log found.
struct Page {
    epoch: u64,
    first: Option<u64>,
    tail: u64,
    records: Vec<(u64, ElementRecord)>,
}

impl Watcher {
    async fn run(mut self, start: Start) {
        let mut tail_rx = self.s.tail.clone();
        let mut pos = match start {
            Start::Cursor(c) | Start::At(c) => c,
        };
        let mut buf = Vec::new();
        loop {
            let after = pos.lseq;
            let page = super::read(&self.s, move |s| {
                let r = s.store.read()?;
                Ok(Page {
                    epoch: r.log_epoch()?,
                    first: r.log_first()?,
                    tail: r.log_tail()?,
                    records: r.log_range(after, WATCH_PAGE_RECORDS)?,
                })
            })
            .await;
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    let line = json!({"error": format!("reading the log: {}", e.message), "cursor": pos.to_string()});
                    let _ = self.sink.tx.try_send(self.sink.line("error", &pos, &line));
                    return;
                }
            };
            // Records after the cursor are gone (another log, trimmed, or a cursor from the
            // future): say so, and go on from the tail.
            let lost = if page.epoch != pos.epoch {
                Some(format!(
                    "the log was replaced (epoch {} is now {}): re-read the state",
                    pos.epoch, page.epoch
                ))
            } else if pos.lseq > page.tail {
                Some(format!(
                    "the cursor is ahead of this node's log ({} > {}): re-read the state",
                    pos.lseq, page.tail
                ))
            } else if page.first.map_or(page.tail, |f| f - 1) > pos.lseq {
                Some(format!(
                    "the changes after {pos} are no longer retained (retention trimmed them): re-read the state"
                ))
            } else {
                None
            };
            if let Some(reason) = lost {
                pos = Cursor {
                    epoch: page.epoch,
                    lseq: page.tail,
                };
                let line = json!({"reset": true, "reason": reason, "cursor": pos.to_string()});
                buf.extend_from_slice(&self.sink.line("reset", &pos, &line));
                if !self.sink.flush(&mut buf, &pos).await {
                    return;
                }
                continue;
            }
            let now = now_ms();
            let full = page.records.len() == WATCH_PAGE_RECORDS;
            let mut matched = false;
            for (lseq, r) in &page.records {
                pos.lseq = *lseq;
                if !self.filter.matches(r) {
                    continue;
                }
                matched = true;
                let el: Value = serde_json::from_slice(&r.element).unwrap_or(Value::Null);
                let line = json!({
                    "cursor": pos.to_string(),
                    "account": r.account,
                    "type": r.etype,
                    "origin": r.origin.to_string(),
                    "oseq": r.oseq,
                    "version": r.version.to_string(),
                    "message_id": r.msg_id.to_string(),
                    "element": view(r.etype, &el, now),
                });
                buf.extend_from_slice(&self.sink.line("change", &pos, &line));
                if buf.len() >= WATCH_CHUNK_BYTES && !self.sink.flush(&mut buf, &pos).await {
                    return;
                }
            }
            if !self.sink.flush(&mut buf, &pos).await {
                return;
            }
            if full {
                continue;
            }
            // Caught up: wait for the writer's next commit, or send a heartbeat (which also
            // finds out whether the client is still there).
            let want = pos.lseq;
            let moved = tokio::time::timeout(WATCH_HEARTBEAT, async {
                tail_rx.wait_for(|t| *t != want).await.map(|_| ())
            })
            .await;
            match moved {
                Ok(Ok(_)) => {}
                // The node is shutting down.
                Ok(Err(_)) => {
                    let line =
                        json!({"error": "the node is shutting down", "cursor": pos.to_string()});
                    let _ = self.sink.tx.try_send(self.sink.line("error", &pos, &line));
                    return;
                }
                Err(_) if !matched => {
                    let line = json!({"heartbeat": true, "cursor": pos.to_string()});
                    buf.extend_from_slice(&self.sink.line("heartbeat", &pos, &line));
                    if !self.sink.flush(&mut buf, &pos).await {
                        return;
                    }
                }
                Err(_) => {}
            }
        }
    }
}
