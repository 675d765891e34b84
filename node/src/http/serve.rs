//! The one HTTP server of every role's API: hyper's HTTP/1 connections, driven one by one so
//! that the server bounds them (issue 9.5).
//!
//! - **A connection cap** (`limits.api_connections_max`). At the cap a new connection takes the
//!   place of the oldest idle one: first one that has sent nothing since its last answer, then
//!   one still sending a request head. Only when every connection is inside a request (each of
//!   those is bounded by the body timeout, or is streaming an answer) does the server stop
//!   accepting until one finishes. So idle or slow-header connections can never lock out a real
//!   client: the newest connection always gets its turn.
//! - **A header timeout** (`limits.api_header_timeout`): a request head must be complete within
//!   it, counted from its first byte.
//! - **An idle timeout** (`limits.api_idle_timeout`): a connection that sends nothing for this
//!   long after connecting or after its last answer is closed.
//! - **A body timeout** (`limits.api_body_timeout`): a request body must arrive whole within it,
//!   counted from the end of the head. A trickled body is answered 408 and its connection
//!   closed. (tower-http's `TimeoutBody` resets its timer at every frame, so a body trickled
//!   one byte at a time would never time out; hence the small [`DeadlineBody`] here.)
//!
//! Every error answer that is not JSON already (axum's own rejections: 413 over
//! `limits.api_body_bytes_max`, 405, a bad path parameter) is rewritten as `{"error": "..."}`,
//! like every other refusal. Each request is counted by route template and status, with its
//! latency, in [`HttpStats`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower_service::Service;

use super::ApiError;
use crate::config::Limits;
use crate::limits::{API_ACCEPT_RETRY, REWRITE_BYTES_MAX};

/// The bounds of one API server, from `[limits]`.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    pub connections_max: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    /// Only to name the bound in a 413's message.
    pub body_bytes_max: usize,
}

impl ApiLimits {
    pub fn from_limits(l: &Limits) -> ApiLimits {
        ApiLimits {
            connections_max: l.api_connections_max,
            header_timeout: l.api_header_timeout,
            idle_timeout: l.api_idle_timeout,
            body_timeout: l.api_body_timeout,
            body_bytes_max: l.api_body_bytes_max,
        }
    }
}

/// Upper bounds (seconds) of the request latency histogram.
pub const HTTP_BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The `route` label of a request that matched no route (one value, so that scanning paths
/// cannot grow the label set).
pub const ROUTE_UNMATCHED: &str = "unmatched";

/// How the server's connections ended, for `outpost_http_connections_closed_total{reason}`.
const CLOSE_REASONS: [&str; 4] = ["idle", "header_timeout", "evicted", "client"];

/// Requests and connections of one API server, shown on `/metrics` by every role.
pub struct HttpStats {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub connections: IntGauge,
    pub connections_max: IntGauge,
    pub closed: IntCounterVec,
    pub body_timeouts: prometheus::IntCounter,
}

impl Default for HttpStats {
    fn default() -> Self {
        let closed = IntCounterVec::new(
            Opts::new(
                "outpost_http_connections_closed_total",
                "API connections closed, by reason: idle (limits.api_idle_timeout), header_timeout (limits.api_header_timeout), evicted (an idle one made room at limits.api_connections_max), client (closed by the client or after an answer).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for r in CLOSE_REASONS {
            closed.with_label_values(&[r]);
        }
        HttpStats {
            requests: IntCounterVec::new(
                Opts::new(
                    "outpost_http_requests_total",
                    "API requests answered, by route template and status code.",
                ),
                &["route", "status"],
            )
            .expect("valid metric"),
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "outpost_http_request_duration_seconds",
                    "Time from a request's head to its answer's head, by route template.",
                )
                .buckets(HTTP_BUCKETS_S.to_vec()),
                &["route"],
            )
            .expect("valid metric"),
            connections: IntGauge::new(
                "outpost_http_connections",
                "API connections open now.",
            )
            .expect("valid metric"),
            connections_max: IntGauge::new(
                "outpost_http_connections_max",
                "Bound of open API connections (limits.api_connections_max).",
            )
            .expect("valid metric"),
            closed,
            body_timeouts: prometheus::IntCounter::new(
                "outpost_http_body_timeouts_total",
                "Requests answered 408 because their body did not arrive within limits.api_body_timeout.",
            )
            .expect("valid metric"),
        }
    }
}

impl HttpStats {
    /// Adds these metrics to a scrape.
    pub fn register(&self, r: &prometheus::Registry) {
        let _ = r.register(Box::new(self.requests.clone()));
        let _ = r.register(Box::new(self.duration.clone()));
        let _ = r.register(Box::new(self.connections.clone()));
        let _ = r.register(Box::new(self.connections_max.clone()));
        let _ = r.register(Box::new(self.closed.clone()));
        let _ = r.register(Box::new(self.body_timeouts.clone()));
    }
}

