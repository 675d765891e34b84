//! The systemd units pass `systemd-analyze verify` on every role's instance (outpost@datacenter,
//! outpost@controller, outpost@worker),
//! with the example drop-in applied, in a root directory of their own: a stub `/usr/bin/outpost`
//! and `/bin/kill`, and a copy of the host's system unit directory for the targets the unit
//! pulls in. Unknown keys only warn (exit code 0), so any output line about our unit fails the
//! test. Skipped, saying so, where systemd-analyze is not installed (`.ci/run` tries to install
//! it first).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROLES: [&str; 3] = ["datacenter", "controller", "worker"];

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

fn repo_systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn stub(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A root directory holding our unit, the example drop-in and what verify needs around them.
fn root_dir() -> PathBuf {
    let root = std::env::temp_dir().join(format!("outpost-ops-systemd-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    stub(&root.join("usr/bin/outpost"));
    stub(&root.join("bin/kill"));
    let units = root.join("etc/systemd/system");
    fs::create_dir_all(units.join("outpost@datacenter.service.d")).unwrap();
    fs::copy(
        repo_systemd_dir().join("outpost@.service"),
        units.join("outpost@.service"),
    )
    .unwrap();
    fs::copy(
        repo_systemd_dir().join("examples/outpost@datacenter.service.d/local.conf"),
        units.join("outpost@datacenter.service.d/local.conf"),
    )
    .unwrap();
    fs::create_dir_all(root.join("etc/outpost")).unwrap();
    for role in ROLES {
        fs::write(root.join(format!("etc/outpost/{role}.toml")), "").unwrap();
    }
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("multi-user.target").exists())
        .expect("systemd-analyze is installed, so are the system units");
    fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let st = Command::new("cp")
        .arg("-r")
        .arg(host_units)
        .arg(root.join("usr/lib/systemd/system"))
        .status()
        .unwrap();
    assert!(st.success(), "copying {host_units}");
    root
}

#[test]
fn units_pass_systemd_analyze_verify_on_an_instance() {
    let Some(analyze) = which("systemd-analyze") else {
        println!("skipped: systemd-analyze not installed");
        return;
    };
    let root = root_dir();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(ROLES.map(|r| format!("outpost@{r}.service")))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("outpost@")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify ({}): {text}",
        out.status
    );

    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg("outpost@datacenter.service")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for outpost@datacenter.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok());
    println!("systemd-analyze security: exposure {score:?}");
    if let Some(score) = score {
        // A datacenter needs the network and little else: keep it well inside "OK".
        assert!(score <= 2.0, "exposure {score} (was 1.1):\n{text}");
    }
    let _ = fs::remove_dir_all(&root);
}

/// Each instance writes only its own `/var/lib/outpost/ROLE` (the unit's StateDirectory, the
/// only writable path under ProtectSystem=strict), which is the `data_dir` of the config the
/// package ships for that role.
#[test]
fn each_role_instance_owns_the_state_directory_its_shipped_config_names() {
    let unit = fs::read_to_string(repo_systemd_dir().join("outpost@.service")).unwrap();
    let keys: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("StateDirectory=") || l.starts_with("ReadWritePaths="))
        .collect();
    assert_eq!(keys, ["StateDirectory=outpost/%i"], "{unit}");
    assert!(unit.contains("ProtectSystem=strict"));
    for role in ROLES {
        let config =
            fs::read_to_string(repo_systemd_dir().join(format!("deb/{role}.toml"))).unwrap();
        let want = format!("data_dir = \"/var/lib/outpost/{role}\"");
        assert!(
            config.lines().any(|l| l == want),
            "deb/{role}.toml lacks {want}"
        );
    }
}
