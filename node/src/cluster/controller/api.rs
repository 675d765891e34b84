//! The controller's HTTP API: status, machines, keys (accept, reject), bundles, deployments
//! and `/metrics`. Same rules as the datacenter's (`crate::http`): every request but `/metrics`
//! needs the bearer token, every refusal is a JSON `{"error"}` naming the field. It reads
//! machine and deployment state only through the core thread (never the database behind its
//! back), and an accept, a reject or a new deployment is answered after its commit.
//!
//! ```text
//! POST /v1/bundles            bundle bytes -> 201 {"bundle_id","service","version","bytes"}
//! POST /v1/deployments        {"service","bundle_id","machines"?} -> 201 {"deployment_id"}
//! GET  /v1/deployments/{id}   {"deployment_id","service","bundle_id","version","created_ms",
//!                              "machines":[{"name","node_id","status","reason"?}]}
//! GET  /v1/deployments        [the same, newest first] (?limit=N, default 20, at most 200)
//! ```
//!
//! Configuration data (`/v1/config/...`) is in `config_api`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::bundles::{self, UploadError};
use super::cmd::DeployCmd;
use super::cmd::{Cmd, KeyCmdError, KeyView, MachineView};
use super::core::{KeyActionError, KeyStatus};
use super::deploy::{ask_core, DeployError, NewDeployment};
use super::rollout::{self, Control, RolloutSpec};
use super::shared::ControllerShared;
use super::views::*;
use crate::bundle::is_bundle_id;
use crate::clock::now_ms;
use crate::config::SERVICES;
use crate::http::ApiError;
use crate::limits::{
    CONTROLLER_CONNECTIONS_MAX, ROLLOUT_HOLD_MAX_MS, ROLLOUT_WAVES_MAX, UPLOADS_MAX,
};
use crate::limits::{CORE_WAIT, DEPLOYMENTS_LISTED_DEFAULT, DEPLOYMENTS_LISTED_MAX};

type ApiResult<T> = Result<T, ApiError>;
type S = State<Arc<ControllerShared>>;

/// Paths only a datacenter serves.
const DATACENTER_ONLY: &[&str] = &[
    "/v1/events",
    "/v1/events/batch",
    "/v1/state/{account}",
    "/v1/state/{account}/{etype}",
    "/v1/digest",
    "/v1/messages/{id}",
];

pub(crate) fn router(shared: Arc<ControllerShared>) -> Router {
    let body_max = shared.config.limits.api_body_bytes_max;
    let mut authed = Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/machines", get(get_machines))
        .route(
            "/v1/machines/{name}",
            get(get_machine).delete(delete_machine),
        )
        .route(
            "/v1/machines/{name}/config",
            get(super::config_api::get_machine_config),
        )
        .route(
            "/v1/config/{*path}",
            get(super::config_api::get_config)
                .put(super::config_api::put_config)
                .delete(super::config_api::delete_config)
                .post(super::config_api::post_config),
        )
        .route("/v1/keys", get(get_keys))
        .route("/v1/keys/{id}/accept", post(post_accept))
        .route("/v1/keys/{id}/reject", post(post_reject))
        // Streamed to disk with a limit of its own, not the router's.
        .route(
            "/v1/bundles",
            post(post_bundle).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/deployments",
            post(post_deployment).get(get_deployments),
        )
        .route("/v1/deployments/{id}", get(get_deployment))
        .route(
            "/v1/deployments/{id}/{action}",
            post(post_deployment_control),
        )
        .route("/v1/backup", get(get_backup))
        .route("/v1/watch", get(super::watch::get_watch));
    for path in DATACENTER_ONLY {
        authed = authed.route(path, any(datacenter_only));
    }
    let authed = authed.route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .merge(authed)
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(crate::http::healthz))
        .route("/readyz", get(get_readyz))
        .route_layer(middleware::from_fn(crate::http::serve::record_route))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(shared)
}

