//! Fetches the bundle sealed to this machine for one deployment into
//! `DATA_DIR/bundles/incoming/<deployment>.age`, resumably, and checks it against the signed
//! order before anything reads it.
//!
//! Each attempt opens a bi stream of its own (on the link to the load balancer when this machine
//! is a dependent and that link is up, else on the connection to the controller), sends a
//! `BundleRequest` from the file's current length, checks the `BundleHeader` (the total the
//! order names, the offset asked for) and appends the raw bytes that follow. A broken stream or
//! connection is retried with backoff from wherever the file then ends, and so is a `Goodbye`
//! saying the other side is busy (`close::OVERLOADED`) or, from a load balancer, not connected
//! (`close::SHUTDOWN`; the next attempt goes to the controller directly); other refusals (no
//! such bundle, not this machine's, a header that does not match the order) are retried a few
//! times, then fail the deployment. The bytes go to disk on a blocking thread fed through a bounded queue, fsynced
//! every [`FETCH_SYNC_EVERY_BYTES`] and at the end of each attempt, and hashed as they are written, so
//! the complete file needs no second read before its blake3 is compared with the order's
//! `sealed_hash`. A mismatch deletes the file: nothing altered is ever decrypted.
//!
//! This module never decrypts, never installs and never talks to the core: it returns to the
//! software task, which does.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::core::Standing;
use super::WorkerShared;
use crate::cluster::body::DeployOrder;
use crate::limits::{
    FETCH_FLUSH_IDLE, FETCH_HEADER_TIMEOUT, FETCH_READ_IDLE, FETCH_REFUSALS_MAX,
    FETCH_SYNC_EVERY_BYTES, FETCH_WRITE_BUF_BYTES, FETCH_WRITE_QUEUE_MAX, STREAM_OPEN_TIMEOUT,
};
use crate::limits::{WORKER_DIAL_BACKOFF_MAX, WORKER_DIAL_BACKOFF_MIN};
use crate::net::backoff::Backoff;
use crate::net::close;
use crate::wire::{read_frame, write_frame, BundleRequest, FrameError, Message};

/// A test hook for the process tests, never for production: with this variable set to N
/// (bytes), a fetch stops reading once N bytes of the sealed bundle are written and fsynced,
/// logs "stalled at N for the test" and waits forever, so that a test can kill the worker
/// (-9) in the middle of a transfer and check that its successor resumes from byte N.
pub const STALL_ENV: &str = "OUTPOST_TEST_STALL_FETCH_AT";

/// `DATA_DIR/bundles/incoming/<deployment>.age`.
pub(crate) fn incoming_path(incoming_dir: &Path, deployment: u64) -> PathBuf {
    incoming_dir.join(format!("{deployment}.age"))
}

/// Why one attempt ended before the file was complete.
enum End {
    /// The stream or the connection broke (or there is none): asked again.
    Broken(String),
    /// The other side refused or answered something that does not match the order.
    Refused(String),
}

/// The value of [`STALL_ENV`], if set.
fn stall_at() -> Option<u64> {
    let v = std::env::var(STALL_ENV).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => {
            tracing::warn!("{STALL_ENV}={v:?} is not a number of bytes; ignored");
            None
        }
    }
}

/// Why a fetch failed; its text is the deployment's reason, reported as is.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("a blocking task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
    #[error("preparing {}: {source}", path.display())]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The controller (or load balancer) refused [`FETCH_REFUSALS_MAX`] times in a row.
    #[error("fetching the sealed bundle: refused {refusals} times, last: {last}")]
    Refused { refusals: u32, last: String },
    #[error("hashing {}: {source}", path.display())]
    Hash {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes do not hash to what the controller signed; the file is deleted unopened.
    #[error(
        "the sealed bundle was altered: its {total} bytes hash to {actual}, the controller \
         signed {expected}; deleted without opening it"
    )]
    Altered {
        total: u64,
        actual: String,
        expected: String,
    },
}

