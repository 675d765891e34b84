//! Every bound of the node, named once (TigerBeetle's `constants.zig` is the model). A module
//! that needs a bound imports it from here; nothing defines a size, a count, a timeout or an
//! interval of its own. Bounds an operator can change are `[limits]` / `[cluster]` keys
//! (`crate::config`), whose defaults and allowed ranges are named here too.
//!
//! Relations between bounds are checked when the crate compiles (`const _: () = assert!(..)`
//! below); a change that breaks one does not build. The reference manual's budget table
//! (docs/reference.md, "Memory") lists the ones that bound memory.

use std::time::Duration;

// ---- Configurable: the defaults of `[limits]` and `[cluster]` -----------------------------------

/// `limits.log_retention`: how long origin logs are kept for catch-up.
pub const LOG_RETENTION_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// `limits.log_records_max`: records kept across origin logs.
pub const LOG_RECORDS_MAX_DEFAULT: u64 = 10_000_000;
/// `limits.ingest_queue_max`: requests queued for the writer thread.
pub const INGEST_QUEUE_MAX_DEFAULT: usize = 4096;
/// `limits.batch_events_max`: events in one `POST /v1/events/batch`.
pub const BATCH_EVENTS_MAX_DEFAULT: usize = 10_000;
/// `limits.commit_events_max`: events in one group commit (a batch is one commit, so at least
/// `batch_events_max`; the config refuses less).
pub const COMMIT_EVENTS_MAX_DEFAULT: usize = 20_000;
/// `limits.in_flight_max`: log positions sent to a peer and not yet acknowledged.
pub const IN_FLIGHT_MAX_DEFAULT: u64 = 16_384;
/// `limits.api_body_bytes_max`: the largest HTTP API request body.
pub const API_BODY_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;
/// `limits.peers_max`: peers in `[[peers]]`.
pub const PEERS_MAX_DEFAULT: usize = 64;
/// `limits.api_connections_max`: HTTP API connections open at once.
pub const API_CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// `limits.api_header_timeout`, `api_idle_timeout`, `api_body_timeout`.
pub const API_HEADER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
pub const API_IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
pub const API_BODY_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// `cluster.down_after`: a worker silent this long is marked down and leaves its pool.
pub const DOWN_AFTER_DEFAULT: Duration = Duration::from_secs(15);
/// `cluster.pending_max`: machine keys waiting as pending.
pub const PENDING_MAX_DEFAULT: usize = 1024;
/// `cluster.channel_max`: publications stored unacknowledged for one machine. A machine that
/// applies what it is sent holds a few; one that stopped acknowledging (hung, or replaying an
/// old database) would otherwise grow the controller's table without end.
pub const CHANNEL_MAX_DEFAULT: usize = 256;
/// `cluster.bundle_keep_unused`: an uploaded bundle no deployment needs is deleted this old.
pub const BUNDLE_KEEP_UNUSED_DEFAULT: Duration = Duration::from_secs(24 * 3600);

const _: () = assert!(BATCH_EVENTS_MAX_DEFAULT <= COMMIT_EVENTS_MAX_DEFAULT);
const _: () = assert!(IN_FLIGHT_MAX_DEFAULT > 0 && INGEST_QUEUE_MAX_DEFAULT > 0);
// One request of the largest default body fits the ingest budget (else it would wait forever).
const _: () =
    assert!(API_BODY_BYTES_MAX_DEFAULT * INGEST_BODY_FACTOR <= INGEST_BYTES_IN_FLIGHT_MAX);

// ---- Events ------------------------------------------------------------------------------------

/// Largest account name, in bytes.
pub const ACCOUNT_BYTES_MAX: usize = 256;
/// Largest key-like string in event data (contact, call id, setting key, status).
pub const EVENT_NAME_BYTES_MAX: usize = 1024;
/// Largest encoded element, in bytes; bounds what one event or one remote element may carry.
pub const ELEMENT_BYTES_MAX: usize = 64 * 1024;
/// Longest registration, ten years.
pub const EXPIRES_S_MAX: u64 = 10 * 365 * 24 * 3600;

// ---- Wire and transport ------------------------------------------------------------------------

/// Default largest payload of one frame, in bytes (the length prefix not included).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// `limits.frame_bytes_max` must lie in this range.
pub const FRAME_BYTES_MAX_LOWEST: usize = 64 * 1024;
pub const FRAME_BYTES_MAX_HIGHEST: usize = 64 * 1024 * 1024;
/// A peer may carry at most this many fingerprints (two while its certificate rotates).
pub const PEER_FINGERPRINTS_MAX: usize = 2;
/// Concurrent streams a peer may open, each direction: enough for control, replication and a
/// few bundle transfers at once.
pub const STREAMS_MAX: u32 = 64;

const _: () = assert!(FRAME_BYTES_MAX_LOWEST <= FRAME_BYTES_MAX_DEFAULT);
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT <= FRAME_BYTES_MAX_HIGHEST);
const _: () = assert!(FRAME_BYTES_MAX_HIGHEST <= u32::MAX as usize);