/// `GET /readyz`: the controller has started, its database is available (not failed after a
/// write) and its core thread answers.
async fn get_readyz(State(s): S) -> Response {
    let check = async {
        if !s.ready.load(Ordering::Relaxed) {
            return Err("starting".to_owned());
        }
        if !s.summary().available {
            return Err("the database is unavailable after a failed write".to_owned());
        }
        super::shared::ping(&s, crate::limits::READY_PING_TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    };
    crate::http::readiness(s.meta.role, check.await, json!({}))
}

async fn auth(State(s): S, req: Request, next: Next) -> Response {
    if let Err(e) = crate::http::check_bearer(req.headers(), &s.token) {
        s.metrics.api_unauthorized.fetch_add(1, Ordering::Relaxed);
        return e.into_response();
    }
    next.run(req).await
}

async fn datacenter_only(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "{}: this node is a controller; events and state are served by datacenters",
            uri.path()
        ),
    )
}

/// Sends a command to the core thread and waits for its answer.
async fn ask<T>(
    s: &ControllerShared,
    make: impl FnOnce(oneshot::Sender<Result<T, KeyCmdError>>) -> Cmd,
) -> ApiResult<T> {
    let gone = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "controller is shutting down",
        )
    };
    let (tx, rx) = oneshot::channel();
    let asked = async {
        s.cmd.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    };
    let answer = tokio::time::timeout(CORE_WAIT, asked).await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the controller's core did not answer within {CORE_WAIT:?}; retry"),
        )
    })??;
    answer.map_err(|e| match e {
        KeyCmdError::Key(k @ KeyActionError::NotFound(_)) => {
            ApiError::new(StatusCode::NOT_FOUND, k.to_string())
        }
        KeyCmdError::Key(k @ (KeyActionError::Ambiguous(_) | KeyActionError::Removed(_))) => {
            ApiError::new(StatusCode::CONFLICT, k.to_string())
        }
        KeyCmdError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
    })
}

/// `GET /v1/backup`: the core thread writes the copy after its current batch; it is streamed
/// from here.
async fn get_backup(State(s): S) -> ApiResult<Response> {
    let copy = ask(&s, |reply| Cmd::Backup { reply }).await?;
    Ok(crate::http::backup::stream_copy(copy, &s.meta.name, ()))
}

async fn machines(s: &ControllerShared, name: Option<String>) -> ApiResult<Vec<MachineView>> {
    ask(s, |reply| Cmd::Machines { name, reply }).await
}

async fn get_status(State(s): S) -> Json<Value> {
    let sum = s.summary();
    Json(json!({
        "role": s.meta.role,
        "name": s.meta.name,
        "node_id": s.meta.node_id.to_string(),
        "fingerprint": s.fingerprint.to_string(),
        "listen": s.config.listen.to_string(),
        "api": s.config.api.to_string(),
        "ready": s.ready.load(Ordering::Relaxed),
        "database_available": sum.available,
        "machines": {
            "up": sum.up,
            "down": sum.down,
            "pending": sum.pending,
            "rejected": sum.rejected,
            "removed": sum.removed,
        },
        "connections": sum.connections,
        "publications_unacked": sum.unacked,
        "admission": if s.config.admission.is_some() { "join token or operator" } else { "operator" },
        "last_errors": s.last_errors(),
    }))
}

async fn get_machines(State(s): S) -> ApiResult<Json<Value>> {
    let now = now_ms();
    let mut list: Vec<MachineView> = machines(&s, None)
        .await?
        .into_iter()
        .filter(|m| m.record.key_status == KeyStatus::Admitted)
        .collect();
    list.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    Ok(Json(Value::Array(
        list.iter().map(|m| machine_json(m, now)).collect(),
    )))
}

