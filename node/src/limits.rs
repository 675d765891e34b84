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

// ---- Replication links -------------------------------------------------------------------------

pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between dial attempts: doubles from MIN after each failed attempt, up to MAX; back to
/// MIN after a session. Kept short so that a peer restarting is found within about a second.
pub const PEER_DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const PEER_DIAL_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long one dial attempt may take. A handshake whose Initial packet went to a peer that was
/// down is retransmitted only after QUIC's growing probe timeouts (1 s, 2 s, 4 s, ...), so an
/// attempt is abandoned early and a fresh one made; the bound doubles after each failure (a
/// lossy or distant link gets its time) up to MAX, and is back to MIN after a session.
pub const PEER_DIAL_TIMEOUT_MIN: Duration = Duration::from_secs(1);
pub const PEER_DIAL_TIMEOUT_MAX: Duration = Duration::from_secs(8);
const _: () = assert!(PEER_DIAL_BACKOFF_MIN.as_millis() <= PEER_DIAL_BACKOFF_MAX.as_millis());
const _: () = assert!(PEER_DIAL_TIMEOUT_MIN.as_millis() <= PEER_DIAL_TIMEOUT_MAX.as_millis());
/// Chunks of a snapshot in flight between the reading thread and the stream.
pub const SNAPSHOT_CHUNKS_AHEAD: usize = 4;
/// Outgoing control frames (acks) waiting for the sender, per connection.
pub const PEER_CONTROL_QUEUE_MAX: usize = 256;
/// Most records in one catch-up batch.
pub const CATCH_UP_BATCH_MAX: u32 = 1024;
/// Bound on the sequences remembered above an origin's contiguous mark. Above it the highest are
/// forgotten: the mark then under-reports, which costs a retransmission, never correctness.
pub const MARK_ABOVE_MAX: usize = 4096;
/// Frames read from a peer and not yet applied by the writer, per connection.
pub const PEER_PENDING_FRAMES_MAX: usize = 64;
/// Bytes of those frames, per connection, as decoded (records and their parsed elements:
/// [`frame_weight`]): the bound on what a fast peer (a snapshot, a catch-up) can make this
/// node hold before its writer has applied it. 8 MiB: a few frames of the largest size.
pub const PEER_PENDING_BYTES_MAX: usize = 8 << 20;
/// The unit of the pending byte budget.
pub const PEER_PENDING_PERMIT_BYTES: usize = 1024;
/// What one record costs in an outgoing frame beyond its account and element bytes (its
/// sequence numbers, version, id and postcard framing), for the frame byte budget.
pub const RECORD_OVERHEAD_BYTES: usize = 96;
/// Most state rows read at once for a snapshot chunk.
pub const SNAPSHOT_ROWS_MAX: usize = 4096;
/// At a peer's Hello, how many of the sequences it lacks (by its marks) are looked up in our
/// log per origin, lowest first, to find one we hold only in our state table (so a snapshot is
/// its only way to get it). Bounds the work of one Hello; sequences the log lost by trimming or
/// never held (snapshots) are the oldest, so they come first.
pub const HELLO_LACKS_CHECK_MAX: usize = 1024;
const _: () = assert!(PEER_PENDING_BYTES_MAX / PEER_PENDING_PERMIT_BYTES <= u32::MAX as usize);

// ---- Cluster worker ----------------------------------------------------------------------------

