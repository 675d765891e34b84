//! Phased rollouts with real processes on 127.0.0.1 (issue 13.3): a controller, a load balancer
//! and three dependents. A bundle whose health check fails, deployed in waves, halts at its
//! first wave with the reason and sends nothing more; a good one in waves of two, each wave
//! healthy for a second before the next, drains every dependent out of its load balancer's
//! pool before replacing it (checked in the controller's own journal, `GET /v1/watch`); and a
//! rollout paused, resumed and aborted with `outpost deploy pause|resume|abort`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost::testkit::{wait_for, Check, Fleet, FleetSpec, WorkerSpec};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_outpost"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles")
}

/// Packs a fixture bundle directory into `out`.
fn pack(name: &str, out: &Path) {
    let o = std::process::Command::new(bin())
        .args(["bundle", "pack"])
        .arg(fixtures().join(name))
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

/// The CLI against the controller.
fn cli(f: &Fleet, args: &[&str]) -> std::process::Output {
    let ctl = f.cluster.node(0);
    std::process::Command::new(bin())
        .args(args)
        .arg("--api")
        .arg(format!("http://{}", ctl.api_addr))
        .env("OUTPOST_TOKEN", &ctl.token)
        .output()
        .unwrap()
}

fn deploy(f: &Fleet, service: &str, bundle: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["deploy", "--service", service, "--bundle"];
    let b = bundle.to_str().unwrap();
    args.push(b);
    args.extend_from_slice(extra);
    cli(f, &args)
}

fn deployment_id(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("deployment ")
                .and_then(|r| r.strip_suffix(" created"))
        })
        .unwrap_or_else(|| panic!("no deployment id in {text}"))
        .to_owned()
}

async fn deployment(f: &Fleet, id: &str) -> Value {
    f.controller()
        .get_json(&format!("/v1/deployments/{id}"))
        .await
        .unwrap()
}

