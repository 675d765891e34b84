//! The cluster with real processes on 127.0.0.1 (issue 3): a controller, a load balancer and
//! its dependents. Admission (join token at once; pending until `outpost keys accept`), a
//! dependent's state reaching its load balancer's pool file, a dependent going down and up, a
//! rejected key staying out, and a controller restart (kill -9) losing no machine state.

use std::path::Path;
use std::time::Duration;

use outpost::testkit::{wait_for, Check, Fleet, FleetSpec, WorkerSpec};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_outpost"))
}

/// Waits until the load balancer's pool file lists exactly `want`.
async fn wait_pool(f: &Fleet, lb: &str, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_for(&format!("{lb}'s pool file to be {want:?}"), WAIT, || {
        let got = f.pool_names(lb);
        let want = want.clone();
        async move {
            match got {
                Ok(Some(names)) if names == want => Check::Done(()),
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
}

/// Waits until the controller lists key `name` with `status`.
async fn wait_key(f: &Fleet, name: &str, status: &str) -> Value {
    wait_for(&format!("key {name} to be {status}"), WAIT, || async {
        match f.key(name).await {
            Ok(Some(k)) if k["status"] == status => Check::Done(k),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap()
}

async fn wait_machine(f: &Fleet, name: &str, status: &str) -> Value {
    wait_for(&format!("machine {name} to be {status}"), WAIT, || async {
        match f.machine(name).await {
            Ok(Some(m)) if m["status"] == status => Check::Done(m),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .await
    .unwrap()
}

/// Runs the CLI against the controller.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_pools_down_and_up_and_a_controller_restart() {
    let spec = FleetSpec::new(
        "cluster",
        vec![
            WorkerSpec::load_balancer("lb-1"),
            WorkerSpec::dependent("media-a", "lb-1"),
            WorkerSpec::dependent("media-b", "lb-1").without_token(),
        ],
    );
    let mut f = Fleet::start(bin(), spec).await.unwrap();
    // The join token admits at once; without it, pending and nothing more.
    wait_key(&f, "lb-1", "admitted").await;
    wait_key(&f, "media-a", "admitted").await;
    let pending = wait_key(&f, "media-b", "pending").await;
    wait_pool(&f, "lb-1", &["media-a"]).await;
    let machines = f.machines().await.unwrap();
    assert!(
        machines.iter().all(|m| m["name"] != "media-b"),
        "a pending machine is not listed among machines: {machines:?}"
    );
    let keys = f.keys().await.unwrap();
    assert_eq!(keys[0]["name"], "media-b", "pending keys first: {keys:?}");

    // `outpost keys list` and `outpost keys accept ID`.
    let out = cli(&f, &["keys", "list"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("media-b") && text.contains("pending"),
        "{text}"
    );
    let id = pending["id"].as_str().unwrap().to_owned();
    let out = cli(&f, &["keys", "accept", &id]);
    assert!(out.status.success(), "{out:?}");
    wait_key(&f, "media-b", "admitted").await;
    wait_pool(&f, "lb-1", &["media-a", "media-b"]).await;

    // The table and its JSON.
    let out = cli(&f, &["machines"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["lb-1", "media-a", "media-b"] {
        assert!(text.contains(name), "{text}");
    }
    let out = cli(&f, &["machines", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.to_string().contains("media-b"), "{v}");
    let lb = f.machine("lb-1").await.unwrap().unwrap();
    assert_eq!(lb["component"], "load-balancer", "{lb}");
    let pool = lb["pool"].to_string();
    assert!(pool.contains("media-a") && pool.contains("media-b"), "{lb}");

    // A dependent dies: down after down_after, out of the pool; back: in again.
    let a = f.index("media-a");
    f.cluster.kill9(a).unwrap();
    wait_machine(&f, "media-a", "down").await;
    wait_pool(&f, "lb-1", &["media-b"]).await;
    f.cluster.restart(a).unwrap();
    wait_machine(&f, "media-a", "up").await;
    wait_pool(&f, "lb-1", &["media-a", "media-b"]).await;

    // The controller dies and comes back: every machine, key and pool as before.
    let before_keys = strip(f.keys().await.unwrap());
    let before_machines = strip(f.machines().await.unwrap());
    f.cluster.kill9(0).unwrap();
    f.cluster.restart(0).unwrap();
    f.cluster.wait_ready(0).await.unwrap();
    assert_eq!(strip(f.keys().await.unwrap()), before_keys);
    let after = strip(f.machines().await.unwrap());
    assert_eq!(after, before_machines);
    // And it still computes new state: media-b dies, leaves the pool.
    let b = f.index("media-b");
    f.cluster.kill9(b).unwrap();
    wait_machine(&f, "media-b", "down").await;
    wait_pool(&f, "lb-1", &["media-a"]).await;
    f.cluster.restart(b).unwrap();
    wait_pool(&f, "lb-1", &["media-a", "media-b"]).await;
    f.finish().await.unwrap();
}

/// Machine and key records without what changes from one moment to the next.
fn strip(list: Vec<Value>) -> Vec<Value> {
    let mut list: Vec<Value> = list
        .into_iter()
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| !k.starts_with("last_seen") && k != "connected" && k != "channel");
            }
            v
        })
        .collect();
    list.sort_by_key(|v| v["name"].as_str().unwrap_or_default().to_owned());
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_stays_out() {
    let spec = FleetSpec::new(
        "reject",
        vec![
            WorkerSpec::load_balancer("lb-1"),
            WorkerSpec::dependent("media-a", "lb-1"),
            WorkerSpec::dependent("rogue", "lb-1").without_token(),
        ],
    );
    let mut f = Fleet::start(bin(), spec).await.unwrap();
    wait_key(&f, "rogue", "pending").await;
    wait_pool(&f, "lb-1", &["media-a"]).await;
    let out = cli(&f, &["keys", "reject", "rogue"]);
    assert!(out.status.success(), "{out:?}");
    wait_key(&f, "rogue", "rejected").await;
    // It tries again (a restart): refused in the handshake, nothing changes.
    let r = f.index("rogue");
    f.cluster.kill9(r).unwrap();
    f.cluster.restart(r).unwrap();
    let api = f.worker("rogue");
    wait_for("the rogue worker to know it is rejected", WAIT, || {
        let api = api.clone();
        async move {
            match api.get_json::<Value>("/v1/status").await {
                Ok(s)
                    if s.to_string().contains("rejected") || s["controller_connected"] == false =>
                {
                    Check::Done(())
                }
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    let keys = f.keys().await.unwrap();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert_eq!(f.key("rogue").await.unwrap().unwrap()["status"], "rejected");
    assert!(f.machine("rogue").await.unwrap().is_none());
    assert_eq!(f.pool_names("lb-1").unwrap().unwrap(), vec!["media-a"]);
    // Unknown keys answer 404 with a reason.
    let out = cli(&f, &["keys", "accept", "no-such-machine"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-machine"), "{err}");
    f.finish().await.unwrap();
}

/// Invariant (`outpost machines remove`, real processes): the removed machine leaves its load
/// balancer's pool file, and after it restarts it stays out (its key refused) while the rest of
/// the pool is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_machine_leaves_the_pool_file_and_stays_out() {
    let spec = FleetSpec::new(
        "remove",
        vec![
            WorkerSpec::load_balancer("lb-1"),
            WorkerSpec::dependent("media-a", "lb-1"),
            WorkerSpec::dependent("media-b", "lb-1"),
        ],
    );
    let mut f = Fleet::start(bin(), spec).await.unwrap();
    wait_pool(&f, "lb-1", &["media-a", "media-b"]).await;
    let out = cli(&f, &["machines", "remove", "media-b"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("removed: media-b"), "{said}");
    wait_pool(&f, "lb-1", &["media-a"]).await;
    wait_key(&f, "media-b", "removed").await;
    assert!(f.machine("media-b").await.unwrap().is_none());
    // It comes back (a restart, still holding the join token): refused, nothing changes.
    let r = f.index("media-b");
    f.cluster.kill9(r).unwrap();
    f.cluster.restart(r).unwrap();
    let api = f.worker("media-b");
    // Restarted, it has tried the controller (an error is on record) and is not admitted.
    let status = wait_for("the removed worker to be refused", WAIT, || {
        let api = api.clone();
        async move {
            match api.get_json::<Value>("/v1/status").await {
                Ok(s) if !s["controller"]["last_error"].is_null() => Check::Done(s),
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(status["controller"]["connected"], false, "{status}");
    assert_ne!(status["standing"], "admitted", "{status}");
    assert_eq!(
        f.key("media-b").await.unwrap().unwrap()["status"],
        "removed"
    );
    assert_eq!(f.pool_names("lb-1").unwrap().unwrap(), vec!["media-a"]);
    // Removing an unknown machine fails with the reason.
    let out = cli(&f, &["machines", "remove", "no-such-machine"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-machine"));
    f.finish().await.unwrap();
}

/// Waits until the call router's file names `lb` with `up` (the load balancer's endpoint as
/// the controller last published it).
async fn wait_coupled(f: &Fleet, router: &str, lb: &str, up: bool) -> Value {
    wait_for(
        &format!("{router}'s file to hold {lb} up={up}"),
        WAIT,
        || {
            let doc = f.pool_doc(router);
            async move {
                match doc {
                    Ok(Some(d))
                        if d["load_balancer"]["name"] == lb && d["load_balancer"]["up"] == up =>
                    {
                        Check::Done(d)
                    }
                    other => Check::NotYet(format!("{other:?}")),
                }
            }
        },
    )
    .await
    .unwrap()
}

/// Invariant (issue 13.2): a call router is coupled with its own load balancer. It is
/// published that load balancer's endpoint (addresses, fingerprint) and told again when it
/// goes down and comes back; the load balancer knows its router and its dependents, and the
/// router is never one of its backends. `outpost machines` shows both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_router_follows_its_load_balancer_down_and_up() {
    let spec = FleetSpec::new(
        "couple",
        vec![
            WorkerSpec::load_balancer("lb-1"),
            WorkerSpec::dependent("media-a", "lb-1"),
            WorkerSpec::router("cr-1", "lb-1"),
        ],
    );
    let mut f = Fleet::start(bin(), spec).await.unwrap();
    wait_pool(&f, "lb-1", &["media-a"]).await;
    let doc = wait_coupled(&f, "cr-1", "lb-1", true).await;
    let lb = wait_machine(&f, "lb-1", "up").await;
    assert_eq!(doc["call_router"], "cr-1", "{doc}");
    assert_eq!(
        doc["load_balancer"]["fingerprint"], lb["fingerprint"],
        "{doc}"
    );
    assert_eq!(
        doc["load_balancer"]["relay_addr"], lb["relay_addr"],
        "{doc} {lb}"
    );
    // The load balancer's side: its router (file and controller) and its dependents.
    let lb_doc = wait_for("lb-1's file to name its router", WAIT, || {
        let d = f.pool_doc("lb-1");
        async move {
            match d {
                Ok(Some(d)) if d["call_router"]["name"] == "cr-1" => Check::Done(d),
                other => Check::NotYet(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        f.pool_names("lb-1").unwrap().unwrap(),
        vec!["media-a"],
        "{lb_doc}"
    );
    let lb = f.machine("lb-1").await.unwrap().unwrap();
    assert_eq!(lb["call_router"], "cr-1", "{lb}");
    assert_eq!(lb["dependents"], serde_json::json!(["media-a"]), "{lb}");
    let cr = f.machine("cr-1").await.unwrap().unwrap();
    assert_eq!(cr["coupling"]["state"], "coupled", "{cr}");
    let out = cli(&f, &["machines"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pool 1 for cr-1"), "{text}");
    assert!(text.contains("lb-1 coupled"), "{text}");

    // The load balancer dies: the router is told it is down; back: told it is up.
    let i = f.index("lb-1");
    f.cluster.kill9(i).unwrap();
    wait_machine(&f, "lb-1", "down").await;
    wait_coupled(&f, "cr-1", "lb-1", false).await;
    let cr = f.machine("cr-1").await.unwrap().unwrap();
    assert_eq!(cr["coupling"]["state"], "down", "{cr}");
    f.cluster.restart(i).unwrap();
    wait_machine(&f, "lb-1", "up").await;
    wait_coupled(&f, "cr-1", "lb-1", true).await;
    f.finish().await.unwrap();
}