/// Fetches the sealed bundle of `order` into `path` and checks its hash. `progress` follows
/// the bytes in the file. `Err` fails the deployment (the reason is reported as is).
pub(crate) async fn fetch(
    shared: Arc<WorkerShared>,
    order: DeployOrder,
    path: PathBuf,
    progress: Arc<AtomicU64>,
) -> Result<(), FetchError> {
    let total = order.sealed_bytes;
    let d = order.deployment;
    let p = path.clone();
    let mut len = blocking(move || prepare(&p, total))
        .await?
        .map_err(|source| FetchError::Prepare {
            path: path.clone(),
            source,
        })?;
    progress.store(len, Ordering::Relaxed);
    let limit = stall_at().map_or(total, |s| s.min(total));
    // The hash of the file's first `len` bytes, once a writer has computed it.
    let mut hasher: Option<blake3::Hasher> = None;
    let mut backoff = Backoff::new(WORKER_DIAL_BACKOFF_MIN, WORKER_DIAL_BACKOFF_MAX);
    let mut refusals = 0u32;
    let mut prefer_lb = true;
    let mut last_error = String::new();
    let mut resumed_at = 0;
    while len < limit {
        if len > 0 && len != resumed_at {
            tracing::info!("resuming the fetch of deployment {d} at byte {len}");
            resumed_at = len;
        }
        let before = len;
        let (via_lb, end) = attempt(
            &shared,
            &order,
            &path,
            &mut len,
            limit,
            &mut hasher,
            &progress,
            prefer_lb,
        )
        .await;
        progress.store(len, Ordering::Relaxed);
        if len > before {
            backoff.reset();
            refusals = 0;
        }
        let Some(end) = end else { continue };
        let e = match end {
            End::Broken(e) => e,
            End::Refused(e) => {
                refusals += 1;
                if refusals >= FETCH_REFUSALS_MAX {
                    return Err(FetchError::Refused { refusals, last: e });
                }
                e
            }
        };
        if e != last_error {
            tracing::info!(deployment = d, at = len, "fetch interrupted: {e}; retrying");
            last_error = e;
        }
        // After a failure through the load balancer, the next attempt goes to the controller.
        prefer_lb = !via_lb;
        tokio::time::sleep(backoff.next_wait()).await;
    }
    if len < total {
        tracing::warn!("stalled at {len} for the test");
        std::future::pending::<()>().await;
    }
    let digest = match hasher {
        Some(h) => h.finalize(),
        None => {
            let p = path.clone();
            blocking(move || -> io::Result<blake3::Hash> {
                let mut h = blake3::Hasher::new();
                h.update_reader(File::open(&p)?)?;
                Ok(h.finalize())
            })
            .await?
            .map_err(|source| FetchError::Hash {
                path: path.clone(),
                source,
            })?
        }
    };
    if digest != blake3::Hash::from(order.sealed_hash) {
        let p = path.clone();
        let _ = blocking(move || std::fs::remove_file(p)).await;
        return Err(FetchError::Altered {
            total,
            actual: digest.to_hex().to_string(),
            expected: blake3::Hash::from(order.sealed_hash).to_hex().to_string(),
        });
    }
    Ok(())
}

/// Creates the incoming directory and returns the length of what an earlier fetch left (a file
/// longer than the bundle is started again).
fn prepare(path: &Path, total: u64) -> io::Result<u64> {
    let dir = path.parent().expect("an incoming file has a directory");
    crate::fsmode::create_private_dir_all(dir)?;
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            crate::fsmode::private_file_options().open(path)?;
            File::open(dir)?.sync_all()?;
            0
        }
        Err(e) => return Err(e),
    };
    if len > total {
        tracing::warn!(
            "{} holds {len} bytes, more than the {total} of the bundle; fetching it again",
            path.display()
        );
        OpenOptions::new().write(true).open(path)?.set_len(0)?;
        return Ok(0);
    }
    Ok(len)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}

