//! What every task of a running controller shares: its config and identity, metrics, the
//! sender to the core thread, the summary it publishes, the bundle store, the refusal log and the
//! change journal; and the round trip that proves the core thread answers.

use super::bundles::BundleStore;
use super::cmd::Cmd;
use super::cmd::Summary;
use super::refusal::RefusalLog;
use crate::config::Config;
use crate::ids::Fingerprint;
use crate::net::PinSet;
use crate::ops::watchdog::round_trip;
use crate::ops::watchdog::PingError;
use crate::store::NodeMeta;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the supervisor's STATUS line is refreshed.
/// Counters for `/metrics`.
#[derive(Default)]
pub struct ControllerMetrics {
    /// Transactions committed by the core thread.
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    /// Connections closed for a bad frame, a wrong first frame or a version mismatch.
    pub refusals: AtomicU64,
    /// Connections refused at `CONNECTIONS_MAX`, or cut at `JOINING_MAX` before their Join.
    pub connections_refused: AtomicU64,
    /// Connections closed because their send queue was full.
    pub slow_closed: AtomicU64,
    /// Relayed copies not queued because the load balancer's send queue was three quarters
    /// full (each is sent directly after `resend_after`).
    pub relays_dropped: AtomicU64,
    pub api_unauthorized: AtomicU64,
    /// Bundles uploaded (new or already stored).
    pub bundles_uploaded: AtomicU64,
    /// Uploaded bundles deleted because no deployment needed them.
    pub bundles_deleted: AtomicU64,
    /// `GET /v1/watch` clients disconnected for not reading.
    pub watchers_slow_closed: AtomicU64,
    pub deployments_created: AtomicU64,
    /// Bytes of sealed bundles written.
    pub bundle_bytes_sealed: AtomicU64,
    pub seal_failures: AtomicU64,
    /// Sealed bundle bytes sent to workers.
    pub bundle_bytes_served: AtomicU64,
    /// Transfers started (a resumed one counts again).
    pub transfers: AtomicU64,
    /// Transfers sending now (a gauge).
    pub transfers_in_flight: AtomicU64,
    pub transfers_refused: AtomicU64,
    /// The API server's requests and connections.
    pub http: Arc<crate::http::serve::HttpStats>,
}

/// What the API, the connections and the core thread share.
pub struct ControllerShared {
    pub config: Config,
    pub meta: NodeMeta,
    pub fingerprint: Fingerprint,
    pub token: String,
    pub metrics: ControllerMetrics,
    /// Certificates refused in the handshake: the rejected keys. The core thread replaces it
    /// after every accept and reject.
    pub deny: PinSet,
    pub ready: AtomicBool,
    pub(crate) cmd: mpsc::Sender<Cmd>,
    pub(crate) summary: Mutex<Summary>,
    pub(crate) last_errors: crate::ops::ErrorLog,
    /// `DATA_DIR/bundles`: uploads, sealed bundles.
    pub(crate) bundles: BundleStore,
    /// The largest upload accepted (tests lower it).
    pub(crate) upload_bytes_max: AtomicU64,
    /// Uploads at once.
    pub(crate) uploads: tokio::sync::Semaphore,
    /// Connections before their Join at once (`conn::JOINING_MAX`; tests lower it).
    pub(crate) joining_max: AtomicUsize,
    /// Rate limit of the refusal log lines.
    pub(crate) refusal_log: Mutex<RefusalLog>,
    /// Machine and deployment changes for `GET /v1/watch`, appended after each commit.
    pub(crate) journal: super::journal::Journal,
    /// Tests: every commit fails while set.
    #[cfg(test)]
    pub(crate) fail_commits: AtomicBool,
}

impl ControllerShared {
    pub fn note_error(&self, e: String) {
        self.last_errors.note(&e);
    }

    /// A refused connection or Join: logged in full if it is the first of its `kind` in this
    /// interval, else only counted (see `conn::REFUSAL_LOG_EVERY`).
    pub(crate) fn note_refusal(&self, kind: &str, line: String) {
        let (full, summary) = self
            .refusal_log
            .lock()
            .expect("refusal log lock")
            .note(kind, tokio::time::Instant::now());
        if let Some(s) = summary {
            self.note_error(s);
        }
        if full {
            self.note_error(line);
        }
    }

    /// The refusal summary of an interval that ended with nothing refused after it.
    pub(crate) fn flush_refusals(&self) {
        let summary = self
            .refusal_log
            .lock()
            .expect("refusal log lock")
            .flush(tokio::time::Instant::now());
        if let Some(s) = summary {
            self.note_error(s);
        }
    }

    pub fn last_errors(&self) -> Vec<String> {
        self.last_errors.list()
    }

    /// Counts as of the core thread's last batch.
    pub fn summary(&self) -> Summary {
        self.summary.lock().expect("summary lock").clone()
    }
}

/// One round trip through the core thread.
pub(crate) async fn ping(shared: &ControllerShared, timeout: Duration) -> Result<(), PingError> {
    round_trip("core thread", timeout, |reply| async move {
        shared.cmd.send(Cmd::Ping { reply }).await.is_ok()
    })
    .await
    .map(|_| ())
}
