//! The JSON the controller shows of machines, deployments and configuration changes: one
//! rendering for the API's answers and the watch journal.

use super::cmd::MachineView;
use super::configdata::ConfigChange;
use super::core::MachineRecord;
use super::deploy::status_of;
use super::deploy::DeploymentView;
use super::rollout;
use crate::ids::NodeId;
use serde_json::json;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// One admitted machine as the API shows it.
pub(crate) fn machine_json(m: &MachineView, now: u64) -> Value {
    let r = &m.record;
    let (state, detail, software) = match &r.report {
        Some(rep) => (
            json!(rep.state),
            json!(rep.detail),
            match &rep.software {
                Some(sw) => json!({
                    "service": sw.service,
                    "bundle_id": sw.bundle_id,
                    "version": sw.version,
                }),
                None => Value::Null,
            },
        ),
        None => (Value::Null, Value::Null, Value::Null),
    };
    let mut v = json!({
        "name": r.name,
        "node_id": r.node_id.to_string(),
        "status": if r.up { "up" } else { "down" },
        "connected": m.connected,
        "service": r.service,
        "component": r.component,
        "load_balancer": r.load_balancer,
        "service_addr": r.service_addr,
        "software": software,
        "state": state,
        "detail": detail,
        "last_seen_ms": r.last_seen_ms,
        "last_seen_s_ago": (r.last_seen_ms > 0).then(|| now.saturating_sub(r.last_seen_ms) / 1000),
        "fingerprint": r.fingerprint.to_string(),
        "channel": { "published": r.pub_seq, "acked": r.pub_acked },
        "config": machine_config_json(r),
        "deployment": r.deploys.last().map(|d| json!({
            "deployment_id": d.deployment,
            "status": status_of(&d.state),
            "reason": d.detail,
        })),
    });
    if r.is_load_balancer() {
        let members: Vec<Value> = r
            .pool
            .as_ref()
            .map(|p| {
                p.members
                    .iter()
                    .map(|m| {
                        json!({
                            "name": m.name,
                            "service_addr": m.service_addr,
                            "node_id": m.node_id.to_string(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        v["pool"] = Value::Array(members);
        v["relay_addr"] = json!(r.relay_addr);
        // What identifies it: the call router it serves and the dependents it manages
        // (up or not; the pool above lists those taking jobs).
        let router = r.balancing.router.clone().flatten();
        v["call_router"] = json!(router.as_ref().map(|p| &p.name));
        v["dependents"] = r
            .pool
            .as_ref()
            .map(|p| {
                p.dependents
                    .iter()
                    .filter(|d| router.as_ref().is_none_or(|x| x.node_id != d.node_id))
                    .map(|d| json!(d.name))
                    .collect()
            })
            .unwrap_or_default();
    }
    if r.is_call_router() {
        v["coupling"] = coupling_json(r);
    }
    v
}

pub(crate) fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(crate) fn deployment_json(v: &DeploymentView) -> Value {
    let r = &v.record;
    let machines: Vec<Value> = v
        .machines
        .iter()
        .map(|t| {
            let mut m = json!({
                "name": t.name,
                "node_id": t.node_id.to_string(),
                "status": t.status,
            });
            if let Some(reason) = &t.reason {
                m["reason"] = json!(reason);
            }
            m
        })
        .collect();
    let mut d = json!({
        "deployment_id": r.id,
        "service": r.service,
        "bundle_id": r.bundle_id,
        "version": r.version,
        "created_ms": r.created_ms,
        "machines": machines,
    });
    if !r.rollout.is_legacy() {
        d["rollout"] = rollout_json(v);
    }
    d
}

pub(crate) fn change_json(c: &ConfigChange) -> Value {
    json!({
        "scope": c.scope,
        "version": c.version,
        "doc": c.doc.as_deref().map(|t| serde_json::from_str::<Value>(t).unwrap_or(Value::Null)),
        "deleted": c.doc.is_none(),
        "at_ms": c.at_ms,
        "at": super::views::rfc3339_ms(c.at_ms),
        "note": c.note,
    })
}

/// A call router's coupling, as last published to it: `coupled` (its load balancer is up),
/// `down` (it is down), `uncoupled` (the load balancer it names is not admitted or serves
/// another router), `none` (it names none).
fn coupling_json(r: &MachineRecord) -> Value {
    let endpoint = r.balancing.endpoint.clone().flatten();
    let state = match (&r.load_balancer, &endpoint) {
        (None, _) => "none",
        (Some(_), Some(e)) if e.up => "coupled",
        (Some(_), Some(_)) => "down",
        (Some(_), None) => "uncoupled",
    };
    json!({
        "load_balancer": r.load_balancer,
        "state": state,
        "endpoint": endpoint.as_ref().map(crate::cluster::worker::pool_file::endpoint_json),
    })
}

/// A deployment's rollout: its state and each wave's, with the machines of each.
fn rollout_json(v: &DeploymentView) -> Value {
    let r = &v.record.rollout;
    let status: BTreeMap<NodeId, &'static str> =
        v.machines.iter().map(|t| (t.node_id, t.status)).collect();
    let names: BTreeMap<NodeId, &str> = v
        .record
        .targets
        .iter()
        .map(|(n, s)| (*n, s.as_str()))
        .collect();
    let waves: Vec<Value> = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let count = |s: &str| w.iter().filter(|n| status.get(n) == Some(&s)).count();
            let (running, failed) = (count("running"), count("rolled_back") + count("failed"));
            let state = match (i.cmp(&(r.wave as usize)), r.state) {
                (std::cmp::Ordering::Less, _) => "done",
                (std::cmp::Ordering::Greater, s) if s.is_final() => "skipped",
                (std::cmp::Ordering::Greater, _) => "waiting",
                (_, rollout::RolloutState::Done) => "done",
                (_, rollout::RolloutState::Halted) => "halted",
                (_, rollout::RolloutState::Aborted) => "aborted",
                (_, rollout::RolloutState::Paused) => "paused",
                (_, rollout::RolloutState::Running) if r.healthy_since_ms.is_some() => "healthy",
                (_, rollout::RolloutState::Running) => "deploying",
            };
            json!({
                "wave": i + 1,
                "state": state,
                "started_ms": r.wave_started_ms.get(i),
                "machines": w.iter().map(|n| names.get(n).copied().unwrap_or("?")).collect::<Vec<_>>(),
                "running": running,
                "failures": failed,
            })
        })
        .collect();
    json!({
        "state": r.state.as_str(),
        "reason": r.reason,
        "wave": r.wave + 1,
        "waves": waves,
        "healthy_for_ms": r.healthy_for_ms,
        "healthy_since_ms": r.healthy_since_ms,
        "failure_threshold": r.failure_threshold,
        "drain_ms": r.drain_ms,
    })
}

/// Where a machine's configuration stands, as `GET /v1/machines` shows it.
pub(crate) fn machine_config_json(r: &MachineRecord) -> Value {
    let c = &r.config;
    if c.state.is_empty() {
        return Value::Null;
    }
    json!({
        "version": c.version,
        "applied": (c.applied > 0).then_some(c.applied),
        "state": c.state,
        "detail": c.detail,
    })
}
