//! The software lifecycle's decisions, each test named after what it defends. Deterministic:
//! time is a number passed in.

use super::*;

fn sw(bundle: &str) -> Software {
    Software {
        service: "voice".into(),
        bundle_id: bundle.into(),
        version: format!("{bundle}.0"),
    }
}

fn order(deployment: u64) -> DeployOrder {
    DeployOrder {
        deployment,
        bundle_id: format!("b{deployment}"),
        service: "voice".into(),
        version: format!("b{deployment}.0"),
        sealed_bytes: 10,
        sealed_hash: [0; 32],
    }
}

fn deployed(cmds: &[Command]) -> Vec<(u64, &str, Option<&str>)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Deployed(d, r) => Some((*d, r.state.as_str(), r.detail.as_deref())),
            _ => None,
        })
        .collect()
}

/// Runs an order through fetch, install and a healthy switch.
fn deploy_healthy(l: &mut Lifecycle, d: u64, now: u64) -> Vec<Command> {
    l.orders(vec![order(d)], now);
    l.fetched(d, Ok(()), now);
    l.installed(d, Ok(sw(&format!("b{d}"))), now);
    l.switched(d, Switched::Healthy, now);
    l.take()
}

#[test]
fn newest_order_wins_and_older_queued_ones_are_superseded() {
    let mut l = Lifecycle::new();
    l.orders(vec![order(3), order(4), order(5)], 0);
    let out = l.take();
    assert_eq!(
        deployed(&out),
        vec![
            (
                3,
                "failed",
                Some("superseded by deployment 5 before it was installed")
            ),
            (
                4,
                "failed",
                Some("superseded by deployment 5 before it was installed")
            ),
        ]
    );
    assert!(out.contains(&Command::Fetch(order(5))));
    assert_eq!(l.deploying(), Some(5));
    // An order not above the highest taken up is ignored.
    l.orders(vec![order(4)], 1);
    assert!(l.take().is_empty());
}

#[test]
fn a_newer_order_cancels_an_older_fetch_and_supersedes_it() {
    let mut l = Lifecycle::new();
    l.orders(vec![order(1)], 0);
    l.take();
    l.orders(vec![order(2)], 10);
    let out = l.take();
    assert_eq!(out[0], Command::CancelFetch(1));
    assert_eq!(deployed(&out)[0].0, 1);
    assert!(out.contains(&Command::Fetch(order(2))));
    // The cancelled fetch's late answer changes nothing.
    l.fetched(1, Ok(()), 20);
    assert!(l.take().is_empty());
}

#[test]
fn an_order_waits_for_an_install_in_progress() {
    let mut l = Lifecycle::new();
    l.orders(vec![order(1)], 0);
    l.fetched(1, Ok(()), 0);
    l.take();
    l.orders(vec![order(2)], 5);
    assert!(l.take().is_empty(), "an install is not interrupted");
    l.installed(1, Ok(sw("b1")), 6);
    l.switched(1, Switched::Healthy, 7);
    let out = l.take();
    assert_eq!(deployed(&out), vec![(1, "running", None)]);
    assert!(out.contains(&Command::Fetch(order(2))));
}

#[test]
fn unhealthy_software_rolls_back_to_the_previous_and_says_why() {
    let mut l = Lifecycle::new();
    l.booted(Boot::Healthy(sw("old")), &WorkerRecord::default(), 0);
    l.take();
    l.orders(vec![order(7)], 0);
    l.fetched(7, Ok(()), 0);
    l.installed(7, Ok(sw("b7")), 0);
    l.switched(7, Switched::Unhealthy("health check failed".into()), 0);
    assert!(l.take().contains(&Command::RollBack { deployment: 7 }));
    l.rolled_back(7, RolledBack::Healthy(sw("old")), 1);
    let out = l.take();
    assert_eq!(
        deployed(&out),
        vec![(7, "rolled_back", Some("health check failed"))]
    );
    assert_eq!(l.running(), Some(&sw("old")));
}

#[test]
fn without_previous_software_a_failed_switch_fails_with_its_reason() {
    let mut l = Lifecycle::new();
    l.orders(vec![order(1)], 0);
    l.fetched(1, Ok(()), 0);
    l.installed(1, Ok(sw("b1")), 0);
    l.switched(1, Switched::Unhealthy("exit 3".into()), 0);
    l.rolled_back(1, RolledBack::NoPrevious, 0);
    let out = l.take();
    assert_eq!(
        deployed(&out),
        vec![(
            1,
            "failed",
            Some("exit 3; no previous software to roll back to")
        )]
    );
    assert_eq!(l.running(), None);
}

