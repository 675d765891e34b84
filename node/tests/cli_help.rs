//! What the command line tells about itself: `--role` lists the accepted values, and the man
//! page and shell completions the package installs are rendered from the same definition.

use std::process::Command;

fn outpost(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn role_help_lists_the_accepted_values() {
    for cmd in [
        &["run", "--help"][..],
        &["init", "--help"],
        &["config", "check", "--help"],
        &["status", "--help"],
    ] {
        let (code, text) = outpost(cmd);
        assert_eq!(code, 0);
        assert!(
            text.contains("[possible values: datacenter, controller, worker]"),
            "{cmd:?}: {text}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["run", "--role", "datacentre"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[possible values: datacenter, controller, worker]"),
        "{stderr}"
    );
}

#[test]
fn man_page_and_completions_are_rendered_from_the_cli() {
    let (code, man) = outpost(&["man"]);
    assert_eq!(code, 0);
    assert!(
        man.starts_with(".ie") || man.contains(".TH outpost 1"),
        "{man}"
    );
    for sub in ["config", "deploy", "backup", "status"] {
        assert!(man.contains(sub), "man page lacks {sub}");
    }
    for (shell, marker) in [
        ("bash", "_outpost()"),
        ("zsh", "#compdef outpost"),
        ("fish", "complete -c outpost"),
    ] {
        let (code, text) = outpost(&["completions", shell]);
        assert_eq!(code, 0);
        assert!(
            text.contains(marker),
            "{shell}: {}",
            &text[..text.len().min(200)]
        );
        assert!(text.contains("check"), "{shell} completes `config check`");
    }
}
