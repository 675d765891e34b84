//! Software delivery with real processes on 127.0.0.1 (issue 4): a controller, a load balancer
//! and two dependents behind it. A voice bundle deployed to all three with `outpost deploy
//! --wait`, replaced by messaging, then a bundle whose health check fails rolled back with the
//! reason reported; and a worker killed in the middle of a transfer finishing it after a restart.

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

fn fleet_spec(label: &str) -> FleetSpec {
    FleetSpec::new(
        label,
        vec![
            WorkerSpec::load_balancer("lb-1"),
            WorkerSpec::dependent("media-a", "lb-1"),
            WorkerSpec::dependent("media-b", "lb-1"),
        ],
    )
}

/// Packs `src` (a fixture bundle directory, optionally with a padding file) into `out`.
fn pack(src: &Path, out: &Path, padding: usize) -> String {
    let dir = out.with_extension("src");
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(src, &dir);
    if padding > 0 {
        let data: Vec<u8> = (0..padding).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(dir.join("padding.bin"), data).unwrap();
    }
    let o = std::process::Command::new(bin())
        .args(["bundle", "pack"])
        .arg(&dir)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("bundle-id: "))
        .unwrap()
        .trim()
        .to_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// `outpost deploy` against the controller.
fn deploy(f: &Fleet, service: &str, bundle: &Path, wait: bool) -> std::process::Output {
    let ctl = f.cluster.node(0);
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["deploy", "--service", service, "--bundle"])
        .arg(bundle)
        .arg("--api")
        .arg(format!("http://{}", ctl.api_addr))
        .env("OUTPOST_TOKEN", &ctl.token);
    if wait {
        cmd.args(["--wait", "--timeout", "90s"]);
    }
    cmd.output().unwrap()
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

async fn software_of(f: &Fleet, name: &str) -> Value {
    f.machine(name).await.unwrap().unwrap()["software"].clone()
}

/// The state file the sample software writes in its working directory (the bundle's dir).
fn sample_state(f: &Fleet, name: &str, bundle_id: &str) -> Option<String> {
    let p = f
        .info(name)
        .data_dir
        .join("software")
        .join(bundle_id)
        .join("sample.state");
    std::fs::read_to_string(p).ok()
}

