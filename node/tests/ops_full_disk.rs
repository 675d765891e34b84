//! A full disk, for real: the data directory on a small tmpfs that a filler file fills up.
//! Ingest answers 503 and changes nothing, reads keep working, and once space returns the node
//! accepts events again on its own (no restart); afterwards `db check` passes and the log holds
//! exactly the acknowledged events. Needs root (to mount the tmpfs); skipped otherwise.

mod ops_support;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ops_support::{outpost, test_dir, Node, WAIT};
use outpost::testkit::{Api, ApiError, Event};

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Option<Mount> {
    std::fs::create_dir_all(at).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then(|| Mount(at.to_owned()))
}

/// Writes until the file system says no.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_all()) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            return;
        }
    }
}

fn big_event(n: u64) -> Event {
    Event::new(
        format!("full-{}", n % 40),
        "element",
        serde_json::json!({ "n": n, "pad": "x".repeat(16 * 1024) }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_with_503_keeps_reads_and_recovers_when_space_returns() {
    let dir = test_dir("ops-full-disk");
    let Some(mount) = mount_tmpfs(&dir.join("mnt"), "24m") else {
        println!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let mnt = mount.0.clone();
    let mut node = Node::init(&mnt, "dc-full", "");
    node.log = dir.join("dc-full.log");
    node.start(&[]);
    let (base, token) = node.api();
    let api = Api::new(&base, &token);

    let mut acked = 0u64;
    for n in 0..20 {
        api.post(&big_event(n)).await.expect("room to spare");
        acked += 1;
    }
    let filler = mnt.join("filler");
    fill(&filler);

    // Full: some commits may still fit in space redb already holds; then 503.
    let mut n = 1000;
    let refused = loop {
        match api.post(&big_event(n)).await {
            Ok(_) => acked += 1,
            Err(ApiError::Status { status: 503, error }) => break error,
            Err(e) => panic!("expected 503 on a full disk, got {e}"),
        }
        n += 1;
        assert!(n < 3000, "never refused");
    };
    assert!(refused.contains("full"), "{refused}");
    let digest = api
        .digest()
        .await
        .expect("reads keep working on a full disk");
    let status: serde_json::Value = api.get_json("/v1/status").await.expect("status");
    assert_eq!(status["disk_full"], true, "{status}");

    // Space returns: the node takes events again by itself.
    std::fs::remove_file(&filler).unwrap();
    let start = Instant::now();
    loop {
        match api.post(&big_event(n)).await {
            Ok(_) => {
                acked += 1;
                break;
            }
            Err(ApiError::Status { status: 503, .. }) if start.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no recovery after space returned: {e}\n{}", node.log_text()),
        }
    }
    assert!(api.digest().await.unwrap().entries >= digest.entries);
    let status: serde_json::Value = api.get_json("/v1/status").await.unwrap();
    assert_eq!(status["disk_full"], false, "{status}");

    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0), "{}", node.log_text());
    let (code, out, err) = outpost(&["db", "check", "--data-dir", node.data_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(" {acked} log records")),
        "exactly the {acked} acknowledged events are logged: {out}"
    );
    drop(mount);
    let _ = std::fs::remove_dir_all(&dir);
}
