//! Client commands against a real node: `api` and `data_dir` come from `--config` (so a node on
//! non-default ports needs no other flag; the token is read from the config's data_dir),
//! explicit flags win, and `--json` puts one JSON document alone on stdout for `event` and
//! `backup`; `deploy` refuses a bundle of another service before it connects.

mod ops_support;

use std::path::Path;
use std::process::Command;

use ops_support::{test_dir, Node, BIN};

fn outpost(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("OUTPOST_TOKEN")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config as an operator would have it: the node's real API port and its data directory.
fn client_config(node: &mut Node, dir: &Path) -> String {
    let (api, _token) = node.api();
    let addr = api.strip_prefix("http://").unwrap();
    let path = dir.join("client.toml");
    std::fs::write(
        &path,
        format!(
            "role = \"datacenter\"\nname = \"dc-cli\"\napi = \"{addr}\"\ndata_dir = \"{}\"\n",
            node.data_dir.display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn client_commands_read_api_and_data_dir_from_the_config_and_flags_win() {
    let dir = test_dir("cli-client");
    let mut node = Node::init(&dir, "dc-cli", "");
    node.start(&[]);
    let config = client_config(&mut node, &dir);

    let (code, stdout, stderr) = outpost(&["status", "--config", &config]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("name:        dc-cli"), "{stdout}");
    let (code, stdout, stderr) = outpost(&["state", "digest", "--config", &config]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.split_whitespace().count(), 2, "{stdout}");

    // --api wins over the file: nothing listens there.
    let (code, _, stderr) =
        outpost(&["status", "--config", &config, "--api", "http://127.0.0.1:1"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach the outpost API at http://127.0.0.1:1"),
        "{stderr}"
    );
    // --data-dir wins too: no token there, so the node answers 401.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, stderr) = outpost(&[
        "status",
        "--config",
        &config,
        "--data-dir",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    // A config that is wrong is bad usage, naming the field.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\napi = \"not an address\"\n").unwrap();
    let (code, _, stderr) = outpost(&["status", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(": api: "), "{stderr}");
}

#[test]
fn json_flag_prints_one_json_document_alone_on_stdout() {
    let dir = test_dir("cli-json");
    let mut node = Node::init(&dir, "dc-cli", "");
    node.start(&[]);
    let config = client_config(&mut node, &dir);

    let (code, stdout, stderr) = outpost(&[
        "event",
        "--config",
        &config,
        "--account",
        "sip:a@example.com",
        "--type",
        "presence",
        "--data",
        "{\"status\":\"online\"}",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(v["message_id"].is_string(), "{v}");
    assert!(v.get("element").is_some(), "{v}");

    let out = dir.join("backup.redb");
    let (code, stdout, stderr) = outpost(&[
        "backup",
        "--config",
        &config,
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["file"], out.to_str().unwrap());
    assert_eq!(v["bytes"], std::fs::metadata(&out).unwrap().len());
    assert_eq!(v["blake3"].as_str().map(str::len), Some(64), "{v}");

    node.signal("TERM");
    assert!(node.wait_exit().success());
    let offline = dir.join("offline.redb");
    let (code, stdout, stderr) = outpost(&[
        "backup",
        "--offline",
        "--config",
        &config,
        "--out",
        offline.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(v["rows"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn deploy_refuses_a_bundle_of_another_service_before_uploading() {
    let dir = test_dir("cli-deploy-service");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles/voice");
    let bundle = dir.join("voice.bundle");
    let (code, _, stderr) = outpost(&[
        "bundle",
        "pack",
        src.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    // Nothing listens at the API: a refusal that names the mismatch was made before connecting.
    let (code, stdout, stderr) = outpost(&[
        "deploy",
        "--service",
        "video",
        "--bundle",
        bundle.to_str().unwrap(),
        "--api",
        "http://127.0.0.1:1",
        "--data-dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("--service: \"video\", but the bundle")
            && stderr.contains("is for \"voice\""),
        "{stderr}"
    );
    // Not a bundle at all.
    let junk = dir.join("junk.bundle");
    std::fs::write(&junk, b"not a tar").unwrap();
    let (code, _, stderr) = outpost(&[
        "deploy",
        "--service",
        "voice",
        "--bundle",
        junk.to_str().unwrap(),
        "--api",
        "http://127.0.0.1:1",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--bundle: "), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
