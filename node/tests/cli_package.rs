//! The Debian package's definition (node/Cargo.toml `[package.metadata.deb]`, systemd/deb/):
//! a config per role, the man page and completions, a changelog whose version is the
//! package's, a real maintainer address and no dependency on an essential package (lintian's
//! errors before). Where `systemd/deb/build-deb.sh` has built the .deb, its contents are checked
//! too; building, installing and purging it is `systemd/deb/test-package.sh` (minutes, root).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deb_metadata() -> toml::Table {
    let text = std::fs::read_to_string(repo().join("node/Cargo.toml")).unwrap();
    let manifest: toml::Table = text.parse().unwrap();
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .unwrap()
        .clone()
}

/// Where each shipped file goes, by destination.
const INSTALLED: [&str; 8] = [
    "etc/outpost/datacenter.toml",
    "etc/outpost/controller.toml",
    "etc/outpost/worker.toml",
    "usr/share/man/man1/outpost.1.gz",
    "usr/share/bash-completion/completions/outpost",
    "usr/share/zsh/vendor-completions/_outpost",
    "usr/share/fish/vendor_completions.d/outpost.fish",
    "usr/bin/",
];

fn version(meta: &toml::Table) -> String {
    format!(
        "{}-{}",
        env!("CARGO_PKG_VERSION"),
        meta["revision"].as_str().unwrap()
    )
}

#[test]
fn package_ships_every_role_config_the_man_page_and_completions() {
    let meta = deb_metadata();
    let assets: Vec<(String, String)> = meta["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (
                a[0].as_str().unwrap().to_owned(),
                a[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for dest in INSTALLED {
        assert!(
            assets.iter().any(|(_, d)| d == dest),
            "no asset installed at {dest}"
        );
    }
    // Sources in the tree exist; generated ones come from build-deb.sh.
    for (src, _) in &assets {
        if !src.starts_with("target/") {
            assert!(
                repo().join("node").join(src).is_file(),
                "asset {src} missing"
            );
        }
    }
    let script = std::fs::read_to_string(repo().join("systemd/deb/build-deb.sh")).unwrap();
    for generated in assets
        .iter()
        .filter(|(s, _)| s.starts_with("target/release/deb-assets/"))
    {
        let name = generated.0.rsplit('/').next().unwrap();
        assert!(script.contains(name), "build-deb.sh does not make {name}");
    }
}

#[test]
fn package_metadata_has_what_lintian_requires() {
    let meta = deb_metadata();
    let maintainer = meta["maintainer"].as_str().unwrap();
    assert!(
        !maintainer.contains("@localhost") && maintainer.contains('@'),
        "{maintainer}"
    );
    let depends = meta["depends"].as_str().unwrap();
    // Essential packages (util-linux, coreutils, ...) are never listed without a version.
    for essential in [
        "util-linux",
        "coreutils",
        "bash",
        "dpkg",
        "findutils",
        "grep",
        "sed",
    ] {
        assert!(
            !depends.split(',').any(|d| d.trim() == essential),
            "depends on {essential}"
        );
    }
    let changelog_path = repo()
        .join("node")
        .join(meta["changelog"].as_str().unwrap());
    let changelog = std::fs::read_to_string(&changelog_path).unwrap();
    let first = changelog.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("outpost ({}) ", version(&meta))),
        "the changelog's latest entry ({first}) is not the package version {}",
        version(&meta)
    );
    assert!(
        changelog.contains(&format!(" -- {maintainer}  ")),
        "changelog trailer names another maintainer"
    );
}

#[test]
fn built_package_holds_the_files_when_it_was_built() {
    let meta = deb_metadata();
    let Ok(arch) = Command::new("dpkg").arg("--print-architecture").output() else {
        println!("skipped: dpkg not installed");
        return;
    };
    let arch = String::from_utf8_lossy(&arch.stdout).trim().to_owned();
    let deb = repo().join(format!(
        "target/debian/outpost_{}_{arch}.deb",
        version(&meta)
    ));
    if !deb.is_file() {
        println!(
            "skipped: {} not built (systemd/deb/build-deb.sh builds it; test-package.sh installs it)",
            deb.display()
        );
        return;
    }
    let out = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    for dest in INSTALLED.iter().map(|d| {
        if d.ends_with('/') {
            "usr/bin/outpost"
        } else {
            d
        }
    }) {
        assert!(
            listing.contains(&format!("./{dest}")),
            "{dest} not in {}",
            deb.display()
        );
    }
    assert!(
        listing.contains("./usr/lib/systemd/system/outpost@.service"),
        "{listing}"
    );
    let out = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles")
        .output()
        .unwrap();
    let conffiles = String::from_utf8_lossy(&out.stdout);
    for role in ["datacenter", "controller", "worker"] {
        assert!(
            conffiles.contains(&format!("/etc/outpost/{role}.toml")),
            "{conffiles}"
        );
    }
}
