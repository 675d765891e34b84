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

/// What is wrong with what a machine claims (a Join, a report): the connection is closed
/// with it, after "bad Join: " or "bad report: ".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum BadField {
    #[error("protocol version {0} (this controller speaks {CLUSTER_PROTOCOL_VERSION})")]
    Protocol(u16),
    /// A field's value, and why.
    #[error("{field}: {why}")]
    Field { field: &'static str, why: String },
}

fn bad(field: &'static str, why: impl std::fmt::Display) -> BadField {
    BadField::Field {
        field,
        why: why.to_string(),
    }
}

pub(super) fn check_join(j: &Join) -> Result<(), BadField> {
    if j.protocol != CLUSTER_PROTOCOL_VERSION {
        return Err(BadField::Protocol(j.protocol));
    }
    config::check_name(&j.name).map_err(|e| bad("name", e))?;
    if !config::SERVICES.contains(&j.service.as_str()) {
        return Err(bad("service", format!("unknown {:?}", short(&j.service))));
    }
    if !config::COMPONENTS.contains(&j.component.as_str()) {
        return Err(bad(
            "component",
            format!("unknown {:?}", short(&j.component)),
        ));
    }
    if let Some(lb) = &j.load_balancer {
        config::check_name(lb).map_err(|e| bad("load_balancer", e))?;
        if j.component == LOAD_BALANCER || lb == &j.name {
            return Err(bad(
                "load_balancer",
                "a load balancer has none in front of it",
            ));
        }
    }
    for (field, v) in [
        ("service_addr", &j.service_addr),
        ("relay_addr", &j.relay_addr),
    ] {
        if let Some(a) = v {
            a.parse::<std::net::SocketAddr>()
                .map_err(|_| bad(field, format!("{:?} is not host:port", short(a))))?;
        }
    }
    if j.seal_key.len() > REPORT_TEXT_MAX {
        return Err(bad("seal_key", "too long"));
    }
    keys::parse_recipient(&j.seal_key).map_err(|e| bad("seal_key", e))?;
    Ok(())
}

/// The report's state, parsed at the wire boundary, if the report is acceptable.
pub(super) fn check_report(r: &MachineReport) -> Result<ReportState, BadField> {
    if r.state.is_empty() || r.state.len() > REPORT_TEXT_MAX {
        return Err(bad("state", "empty or too long"));
    }
    let state = r.parsed_state().map_err(|e| bad("state", e))?;
    if r.detail
        .as_ref()
        .is_some_and(|d| d.len() > REPORT_DETAIL_MAX)
    {
        return Err(bad(
            "detail",
            format!("more than {REPORT_DETAIL_MAX} bytes"),
        ));
    }
    if let Some(sw) = &r.software {
        if [&sw.service, &sw.bundle_id, &sw.version]
            .iter()
            .any(|v| v.len() > REPORT_TEXT_MAX)
        {
            return Err(bad("software", "a field is too long"));
        }
    }
    Ok(state)
}

pub(super) fn check_config_report(r: &ConfigReport) -> Result<(), BadField> {
    if !matches!(r.state.as_str(), "applied" | "rolled_back" | "failed") {
        return Err(bad("state", format!("unknown {:?}", short(&r.state))));
    }
    if r.detail
        .as_ref()
        .is_some_and(|d| d.len() > REPORT_DETAIL_MAX)
    {
        return Err(bad(
            "detail",
            format!("more than {REPORT_DETAIL_MAX} bytes"),
        ));
    }
    Ok(())
}

pub(super) fn short(s: &str) -> String {
    s.chars().take(64).collect()
}
