//! The node's log as the real binary writes it: under journald (`JOURNAL_STREAM` set, as
//! systemd sets it) every line starts with its syslog priority (`<6>` info, `<4>` warn, ...,
//! sd-daemon(3)) and carries no timestamp of its own; with `[log] format = "json"` every line is
//! one JSON object.

mod ops_support;

use ops_support::{test_dir, Node};

/// Starts a node with `env` and `extra` config, waits for the line with `ready`, stops it with
/// SIGTERM and answers its whole log.
fn run_until_ready(label: &str, extra: &str, env: &[(&str, &str)], ready: &str) -> String {
    let dir = test_dir(label);
    let mut node = Node::init(&dir, "dc-log", extra);
    node.start(env);
    node.wait_log(0, &[ready]);
    node.signal("TERM");
    let st = node.wait_exit();
    assert!(st.success(), "exit {st}:\n{}", node.log_text());
    let text = node.log_text();
    let _ = std::fs::remove_dir_all(&dir);
    text
}

#[test]
fn journald_lines_start_with_their_priority_and_carry_no_timestamp() {
    // A NOTIFY_SOCKET that is not a socket path makes the node warn, and go on.
    let text = run_until_ready(
        "log-journal",
        "",
        &[
            ("JOURNAL_STREAM", "8:12345"),
            ("NOTIFY_SOCKET", "not-a-path"),
        ],
        "ready",
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 3, "{text}");
    for l in &lines {
        let b = l.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'<' && (b'3'..=b'7').contains(&b[1]) && b[2] == b'>',
            "no priority prefix on {l:?}:\n{text}"
        );
        // The journal keeps the time; a line of ours would start with the year.
        assert!(
            !l[3..].trim_start().starts_with("20"),
            "a timestamp on {l:?}"
        );
    }
    let ready = lines.iter().find(|l| l.contains("ready")).unwrap();
    assert!(ready.starts_with("<6>"), "{ready}");
    let warn = lines
        .iter()
        .find(|l| l.contains("not notifying systemd"))
        .unwrap_or_else(|| panic!("no warning about NOTIFY_SOCKET:\n{text}"));
    assert!(warn.starts_with("<4>"), "{warn}");
}

#[test]
fn plain_stderr_has_no_priority_prefix() {
    let text = run_until_ready("log-plain", "", &[], "ready");
    let ready = text.lines().find(|l| l.contains("ready")).unwrap();
    assert!(!ready.starts_with('<'), "{ready}");
    assert!(ready.starts_with("20"), "a timestamp first: {ready}");
}

#[test]
fn json_format_writes_one_object_per_line() {
    let text = run_until_ready(
        "log-json",
        "[log]\nformat = \"json\"\n",
        &[],
        "\"message\":\"ready\"",
    );
    let mut ready = None;
    for l in text.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v.get(key).is_some(), "no {key} in {l}");
        }
        if v["message"] == "ready" {
            ready = Some(v);
        }
    }
    let ready = ready.unwrap_or_else(|| panic!("no ready line:\n{text}"));
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["role"], "datacenter");
    assert_eq!(ready["name"], "dc-log");

    // Under journald the JSON keeps its priority prefix, and drops its timestamp.
    let text = run_until_ready(
        "log-json-journal",
        "[log]\nformat = \"json\"\n",
        &[("JOURNAL_STREAM", "8:12345")],
        "\"message\":\"ready\"",
    );
    let l = text.lines().find(|l| l.contains("ready")).unwrap();
    let body = l.strip_prefix("<6>").unwrap_or_else(|| panic!("{l}"));
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(v.get("timestamp").is_none(), "{l}");
}