fn statuses(d: &Value) -> Vec<(String, String)> {
    d["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Every line of the controller's journal from the oldest, until (and with) the line of
/// deployment `id` whose rollout is `done`.
async fn journal_until_done(f: &Fleet, id: &str) -> Vec<Value> {
    let ctl = f.cluster.node(0);
    let mut resp = reqwest::Client::new()
        .get(format!(
            "http://{}/v1/watch?from=oldest&format=ndjson",
            ctl.api_addr
        ))
        .bearer_auth(&ctl.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    loop {
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let v: Value = serde_json::from_slice(&line).unwrap();
            let done = v["kind"] == "deployment"
                && v["name"] == id
                && v["deployment"]["rollout"]["state"] == "done";
            lines.push(v);
            if done {
                return lines;
            }
        }
        let chunk = tokio::time::timeout(WAIT, resp.chunk())
            .await
            .expect("a journal line within the deadline")
            .unwrap()
            .expect("the journal goes on");
        buf.extend_from_slice(&chunk);
    }
}

fn pool_of(line: &Value) -> Option<Vec<String>> {
    (line["kind"] == "machine" && line["name"] == "lb-1").then(|| {
        line["machine"]["pool"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| m["name"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Invariants (issue 13.3): a rollout halts at the wave that reaches its failure threshold and
/// sends nothing more; a wave starts only after the previous one ran healthy for the set time;
/// a dependent leaves its load balancer's pool before it is sent the order and comes back
/// after; an operator pauses, resumes and aborts a rollout, and an aborted one sends nothing
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_halt_gate_drain_and_obey_the_operator() {
    let spec = FleetSpec::new(
        "rollout",
        vec![
            WorkerSpec::load_balancer("lb-1"),
            WorkerSpec::dependent("media-a", "lb-1"),
            WorkerSpec::dependent("media-b", "lb-1"),
            WorkerSpec::dependent("media-c", "lb-1"),
        ],
    );
    let f = Fleet::start(bin(), spec).await.unwrap();
    let tmp = f.cluster.dir().to_owned();
    wait_for("all four admitted and up", WAIT, || async {
        match f.machines().await {
            Ok(m) if m.len() == 4 && m.iter().all(|m| m["status"] == "up") => Check::Done(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let (voice, broken, messaging) = (
        tmp.join("voice.bundle"),
        tmp.join("broken.bundle"),
        tmp.join("messaging.bundle"),
    );
    pack("voice", &voice);
    pack("broken", &broken);
    pack("messaging", &messaging);
    let out = deploy(&f, "voice", &voice, &["--wait", "--timeout", "90s"]);
    assert!(out.status.success(), "{out:?}");

    // 1. A broken bundle in waves: the first wave (one machine) rolls back, the rollout halts
    // with the reason, the others are never sent it and still run voice.
    let out = deploy(
        &f,
        "voice",
        &broken,
        &["--waves", "1,100%", "--wait", "--timeout", "90s"],
    );
    assert!(!out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("in 2 waves (1, 3 machines)"), "{said}");
    assert!(said.contains("rollout halted"), "{said}");
    let d = deployment(&f, &deployment_id(&out)).await;
    let r = &d["rollout"];
    assert_eq!(r["state"], "halted", "{d}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("wave 1 of 2") && reason.contains("lb-1: rolled_back"),
        "{reason}"
    );
    assert_eq!(r["waves"][0]["state"], "halted", "{d}");
    assert_eq!(r["waves"][1]["state"], "skipped", "{d}");
    assert_eq!(
        statuses(&d),
        [
            ("lb-1".into(), "rolled_back".into()),
            ("media-a".into(), "skipped".into()),
            ("media-b".into(), "skipped".into()),
            ("media-c".into(), "skipped".into()),
        ]
    );
    for name in ["media-a", "media-b", "media-c"] {
        let m = f.machine(name).await.unwrap().unwrap();
        assert_eq!(m["software"]["service"], "voice", "{m}");
    }

    // 2. Messaging in waves of two, each healthy for 1 s before the next, dependents drained
    // for 300 ms before they are replaced.
    let out = deploy(
        &f,
        "messaging",
        &messaging,
        &[
            "--max-parallel",
            "2",
            "--healthy-for",
            "1s",
            "--drain",
            "300ms",
            "--wait",
            "--timeout",
            "90s",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let id = deployment_id(&out);
    let d = deployment(&f, &id).await;
    let r = &d["rollout"];
    assert_eq!(r["state"], "done", "{d}");
    assert_eq!(r["waves"].as_array().unwrap().len(), 2, "{d}");
    let started: Vec<u64> = r["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["started_ms"].as_u64().unwrap())
        .collect();
    assert!(
        started[1] >= started[0] + 1000,
        "wave 2 started before wave 1 was healthy for 1 s: {started:?}"
    );
    assert!(statuses(&d).iter().all(|(_, s)| s == "running"), "{d}");
    // In the controller's journal: each dependent out of lb-1's pool after the deployment was
    // created and before it was sent the order, and back in by the end.
    let lines = journal_until_done(&f, &id).await;
    let created = lines
        .iter()
        .position(|l| l["kind"] == "deployment" && l["name"] == id.as_str())
        .unwrap();
    for dep in ["media-a", "media-b", "media-c"] {
        let ordered = lines
            .iter()
            .position(|l| {
                l["kind"] == "machine"
                    && l["name"] == dep
                    && l["machine"]["deployment"]["deployment_id"].as_u64()
                        == id.parse::<u64>().ok()
            })
            .unwrap_or_else(|| panic!("{dep} never got deployment {id}"));
        let drained = lines[created..ordered]
            .iter()
            .filter_map(pool_of)
            .any(|pool| !pool.iter().any(|n| n == dep));
        assert!(
            drained,
            "{dep} was sent the order without leaving lb-1's pool first"
        );
    }
    wait_for("every dependent back in lb-1's pool", WAIT, || {
        let names = f.pool_names("lb-1");
        async move {
            match names {
                Ok(Some(n)) if n == ["media-a", "media-b", "media-c"] => Check::Done(()),
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();

    // 3. By hand: a rollout one machine at a time that would hold each wave for an hour.
    let out = deploy(
        &f,
        "voice",
        &voice,
        &["--max-parallel", "1", "--healthy-for", "1h"],
    );
    assert!(out.status.success(), "{out:?}");
    let id = deployment_id(&out);
    wait_for("wave 1 running", WAIT, || async {
        let d = deployment(&f, &id).await;
        match d["machines"][0]["status"].as_str() {
            Some("running") => Check::Done(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    for (action, state) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("abort", "aborted"),
    ] {
        let out = cli(&f, &["deploy", action, &id]);
        assert!(out.status.success(), "{action}: {out:?}");
        let d = deployment(&f, &id).await;
        assert_eq!(d["rollout"]["state"], state, "{d}");
    }
    let d = deployment(&f, &id).await;
    assert_eq!(d["rollout"]["reason"], "aborted by an operator", "{d}");
    let s = statuses(&d);
    assert_eq!(s[0].1, "running", "{d}");
    assert!(s[1..].iter().all(|(_, st)| st == "skipped"), "{d}");
    // Over: it can be neither resumed nor aborted again, and says why.
    let out = cli(&f, &["deploy", "resume", &id]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("aborted"),
        "{out:?}"
    );
    let out = cli(&f, &["deploy", "status", &id]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("WAVE") && text.contains("skipped"), "{text}");
    f.finish().await.unwrap();
}