/// Publications waiting for one dependent's connection; beyond it they are dropped (the
/// controller resends them directly).
pub const RELAY_QUEUE_MAX: usize = 64;
/// A link to the load balancer that lasted this long counts as having worked.
pub const RELAY_LINK_STABLE: Duration = Duration::from_secs(5);
/// Inputs fed to the core before one commit.
pub const WORKER_DRIVER_BATCH_MAX: usize = 64;
pub const WORKER_COMMIT_RETRY_MIN: Duration = Duration::from_millis(100);
pub const WORKER_COMMIT_RETRY_MAX: Duration = Duration::from_secs(5);
/// A pool file that could not be written is tried again this often.
pub const POOL_FILE_RETRY: Duration = Duration::from_secs(5);
/// A controller that refuses this machine is asked again this rarely.
pub const JOIN_REJECTED_RETRY: Duration = Duration::from_secs(30);
/// A controller that refused this Join for now (name taken, too many waiting) is asked again
/// after this long.
pub const JOIN_REFUSED_RETRY: Duration = Duration::from_secs(10);
/// Opening the stream after the handshake.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting for the connection's writer.
pub const WORKER_CONTROL_QUEUE_MAX: usize = 1024;
/// Heartbeat interval when the controller's admission did not say.
pub const HEARTBEAT_DEFAULT: Duration = Duration::from_secs(5);
/// How often a worker not yet admitted looks whether it is.
pub const STANDING_POLL: Duration = Duration::from_secs(1);
/// Inputs queued for the driver (frames from the controller and the load balancer, reports).
pub const WORKER_INPUTS_MAX: usize = 256;
/// How long shutdown waits for the software to stop before leaving it to its supervisor's
/// drop (SIGKILL).
pub const SOFTWARE_STOP_WAIT: Duration = Duration::from_secs(30);
/// How often the running software is looked at.
pub const SOFTWARE_WATCH_EVERY: Duration = Duration::from_millis(200);
/// Orders waiting for the task; beyond it the oldest is dropped (a newer one supersedes it).
pub const SOFTWARE_ORDERS_MAX: usize = 16;
/// Orders remembered for their outcome's view (the newest).
pub const SOFTWARE_ORDERS_KEPT: usize = 16;
/// A `config.reload` command running longer than this is killed (the change is rolled back).
pub const SOFTWARE_RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// One buffer handed to the writer thread.
pub const FETCH_WRITE_BUF_BYTES: usize = 1 << 20;
/// Buffers queued for the writer thread: at most this many MiB of a transfer in memory.
pub const FETCH_WRITE_QUEUE_MAX: usize = 4;
/// The file is fsynced after this many new bytes, and at the end of every attempt.
pub const FETCH_SYNC_EVERY_BYTES: u64 = 16 << 20;
/// The answer (header or Goodbye) to a request.
pub const FETCH_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A transfer stream that delivers nothing for this long is given up and asked again.
pub const FETCH_READ_IDLE: Duration = Duration::from_secs(60);
/// A partly filled buffer goes to the writer when the stream pauses this long, so that what
/// arrived is on disk (and shown) even if the stream then stalls.
pub const FETCH_FLUSH_IDLE: Duration = Duration::from_millis(50);
/// Consecutive refusals (a Goodbye other than "busy", a header that does not match the order)
/// before the deployment fails; a broken connection is retried without limit.
pub const FETCH_REFUSALS_MAX: u32 = 5;
/// Transfers one dependent may have going through this load balancer at once.
pub const TRANSFERS_PER_DEPENDENT_MAX: usize = 4;
/// The request must arrive this soon after the stream opens.
pub const TRANSFER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest chunk taken from the controller's stream at a time.
pub const TRANSFER_CHUNK_BYTES_MAX: usize = 256 * 1024;

// ---- Cluster controller ------------------------------------------------------------------------