async fn get_machine(State(s): S, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let found = machines(&s, Some(name.clone())).await?.into_iter().next();
    match found {
        Some(m) if m.record.key_status == KeyStatus::Admitted => {
            Ok(Json(machine_json(&m, now_ms())))
        }
        Some(m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "machine {name:?} is not admitted (its key is {}; see /v1/keys)",
                m.record.key_status.as_str()
            ),
        )),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no machine named {name:?}"),
        )),
    }
}

pub(crate) fn key_json(k: &KeyView) -> Value {
    json!({
        "id": k.node_id.to_string(),
        "name": k.name,
        "fingerprint": k.fingerprint.to_string(),
        "status": k.status.as_str(),
        "first_seen_ms": k.first_seen_ms,
        "first_seen": rfc3339_ms(k.first_seen_ms),
    })
}

/// Pending keys first (what needs an operator), then admitted, then rejected; by name within.
fn key_order(s: KeyStatus) -> u8 {
    match s {
        KeyStatus::Pending => 0,
        KeyStatus::Admitted => 1,
        KeyStatus::Rejected => 2,
        KeyStatus::Removed => 3,
    }
}

async fn get_keys(State(s): S) -> ApiResult<Json<Value>> {
    let mut keys: Vec<KeyView> = machines(&s, None)
        .await?
        .iter()
        .map(|m| KeyView {
            node_id: m.record.node_id,
            name: m.record.name.clone(),
            fingerprint: m.record.fingerprint,
            status: m.record.key_status,
            first_seen_ms: m.record.first_seen_ms,
        })
        .collect();
    keys.sort_by(|a, b| {
        (key_order(a.status), &a.name, a.node_id).cmp(&(key_order(b.status), &b.name, b.node_id))
    });
    Ok(Json(Value::Array(keys.iter().map(key_json).collect())))
}

async fn post_accept(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let k = ask(&s, |reply| Cmd::Accept { key: id, reply }).await?;
    tracing::info!(name = %k.name, node_id = %k.node_id, "key accepted by an operator");
    Ok(Json(key_json(&k)))
}

/// `DELETE /v1/machines/{name}`: the machine leaves the cluster for good (its key refused from
/// then on, its channel and records dropped, its load balancer's pool updated).
async fn delete_machine(State(s): S, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let k = ask(&s, |reply| Cmd::Remove { key: name, reply }).await?;
    tracing::info!(name = %k.name, node_id = %k.node_id, "machine removed by an operator");
    Ok(Json(key_json(&k)))
}

async fn post_reject(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let k = ask(&s, |reply| Cmd::Reject { key: id, reply }).await?;
    tracing::info!(name = %k.name, node_id = %k.node_id, "key rejected by an operator");
    Ok(Json(key_json(&k)))
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

fn core_error(e: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{e}; retry"))
}

fn deploy_error(e: DeployError) -> ApiError {
    match e {
        DeployError::Invalid(m) => bad(m),
        DeployError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
        DeployError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
        DeployError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
    }
}

async fn post_bundle(
    State(s): S,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let max = s.upload_bytes_max.load(Ordering::Relaxed);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body: the bundle is larger than {max} bytes, the most this controller accepts"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let Ok(_permit) = s.uploads.try_acquire() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{UPLOADS_MAX} uploads are already in progress; retry when one is done"),
        ));
    };
    let up = bundles::receive(&s.bundles, body, max)
        .await
        .map_err(|e| match e {
            UploadError::TooLarge { .. } => too_large(),
            UploadError::NotABundle(why) => bad(format!("body: not a bundle: {why}")),
            UploadError::Interrupted(why) => {
                bad(format!("body: the upload was interrupted: {why}"))
            }
            e if e.is_full() => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the controller's disk is full ({e}); nothing was stored"),
            ),
            e => {
                s.note_error(format!("storing an uploaded bundle: {e}"));
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot store the bundle: {e}"),
                )
            }
        })?;
    s.metrics.bundles_uploaded.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        bundle_id = %up.bundle_id,
        service = %up.manifest.service,
        version = %up.manifest.version,
        bytes = up.bytes,
        "bundle uploaded"
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "bundle_id": up.bundle_id,
            "service": up.manifest.service,
            "version": up.manifest.version,
            "bytes": up.bytes,
        })),
    ))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeploymentRequest {
    pub(crate) service: String,
    pub(crate) bundle_id: String,
    pub(crate) machines: Option<Vec<String>>,
    /// Cumulative wave sizes: machine counts or percentages (`[1, "25%", "100%"]`).
    pub(crate) waves: Option<Vec<Value>>,
    /// Waves of this many machines.
    pub(crate) max_parallel: Option<u64>,
    /// How long a wave must run healthy before the next (`"30s"`).
    pub(crate) healthy_for: Option<String>,
    /// Rolled back or failed targets in one wave that halt the rollout (0: never).
    pub(crate) failure_threshold: Option<u32>,
    /// How long a dependent stays out of its load balancer's pool before it is replaced.
    pub(crate) drain: Option<String>,
}

