//! Configuration data with real processes on 127.0.0.1 (issue 13.1): a controller and three
//! workers running the sample voice software. `outpost config set` for the service reaches all
//! three (written to each worker's file, the software told, reported applied); an override for
//! one machine that makes its software fail is rolled back there alone, with the reason, while
//! the others keep what they have; `history`, `get` and `effective` show it.

use std::path::Path;
use std::time::Duration;

use outpost::testkit::{wait_for, Check, Fleet, FleetSpec, WorkerSpec};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_outpost"))
}

/// Runs the CLI against the controller (off the runtime: it blocks).
async fn cli(f: &Fleet, args: &[&str]) -> std::process::Output {
    let ctl = f.cluster.node(0);
    let (api, token) = (format!("http://{}", ctl.api_addr), ctl.token.clone());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin())
            .args(&args)
            .arg("--api")
            .arg(api)
            .env("OUTPOST_TOKEN", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits until machine `name`'s configuration is in `state` at `version`.
async fn wait_config(f: &Fleet, name: &str, version: u64, state: &str) -> Value {
    wait_for(
        &format!("{name}'s configuration {version} to be {state}"),
        WAIT,
        || async {
            match f.machine(name).await {
                Ok(Some(m))
                    if m["config"]["version"] == version && m["config"]["state"] == state =>
                {
                    Check::Done(m)
                }
                other => Check::NotYet(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap()
}

fn config_file(f: &Fleet, name: &str) -> Value {
    let path = f.info(name).data_dir.join("config.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_is_applied_on_three_workers_and_a_bad_one_rolled_back_on_one() {
    let names = ["lb-1", "mp-1", "mp-2"];
    let f = Fleet::start(
        bin(),
        FleetSpec::new(
            "config",
            vec![
                WorkerSpec::load_balancer("lb-1"),
                WorkerSpec::dependent("mp-1", "lb-1"),
                WorkerSpec::dependent("mp-2", "lb-1"),
            ],
        ),
    )
    .await
    .unwrap();
    wait_for("the three workers admitted and up", WAIT, || async {
        match f.machines().await {
            Ok(m) if m.len() == 3 && m.iter().all(|m| m["status"] == "up") => Check::Done(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let dir = f.cluster.dir().to_owned();
    let bundle = dir.join("voice.bundle");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles/voice");
    let o = std::process::Command::new(bin())
        .args(["bundle", "pack"])
        .arg(&src)
        .arg("-o")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let out = cli(
        &f,
        &[
            "deploy",
            "--service",
            "voice",
            "--wait",
            "--timeout",
            "90s",
            "--bundle",
            bundle.to_str().unwrap(),
        ],
    )
    .await;
    ok(&out);

    // The service's document: every worker applies it.
    let doc = dir.join("voice.json");
    std::fs::write(&doc, r#"{"log": "info", "limits": {"calls": 100}}"#).unwrap();
    let out = ok(&cli(
        &f,
        &["config", "set", "service/voice", doc.to_str().unwrap()],
    )
    .await);
    assert!(
        out.contains("version 1; sent to 3 machines (lb-1, mp-1, mp-2)"),
        "{out}"
    );
    for n in names {
        let m = wait_config(&f, n, 1, "applied").await;
        assert_eq!(m["config"]["applied"], 1, "{m}");
        assert_eq!(
            config_file(&f, n),
            json!({"log": "info", "limits": {"calls": 100}})
        );
    }

    // TOML for one machine, making its software exit on the reload: rolled back there alone.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "crash_on_reload = true\n[limits]\ncalls = 900\n").unwrap();
    let out = ok(&cli(
        &f,
        &["config", "set", "machine/mp-2", bad.to_str().unwrap()],
    )
    .await);
    assert!(out.contains("version 2; sent to 1 machine (mp-2)"), "{out}");
    let m = wait_config(&f, "mp-2", 2, "rolled_back").await;
    let detail = m["config"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("health check") && detail.contains("configuration 1 is back"),
        "{detail}"
    );
    assert_eq!(m["config"]["applied"], 1, "{m}");
    assert_eq!(
        config_file(&f, "mp-2"),
        json!({"log": "info", "limits": {"calls": 100}})
    );
    for n in ["lb-1", "mp-1"] {
        let m = f.machine(n).await.unwrap().unwrap();
        assert_eq!(m["config"]["version"], 1, "{m}");
        assert_eq!(m["config"]["state"], "applied", "{m}");
    }
    // mp-2's software runs again with the restored file.
    wait_for("mp-2's software running again", WAIT, || async {
        match f.machine("mp-2").await {
            Ok(Some(m)) if m["state"] == "running" => Check::Done(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap();

    // The CLI's views.
    let eff = ok(&cli(&f, &["config", "effective", "mp-2", "--json"]).await);
    let eff: Value = serde_json::from_str(&eff).unwrap();
    assert_eq!(
        eff["doc"],
        json!({"crash_on_reload": true, "log": "info", "limits": {"calls": 900}})
    );
    assert_eq!(eff["published"]["state"], "rolled_back");
    let h = ok(&cli(&f, &["config", "history", "machine/mp-2"]).await);
    assert!(h.lines().nth(1).unwrap().starts_with('2'), "{h}");
    let g = ok(&cli(&f, &["config", "get", "service/voice"]).await);
    assert_eq!(
        serde_json::from_str::<Value>(&g).unwrap(),
        json!({"log": "info", "limits": {"calls": 100}})
    );
    // Deleting the override: mp-2 is sent the service's document again (same as what it
    // has in effect) and applies it.
    let out = ok(&cli(&f, &["config", "delete", "machine/mp-2"]).await);
    assert!(out.contains("version 3; sent to 1 machine (mp-2)"), "{out}");
    wait_config(&f, "mp-2", 3, "applied").await;
    let machines = ok(&cli(&f, &["machines"]).await);
    assert!(machines.contains("CONFIG"), "{machines}");
    f.finish().await.unwrap();
}
