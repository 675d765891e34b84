//! Online backups on the cluster roles, and a controller restored from one (issue 9.6). The
//! controller's database holds every machine key and the signing key; `outpost backup` must
//! copy it while it runs, and a controller started from that copy must
//!
//! - keep every machine admitted at the time of the backup (an operator-accepted one included:
//!   it is not sent back to pending);
//! - never reuse a publication sequence that a worker already applied: the load balancer applied
//!   publications the backup does not know of, and everything published after the restore is
//!   applied (a reused sequence would be ignored as a replay, and the pool file would go stale);
//! - publish again what the restored state remembers publishing, when the worker is ahead of
//!   it: here the pool the backup remembers equals the true pool again, while the load balancer
//!   holds an older one; it must still end on the true pool.
//!
//! A worker's backup is served too (its database holds its TLS and sealing keys).

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost::testkit::{wait_for, Check, Fleet, FleetSpec, NodeInfo, WorkerSpec};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_outpost"))
}

async fn wait_pool(f: &Fleet, lb: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
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

/// The highest publication sequence the worker applied.
async fn applied(f: &Fleet, name: &str) -> u64 {
    let s: Value = f.worker(name).get_json("/v1/status").await.unwrap();
    s["applied"]
        .as_u64()
        .unwrap_or_else(|| panic!("applied in {s}"))
}

fn backup(node: &NodeInfo, out: &Path) {
    let o = std::process::Command::new(bin())
        .args(["backup", "--api", &format!("http://{}", node.api_addr)])
        .args(["--token", &node.token, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "backup of {}: {}",
        node.name,
        String::from_utf8_lossy(&o.stderr)
    );
    let meta = std::fs::metadata(out).unwrap();
    assert!(meta.len() > 0, "{} is empty", out.display());
    assert_eq!(
        outpost::fsmode::mode_of(out).unwrap(),
        0o600,
        "a backup holds private keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_controller_keeps_keys_and_never_reuses_a_sequence() {
    let spec = FleetSpec::new(
        "ctl-restore",
        vec![
            WorkerSpec::load_balancer("lb-1"),
            WorkerSpec::dependent("media-a", "lb-1"),
            WorkerSpec::dependent("media-b", "lb-1").without_token(),
        ],
    );
    let mut f = Fleet::start(bin(), spec).await.unwrap();
    let pending = wait_key(&f, "media-b", "pending").await;
    let id = pending["id"].as_str().unwrap().to_owned();
    let r = f
        .controller()
        .post_json::<_, Value>(&format!("/v1/keys/{id}/accept"), &serde_json::json!({}))
        .await;
    assert!(r.is_ok(), "accept: {r:?}");
    wait_pool(&f, "lb-1", &["media-a", "media-b"]).await;

    let ctl = f.info("controller").clone();
    let backup_file: PathBuf = f.cluster.dir().join("controller.backup.redb");
    backup(&ctl, &backup_file);
    backup(f.info("lb-1"), &f.cluster.dir().join("lb-1.backup.redb"));
    let at_backup = applied(&f, "lb-1").await;

    // After the backup: media-a goes, the load balancer applies a pool the backup never saw.
    let a = f.index("media-a");
    f.cluster.kill9(a).unwrap();
    wait_pool(&f, "lb-1", &["media-b"]).await;
    let before_restore = applied(&f, "lb-1").await;
    assert!(before_restore > at_backup, "{before_restore} > {at_backup}");

    // Restore the controller while media-a is back: the restored state's remembered pool
    // (media-a, media-b) is the true one again, and the load balancer still holds the older.
    let c = f.index("controller");
    f.cluster.stop(c).await.unwrap();
    std::fs::copy(&backup_file, ctl.data_dir.join("outpost.redb")).unwrap();
    f.cluster.restart(a).unwrap();
    f.cluster.restart(c).unwrap();
    f.cluster.wait_ready(c).await.unwrap();

    wait_key(&f, "media-b", "admitted").await;
    wait_key(&f, "media-a", "admitted").await;
    wait_key(&f, "lb-1", "admitted").await;
    wait_pool(&f, "lb-1", &["media-a", "media-b"]).await;
    let after_restore = applied(&f, "lb-1").await;
    assert!(
        after_restore > before_restore,
        "the pool was applied under a new sequence ({after_restore} > {before_restore})"
    );

    // And the channel goes on: a later change is applied, not taken for a replay.
    let b = f.index("media-b");
    f.cluster.kill9(b).unwrap();
    wait_pool(&f, "lb-1", &["media-a"]).await;
    assert!(applied(&f, "lb-1").await > after_restore);
    let log = f.cluster.log_tail(c, 400);
    assert!(log.contains("restored from a backup"), "{log}");
    f.finish().await.unwrap();
}