// ---- Cluster -------------------------------------------------------------------------------------

/// A worker redials its controller or load balancer, and retries a bundle fetch, after waits
/// doubling from this minimum to this maximum (`net::backoff`, each plus up to as much again).
pub const WORKER_DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const WORKER_DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);
const _: () = assert!(WORKER_DIAL_BACKOFF_MIN.as_nanos() <= WORKER_DIAL_BACKOFF_MAX.as_nanos());

// ---- Configuration -----------------------------------------------------------------------------

/// A config file larger than this is refused before it is parsed.
pub const CONFIG_BYTES_MAX: u64 = 1024 * 1024;
/// Node, peer and machine names: at most this many bytes of `[A-Za-z0-9._-]`.
pub const NODE_NAME_BYTES_MAX: usize = 64;
/// Longest join token file read; anything larger is not a token.
pub const JOIN_TOKEN_BYTES_MAX: u64 = 4096;

// ---- Storage -----------------------------------------------------------------------------------

/// redb's page cache. The default (1 GiB) is too much for a small edge box; the working set
/// (state table + log head + indexes) of a busy node fits comfortably in this.
pub const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Bound on the overlay's clean entries (committed entries the table holds, kept so the writer
/// need not read them back). Its dirty entries are bounded by the writer's flush policy.
pub const STATE_CLEAN_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Bounds on what [`crate::store::Store::put_secret`] accepts: identity material is small.
pub const SECRET_NAME_BYTES_MAX: usize = 64;
pub const SECRET_BYTES_MAX: usize = 64 * 1024;
/// Bytes an entry is counted for beyond its account and element: the key's type code,
/// version, origin, oseq, message id and the maps' own overhead.
pub const STATE_ENTRY_OVERHEAD_BYTES: usize = 128;
/// Rows copied per write transaction of the copy: bounds the memory of its dirty pages.
pub const BACKUP_COPY_ROWS_PER_TXN: u64 = 50_000;
/// Rows rewritten per pass over the state table (bounds the memory of a migration).
pub const MIGRATE_ROWS_PER_TXN: usize = 4096;
/// Problems listed one by one; beyond this many only counted.
pub const DB_CHECK_PROBLEMS_SHOWN_MAX: usize = 100;

// ---- Datacenter writer -------------------------------------------------------------------------

/// After a failed write, work is refused with the same error for this long before the database
/// is reopened and a commit tried again: a full disk costs at most one reopen a second.
pub const WRITER_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// How long a reopen waits for readers to let go of the old database.
pub const STORE_REOPEN_WAIT_MAX: Duration = Duration::from_secs(5);
/// The state write-back (see `store::overlay`). Dirty entries over this many bytes are all
/// written to the state table in the next commit, whatever else it holds: the hard bound.
pub const STATE_DIRTY_BYTES_MAX: usize = 16 << 20;
/// A flush round starts when the dirty entries reach this many bytes, ...
pub const STATE_DIRTY_BYTES_TARGET: usize = 8 << 20;
/// ... or this many log records follow `state_upto` (what a restart replays: bounded by it),
pub const STATE_REPLAY_RECORDS_MAX: u64 = 200_000;
/// ... or this long after the last round ended, if anything is dirty.
pub const STATE_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// A round writes its entries over about this many commits, in key-ordered chunks of at
/// least [`STATE_FLUSH_CHUNK_MIN`], so no one commit (and no acknowledgement) waits for all.
pub const STATE_FLUSH_ROUND_COMMITS: usize = 8;
pub const STATE_FLUSH_CHUNK_MIN: usize = 1024;
const _: () = assert!(STATE_DIRTY_BYTES_TARGET < STATE_DIRTY_BYTES_MAX);
/// How often an idle node trims old log records (busy nodes trim with their commits).
pub const RETENTION_TRIM_EVERY: Duration = Duration::from_secs(60);
/// How often the STATUS line is refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

// ---- HTTP API ----------------------------------------------------------------------------------