fn pid_in(state: &str) -> u32 {
    state
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {state:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_replace_and_roll_back_on_three_workers() {
    let f = Fleet::start(bin(), fleet_spec("deploy")).await.unwrap();
    let tmp = f.cluster.dir().to_owned();
    let names = ["lb-1", "media-a", "media-b"];
    wait_for("all three admitted and up", WAIT, || async {
        match f.machines().await {
            Ok(m) if m.len() == 3 && m.iter().all(|m| m["status"] == "up") => Check::Done(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap();

    // 1. voice, everywhere (media-a and media-b receive it through lb-1).
    let voice = tmp.join("voice.bundle");
    let voice_id = pack(&fixtures().join("voice"), &voice, 0);
    let out = deploy(&f, "voice", &voice, true);
    assert!(out.status.success(), "{out:?}");
    for name in names {
        let sw = software_of(&f, name).await;
        assert_eq!(sw["service"], "voice", "{name}: {sw}");
        assert_eq!(sw["bundle_id"], voice_id.as_str(), "{name}: {sw}");
        let state = sample_state(&f, name, &voice_id).expect("voice wrote its state file");
        assert!(state.contains("service=voice"), "{state}");
    }
    let voice_pids: Vec<u32> = names
        .iter()
        .map(|n| pid_in(&sample_state(&f, n, &voice_id).unwrap()))
        .collect();

    // 2. messaging replaces it.
    let messaging = tmp.join("messaging.bundle");
    let messaging_id = pack(&fixtures().join("messaging"), &messaging, 0);
    let out = deploy(&f, "messaging", &messaging, true);
    assert!(out.status.success(), "{out:?}");
    for (k, name) in names.iter().enumerate() {
        let sw = software_of(&f, name).await;
        assert_eq!(sw["service"], "messaging", "{name}: {sw}");
        let state = sample_state(&f, name, &messaging_id).unwrap();
        assert!(state.contains("service=messaging"), "{state}");
        assert!(
            !Path::new(&format!("/proc/{}", voice_pids[k])).exists(),
            "{name}: the voice process {} is still there",
            voice_pids[k]
        );
    }

    // 3. A bundle whose health check fails: rolled back, with the reason, messaging still runs.
    let broken = tmp.join("broken.bundle");
    pack(&fixtures().join("broken"), &broken, 0);
    let out = deploy(&f, "voice", &broken, true);
    assert!(!out.status.success(), "{out:?}");
    let id = deployment_id(&out);
    let d: Value = f
        .controller()
        .get_json(&format!("/v1/deployments/{id}"))
        .await
        .unwrap();
    let machines = d["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 3, "{d}");
    for m in machines {
        assert_eq!(m["status"], "rolled_back", "{d}");
        let reason = m["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("exit"), "the reason says why: {d}");
    }
    for name in names {
        let sw = software_of(&f, name).await;
        assert_eq!(sw["service"], "messaging", "{name}: {sw}");
    }
    // The service must match the manifest's: refused before anything is sent.
    let out = deploy(&f, "video", &messaging, false);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("service"), "{err}");
    f.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_transfer_finishes_it_after_a_restart() {
    let mut f = Fleet::start(bin(), fleet_spec("resume")).await.unwrap();
    let tmp = f.cluster.dir().to_owned();
    let a = f.index("media-a");
    // media-a stops fetching after 1 MiB of a 6 MiB bundle, as if it died there.
    const STALL: u64 = 1 << 20;
    f.cluster.kill9(a).unwrap();
    f.cluster
        .set_env(a, "OUTPOST_TEST_STALL_FETCH_AT", Some(&STALL.to_string()));
    f.cluster.restart(a).unwrap();
    wait_for("all three admitted and up", WAIT, || async {
        match f.machines().await {
            Ok(m) if m.len() == 3 && m.iter().all(|m| m["status"] == "up") => Check::Done(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let bundle = tmp.join("big.bundle");
    let bundle_id = pack(&fixtures().join("voice"), &bundle, 6 << 20);
    let out = deploy(&f, "voice", &bundle, false);
    assert!(out.status.success(), "{out:?}");
    let id = deployment_id(&out);
    let log = f.info("media-a").log.clone();
    wait_for("media-a to stall mid-transfer", WAIT, || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(&format!("stalled at {STALL}")) {
                Check::Done(())
            } else {
                Check::NotYet(text.lines().last().unwrap_or_default().to_owned())
            }
        }
    })
    .await
    .unwrap();
    f.cluster.kill9(a).unwrap();
    f.cluster.set_env(a, "OUTPOST_TEST_STALL_FETCH_AT", None);
    f.cluster.restart(a).unwrap();
    let api = f.controller();
    let path = format!("/v1/deployments/{id}");
    wait_for("the deployment to run everywhere", WAIT, || {
        let api = api.clone();
        let path = path.clone();
        async move {
            match api.get_json::<Value>(&path).await {
                Ok(d)
                    if d["machines"].as_array().is_some_and(|m| {
                        m.len() == 3 && m.iter().all(|m| m["status"] == "running")
                    }) =>
                {
                    Check::Done(())
                }
                Ok(d)
                    if d["machines"].as_array().is_some_and(|m| {
                        m.iter()
                            .any(|m| m["status"] == "rolled_back" || m["status"] == "failed")
                    }) =>
                {
                    Check::Failed(d.to_string())
                }
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "resuming the fetch of deployment {id} at byte {STALL}"
        )),
        "media-a resumed where it stopped:\n{text}"
    );
    assert_eq!(
        software_of(&f, "media-a").await["bundle_id"],
        bundle_id.as_str()
    );
    f.finish().await.unwrap();
}
