//! The worker's local HTTP API: `GET /v1/status` behind the API token, `GET /metrics` without
//! it. Read-only: it shows what the driver last published and never touches the database.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::core::Standing;
use super::WorkerShared;
use crate::http::ApiError;

pub(crate) fn standing_str(s: Standing) -> &'static str {
    match s {
        Standing::Waiting => "waiting",
        Standing::Pending => "pending",
        Standing::Admitted => "admitted",
        Standing::Rejected => "rejected",
    }
}

pub(crate) fn router(shared: Arc<WorkerShared>) -> Router {
    let authed = Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/backup", get(get_backup))
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .merge(authed)
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(crate::http::healthz))
        .route("/readyz", get(get_readyz))
        .route_layer(middleware::from_fn(crate::http::serve::record_route))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint on a worker (it serves GET /v1/status, /v1/backup, /metrics, /healthz and /readyz)",
            )
        })
        .with_state(shared)
}

/// `GET /v1/backup`: the driver writes a consistent copy between two steps.
async fn get_backup(State(s): State<Arc<WorkerShared>>) -> Result<Response, ApiError> {
    match s.backup().await {
        Some(Ok(copy)) => Ok(crate::http::backup::stream_copy(copy, &s.name, ())),
        Some(Err(e)) => {
            s.note_error(format!("backup failed: {e}"));
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("backup failed: {e}"),
            ))
        }
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the worker is shutting down",
        )),
    }
}

async fn auth(State(s): State<Arc<WorkerShared>>, req: Request, next: Next) -> Response {
    if let Err(e) = crate::http::check_bearer(req.headers(), &s.token) {
        s.metrics.api_refused.fetch_add(1, Ordering::Relaxed);
        return e.into_response();
    }
    next.run(req).await
}

