//! A datacenter's HTTP API (axum): events in, state, digest, status and message lookups out,
//! the backup, the watch feed, and `/metrics`, `/healthz`, `/readyz`. Every request but those
//! three needs the bearer token. Bodies are parsed here, not by axum's extractors, so that every
//! refusal is a JSON `{"error"}` naming the field. Served by [`crate::http::serve::serve`].

pub(crate) mod backup;
pub(crate) mod metrics;
pub mod watch;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::clock::now_ms;
use crate::datacenter::writer::Cmd;
use crate::datacenter::Shared;
use crate::http::{healthz, readiness, serve, ApiError, ApiResult};
use crate::ids::{MsgId, NodeId};
use crate::limits::READY_PING_TIMEOUT;
use crate::limits::{INGEST_BODY_FACTOR, INGEST_BYTES_IN_FLIGHT_MAX, INGEST_PERMIT_BYTES};
use crate::model::events::view;
use crate::model::{Event, EventType, RawEvent};
use crate::ops::watchdog::PingError;
use crate::replication::{IngestError, Ingested, LogRead, MsgKey, StoreError};

/// The permits of [`INGEST_BYTES_IN_FLIGHT_MAX`] an ingest request takes: by its declared
/// length (the body limit when it declares none), at least one, at most all.
fn ingest_permits(content_length: Option<usize>, body_max: usize) -> u32 {
    let body = content_length.unwrap_or(body_max).min(body_max);
    body.saturating_mul(INGEST_BODY_FACTOR)
        .div_ceil(INGEST_PERMIT_BYTES)
        .clamp(1, INGEST_BYTES_IN_FLIGHT_MAX / INGEST_PERMIT_BYTES) as u32
}

async fn ingest_budget(
    budget: Arc<tokio::sync::Semaphore>,
    body_max: usize,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let Ok(_held) = budget
        .acquire_many_owned(ingest_permits(declared, body_max))
        .await
    else {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down")
            .into_response();
    };
    next.run(req).await
}