/// A `route_layer` for every role's router: puts the matched route template on the answer, so
/// that the server counts requests by template (`/v1/state/{account}`), never by raw path.
pub async fn record_route(path: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if let Some(p) = path {
        resp.extensions_mut().insert(p);
    }
    resp
}

/// Serves `app` on `listener` in a task, as every role does: the stop sender ends it (see
/// `ops::shutdown::stop_api`).
pub fn spawn(
    listener: TcpListener,
    app: Router,
    limits: &Limits,
    stats: Arc<HttpStats>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(serve(
        listener,
        app,
        ApiLimits::from_limits(limits),
        stats,
        async move {
            let _ = stop_rx.await;
        },
    ));
    (stop, task)
}

/// Serves `app` on `listener` under `limits` until `shutdown` completes; then stops accepting,
/// lets the requests in flight finish and closes the idle connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ApiLimits,
    stats: Arc<HttpStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    stats.connections_max.set(limits.connections_max as i64);
    let server = Arc::new(Server {
        limits,
        stats,
        table: Mutex::new(Table::default()),
        changed: Notify::new(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: the connections we hold will end (timeouts), retry.
                    tracing::warn!("HTTP API: accept failed: {e}");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(API_ACCEPT_RETRY) => continue,
                    }
                }
            },
        };
        let admitted = tokio::select! {
            _ = &mut shutdown => break,
            c = server.admit() => c,
        };
        let _ = stream.set_nodelay(true);
        tasks.spawn(connection(
            server.clone(),
            stream,
            admitted,
            app.clone(),
            stop_rx.clone(),
        ));
    }
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
}

struct Server {
    limits: ApiLimits,
    stats: Arc<HttpStats>,
    table: Mutex<Table>,
    /// A connection ended or became idle: the accept loop may find room.
    changed: Notify,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Arc<Conn>>,
}

impl Server {
    /// A slot for a new connection: a free one, or the oldest idle connection's, or (every
    /// connection inside a request) the first to end or go idle.
    async fn admit(&self) -> Arc<Conn> {
        loop {
            let changed = self.changed.notified();
            {
                let mut t = self.table.lock().expect("connection table");
                if t.open.len() >= self.limits.connections_max {
                    if let Some(victim) = oldest_idle(&t.open) {
                        if let Some(c) = t.open.remove(&victim) {
                            c.evicted.store(true, Ordering::Relaxed);
                            c.wake.notify_one();
                        }
                    }
                }
                if t.open.len() < self.limits.connections_max {
                    t.next_id += 1;
                    let conn = Arc::new(Conn::new(t.next_id));
                    t.open.insert(conn.id, conn.clone());
                    self.stats.connections.set(t.open.len() as i64);
                    return conn;
                }
            }
            changed.await;
        }
    }

    fn remove(&self, id: u64) {
        let mut t = self.table.lock().expect("connection table");
        t.open.remove(&id);
        self.stats.connections.set(t.open.len() as i64);
        drop(t);
        self.changed.notify_one();
    }
}

/// The connection to make room with: one that sent nothing since it went idle (oldest first),
/// else one sending a request head (oldest head first); never one inside a request.
fn oldest_idle(open: &HashMap<u64, Arc<Conn>>) -> Option<u64> {
    open.values()
        .filter_map(|c| match *c.phase.lock().expect("phase") {
            Phase::Idle { since, head_at } => {
                Some((head_at.is_some(), head_at.unwrap_or(since), c.id))
            }
            Phase::Busy => None,
        })
        .min()
        .map(|(_, _, id)| id)
}

#[derive(Clone, Copy)]
enum Phase {
    /// Between requests (or before the first): since when, and when the next head's first
    /// byte arrived.
    Idle {
        since: Instant,
        head_at: Option<Instant>,
    },
    /// Inside a request: from its head until its answer is sent.
    Busy,
}

struct Conn {
    id: u64,
    phase: Mutex<Phase>,
    /// The phase changed, or the connection was evicted: its task looks again.
    wake: Notify,
    evicted: AtomicBool,
}

impl Conn {
    fn new(id: u64) -> Conn {
        Conn {
            id,
            phase: Mutex::new(Phase::Idle {
                since: Instant::now(),
                head_at: None,
            }),
            wake: Notify::new(),
            evicted: AtomicBool::new(false),
        }
    }

    /// When the connection is to be closed unless something happens, and why.
    fn deadline(&self, l: &ApiLimits) -> Option<(Instant, &'static str)> {
        match *self.phase.lock().expect("phase") {
            Phase::Idle {
                head_at: Some(t), ..
            } => Some((t + l.header_timeout, "header_timeout")),
            Phase::Idle { since, .. } => Some((since + l.idle_timeout, "idle")),
            Phase::Busy => None,
        }
    }

