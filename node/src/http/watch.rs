//! The change-feed plumbing every role's `GET /v1/watch` shares: cursors, the watcher bound
//! ([`WATCHERS_MAX`]), the NDJSON / server-sent-events framing and the slow-reader cut-off
//! ([`Sink`]). The datacenter's feed is `crate::datacenter::api::watch`; the controller's is
//! `crate::cluster::controller::watch`.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{ApiError, ApiResult};
use crate::limits::{WATCHERS_MAX, WATCH_QUEUE_CHUNKS, WATCH_SLOW_AFTER};

static WATCHERS: AtomicUsize = AtomicUsize::new(0);

/// One watcher's place among [`WATCHERS_MAX`] (every role's watchers together); given back when
/// the stream ends.
pub(crate) struct Slot;

impl Slot {
    pub(crate) fn take() -> Option<Slot> {
        let n = WATCHERS.fetch_add(1, Ordering::AcqRel);
        if n >= WATCHERS_MAX {
            WATCHERS.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        WATCHERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Watchers streaming now (for `/metrics`).
pub fn watchers() -> usize {
    WATCHERS.load(Ordering::Relaxed)
}

/// A position in the change feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub lseq: u64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.epoch, self.lseq)
    }
}

/// Text that is not a [`Cursor`] (quoted in the message).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a cursor (EPOCH-LSEQ, as a change line gives it)")]
pub struct BadCursor(pub String);

impl std::str::FromStr for Cursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Cursor, BadCursor> {
        let bad = || BadCursor(s.to_owned());
        let (e, l) = s.trim().split_once('-').ok_or_else(bad)?;
        Ok(Cursor {
            epoch: e.parse().map_err(|_| bad())?,
            lseq: l.parse().map_err(|_| bad())?,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Ndjson,
    Sse,
}

impl Format {
    /// `?format=`, else the Accept header; default NDJSON.
    pub(crate) fn of(format: Option<&str>, headers: &HeaderMap) -> ApiResult<Format> {
        let accept_sse = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
        match format {
            Some("ndjson") => Ok(Format::Ndjson),
            Some("sse") => Ok(Format::Sse),
            None if accept_sse => Ok(Format::Sse),
            None => Ok(Format::Ndjson),
            Some(other) => Err(ApiError::bad(format!("format: {other:?} (ndjson or sse)"))),
        }
    }
}

/// `?cursor=`, else SSE's `Last-Event-ID`.
pub(crate) fn cursor_of(cursor: Option<&str>, headers: &HeaderMap) -> ApiResult<Option<Cursor>> {
    let text = cursor.map(str::to_owned).or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    match text {
        None => Ok(None),
        Some(c) => c
            .parse::<Cursor>()
            .map(Some)
            .map_err(|e| ApiError::bad(format!("cursor: {e}"))),
    }
}

/// `?from=`: true for `oldest`.
pub(crate) fn from_oldest(from: Option<&str>, cursor: bool) -> ApiResult<bool> {
    let oldest = match from {
        None | Some("now") => false,
        Some("oldest") => true,
        Some(other) => return Err(ApiError::bad(format!("from: {other:?} (now or oldest)"))),
    };
    if cursor && from.is_some() {
        return Err(ApiError::bad(
            "from: give a cursor or where to start, not both",
        ));
    }
    Ok(oldest)
}

pub(crate) fn too_many() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{WATCHERS_MAX} watchers already; retry later"),
    )
}

/// What every role's `GET /v1/watch` takes from its request before it streams, checked in this
/// order (the first refusal is the answer): the format, the cursor, where to start without one,
/// and a watcher's slot.
pub(crate) struct Opening {
    pub(crate) format: Format,
    /// `?cursor=`, else SSE's `Last-Event-ID`.
    pub(crate) cursor: Option<Cursor>,
    /// `?from=oldest` (never with a cursor).
    pub(crate) oldest: bool,
    slot: Slot,
}

impl Opening {
    /// The query's `format`, `cursor` and `from`, with the headers; 503 when [`WATCHERS_MAX`]
    /// watch already.
    pub(crate) fn of(
        format: Option<&str>,
        cursor: Option<&str>,
        from: Option<&str>,
        headers: &HeaderMap,
    ) -> ApiResult<Opening> {
        let format = Format::of(format, headers)?;
        let cursor = cursor_of(cursor, headers)?;
        let oldest = from_oldest(from, cursor.is_some())?;
        let slot = Slot::take().ok_or_else(too_many)?;
        Ok(Opening {
            format,
            cursor,
            oldest,
            slot,
        })
    }

