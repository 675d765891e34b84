//! Every role's `/healthz`, `/readyz` (issue 10.4) and `/metrics` (issue 10.6) on real
//! processes: health and readiness answer without a token, readiness with status codes that
//! mean it (a worker the controller has not admitted is 503 with the reason); every role's
//! metrics pass `promtool check metrics` and carry the process, database and HTTP metrics; a
//! datacenter shows replication latency and its peers' last contact.

mod metrics_support;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_support::{assert_promtool_clean, sample};
use outpost::testkit::{
    sample_event, wait_for, Check, Cluster, ClusterSpec, Fleet, FleetSpec, WorkerSpec,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// What every role shows besides its own metrics.
const COMMON: [&str; 7] = [
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_start_time_seconds",
    "outpost_db_bytes",
    "outpost_http_connections_max",
    "outpost_build_info",
];

async fn try_get(base: &str, path: &str) -> Option<(u16, Value)> {
    let r = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    try_get(base, path)
        .await
        .unwrap_or_else(|| panic!("GET {base}{path}: no answer"))
}

fn check_common(role: &str, text: &str) {
    assert_promtool_clean(role, text);
    for name in COMMON {
        assert!(sample(text, name, &[]).is_some(), "{role}: no {name}");
    }
    assert!(
        sample(text, "outpost_db_bytes", &[]).unwrap() > 0.0,
        "{role}"
    );
    assert!(sample(text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(
        sample(
            text,
            "outpost_http_requests_total",
            &[("route", "/healthz"), ("status", "200")]
        )
        .is_some_and(|v| v >= 1.0),
        "{role}: /healthz counted by route template and status"
    );
    assert!(
        sample(
            text,
            "outpost_http_request_duration_seconds_count",
            &[("route", "/healthz")]
        )
        .is_some(),
        "{role}: latency histogram by route"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_answers_health_readiness_and_clean_metrics() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let fleet = Fleet::start(
        bin,
        FleetSpec::new(
            "health",
            vec![
                WorkerSpec::load_balancer("lb-1"),
                WorkerSpec::load_balancer("lb-2").without_token(),
            ],
        ),
    )
    .await
    .unwrap();
    let ctl = fleet.controller().base.clone();
    let admitted = fleet.worker("lb-1").base.clone();
    let pending = fleet.worker("lb-2").base.clone();
    // The processes start in the background: /healthz answers 200 once each serves HTTP.
    for base in [&ctl, &admitted, &pending] {
        wait_for("/healthz answers", WAIT, || {
            let b = base.clone();
            async move {
                match try_get(&b, "/healthz").await {
                    Some((200, v)) if v["alive"] == true => Check::Done(()),
                    other => Check::NotYet(format!("{other:?}")),
                }
            }
        })
        .await
        .unwrap();
    }
    let (status, v) = get(&ctl, "/readyz").await;
    assert_eq!(
        (status, &v["role"]),
        (200, &Value::from("controller")),
        "{v}"
    );
    wait_for("lb-1 is admitted and ready", WAIT, || {
        let b = admitted.clone();
        async move {
            match get(&b, "/readyz").await {
                (200, v) if v["ready"] == true => Check::Done(()),
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    // lb-2 has no token: pending until an operator accepts it.
    wait_for("lb-2 is pending at the controller", WAIT, || {
        let f = &fleet;
        async move {
            match f.key("lb-2").await {
                Ok(Some(k)) => Check::Done(k),
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    let (status, v) = get(&pending, "/readyz").await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not admitted"),
        "{v}"
    );
    println!("worker not admitted: /readyz 503 {v}");

    for (role, api) in [
        ("controller", fleet.controller()),
        ("worker", fleet.worker("lb-1")),
    ] {
        let text = api.metrics().await.unwrap();
        check_common(role, &text);
    }
    fleet.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datacenter_metrics_show_replication_latency_and_peer_contact() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let started_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let c = Cluster::start(bin, ClusterSpec::new("dc-metrics", &["dc-1", "dc-2"]))
        .await
        .unwrap();
    c.wait_all_ready().await.unwrap();
    const N: u64 = 60;
    let events: Vec<_> = (0..N)
        .map(|n| sample_event(&format!("a{}", n % 7), n))
        .collect();
    for chunk in events.chunks(20) {
        c.api(0).post_batch(chunk).await.unwrap();
    }
    c.wait_quiet().await.unwrap();
    for i in 0..2 {
        let _ = get(&c.api(i).base, "/healthz").await;
        assert_eq!(get(&c.api(i).base, "/readyz").await.0, 200);
    }
    let origin = c.api(0).metrics().await.unwrap();
    check_common("datacenter", &origin);
    assert_eq!(
        sample(
            &origin,
            "outpost_http_requests_total",
            &[("route", "/v1/events/batch"), ("status", "200")]
        ),
        Some(3.0),
        "three batches, counted by route template"
    );
    let peer = c.api(1).metrics().await.unwrap();
    assert_promtool_clean("datacenter (peer)", &peer);
    let applied = sample(&peer, "outpost_elements_applied_total", &[]).unwrap();
    assert_eq!(applied, N as f64);
    let sampled = sample(&peer, "outpost_replication_latency_seconds_count", &[]).unwrap();
    assert!(
        (1.0..=N as f64).contains(&sampled),
        "{sampled} replication latency samples for {N} elements"
    );
    let sum = sample(&peer, "outpost_replication_latency_seconds_sum", &[]).unwrap();
    let contact = sample(
        &peer,
        "outpost_peer_last_contact_timestamp_seconds",
        &[("peer", "dc-1")],
    )
    .expect("dc-2 has heard from dc-1");
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        contact >= started_s - 1.0 && contact <= now_s + 1.0,
        "last contact {contact} outside {started_s}..{now_s}"
    );
    println!(
        "dc-2: {sampled} replication latency samples, mean {:.4} s; last contact with dc-1 {:.1} s ago",
        sum / sampled,
        now_s - contact
    );
    c.finish().await.unwrap();
}