/// Most waves a rollout may have.
pub const ROLLOUT_WAVES_MAX: usize = 64;
/// Default `healthy_for` of a phased rollout: how long a wave must be running and healthy
/// before the next starts.
pub const ROLLOUT_HEALTHY_FOR_DEFAULT_MS: u64 = 10_000;
/// Bounds of the times a request may give.
pub const ROLLOUT_HOLD_MAX_MS: u64 = 24 * 3600 * 1000;
/// How often sealed files are checked for deletion.
pub const BUNDLE_SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Commands waiting for the core thread. Readers wait when it is full (backpressure onto
/// QUIC's flow control); the tick is skipped instead.
pub const CONTROLLER_CMD_QUEUE_MAX: usize = 4096;
/// Most commands stepped before one commit: bounds the time a command waits behind others
/// and the size of one transaction.
pub const CONTROLLER_COMMIT_BATCH_MAX: usize = 1024;
/// After a failed commit the database is reopened; while that fails, at most this often.
pub const CONTROLLER_REOPEN_EVERY: Duration = Duration::from_secs(1);
/// A close reason longer than this is cut (it travels in one QUIC frame).
pub const REFUSAL_REASON_BYTES_MAX: usize = 256;
/// How many of the newest deployments are looked at for unfinished targets after a restart.
pub const DEPLOY_RESUME_MAX: usize = 64;
/// How many deployments a machine record remembers.
pub const DEPLOYS_KEPT: usize = 16;
/// Bounds on what a worker may claim about itself.
pub const REPORT_TEXT_MAX: usize = 256;
/// The longest report detail the controller accepts (bytes); workers clip theirs to it.
pub const REPORT_DETAIL_MAX: usize = 2048;
/// The largest upload accepted (the bundle file, tar headers included).
pub const UPLOAD_BYTES_MAX: u64 = 1 << 30;
/// Uploads at once; more answer 503.
pub const UPLOADS_MAX: usize = 4;
/// Chunks of an upload queued between the HTTP body and the thread writing them to disk.
pub const UPLOAD_QUEUE_CHUNKS: usize = 8;
/// Buffer sizes for writing and reading bundle files.
pub const UPLOAD_IO_BUF_BYTES: usize = 256 * 1024;
/// Connections open at once, past their Join. A constant rather than a config field: each
/// costs a few tasks and two small queues, and the target is 1,000 workers per controller with
/// room to spare.
pub const CONTROLLER_CONNECTIONS_MAX: usize = 4096;
/// Connections still in their handshake or before their Join, at once: a flood of strangers
/// costs at most this many handshakes in flight. At the bound the oldest is cut.
pub const JOINING_MAX: usize = 1024;
/// From the first packet to the end of the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// From the end of the handshake to the Join frame: a worker sends it at once, one round trip.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages queued for one connection before it counts as not keeping up and is closed.
pub const CONNECTION_OUTBOUND_MAX: usize = 256;
/// How long a closing connection may take to deliver what was queued before it.
pub const CONNECTION_CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// The writer coalesces queued frames into writes of about this size.
pub const CONNECTION_WRITE_CHUNK_BYTES: usize = 64 * 1024;
/// How often refused connections are summed up in the log: in each interval the first of each
/// kind is logged in full, the rest only counted, and one line at the end of the interval says
/// how many of each were not logged. A flood then costs a few lines per interval, not one per
/// connection.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Kinds of refusal counted apart in one interval; more are counted as "other".
pub const REFUSAL_KINDS_MAX: usize = 16;
/// How often the core is ticked (silent machines marked down, publications resent).
pub const CONTROLLER_TICK_EVERY: Duration = Duration::from_millis(100);
/// A document larger than this is refused (413), as JSON or as TOML.
pub const CONFIG_DOC_BYTES_MAX: usize = 64 * 1024;
/// Objects and arrays nest at most this deep in a document.
pub const CONFIG_DOC_DEPTH_MAX: usize = 32;
/// Changes kept per scope (`outpost config history`, `rollback`); older ones are deleted.
pub const CONFIG_HISTORY_KEPT: usize = 32;
/// Changes kept for watchers that reconnect.
pub const JOURNAL_MAX: usize = 4096;
/// And at most this many bytes of them (their JSON): a deployment's view grows with its
/// targets, and a rollout to a thousand machines changes it on many ticks.
pub const JOURNAL_BYTES_MAX: usize = 32 << 20;
/// How long a request waits for the core thread (behind a slow commit) before a 503; also how
/// long a deployment's background task (seal worker, sweeper) waits for it.
pub const CORE_WAIT: Duration = Duration::from_secs(30);
/// How many deployments `GET /v1/deployments` lists by default, and at most.
pub const DEPLOYMENTS_LISTED_DEFAULT: usize = 20;
pub const DEPLOYMENTS_LISTED_MAX: usize = 200;
const _: () = assert!(DEPLOYMENTS_LISTED_DEFAULT <= DEPLOYMENTS_LISTED_MAX);
/// Transfers served at once on one connection.
pub const TRANSFERS_PER_CONN: usize = 4;
/// A `BundleRequest` is a few dozen bytes.
pub const TRANSFER_REQUEST_FRAME_MAX: usize = 4096;
/// Read from disk and written to the stream in chunks of this size.
pub const TRANSFER_CHUNK_BYTES: usize = 256 * 1024;
/// Chunks read ahead of the stream.
pub const TRANSFER_READ_AHEAD_CHUNKS: usize = 4;

// ---- Software ----------------------------------------------------------------------------------

/// First delay before restarting software that died.
pub const SOFTWARE_RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The delay doubles with each restart, up to this.
pub const SOFTWARE_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Software that ran at least this long before it died is restarted after `BACKOFF_MIN` again.
pub const SOFTWARE_RESTART_BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// How often a blocking wait looks at the child.
pub const SUPERVISOR_POLL: Duration = Duration::from_millis(50);
/// How often `wait_exit` looks.
pub const SUPERVISOR_WATCH_POLL: Duration = Duration::from_millis(200);
/// How long to wait for a group to vanish after SIGKILL (it is immediate unless a process is
/// stuck in the kernel).
pub const SOFTWARE_KILL_WAIT: Duration = Duration::from_secs(5);
/// Pause between attempts of a `tcp` or `http` check.
pub const HEALTH_RETRY_EVERY: Duration = Duration::from_millis(100);
/// One attempt never takes longer than this, so the process is looked at in between.
pub const HEALTH_ATTEMPT_MAX: Duration = Duration::from_secs(2);
/// The HTTP status line is looked for in at most this many bytes.
pub const HEALTH_STATUS_LINE_BYTES_MAX: usize = 1024;
/// The log tail quoted in a failure: at most this many bytes...
pub const HEALTH_LOG_TAIL_BYTES: u64 = 4096;
/// ... and lines.
pub const HEALTH_LOG_TAIL_LINES: usize = 10;

// ---- Relations across sections -----------------------------------------------------------------

// A load balancer relays a bundle in the chunks the controller sends.
const _: () = assert!(TRANSFER_CHUNK_BYTES <= TRANSFER_CHUNK_BYTES_MAX);
const _: () =
    assert!(SOFTWARE_RESTART_BACKOFF_MIN.as_millis() <= SOFTWARE_RESTART_BACKOFF_MAX.as_millis());
const _: () = assert!(WORKER_COMMIT_RETRY_MIN.as_millis() <= WORKER_COMMIT_RETRY_MAX.as_millis());