/// How long `/readyz` waits for a round trip through the role's core (the writer thread, the
/// controller's core, the worker's driver) before it answers 503.
pub const READY_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of ingest requests in progress across all connections, counting each request's body
/// [`INGEST_BODY_FACTOR`] times (the body, the events decoded from it, their answers): a
/// request waits for room instead of adding to memory. Beside `limits.api_body_bytes_max`
/// (one request), this bounds what clients can make the node hold at once.
pub const INGEST_BYTES_IN_FLIGHT_MAX: usize = 64 << 20;
/// What an ingest request is counted for, per byte of its body.
pub const INGEST_BODY_FACTOR: usize = 4;
pub const INGEST_PERMIT_BYTES: usize = 1024;
const _: () = assert!(INGEST_BYTES_IN_FLIGHT_MAX / INGEST_PERMIT_BYTES <= u32::MAX as usize);
/// `GET /v1/backup` streams its copy in chunks of this many bytes.
pub const BACKUP_CHUNK_BYTES: usize = 256 * 1024;
/// Largest non-JSON error body rewritten as `{"error"}`; a larger one (none of axum's
/// rejections is) passes unchanged.
pub const REWRITE_BYTES_MAX: usize = 4096;
/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
pub const API_ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// `GET /v1/watch` reads the log in pages of this many records.
pub const WATCH_PAGE_RECORDS: usize = 512;
/// A chunk is sent once it holds this many bytes (or the page ends).
pub const WATCH_CHUNK_BYTES: usize = 64 * 1024;
/// Chunks queued for one watcher; one slot is kept for the last line.
pub const WATCH_QUEUE_CHUNKS: usize = 8;
/// A watcher whose queue stays full this long is disconnected.
pub const WATCH_SLOW_AFTER: Duration = Duration::from_secs(10);
/// A heartbeat line is sent after this long without a change that matched.
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(15);
/// Watchers at once, per node.
pub const WATCHERS_MAX: usize = 64;
// A watcher's flush reserves two slots: one for the chunk, one kept for a last line.
const _: () = assert!(WATCH_QUEUE_CHUNKS >= 2);

// ---- Shutdown ------------------------------------------------------------------------------------

/// At a clean stop, requests in progress get this long before the API server is aborted.
pub const API_STOP_WAIT: Duration = Duration::from_secs(5);
/// ... and the QUIC endpoint this long to deliver its close to peers.
pub const ENDPOINT_IDLE_WAIT: Duration = Duration::from_secs(2);

// ---- Operator ----------------------------------------------------------------------------------

/// How many errors `outpost status` shows.
pub const LAST_ERRORS_MAX: usize = 16;
/// How long one send may block when the supervisor's queue is full.
pub const NOTIFY_SEND_TIMEOUT: Duration = Duration::from_millis(250);
/// A STATUS text is cut to this many bytes (systemd shows one line).
pub const NOTIFY_STATUS_BYTES_MAX: usize = 200;
/// How long the CLI waits for the TCP connection to a node.
pub const CLI_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the CLI waits for a whole answer (an event is answered after its commit).
pub const CLI_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The CLI shows an error answer's body up to this many bytes.
pub const CLI_ERROR_BODY_SHOWN_MAX: usize = 500;
/// `outpost backup`: a whole backup may take long; a stalled one still ends.
pub const CLI_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// `outpost bundle upload` reads and sends the file in chunks of this many bytes.
pub const CLI_UPLOAD_CHUNK_BYTES: usize = 256 * 1024;
/// How often `outpost deploy --wait` asks where the deployment stands.
pub const CLI_DEPLOY_POLL: Duration = Duration::from_millis(250);

// ---- Bundles -----------------------------------------------------------------------------------

/// Largest PAX extension header (`x` or `g`) read from a bundle.
pub const PAX_BYTES_MAX: u64 = 64 * 1024;
/// Unpacking a bundle copies file contents through a buffer of this many bytes.
pub const UNPACK_COPY_BUF_BYTES: usize = 64 * 1024;
/// Longest file name (one component) Linux file systems accept.
pub const BUNDLE_PATH_NAME_BYTES_MAX: usize = 255;
/// Bytes accepted after the archive's end marker (tar pads to records of 10 KiB) before the
/// stream is refused.
pub const BUNDLE_TRAILING_BYTES_MAX: u64 = 64 * 1024;
/// A larger manifest is refused before it is parsed.
pub const MANIFEST_BYTES_MAX: u64 = 64 * 1024;
/// `version`: at most this many bytes of `[A-Za-z0-9._+~-]`.
pub const MANIFEST_VERSION_BYTES_MAX: usize = 64;
/// `exec`: at most this many strings (the program and its arguments).
pub const EXEC_ARGS_MAX: usize = 256;
/// Any one `exec` string or `[env]` value.
pub const ARG_BYTES_MAX: usize = 4096;
/// `exec[0]`, a path inside the bundle.
pub const EXEC_PATH_BYTES_MAX: usize = 1024;
/// `[env]`: at most this many variables...
pub const ENV_VARS_MAX: usize = 128;
/// ... whose names are at most this long ...
pub const ENV_NAME_BYTES_MAX: usize = 128;
/// ... and whose names and values together are at most this many bytes.
pub const ENV_BYTES_MAX: usize = 64 * 1024;
/// `stop_timeout` when the manifest does not say.
pub const STOP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// The longest `stop_timeout`, `health.alive` or `health.timeout`.
pub const MANIFEST_DURATION_MAX: Duration = Duration::from_secs(600);
/// The health check when there is no `[health]`: alive for this long.
pub const HEALTH_ALIVE_DEFAULT: Duration = Duration::from_secs(5);
/// `health.timeout` when the manifest does not say.
pub const HEALTH_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// `health.tcp` and `health.http`.
pub const HEALTH_TARGET_BYTES_MAX: usize = 2048;