pub fn router(shared: Arc<Shared>) -> Router {
    let body_max = shared.config.limits.api_body_bytes_max;
    let budget = Arc::new(tokio::sync::Semaphore::new(
        INGEST_BYTES_IN_FLIGHT_MAX / INGEST_PERMIT_BYTES,
    ));
    let ingest = Router::new()
        .route("/v1/events", post(post_event))
        .route("/v1/events/batch", post(post_batch))
        .route_layer(middleware::from_fn(move |req: Request, next: Next| {
            ingest_budget(budget.clone(), body_max, req, next)
        }));
    let authed = Router::new()
        .merge(ingest)
        .route("/v1/state/{account}", get(get_state))
        .route("/v1/state/{account}/{etype}", get(get_state_typed))
        .route("/v1/digest", get(get_digest))
        .route("/v1/status", get(get_status))
        .route("/v1/messages/{id}", get(get_message))
        .route("/v1/backup", get(backup::get_backup))
        .route("/v1/watch", get(watch::get_watch))
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .merge(authed)
        .route("/metrics", get(metrics::get_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(get_readyz))
        .route_layer(middleware::from_fn(serve::record_route))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(shared)
}

async fn get_readyz(State(s): State<Arc<Shared>>) -> Response {
    readiness(s.meta.role, datacenter_ready(&s).await, json!({}))
}

/// A datacenter is ready when it has started, its database is open (not being reopened after
/// a failed write), it is not restoring from a backup, its disk is not full and its writer
/// thread answers.
async fn datacenter_ready(s: &Shared) -> Result<(), NotReady> {
    if !s.ready.load(Ordering::Relaxed) {
        return Err(NotReady::Starting);
    }
    s.store.get().map_err(NotReady::Database)?;
    if let Some(left) = s.restore.waiting() {
        return Err(NotReady::Restoring { left });
    }
    if s.disk_full.load(Ordering::Relaxed) {
        return Err(NotReady::DiskFull);
    }
    crate::datacenter::supervise::ping_writer(s, READY_PING_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(NotReady::Writer)
}

/// Why a datacenter is not ready: `/readyz`'s `error` (its text).
#[derive(Debug, thiserror::Error)]
enum NotReady {
    #[error("starting")]
    Starting,
    /// The database is closed, being reopened after a failed write.
    #[error("database: {0}")]
    Database(#[source] StoreError),
    #[error("restored from a backup: recovering this node's own log from its peers ({left} still to answer)")]
    Restoring { left: usize },
    #[error("the disk is full: commits fail, events are refused")]
    DiskFull,
    #[error(transparent)]
    Writer(#[from] PingError),
}

async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Err(e) = crate::http::check_bearer(req.headers(), &s.token) {
        s.metrics.api_refused.fetch_add(1, Ordering::Relaxed);
        return e.into_response();
    }
    next.run(req).await
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("body: {e}")))
}

fn parse_event(raw: RawEvent, at: &str) -> ApiResult<Event> {
    Event::from_raw(raw).map_err(|e| ApiError::bad(format!("{at}{}: {}", e.field, e.reason)))
}

/// Appends the answer to one ingested event, as JSON text written directly (no `Value` tree
/// per event: a batch of 10,000 is answered with one buffer): `{"message_id","origin","oseq",
/// "element","version"}`. The element is its canonical JSON bytes as logged; ids and versions
/// are hex and digits, so nothing needs escaping.
fn write_answer(out: &mut Vec<u8>, origin: &str, a: &Ingested) {
    use std::io::Write as _;
    let _ = write!(
        out,
        r#"{{"message_id":"{}","origin":"{origin}","oseq":{},"element":"#,
        a.msg_id, a.oseq
    );
    out.extend_from_slice(&a.element);
    let _ = write!(out, r#","version":"{}"}}"#, a.version);
}

/// The answers to a request's events: one object, or an array of them for a batch.
fn answers(s: &Shared, got: &[Ingested], array: bool) -> Response {
    let origin = s.meta.node_id.to_string();
    let mut out =
        Vec::with_capacity(got.len() * (200 + got.first().map_or(0, |a| a.element.len())));
    if array {
        out.push(b'[');
    }
    for (i, a) in got.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_answer(&mut out, &origin, a);
    }
    if array {
        out.push(b']');
    }
    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
}

async fn ingest(s: &Shared, events: Vec<Event>) -> ApiResult<Vec<Ingested>> {
    if let Some(left) = s.restore.waiting() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "restored from a backup: recovering this node's own log from its peers ({left} of {} still to answer); events are taken once that is done",
                s.peers.active().len()
            ),
        ));
    }
    if s.disk_full.load(Ordering::Relaxed) {
        // Still try: the writer clears the flag when a commit succeeds again.
    }
    let (tx, rx) = oneshot::channel();
    s.writer
        .send(Cmd::Ingest { events, reply: tx })
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down"))?;
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(IngestError::Event(e))) => Err(ApiError::bad(e.to_string())),
        Ok(Err(IngestError::Store(e))) => Err(e.into()),
        Ok(Err(e @ IngestError::NotReady(_))) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node is shutting down",
        )),
    }
}

/// The body of `POST /v1/events` as an event, or the 400 naming the field. Also the body of
/// the fuzz target `api_event` (`crate::fuzzing`).
pub(crate) fn parse_event_body(body: &[u8]) -> ApiResult<Event> {
    parse_event(parse_body(body)?, "")
}

/// The body of `POST /v1/events/batch` (at most `max` events, `limits.batch_events_max`) as
/// events, or the 400 (413 for too many) naming the field. Also the body of the fuzz target
/// `api_event_batch`.
pub(crate) fn parse_batch_body(body: &[u8], max: usize) -> ApiResult<Vec<Event>> {
    let raws: Vec<RawEvent> = parse_body(body)?;
    if raws.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body: {} events, at most {max} per batch (limits.batch_events_max)",
                raws.len()
            ),
        ));
    }
    raws.into_iter()
        .enumerate()
        .map(|(i, r)| parse_event(r, &format!("[{i}].")))
        .collect()
}