impl DeploymentRequest {
    /// The rollout asked for, or the 400 naming the field.
    pub(crate) fn rollout(&self) -> ApiResult<RolloutSpec> {
        let duration = |field: &str, v: &Option<String>| -> ApiResult<Option<u64>> {
            let Some(text) = v else { return Ok(None) };
            let d = humantime::parse_duration(text).map_err(|e| {
                bad(format!(
                    "{field}: {:?} is not a duration like \"30s\" or \"2m\": {e}",
                    text.chars().take(32).collect::<String>()
                ))
            })?;
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if ms > ROLLOUT_HOLD_MAX_MS {
                return Err(bad(format!("{field}: at most 24h")));
            }
            Ok(Some(ms))
        };
        if self.waves.is_some() && self.max_parallel.is_some() {
            return Err(bad(
                "waves, max_parallel: give one or the other (waves of max_parallel machines, or the sizes of each)",
            ));
        }
        let mut waves = Vec::new();
        if let Some(list) = &self.waves {
            if list.is_empty() || list.len() > ROLLOUT_WAVES_MAX {
                return Err(bad(format!(
                    "waves: from 1 to {} sizes, such as [1, \"25%\", \"100%\"]",
                    ROLLOUT_WAVES_MAX
                )));
            }
            for (i, v) in list.iter().enumerate() {
                waves.push(
                    rollout::WaveSize::parse(v).map_err(|e| bad(format!("waves[{i}]: {e}")))?,
                );
            }
        }
        let max_parallel = match self.max_parallel {
            Some(0) => return Err(bad("max_parallel: 1 or more")),
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        Ok(RolloutSpec {
            waves,
            max_parallel,
            healthy_for_ms: duration("healthy_for", &self.healthy_for)?,
            failure_threshold: self.failure_threshold,
            drain_ms: duration("drain", &self.drain)?,
        })
    }
}

/// The body of `POST /v1/deployments`, checked as far as it can be without the stored
/// bundles, or the 400 naming the field. Also the body of the fuzz target
/// `controller_deployment` (`crate::fuzzing`).
pub(crate) fn parse_deployment_request(body: &[u8]) -> ApiResult<DeploymentRequest> {
    let req: DeploymentRequest =
        serde_json::from_slice(body).map_err(|e| bad(format!("body: {e}")))?;
    if !SERVICES.contains(&req.service.as_str()) {
        return Err(bad(format!(
            "service: unknown {:?} (one of {})",
            req.service.chars().take(64).collect::<String>(),
            SERVICES.join(", ")
        )));
    }
    if !is_bundle_id(&req.bundle_id) {
        return Err(bad(
            "bundle_id: not a bundle id (64 lowercase hex characters, as POST /v1/bundles answers)",
        ));
    }
    req.rollout()?;
    Ok(req)
}

async fn post_deployment(State(s): S, body: Bytes) -> ApiResult<(StatusCode, Json<Value>)> {
    let req = parse_deployment_request(&body)?;
    let path = s.bundles.bundle_path(&req.bundle_id);
    let manifest = tokio::task::spawn_blocking(move || {
        if !path.exists() {
            return Ok(None);
        }
        bundles::read_manifest(&path).map(Some)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let manifest = match manifest {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "bundle_id: no bundle {} was uploaded (POST /v1/bundles first)",
                    req.bundle_id
                ),
            ))
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("bundle_id: the stored bundle is unreadable: {e}"),
            ))
        }
    };
    if manifest.service != req.service {
        return Err(bad(format!(
            "service: the bundle {} is a {} bundle, not {}",
            req.bundle_id, manifest.service, req.service
        )));
    }
    let new = NewDeployment {
        rollout: req.rollout()?,
        bundle_path: s.bundles.bundle_path(&req.bundle_id),
        service: req.service,
        bundle_id: req.bundle_id,
        version: manifest.version,
        machines: req.machines,
    };
    let id = ask_core(&s, |reply| DeployCmd::Create { req: new, reply })
        .await
        .map_err(core_error)?
        .map_err(deploy_error)?;
    s.metrics
        .deployments_created
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(deployment = id, "deployment created");
    Ok((StatusCode::CREATED, Json(json!({ "deployment_id": id }))))
}

