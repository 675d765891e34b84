//! `outpost deploy --wait --json` against a real controller and one worker: stdout holds one
//! JSON object alone (the uploaded bundle, the deployment created, and where it ended), none of
//! the progress text of the human form.

use std::path::Path;
use std::time::Duration;

use outpost::testkit::{wait_for, Check, Fleet, FleetSpec, WorkerSpec};

const WAIT: Duration = Duration::from_secs(90);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_outpost"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_json_is_one_object_alone_on_stdout() {
    let f = Fleet::start(
        bin(),
        FleetSpec::new("cli-deploy-json", vec![WorkerSpec::load_balancer("lb-1")]),
    )
    .await
    .unwrap();
    wait_for("the worker admitted and up", WAIT, || async {
        match f.machines().await {
            Ok(m) if m.len() == 1 && m[0]["status"] == "up" => Check::Done(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let bundle = f.cluster.dir().join("voice.bundle");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles/voice");
    let o = std::process::Command::new(bin())
        .args(["bundle", "pack"])
        .arg(&src)
        .arg("-o")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");

    let ctl = f.cluster.node(0);
    let out = tokio::task::spawn_blocking({
        let (bundle, api, token) = (bundle.clone(), ctl.api_addr, ctl.token.clone());
        move || {
            std::process::Command::new(bin())
                .args([
                    "deploy",
                    "--service",
                    "voice",
                    "--json",
                    "--wait",
                    "--timeout",
                    "90s",
                ])
                .arg("--bundle")
                .arg(&bundle)
                .arg("--api")
                .arg(format!("http://{api}"))
                .env("OUTPOST_TOKEN", token)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {stdout}"));
    assert_eq!(v["bundle"]["service"], "voice", "{v}");
    assert_eq!(
        v["bundle"]["bundle_id"].as_str().map(str::len),
        Some(64),
        "{v}"
    );
    assert!(
        v["deployment"]["deployment_id"].is_number()
            || v["deployment"]["deployment_id"].is_string(),
        "{v}"
    );
    let machines = v["result"]["machines"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(machines.len(), 1, "{v}");
    assert_eq!(machines[0]["status"], "running", "{v}");
    // Stops the worker cleanly, so that it stops its software (dropping the fleet would kill
    // the worker and leave the software running).
    f.finish().await.unwrap();
}