/// The connection a transfer stream goes on: the load balancer's link (a dependent, when
/// `prefer_lb` and it is up), else the controller's once it has admitted this machine.
fn transfer_conn(shared: &WorkerShared, prefer_lb: bool) -> Option<(quinn::Connection, bool)> {
    if prefer_lb {
        if let Some(c) = super::relay::lb_connection(shared) {
            return Some((c, true));
        }
    }
    if shared.standing() != Standing::Admitted {
        return None;
    }
    let l = shared.controller.lock().expect("controller lock");
    if !l.connected {
        return None;
    }
    l.conn.clone().map(|c| (c, false))
}

/// One request: appends to the file what the stream delivers, up to `limit`. Returns whether
/// it went through the load balancer, and why it ended early (`None`: `limit` reached).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    shared: &Arc<WorkerShared>,
    order: &DeployOrder,
    path: &Path,
    len: &mut u64,
    limit: u64,
    hasher: &mut Option<blake3::Hasher>,
    progress: &Arc<AtomicU64>,
    prefer_lb: bool,
) -> (bool, Option<End>) {
    let Some((conn, via_lb)) = transfer_conn(shared, prefer_lb) else {
        return (
            false,
            Some(End::Broken("not connected to the controller".into())),
        );
    };
    let via = if via_lb {
        "the load balancer"
    } else {
        "the controller"
    };
    let start = *len;
    let (mut send, mut recv) = match tokio::time::timeout(STREAM_OPEN_TIMEOUT, conn.open_bi()).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (via_lb, Some(End::Broken(format!("{via}: {e}")))),
        Err(_) => {
            return (
                via_lb,
                Some(End::Broken(format!("{via}: opening a stream timed out"))),
            )
        }
    };
    let request = Message::BundleRequest(BundleRequest {
        deployment: order.deployment,
        machine: shared.node_id,
        offset: start,
    });
    if let Err(e) = write_frame(&mut send, &request).await {
        return (
            via_lb,
            Some(End::Broken(format!("{via}: sending the request: {e}"))),
        );
    }
    let _ = send.finish();
    let max = shared.config.limits.frame_bytes_max;
    let header = match tokio::time::timeout(FETCH_HEADER_TIMEOUT, read_frame(&mut recv, max)).await
    {
        Ok(Ok(Some(Message::BundleHeader(h)))) => h,
        Ok(Ok(Some(Message::Goodbye(g)))) => {
            let why = format!("{via} refused: {}", g.reason);
            // Busy, or (a load balancer) without its own link to the controller: not a no.
            let end = if g.code == close::OVERLOADED || g.code == close::SHUTDOWN {
                End::Broken(why)
            } else {
                End::Refused(why)
            };
            return (via_lb, Some(end));
        }
        Ok(Ok(Some(m))) => {
            return (
                via_lb,
                Some(End::Refused(format!(
                    "{via} answered a {} instead of a BundleHeader",
                    m.kind()
                ))),
            )
        }
        Ok(Ok(None)) => {
            return (
                via_lb,
                Some(End::Broken(format!(
                    "{via} closed the stream without answering"
                ))),
            )
        }
        Ok(Err(FrameError::Io(e))) => return (via_lb, Some(End::Broken(format!("{via}: {e}")))),
        Ok(Err(e)) => return (via_lb, Some(End::Refused(format!("{via}: {e}")))),
        Err(_) => {
            return (
                via_lb,
                Some(End::Broken(format!(
                    "{via} did not answer within {FETCH_HEADER_TIMEOUT:?}"
                ))),
            )
        }
    };
    if header.total != order.sealed_bytes || header.offset != start {
        return (
            via_lb,
            Some(End::Refused(format!(
                "{via} offers bytes {}.. of {} for deployment {}, the signed order says {} bytes \
                 and this machine asked from {start}",
                header.offset, header.total, order.deployment, order.sealed_bytes
            ))),
        );
    }

    let (tx, rx) = mpsc::channel::<Vec<u8>>(FETCH_WRITE_QUEUE_MAX);
    let writer = {
        let path = path.to_owned();
        let known = hasher.take();
        let progress = progress.clone();
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            write_loop(
                &path,
                start,
                known,
                rx,
                &progress,
                &shared.metrics.bundle_bytes_fetched,
            )
        })
    };
    let want = limit - start;
    let mut got = 0u64;
    let mut end = None;
    while got < want && end.is_none() {
        let n = (want - got).min(FETCH_WRITE_BUF_BYTES as u64) as usize;
        let mut buf = vec![0u8; n];
        let mut filled = 0;
        while filled < n {
            let idle = if filled > 0 {
                FETCH_FLUSH_IDLE
            } else {
                FETCH_READ_IDLE
            };
            // Cancel-safe: a read that times out took nothing.
            match tokio::time::timeout(idle, recv.read(&mut buf[filled..])).await {
                Ok(Ok(Some(k))) => filled += k,
                Err(_) if filled > 0 => break,
                Ok(Ok(None)) => {
                    end = Some(End::Broken(format!(
                        "{via} ended the stream at byte {} of {}",
                        start + got + filled as u64,
                        order.sealed_bytes
                    )));
                    break;
                }
                Ok(Err(e)) => {
                    end = Some(End::Broken(format!("{via}: {e}")));
                    break;
                }
                Err(_) => {
                    end = Some(End::Broken(format!(
                        "{via} sent nothing for {FETCH_READ_IDLE:?}"
                    )));
                    break;
                }
            }
        }
        buf.truncate(filled);
        got += filled as u64;
        if filled > 0 && tx.send(buf).await.is_err() {
            // The writer stopped: its error says why.
            break;
        }
    }
    // Whatever else the stream holds is not wanted (or, past the total, not trusted).
    let _ = recv.stop(0u32.into());
    drop(tx);
    let outcome = match writer.await {
        Ok(o) => o,
        Err(e) => WriteOutcome {
            len: std::fs::metadata(path).map_or(start, |m| m.len()),
            hasher: None,
            error: Some(format!("the writer thread failed: {e}")),
        },
    };
    *len = outcome.len;
    *hasher = outcome.hasher;
    if let Some(e) = outcome.error {
        shared.note_error(format!("writing {}: {e}", path.display()));
        end = Some(End::Broken(format!("writing {}: {e}", path.display())));
    }
    (via_lb, end)
}