async fn post_event(State(s): State<Arc<Shared>>, body: Bytes) -> ApiResult<Response> {
    let ev = parse_event_body(&body)?;
    drop(body);
    let got = ingest(&s, vec![ev]).await?;
    Ok(answers(&s, &got, false))
}

async fn post_batch(State(s): State<Arc<Shared>>, body: Bytes) -> ApiResult<Response> {
    let events = parse_batch_body(&body, s.limits().batch_events_max)?;
    // The events hold what the request said: its bytes are not needed while it waits.
    drop(body);
    if events.is_empty() {
        return Ok(answers(&s, &[], true));
    }
    let got = ingest(&s, events).await?;
    Ok(answers(&s, &got, true))
}

async fn read<T: Send + 'static>(
    s: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    let s = s.clone();
    let shared = s.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| match e {
            // While the disk is full the writer reopens the database after each failed
            // commit; a read that meets a reopen is worth retrying.
            StoreError::Io(_) if shared.disk_full.load(Ordering::Relaxed) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e} (the disk is full; retry)"),
            ),
            e => ApiError::from(e),
        })
}

async fn get_state(
    State(s): State<Arc<Shared>>,
    Path(account): Path<String>,
) -> ApiResult<Json<Value>> {
    state(s, account, None).await
}

async fn get_state_typed(
    State(s): State<Arc<Shared>>,
    Path((account, etype)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let t: EventType = etype
        .parse()
        .map_err(|e: crate::model::EventError| ApiError::bad(e.to_string()))?;
    state(s, account, Some(t)).await
}

async fn state(s: Arc<Shared>, account: String, t: Option<EventType>) -> ApiResult<Json<Value>> {
    crate::model::events::validate_account(&account).map_err(|e| ApiError::bad(e.to_string()))?;
    let acct = account.clone();
    let rows = read(&s, move |s| s.store.state(&acct, t)).await?;
    let now = now_ms();
    let entries: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let el: Value = serde_json::from_slice(&r.entry.element).unwrap_or(Value::Null);
            json!({
                "type": r.etype,
                "element": view(r.etype, &el, now),
                "version": r.entry.version.to_string(),
                "origin": r.entry.origin.to_string(),
                "message_id": r.entry.msg_id.to_string(),
                "message_count": r.message_count,
            })
        })
        .collect();
    Ok(Json(json!({ "account": account, "entries": entries })))
}

async fn get_digest(State(s): State<Arc<Shared>>) -> ApiResult<Json<Value>> {
    let (digest, entries) = s.digest().await?;
    Ok(Json(json!({ "digest": digest, "entries": entries })))
}

/// `?origin=NODE&oseq=N`: where the message's record is (the answer to its POST says), so it is
/// found at once; without them the retained log is scanned for the id.
#[derive(Deserialize)]
struct MessageAt {
    origin: Option<String>,
    oseq: Option<u64>,
}

async fn get_message(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    at: Result<Query<MessageAt>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(at) = at.map_err(|e| ApiError::bad(format!("query: {}", e.body_text())))?;
    let id: MsgId = id
        .parse()
        .map_err(|e| ApiError::bad(format!("message id: {e}")))?;
    let key = match (at.origin, at.oseq) {
        (Some(o), Some(oseq)) => {
            let origin: NodeId = o
                .parse()
                .map_err(|e| ApiError::bad(format!("origin: {e}")))?;
            Some(MsgKey::new(origin, oseq, &id))
        }
        (None, None) => None,
        _ => {
            return Err(ApiError::bad(
                "origin and oseq: give both (where the message's record is) or neither",
            ))
        }
    };
    let rec = read(&s, move |s| {
        let r = s.store.read()?;
        match key {
            Some(k) => r.message(k, &id),
            None => r.find_message(&id),
        }
    })
    .await?;
    let Some(m) = rec else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("message {id} is not known here (never seen, or trimmed by retention)"),
        ));
    };
    let names: Vec<String> = m
        .senders
        .iter()
        .map(|id| {
            s.peers
                .active()
                .iter()
                .find(|(_, p)| p.info.lock().expect("link lock").node_id == Some(*id))
                .map_or_else(|| id.to_string(), |(_, p)| p.cfg.name.clone())
        })
        .collect();
    Ok(Json(json!({
        "message_id": id.to_string(),
        "origin": m.origin.to_string(),
        "oseq": m.oseq,
        "first_seen_ms": m.first_seen_ms,
        "message_count": m.senders.len(),
        "copies_from": names,
    })))
}