    fn bytes_read(&self) {
        let mut p = self.phase.lock().expect("phase");
        if let Phase::Idle {
            head_at: head_at @ None,
            ..
        } = &mut *p
        {
            *head_at = Some(Instant::now());
            drop(p);
            self.wake.notify_one();
        }
    }
}

/// Marks its connection busy while alive: from a request's head until its answer's body is
/// sent (or dropped).
struct BusyGuard {
    conn: Arc<Conn>,
    server: Arc<Server>,
}

impl BusyGuard {
    fn new(conn: Arc<Conn>, server: Arc<Server>) -> BusyGuard {
        *conn.phase.lock().expect("phase") = Phase::Busy;
        conn.wake.notify_one();
        BusyGuard { conn, server }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        *self.conn.phase.lock().expect("phase") = Phase::Idle {
            since: Instant::now(),
            head_at: None,
        };
        self.conn.wake.notify_one();
        self.server.changed.notify_one();
    }
}

async fn connection(
    server: Arc<Server>,
    stream: TcpStream,
    conn: Arc<Conn>,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Watched {
        inner: stream,
        conn: conn.clone(),
    });
    let svc = {
        let (server, conn) = (server.clone(), conn.clone());
        hyper::service::service_fn(move |req| {
            handle(
                req,
                app.clone(),
                BusyGuard::new(conn.clone(), server.clone()),
                server.clone(),
            )
        })
    };
    let http = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(http);
    let mut stopping = false;
    let reason = loop {
        let deadline = conn.deadline(&server.limits);
        let woken = conn.wake.notified();
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("HTTP API connection: {e}");
                }
                break "client";
            }
            _ = sleep_until(deadline.map(|d| d.0)) => {
                // Still the same deadline? (The phase may have moved on meanwhile.)
                if let Some((at, why)) = conn.deadline(&server.limits) {
                    if at <= Instant::now() {
                        break why;
                    }
                }
            }
            _ = woken => {
                if conn.evicted.load(Ordering::Relaxed) {
                    break "evicted";
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                http.as_mut().graceful_shutdown();
            }
        }
    };
    server.stats.closed.with_label_values(&[reason]).inc();
    server.remove(conn.id);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    mut app: Router,
    busy: BusyGuard,
    server: Arc<Server>,
) -> Result<Response<Tracked>, Infallible> {
    let started = Instant::now();
    let timed_out = Arc::new(AtomicBool::new(false));
    let limit = server.limits.body_timeout;
    let req = req.map(|b| DeadlineBody::new(b, limit, timed_out.clone()));
    std::future::poll_fn(|cx| Service::<hyper::Request<DeadlineBody>>::poll_ready(&mut app, cx))
        .await?;
    let resp = app.call(req).await?;
    let route = resp
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| ROUTE_UNMATCHED.to_owned(), |m| m.as_str().to_owned());
    let mut resp = if timed_out.load(Ordering::Relaxed) {
        server.stats.body_timeouts.inc();
        let mut r = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "body: not received within {} (limits.api_body_timeout)",
                humantime::format_duration(limit)
            ),
        )
        .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    } else {
        json_errors(resp, server.limits.body_bytes_max).await
    };
    resp.extensions_mut().remove::<MatchedPath>();
    let stats = &server.stats;
    stats
        .requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    stats
        .duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    Ok(resp.map(|inner| Tracked { inner, _busy: busy }))
}

/// An error answer that is not JSON (one of axum's rejections) as `{"error": "..."}`.
async fn json_errors(resp: Response, body_bytes_max: usize) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let small = http_body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n as usize <= REWRITE_BYTES_MAX);
    if !(status.is_client_error() || status.is_server_error()) || is_json || !small {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, REWRITE_BYTES_MAX).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("body: larger than {body_bytes_max} bytes (limits.api_body_bytes_max)")
    } else if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_lowercase()
    } else {
        text
    };
    let mut out = ApiError::new(status, message).into_response();
    // Keep what the rejection said besides its body (e.g. `Allow` on a 405).
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// The answer's body, holding its connection busy until it is sent.
pub struct Tracked {
    inner: Body,
    _busy: BusyGuard,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body, to arrive whole within a deadline set at the end of the head.
pub struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    timed_out: Arc<AtomicBool>,
}

impl DeadlineBody {
    fn new(inner: Incoming, limit: Duration, timed_out: Arc<AtomicBool>) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            timed_out,
        }
    }
}

/// A request body that did not arrive within `limits.api_body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {} (limits.api_body_timeout)", humantime::format_duration(*.0))]
pub struct BodyTimeout(Duration);

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimeout(self.limit).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The TCP stream, telling its connection when a request head's first byte arrives.
struct Watched {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.bytes_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