#[test]
fn a_bundle_for_another_service_is_discarded_and_never_run() {
    let mut l = Lifecycle::new();
    l.orders(vec![order(1)], 0);
    l.fetched(1, Ok(()), 0);
    let mut other = sw("b1");
    other.service = "video".into();
    l.installed(1, Ok(other), 0);
    let out = l.take();
    assert!(out.contains(&Command::Discard("b1".into())));
    assert!(!out.iter().any(|c| matches!(c, Command::Switch { .. })));
    assert_eq!(deployed(&out)[0].1, "failed");
}

#[test]
fn restart_backoff_doubles_from_now_and_resets_after_a_stable_run() {
    let mut l = Lifecycle::new();
    l.booted(Boot::Healthy(sw("a")), &WorkerRecord::default(), 0);
    l.take();
    let min = ms(BACKOFF_MIN);
    l.exited("exit 1", 100);
    assert_eq!(l.poll_timeout(), Some(100 + min));
    l.timeout(100 + min - 1);
    assert!(l.take().iter().all(|c| !matches!(c, Command::Restart(_))));
    l.timeout(100 + min);
    assert!(l.take().contains(&Command::Restart(sw("a"))));
    // The restart fails: the next delay is doubled, counted from that now.
    l.restarted(Err("unhealthy".into()), 2000);
    assert_eq!(l.poll_timeout(), Some(2000 + 2 * min));
    l.timeout(2000 + 2 * min);
    l.restarted(Ok(()), 5000);
    assert!(l
        .take()
        .iter()
        .any(|c| matches!(c, Command::Report(r) if r.state == "running")));
    // A long, stable run resets the backoff.
    let later = 5000 + ms(BACKOFF_RESET_AFTER);
    l.exited("signal 9", later);
    assert_eq!(l.poll_timeout(), Some(later + min));
}

#[test]
fn boot_does_not_overwrite_an_unacknowledged_deployment_outcome() {
    let stored = report(
        ReportState::RolledBack,
        Some(sw("old")),
        Some("x".into()),
        Some(4),
    );
    let mut rec = WorkerRecord {
        report: Some(stored),
        report_seq: 5,
        report_acked: 4,
        last_deployment: 4,
        ..WorkerRecord::default()
    };
    let mut l = Lifecycle::new();
    l.booted(Boot::Healthy(sw("old")), &rec, 0);
    assert!(l.take().is_empty());
    assert_eq!(l.running(), Some(&sw("old")));
    // Acknowledged, a boot says `running` as always.
    rec.report_acked = 5;
    let mut l = Lifecycle::new();
    l.booted(Boot::Healthy(sw("old")), &rec, 0);
    assert_eq!(l.take().len(), 1);
    // A failed outcome (the software was down then): `running` once acknowledged.
    rec.report_acked = 4;
    rec.report = Some(report(
        ReportState::Failed,
        None,
        Some("no".into()),
        Some(4),
    ));
    rec.last_deployment = 4;
    let mut l = Lifecycle::new();
    l.booted(Boot::Healthy(sw("old")), &rec, 0);
    assert!(l.take().is_empty());
    rec.report_acked = 5;
    l.record(&rec);
    assert_eq!(
        l.take(),
        vec![Command::Report(report(
            ReportState::Running,
            Some(sw("old")),
            None,
            None
        ))]
    );
}

#[test]
fn a_failed_delivery_reports_running_again_once_acknowledged() {
    let mut l = Lifecycle::new();
    l.booted(Boot::Healthy(sw("old")), &WorkerRecord::default(), 0);
    l.take();
    l.orders(vec![order(2)], 0);
    l.fetched(2, Err("hash mismatch".into()), 0);
    let out = l.take();
    assert_eq!(deployed(&out), vec![(2, "failed", Some("hash mismatch"))]);
    let mut rec = WorkerRecord {
        report: Some(report(ReportState::Failed, Some(sw("old")), None, Some(2))),
        report_seq: 3,
        report_acked: 2,
        last_deployment: 2,
        ..WorkerRecord::default()
    };
    l.record(&rec);
    assert!(l.take().is_empty(), "not before the ack");
    rec.report_acked = 3;
    l.record(&rec);
    assert_eq!(
        l.take(),
        vec![Command::Report(report(
            ReportState::Running,
            Some(sw("old")),
            None,
            None
        ))]
    );
}

#[test]
fn report_details_are_clipped_to_what_the_controller_accepts() {
    let long = "é".repeat(REPORT_DETAIL_MAX);
    let c = clip(long);
    assert!(c.len() <= REPORT_DETAIL_MAX);
    assert!(c.ends_with("..."));
    let _ = deploy_healthy(&mut Lifecycle::new(), 1, 0);
}

