//! Bad configs are refused by the real binary before anything starts: `outpost run` exits 2 and
//! its message names the field that is wrong.

use std::path::PathBuf;
use std::process::Command;

const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A config file of its own for each case (tests run in parallel).
fn config_file(case: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outpost-config-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{case}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `outpost run [--role ROLE] --config FILE`; returns the exit code and stderr.
fn run(case: &str, role: Option<&str>, text: &str) -> (Option<i32>, String) {
    let path = config_file(case, text);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost"));
    cmd.arg("run");
    if let Some(role) = role {
        cmd.args(["--role", role]);
    }
    let out = cmd
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the outpost binary");
    let _ = std::fs::remove_file(&path);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(case: &str, role: Option<&str>, text: &str, field: &str, detail: &str) {
    let (code, stderr) = run(case, role, text);
    assert_eq!(code, Some(2), "{case}: exit code; stderr: {stderr}");
    assert!(
        stderr.contains(&format!(": {field}: ")),
        "{case}: stderr does not name `{field}`: {stderr}"
    );
    assert!(
        stderr.contains(detail),
        "{case}: stderr does not say {detail:?}: {stderr}"
    );
}

fn datacenter(extra: &str) -> String {
    format!("name = \"dc-east\"\n{extra}")
}

fn peer(name: &str, fingerprint: Option<&str>) -> String {
    let mut s = format!("[[peers]]\nname = \"{name}\"\naddr = \"127.0.0.1:7401\"\n");
    if let Some(fp) = fingerprint {
        s.push_str(&format!("fingerprint = \"{fp}\"\n"));
    }
    s
}

#[test]
fn unknown_key_is_named_with_its_path() {
    assert_refused(
        "unknown-key",
        Some("datacenter"),
        &datacenter("[limits]\nframe_bytes = 1048576\n"),
        "limits.frame_bytes",
        "unknown key",
    );
}

#[test]
fn bad_duration_names_the_field_and_the_value() {
    assert_refused(
        "bad-duration",
        Some("datacenter"),
        &datacenter("[limits]\nlog_retention = \"5 parsecs\"\n"),
        "limits.log_retention",
        "invalid duration \"5 parsecs\"",
    );
}

#[test]
fn unreadable_join_token_file_names_the_field_and_os_error() {
    let missing = std::env::temp_dir().join("outpost-config-errors-no-such-dir/join-token");
    assert_refused(
        "unreadable-token",
        Some("controller"),
        &format!(
            "name = \"ctl\"\n[admission]\njoin_token_file = \"{}\"\n",
            missing.display()
        ),
        "admission.join_token_file",
        "No such file or directory",
    );
}

#[test]
fn peer_without_fingerprint_is_named_by_index() {
    let text = datacenter(&format!(
        "{}{}",
        peer("dc-west", Some(FP)),
        peer("dc-north", None)
    ));
    assert_refused(
        "peer-no-fingerprint",
        Some("datacenter"),
        &text,
        "peers[1].fingerprint",
        "missing",
    );
}

#[test]
fn bad_fingerprint_hex_is_refused() {
    let text = datacenter(&peer("dc-west", Some(&"zz".repeat(32))));
    assert_refused(
        "bad-fingerprint",
        Some("datacenter"),
        &text,
        "peers[0].fingerprint",
        "64 hex",
    );
}

#[test]
fn duplicate_peer_names_are_refused() {
    let text = datacenter(&format!(
        "{}{}",
        peer("dc-west", Some(FP)),
        peer("dc-west", Some(FP))
    ));
    assert_refused(
        "duplicate-peers",
        Some("datacenter"),
        &text,
        "peers[1].name",
        "duplicate peer name \"dc-west\"",
    );
}

#[test]
fn worker_without_machine_is_refused() {
    let text =
        format!("name = \"w1\"\n[controller]\naddr = \"127.0.0.1:7400\"\nfingerprint = \"{FP}\"\n");
    assert_refused(
        "worker-no-machine",
        Some("worker"),
        &text,
        "machine",
        "missing",
    );
}

#[test]
fn controller_sections_in_a_datacenter_say_which_role_uses_them() {
    let text = datacenter("[cluster]\ndown_after = \"15s\"\n");
    assert_refused(
        "dc-with-cluster",
        Some("datacenter"),
        &text,
        "cluster",
        "only a controller",
    );
}

#[test]
fn role_missing_from_flag_and_file_is_named() {
    assert_refused("no-role", None, &datacenter(""), "role", "missing");
}

#[test]
fn role_flag_overrides_the_file() {
    // The file says datacenter; as a worker the same file lacks [controller].
    let text = format!("role = \"datacenter\"\n{}", datacenter(""));
    assert_refused(
        "role-override",
        Some("worker"),
        &text,
        "controller",
        "missing",
    );
}

#[test]
fn mistyped_log_level_is_refused_naming_log_level() {
    // EnvFilter alone takes "infoo" for a target name, and the node would log nothing.
    assert_refused(
        "log-level-typo",
        Some("datacenter"),
        &datacenter("[log]\nlevel = \"infoo\"\n"),
        "log.level",
        "\"infoo\" in \"infoo\" is not a level",
    );
    assert_refused(
        "log-level-directive-typo",
        Some("datacenter"),
        &datacenter("[log]\nlevel = \"info,outpost=debgu\"\n"),
        "log.level",
        "not a level",
    );
    assert_refused(
        "log-format",
        Some("datacenter"),
        &datacenter("[log]\nformat = \"yaml\"\n"),
        "log.format",
        "expected one of text, json",
    );
}

#[test]
fn placeholder_controller_fingerprint_is_refused_at_start() {
    let zeros = "0".repeat(64);
    let text = format!(
        "name = \"w1\"\n[controller]\naddr = \"127.0.0.1:7400\"\nfingerprint = \"{zeros}\"\n\
         [machine]\nservice = \"voice\"\ncomponent = \"proxy\"\n"
    );
    assert_refused(
        "placeholder-fingerprint",
        Some("worker"),
        &text,
        "controller.fingerprint",
        "placeholder",
    );
}