    /// The streamed answer: `feed` writes to the [`Sink`] on a task of its own, which holds the
    /// watcher's slot until it returns. `on_slow` counts a watcher cut off for not reading.
    pub(crate) fn stream<Fut>(
        self,
        on_slow: Box<dyn Fn() + Send + Sync>,
        feed: impl FnOnce(Sink) -> Fut,
    ) -> Response
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Bytes>(WATCH_QUEUE_CHUNKS);
        let sink = Sink {
            tx,
            format: self.format,
            on_slow,
        };
        let fed = feed(sink);
        let slot = self.slot;
        tokio::spawn(async move {
            let _slot = slot;
            fed.await;
        });
        response(self.format, rx)
    }
}

/// The streamed answer reading `rx`.
pub(crate) fn response(format: Format, rx: mpsc::Receiver<Bytes>) -> Response {
    let content_type = match format {
        Format::Ndjson => "application/x-ndjson",
        Format::Sse => "text/event-stream",
    };
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    }));
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// One watcher's end of its stream: lines in its format, sent with the slow-client bound.
pub(crate) struct Sink {
    pub(crate) tx: mpsc::Sender<Bytes>,
    pub(crate) format: Format,
    /// Counts a watcher cut off for not reading.
    pub(crate) on_slow: Box<dyn Fn() + Send + Sync>,
}

impl Sink {
    /// One line of the stream in the watcher's format.
    pub(crate) fn line(&self, event: &str, pos: &Cursor, v: &Value) -> Bytes {
        let mut out = Vec::new();
        match self.format {
            Format::Ndjson => {
                serde_json::to_writer(&mut out, v).expect("a Value always encodes");
                out.push(b'\n');
            }
            Format::Sse => {
                out.extend_from_slice(format!("id: {pos}\nevent: {event}\ndata: ").as_bytes());
                serde_json::to_writer(&mut out, v).expect("a Value always encodes");
                out.extend_from_slice(b"\n\n");
            }
        }
        Bytes::from(out)
    }

    /// Sends what `buf` holds. False: the stream is over (the client left, or was too slow
    /// and was told so in the slot kept free for it).
    pub(crate) async fn flush(&mut self, buf: &mut Vec<u8>, pos: &Cursor) -> bool {
        if buf.is_empty() {
            return !self.tx.is_closed();
        }
        // Two free slots: one for this chunk, one kept for a last line.
        match tokio::time::timeout(WATCH_SLOW_AFTER, self.tx.reserve_many(2)).await {
            Ok(Ok(mut permits)) => {
                permits
                    .next()
                    .expect("two permits")
                    .send(Bytes::from(std::mem::take(buf)));
                true
            }
            Ok(Err(_)) => false,
            Err(_) => {
                (self.on_slow)();
                tracing::info!(
                    cursor = %pos,
                    "disconnecting a watcher that has not read for {}",
                    humantime::format_duration(WATCH_SLOW_AFTER)
                );
                let line = json!({
                    "error": format!(
                        "this client did not read for {}: disconnected; reconnect with the cursor of the last line it read",
                        humantime::format_duration(WATCH_SLOW_AFTER)
                    ),
                    "cursor": pos.to_string(),
                });
                let _ = self.tx.try_send(self.line("error", pos, &line));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cursor;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let c = Cursor {
            epoch: 7,
            lseq: 12345,
        };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        for bad in [
            "",
            "7",
            "7-",
            "-3",
            "x-1",
            "1-2-3",
            "18446744073709551616-1",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
    }
}