async fn get_deployments(State(s): S, RawQuery(q): RawQuery) -> ApiResult<Json<Value>> {
    let mut limit = DEPLOYMENTS_LISTED_DEFAULT;
    for (k, v) in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        if k == "limit" {
            limit = v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=DEPLOYMENTS_LISTED_MAX).contains(n))
                .ok_or_else(|| {
                    bad(format!(
                        "limit: a number from 1 to {DEPLOYMENTS_LISTED_MAX}"
                    ))
                })?;
        }
    }
    let list = ask_core(&s, |reply| DeployCmd::List { limit, reply })
        .await
        .map_err(core_error)?
        .map_err(deploy_error)?;
    Ok(Json(Value::Array(
        list.iter().map(deployment_json).collect(),
    )))
}

async fn get_deployment(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    deployment_answer(&s, deployment_id(&id)?).await
}

/// `{id}` of the deployment endpoints, or the 400.
fn deployment_id(id: &str) -> ApiResult<u64> {
    id.parse().map_err(|_| {
        bad(format!(
            "id: {:?} is not a deployment id (a number)",
            id.chars().take(32).collect::<String>()
        ))
    })
}

/// Deployment `id` as `GET /v1/deployments/{id}` answers it.
async fn deployment_answer(s: &ControllerShared, id: u64) -> ApiResult<Json<Value>> {
    let found = ask_core(s, |reply| DeployCmd::Get { id, reply })
        .await
        .map_err(core_error)?
        .map_err(deploy_error)?;
    match found {
        Some(v) => Ok(Json(deployment_json(&v))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("id: no deployment {id}"),
        )),
    }
}

/// `POST /v1/deployments/{id}/pause|resume|abort`.
async fn post_deployment_control(
    State(s): S,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let id = deployment_id(&id)?;
    let control = Control::parse(&action).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{:?} is not something a rollout does: pause, resume or abort",
                action.chars().take(32).collect::<String>()
            ),
        )
    })?;
    ask_core(&s, |reply| DeployCmd::Control { id, control, reply })
        .await
        .map_err(core_error)?
        .map_err(deploy_error)?;
    deployment_answer(&s, id).await
}

