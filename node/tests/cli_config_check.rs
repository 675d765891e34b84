//! `outpost config check` with the real binary: exit 0 and one `ok:` line for a good config,
//! exit 2 naming the field for a bad one (like `nats-server -t`), and the configs the Debian
//! package ships, which pass as they are, except the worker's until its placeholder
//! controller fingerprint is replaced.

use std::path::{Path, PathBuf};
use std::process::Command;

const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn write(case: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outpost-cli-config-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{case}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn check(args: &[&str], path: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["config", "check"])
        .args(args)
        .arg("--config")
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shipped(role: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../systemd/deb/{role}.toml"))
}

#[test]
fn a_good_config_passes_with_one_ok_line_and_starts_nothing() {
    let dir = std::env::temp_dir().join(format!("outpost-cli-check-data-{}", std::process::id()));
    let path = write(
        "good",
        &format!(
            "role = \"datacenter\"\nname = \"dc-east\"\ndata_dir = \"{}\"\n[[peers]]\n\
             name = \"dc-west\"\naddr = \"192.0.2.10:7400\"\nfingerprint = \"{FP}\"\n",
            dir.display()
        ),
    );
    let (code, stdout, stderr) = check(&[], &path);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(
        stdout.contains("datacenter \"dc-east\"") && stdout.contains("1 peers"),
        "{stdout}"
    );
    assert!(!dir.exists(), "config check created the data directory");
}

#[test]
fn a_bad_config_exits_2_naming_the_field() {
    let path = write(
        "bad",
        "role = \"datacenter\"\nname = \"d\"\n[log]\nlevel = \"infoo\"\n",
    );
    let (code, stdout, stderr) = check(&[], &path);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains(": log.level: "), "{stderr}");
    // The role flag applies as with `run`: as a worker the file lacks [controller].
    let (code, _, stderr) = check(&["--role", "worker"], &write("role", "name = \"d\"\n"));
    assert_eq!(code, 2);
    assert!(stderr.contains(": controller: missing"), "{stderr}");
}

#[test]
fn shipped_configs_pass_and_the_worker_placeholder_fingerprint_is_refused() {
    for role in ["datacenter", "controller"] {
        let (code, stdout, stderr) = check(&["--role", role], &shipped(role));
        assert_eq!(code, 0, "{role}: {stderr}");
        assert!(
            stdout.contains(&format!("data_dir /var/lib/outpost/{role},")),
            "{stdout}"
        );
    }
    let (code, _, stderr) = check(&["--role", "worker"], &shipped("worker"));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(": controller.fingerprint: ") && stderr.contains("real fingerprint"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(shipped("worker")).unwrap();
    let fixed = write("worker", &text.replace(&"0".repeat(64), FP));
    let (code, stdout, stderr) = check(&["--role", "worker"], &fixed);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("data_dir /var/lib/outpost/worker,"),
        "{stdout}"
    );
}