async fn get_status(State(s): State<Arc<Shared>>) -> ApiResult<Json<Value>> {
    Ok(Json(status(&s).await?))
}

pub async fn status(s: &Arc<Shared>) -> ApiResult<Value> {
    let (digest, entries) = s.digest().await?;
    let (progress, tail) = read(s, |s| {
        let r = s.store.read()?;
        Ok((r.peers()?, r.log_tail()?))
    })
    .await?;
    let peers: Vec<Value> = s
        .peers
        .active()
        .iter()
        .map(|(_, p)| {
            let (node_id, connected, last_error) = {
                let i = p.info.lock().expect("link lock");
                (i.node_id, i.connected, i.last_error.clone())
            };
            let stored = node_id
                .and_then(|id| progress.iter().find(|(n, _)| *n == id))
                .map(|(_, pp)| pp.clone())
                .unwrap_or_default();
            json!({
                "name": p.cfg.name,
                "addr": p.addr().to_string(),
                "node_id": node_id.map(|n| n.to_string()),
                "connected": connected,
                "dials": p.dials(),
                "lag": p.lag(tail, stored.acked_in(s.meta.log_epoch, stored.acked_peer_epoch)),
                "acked": stored.acked_in(s.meta.log_epoch, stored.acked_peer_epoch),
                "received": stored.received,
                "last_error": last_error,
            })
        })
        .collect();
    let up = peers.iter().filter(|p| p["connected"] == true).count();
    Ok(json!({
        "role": s.meta.role,
        "name": s.meta.name,
        "node_id": s.meta.node_id.to_string(),
        "fingerprint": s.fingerprint.to_string(),
        "listen": s.config.listen.to_string(),
        "api": s.config.api.to_string(),
        "ready": s.ready.load(Ordering::Relaxed),
        "disk_full": s.disk_full.load(Ordering::Relaxed),
        "restoring": s.restore.waiting().is_some(),
        "log_tail": tail,
        "entries": entries,
        "digest": digest,
        "peers_up": up,
        "peers": peers,
        "last_errors": s.last_errors(),
    }))
}

#[cfg(test)]
mod ingest_budget_tests {
    use super::*;

    /// Bounded memory: an ingest request is counted by its declared body (the body limit when
    /// it declares none, so a chunked body cannot claim less), never more than the whole
    /// budget (so one request over it still runs, alone).
    #[test]
    fn ingest_requests_are_counted_against_the_in_flight_budget() {
        let all = (INGEST_BYTES_IN_FLIGHT_MAX / INGEST_PERMIT_BYTES) as u32;
        assert_eq!(ingest_permits(Some(0), 1 << 20), 1);
        assert_eq!(ingest_permits(Some(256 << 10), 16 << 20), 1024);
        assert_eq!(ingest_permits(None, 1 << 20), 4096);
        assert_eq!(ingest_permits(Some(usize::MAX), 1 << 20), 4096);
        assert_eq!(ingest_permits(None, 64 << 20), all);
        // 10,000-event batches (about 2.2 MB): seven in flight at once, the eighth waits.
        let batch = ingest_permits(Some(2_200_000), 16 << 20);
        assert_eq!(all / batch, 7);
    }
}