async fn get_metrics(State(s): S) -> Response {
    let sum = s.summary();
    let m = &s.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let o =
        crate::http::metrics::Scrape::new("controller", &s.meta.name, &s.config.data_dir, &m.http);
    o.labelled(
        "outpost_machines",
        "Machine keys by status (up and down: admitted).",
        &["status"],
        [
            ("up", sum.up),
            ("down", sum.down),
            ("pending", sum.pending),
            ("rejected", sum.rejected),
            ("removed", sum.removed),
        ]
        .map(|(status, n)| (vec![status], n as f64)),
    );
    o.gauge(
        "outpost_publications_unacked",
        "Publications stored and not yet acknowledged, all machines.",
        (sum.unacked as u64) as f64,
    );
    o.counter(
        "outpost_controller_commits_total",
        "Transactions committed by the controller's core.",
        load(&m.commits),
    );
    o.counter(
        "outpost_controller_commit_failures_total",
        "Commits that failed (every connection was closed and the state reloaded).",
        load(&m.commit_failures),
    );
    o.gauge(
        "outpost_controller_connections",
        "Worker connections past their Join.",
        (sum.connections as u64) as f64,
    );
    o.gauge(
        "outpost_controller_connections_max",
        "Most connections open at once.",
        (CONTROLLER_CONNECTIONS_MAX as u64) as f64,
    );
    o.counter(
        "outpost_controller_connections_refused_total",
        "Connections refused at the connection limits.",
        load(&m.connections_refused),
    );
    o.counter(
        "outpost_frames_refused_total",
        "Connections closed for a bad or forbidden frame, or a protocol version mismatch.",
        load(&m.refusals),
    );
    o.counter(
        "outpost_controller_slow_closed_total",
        "Connections closed because their send queue was full.",
        load(&m.slow_closed),
    );
    o.counter(
        "outpost_controller_relays_dropped_total",
        "Relayed copies not queued because the load balancer's send queue was three quarters full (each is then sent directly).",
        load(&m.relays_dropped),
    );
    o.counter(
        "outpost_api_unauthorized_total",
        "API requests refused for a missing or wrong token.",
        load(&m.api_unauthorized),
    );
    o.counter(
        "outpost_bundles_uploaded_total",
        "Bundles uploaded (new or already stored).",
        load(&m.bundles_uploaded),
    );
    o.counter(
        "outpost_watchers_slow_closed_total",
        "GET /v1/watch clients disconnected because they did not read for 10 s.",
        load(&m.watchers_slow_closed),
    );
    o.gauge(
        "outpost_watchers",
        "GET /v1/watch streams open.",
        crate::http::watch::watchers() as f64,
    );
    o.counter(
        "outpost_bundles_deleted_total",
        "Uploaded bundles deleted because no deployment needed them (cluster.bundle_keep_unused).",
        load(&m.bundles_deleted),
    );
    o.counter(
        "outpost_deployments_created_total",
        "Deployments created.",
        load(&m.deployments_created),
    );
    o.counter(
        "outpost_bundle_sealed_bytes_total",
        "Bytes of bundles sealed to machines.",
        load(&m.bundle_bytes_sealed),
    );
    o.counter(
        "outpost_bundle_seal_failures_total",
        "Bundles that could not be sealed to a machine.",
        load(&m.seal_failures),
    );
    o.counter(
        "outpost_bundle_served_bytes_total",
        "Sealed bundle bytes sent to workers.",
        load(&m.bundle_bytes_served),
    );
    o.counter(
        "outpost_bundle_transfers_total",
        "Bundle transfers started (a resumed transfer counts again).",
        load(&m.transfers),
    );
    o.gauge(
        "outpost_bundle_transfers_in_flight",
        "Bundle transfers sending now.",
        (load(&m.transfers_in_flight)) as f64,
    );
    o.counter(
        "outpost_bundle_transfers_refused_total",
        "Bundle requests refused (not authorized, unknown, bad offset).",
        load(&m.transfers_refused),
    );
    o.gauge(
        "outpost_ready",
        "1 once the controller serves.",
        (u64::from(s.ready.load(Ordering::Relaxed))) as f64,
    );
    o.gauge(
        "outpost_storage_readable",
        "0 while the database is unavailable after a failed write.",
        (u64::from(sum.available)) as f64,
    );
    o.answer()
}