#[test]
fn a_resumed_deployment_whose_software_already_runs_is_reported_running_without_a_fetch() {
    let mut l = Lifecycle::new();
    // Crashed after the switch to b3, before the outcome was committed: b3 boots.
    l.booted(Boot::Healthy(sw("b3")), &WorkerRecord::default(), 0);
    l.take();
    l.orders(vec![order(3)], 1);
    let out = l.take();
    assert_eq!(deployed(&out), vec![(3, "running", None)]);
    assert!(!out.iter().any(|c| matches!(c, Command::Fetch(_))));
    assert_eq!(l.deploying(), None);
}

fn reports(cmds: &[Command]) -> Vec<(&str, Option<u64>)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Report(r) => Some((r.state.as_str(), r.deployment)),
            _ => None,
        })
        .collect()
}

/// The record once the outcome of `d` is committed as report `seq`, acknowledged up to
/// `acked`.
fn outcome_record(d: u64, state: &str, seq: u64, acked: u64) -> WorkerRecord {
    WorkerRecord {
        report: Some(report(
            state.parse().unwrap(),
            Some(sw(&format!("b{d}"))),
            None,
            Some(d),
        )),
        report_seq: seq,
        report_acked: acked,
        last_deployment: d,
        ..WorkerRecord::default()
    }
}

/// Seed 3238338651 of the cluster simulation: the new software died in the very step its
/// `running` outcome was reported; the death's `failed` replaced the outcome before the
/// controller heard it, so deployment 1 stayed `installed` there for ever and its rollout
/// never ended. A worker's deployment outcome is never lost: what the machine says after it
/// waits until the controller acknowledged it.
#[test]
fn a_deployment_outcome_is_never_lost_to_a_report_after_it() {
    let mut l = Lifecycle::new();
    let out = deploy_healthy(&mut l, 1, 0);
    assert_eq!(deployed(&out), vec![(1, "running", None)]);
    l.exited("signal 9", 5);
    assert!(reports(&l.take()).is_empty(), "the death waits for the ack");
    // A record from before the outcome was committed (its `installed`, acknowledged) is no
    // acknowledgement of the outcome.
    let mut before = outcome_record(1, "installed", 2, 2);
    before.last_deployment = 0;
    l.record(&before);
    assert!(reports(&l.take()).is_empty());
    // Committed, not acknowledged: still waiting.
    l.record(&outcome_record(1, "running", 3, 2));
    assert!(reports(&l.take()).is_empty());
    // Its restart replaces the death (reports are the latest state): only `running` waits.
    l.timeout(5 + ms(BACKOFF_MIN));
    assert!(l.take().contains(&Command::Restart(sw("b1"))));
    l.restarted(Ok(()), 2000);
    assert!(reports(&l.take()).is_empty());
    l.record(&outcome_record(1, "running", 3, 3));
    assert_eq!(reports(&l.take()), vec![("running", None)]);
    // From then on, reports go at once.
    l.exited("signal 9", 3000);
    assert_eq!(reports(&l.take()), vec![("failed", None)]);
}

/// A worker's deployment outcome is never lost: software that does not come back healthy at
/// boot says so only after the controller acknowledged the outcome committed before the
/// crash.
#[test]
fn an_unhealthy_boot_does_not_overwrite_an_unacknowledged_deployment_outcome() {
    let rec = outcome_record(4, "rolled_back", 5, 4);
    let mut l = Lifecycle::new();
    l.booted(Boot::Unhealthy(sw("b4"), "no answer".into()), &rec, 0);
    assert!(reports(&l.take()).is_empty());
    l.record(&outcome_record(4, "rolled_back", 5, 5));
    assert_eq!(reports(&l.take()), vec![("failed", None)]);
}

/// Every target ends running the newest deployment or failed with a reason: a newer order's
/// reports are about that deployment and go at once (the older outcome is superseded at the
/// controller), and a report held behind the older outcome is dropped as stale.
#[test]
fn a_newer_deployment_reports_at_once_after_an_unacknowledged_outcome() {
    let mut l = Lifecycle::new();
    deploy_healthy(&mut l, 1, 0);
    l.exited("signal 9", 5);
    l.take();
    l.orders(vec![order(2)], 10);
    let out = l.take();
    assert_eq!(reports(&out), vec![("delivering", Some(2))]);
    l.record(&outcome_record(1, "running", 3, 3));
    assert!(reports(&l.take()).is_empty(), "the stale death is not sent");
}
