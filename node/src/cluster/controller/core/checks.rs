//! The controller core's checks of what a machine claims (its Join, reports) and the small
//! helpers the rest of the core shares.

use super::*;

/// In its load balancer's pool: admitted, up, not drained by a rollout, and its software not
/// failed or stopped.
pub(super) fn is_member(m: &MachineRecord) -> bool {
    m.key_status == KeyStatus::Admitted
        && m.up
        && m.balancing.draining.is_none()
        && !m
            .report
            .as_ref()
            .is_some_and(|r| r.is(ReportState::Failed) || r.is(ReportState::Stopped))
}

pub(super) fn check_join(j: &Join) -> Result<(), String> {
    if j.protocol != CLUSTER_PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (this controller speaks {CLUSTER_PROTOCOL_VERSION})",
            j.protocol
        ));
    }
    config::check_name(&j.name).map_err(|e| format!("name: {e}"))?;
    if !config::SERVICES.contains(&j.service.as_str()) {
        return Err(format!("service: unknown {:?}", short(&j.service)));
    }
    if !config::COMPONENTS.contains(&j.component.as_str()) {
        return Err(format!("component: unknown {:?}", short(&j.component)));
    }
    if let Some(lb) = &j.load_balancer {
        config::check_name(lb).map_err(|e| format!("load_balancer: {e}"))?;
        if j.component == LOAD_BALANCER || lb == &j.name {
            return Err("load_balancer: a load balancer has none in front of it".into());
        }
    }
    for (field, v) in [
        ("service_addr", &j.service_addr),
        ("relay_addr", &j.relay_addr),
    ] {
        if let Some(a) = v {
            a.parse::<std::net::SocketAddr>()
                .map_err(|_| format!("{field}: {:?} is not host:port", short(a)))?;
        }
    }
    if j.seal_key.len() > REPORT_TEXT_MAX {
        return Err("seal_key: too long".into());
    }
    keys::parse_recipient(&j.seal_key).map_err(|e| format!("seal_key: {e}"))?;
    Ok(())
}

/// The report's state, parsed at the wire boundary, if the report is acceptable.
pub(super) fn check_report(r: &MachineReport) -> Result<ReportState, String> {
    if r.state.is_empty() || r.state.len() > REPORT_TEXT_MAX {
        return Err("state: empty or too long".into());
    }
    let state = r.parsed_state().map_err(|e| format!("state: {e}"))?;
    if r.detail
        .as_ref()
        .is_some_and(|d| d.len() > REPORT_DETAIL_MAX)
    {
        return Err(format!("detail: more than {REPORT_DETAIL_MAX} bytes"));
    }
    if let Some(sw) = &r.software {
        if [&sw.service, &sw.bundle_id, &sw.version]
            .iter()
            .any(|v| v.len() > REPORT_TEXT_MAX)
        {
            return Err("software: a field is too long".into());
        }
    }
    Ok(state)
}

pub(super) fn check_config_report(r: &ConfigReport) -> Result<(), String> {
    if !matches!(r.state.as_str(), "applied" | "rolled_back" | "failed") {
        return Err(format!("state: unknown {:?}", short(&r.state)));
    }
    if r.detail
        .as_ref()
        .is_some_and(|d| d.len() > REPORT_DETAIL_MAX)
    {
        return Err(format!("detail: more than {REPORT_DETAIL_MAX} bytes"));
    }
    Ok(())
}

pub(super) fn short(s: &str) -> String {
    s.chars().take(64).collect()
}