struct WriteOutcome {
    /// The file's length after the attempt.
    len: u64,
    /// The hash of those `len` bytes (`None` after an error).
    hasher: Option<blake3::Hasher>,
    error: Option<String>,
}

/// The writer thread of one attempt: appends what it is sent at `start`, hashing and counting
/// it, fsyncs regularly and at the end. Given no hash of the first `start` bytes (the first
/// attempt of a resumed fetch), it hashes them from the file first.
fn write_loop(
    path: &Path,
    start: u64,
    known: Option<blake3::Hasher>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    progress: &AtomicU64,
    fetched: &AtomicU64,
) -> WriteOutcome {
    let mut written = start;
    let run = |written: &mut u64| -> io::Result<blake3::Hasher> {
        let mut f = OpenOptions::new().read(true).write(true).open(path)?;
        // Bytes past `start` were never vouched for by an attempt: dropped.
        f.set_len(start)?;
        let mut h = match known {
            Some(h) => h,
            None => {
                let mut h = blake3::Hasher::new();
                h.update_reader((&mut f).take(start))?;
                h
            }
        };
        f.seek(SeekFrom::Start(start))?;
        let mut unsynced = 0u64;
        while let Some(buf) = rx.blocking_recv() {
            f.write_all(&buf)?;
            h.update(&buf);
            let n = buf.len() as u64;
            *written += n;
            unsynced += n;
            progress.store(*written, Ordering::Relaxed);
            fetched.fetch_add(n, Ordering::Relaxed);
            if unsynced >= FETCH_SYNC_EVERY_BYTES {
                f.sync_data()?;
                unsynced = 0;
            }
        }
        f.sync_data()?;
        Ok(h)
    };
    match run(&mut written) {
        Ok(h) => WriteOutcome {
            len: written,
            hasher: Some(h),
            error: None,
        },
        Err(e) => WriteOutcome {
            len: std::fs::metadata(path).map_or(start, |m| m.len()),
            hasher: None,
            error: Some(e.to_string()),
        },
    }
}