/// `GET /readyz`: the controller has admitted this machine and its driver answers. A worker
/// admitted earlier stays ready while its controller is out of reach (it keeps running its
/// software and pool); `controller_connected` says which.
async fn get_readyz(State(s): State<Arc<WorkerShared>>) -> Response {
    let standing = s.view().standing;
    let check = async {
        match standing {
            Standing::Admitted => {}
            Standing::Rejected => {
                return Err("the controller rejected this machine's key".to_owned());
            }
            Standing::Waiting | Standing::Pending => {
                return Err(format!(
                    "not admitted yet ({}): waiting for the controller to admit this machine",
                    standing_str(standing)
                ));
            }
        }
        s.ping_driver(crate::limits::READY_PING_TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    };
    let connected = s.controller_connected();
    crate::http::readiness(
        crate::wire::Role::Worker,
        check.await,
        json!({ "controller_connected": connected }),
    )
}

async fn get_status(State(s): State<Arc<WorkerShared>>) -> Json<Value> {
    Json(status(&s))
}

/// What `GET /v1/status` answers.
pub fn status(s: &WorkerShared) -> Value {
    let v = s.view();
    let machine = s.config.machine.as_ref();
    let controller = {
        let l = s.controller.lock().expect("controller lock");
        json!({
            "addr": s.controller_addr.to_string(),
            "fingerprint": s.controller_fingerprint.to_string(),
            "connected": l.connected,
            "rejected": l.rejected,
            "last_error": l.last_error,
        })
    };
    let rec = &v.record;
    let report = rec.report.as_ref().map(|r| {
        json!({
            "state": r.state,
            "software": r.software.as_ref().map(|sw| json!({
                "service": sw.service,
                "bundle_id": sw.bundle_id,
                "version": sw.version,
            })),
            "detail": r.detail,
            "seq": rec.report_seq,
            "acked": rec.report_acked,
        })
    });
    let route = rec.route.as_ref().map(|r| {
        let d = s.dependent.lock().expect("dependent lock");
        json!({
            "name": r.name,
            "node_id": r.node_id.to_string(),
            "addr": r.addr,
            "fingerprint": r.fingerprint.to_string(),
            "connected": d.connected,
            "last_error": d.last_error,
        })
    });
    let pool = rec.pool.as_ref().map(|p| {
        json!({
            "file": s.pool_path.display().to_string(),
            "members": super::pool_file::pool_json(&s.name, p, None)["members"],
            "dependents": p.dependents.iter().map(|d| json!({
                "name": d.name,
                "node_id": d.node_id.to_string(),
                "fingerprint": d.fingerprint.to_string(),
            })).collect::<Vec<_>>(),
        })
    });
    let c = &rec.config;
    let config = json!({
        "version": c.current.as_ref().map(|o| o.version),
        "pending": c.pending.as_ref().map(|o| o.version),
        "report": c.report.as_ref().map(|r| json!({
            "version": r.version,
            "state": r.state,
            "detail": r.detail,
            "seq": c.report_seq,
            "acked": c.report_acked,
        })),
    });
    let relay: Vec<Value> = s
        .relay
        .lock()
        .expect("relay lock")
        .connections()
        .into_iter()
        .map(|(name, id)| json!({ "name": name, "node_id": id.to_string() }))
        .collect();
    json!({
        "role": "worker",
        "ready": true,
        "name": s.name,
        "node_id": s.node_id.to_string(),
        "fingerprint": s.fingerprint.to_string(),
        "listen": s.quic_addr.to_string(),
        "api": s.config.api.to_string(),
        "service": machine.map(|m| m.service.clone()),
        "component": machine.map(|m| m.component.clone()),
        "load_balancer": machine.and_then(|m| m.load_balancer.clone()),
        "service_addr": machine.and_then(|m| m.service_addr.map(|a| a.to_string())),
        "relay_addr": s.relay_addr,
        "standing": standing_str(v.standing),
        "controller": controller,
        "applied": rec.applied,
        "heartbeat_ms": rec.heartbeat_ms,
        "report": report,
        "route": route,
        "pool": pool,
        // A call router: its load balancer; a load balancer: its call router (as the pool
        // file shows them).
        "coupled_load_balancer": rec.coupling.endpoint.as_ref().map(super::pool_file::endpoint_json),
        "call_router": rec.coupling.router.as_ref().map(|r| json!({
            "name": r.name,
            "node_id": r.node_id.to_string(),
            "fingerprint": r.fingerprint.to_string(),
        })),
        "config": config,
        "relay_connections": relay,
        "software": s.software.view().json(),
        "uptime_s": s.started.elapsed().as_secs(),
        "last_errors": s.last_errors(),
    })
}

async fn get_metrics(State(s): State<Arc<WorkerShared>>) -> Response {
    let v = s.view();
    let m = &s.metrics;
    let relay_conns = s.relay.lock().expect("relay lock").connections().len() as u64;
    let lb_connected = s.dependent.lock().expect("dependent lock").connected;
    let sw = s.software.view();
    let o = crate::http::metrics::Scrape::new("worker", &s.name, &s.config.data_dir, &m.http);
    let gauges = [
        (
            "outpost_worker_publications_applied",
            "Highest publication sequence of this machine's channel applied.",
            v.record.applied,
        ),
        (
            "outpost_worker_controller_connected",
            "1 while connected to the controller.",
            u64::from(s.controller_connected()),
        ),
        (
            "outpost_worker_admitted",
            "1 once the controller admitted this machine.",
            u64::from(v.standing == Standing::Admitted),
        ),
        (
            "outpost_worker_report_seq",
            "Sequence of this machine's latest report.",
            v.record.report_seq,
        ),
        (
            "outpost_worker_report_acked",
            "Highest report sequence the controller acknowledged.",
            v.record.report_acked,
        ),
        (
            "outpost_worker_config_version",
            "Configuration data version in effect (0: none).",
            v.record.config.current.as_ref().map_or(0, |o| o.version),
        ),
        (
            "outpost_worker_pool_members",
            "Load balancer: backends in its current pool.",
            v.record.pool.as_ref().map_or(0, |p| p.members.len() as u64),
        ),
        (
            "outpost_worker_relay_connections",
            "Load balancer: dependents connected to its relay.",
            relay_conns,
        ),
        (
            "outpost_worker_lb_connected",
            "Dependent: 1 while connected to its load balancer.",
            u64::from(lb_connected),
        ),
        (
            "outpost_worker_software_running",
            "1 while the installed software runs and passed its health check.",
            u64::from(sw.running.is_some()),
        ),
        (
            "outpost_worker_deployment_bytes_fetched",
            "Bytes of the sealed bundle of the deployment in progress fetched so far.",
            sw.deploying
                .as_ref()
                .map_or(0, |d| d.fetched.load(Ordering::Relaxed)),
        ),
        (
            // A gauge: no `_total` (promtool refuses the suffix on a non-counter).
            "outpost_worker_deployment_bundle_bytes",
            "Size of the sealed bundle of the deployment in progress.",
            sw.deploying.as_ref().map_or(0, |d| d.total),
        ),
    ];
    for (name, help, v) in gauges {
        o.gauge(name, help, v as f64);
    }
    let counters = [
        (
            "outpost_worker_relay_forwarded_total",
            "Publications relayed to a dependent.",
            &m.relay_forwarded,
        ),
        (
            "outpost_worker_relay_dropped_total",
            "Relayed publications dropped (dependent not connected or queue full).",
            &m.relay_dropped,
        ),
        (
            "outpost_worker_refused_total",
            "Connections and frames refused as hostile or unknown.",
            &m.refused,
        ),
        (
            "outpost_worker_pool_writes_total",
            "Pool files written.",
            &m.pool_writes,
        ),
        (
            "outpost_worker_bundle_bytes_fetched_total",
            "Bytes of sealed bundles fetched and written to disk.",
            &m.bundle_bytes_fetched,
        ),
        (
            "outpost_worker_deployments_running_total",
            "Deployments finished with the new software running.",
            &m.deployments_running,
        ),
        (
            "outpost_worker_deployments_rolled_back_total",
            "Deployments rolled back to the previous software (not healthy).",
            &m.deployments_rolled_back,
        ),
        (
            "outpost_worker_deployments_failed_total",
            "Deployments refused or failed.",
            &m.deployments_failed,
        ),
        (
            "outpost_worker_software_restarts_total",
            "Restarts of software that died after it was healthy.",
            &m.software_restarts,
        ),
        (
            "outpost_api_unauthorized_total",
            "API requests refused for a missing or wrong token.",
            &m.api_refused,
        ),
    ];
    for (name, help, c) in counters {
        o.count(name, help, c);
    }
    o.answer()
}
