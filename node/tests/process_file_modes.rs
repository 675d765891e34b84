//! Keys on disk are readable by their owner only (design.md, Identities: "The data directory and
//! every file holding key material are owner-only whatever the umask"). The database holds the
//! TLS private key (and a controller's signing key); the `outpost` group may read the API token
//! and nothing else.
//!
//! - `outpost init` under umask 000 (the worst case) leaves the data directory 0750, the
//!   database 0600 and the token 0640, for every role;
//! - a loose existing installation (0777 directory, 0644 database, 0666 token, a 0755 bundle
//!   directory) is tightened by `outpost run` on start, with one log line saying so, and the node
//!   then serves as usual.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use outpost::fsmode::mode_of;
use outpost::testkit::{Cluster, ClusterSpec, Fleet, FleetSpec, WorkerSpec};

fn scratch(label: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "outpost-modes-{label}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn init_under_umask_000(bin: &Path, role: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"umask 000 && exec "$0" init --role "$1" --data-dir "$2" --name "$3""#)
        .arg(bin)
        .args([role, dir.to_str().unwrap(), &format!("m-{role}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init {role}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_modes(dir: &Path, what: &str) {
    assert_eq!(mode_of(dir).unwrap(), 0o750, "{what}: data directory");
    assert_eq!(
        mode_of(&dir.join("outpost.redb")).unwrap(),
        0o600,
        "{what}: outpost.redb (holds the private keys)"
    );
    assert_eq!(mode_of(&dir.join("token")).unwrap(), 0o640, "{what}: token");
}

#[test]
fn init_creates_owner_only_key_files_whatever_the_umask() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let root = scratch("init");
    for role in ["datacenter", "controller", "worker"] {
        let dir = root.join(role);
        init_under_umask_000(bin, role, &dir);
        assert_modes(&dir, &format!("after init --role {role}"));
    }
    std::fs::remove_dir_all(root).unwrap();
}

fn loosen(dir: &Path) {
    let set = |p: PathBuf, m: u32| std::fs::set_permissions(p, PermissionsExt::from_mode(m));
    set(dir.to_path_buf(), 0o777).unwrap();
    set(dir.join("outpost.redb"), 0o644).unwrap();
    set(dir.join("token"), 0o666).unwrap();
    let bundles = dir.join("bundles");
    if bundles.is_dir() {
        set(bundles, 0o755).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_tightens_a_loose_datacenter_installation_and_says_so() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let mut c = Cluster::start(bin, ClusterSpec::new("modes", &["dc-1"]))
        .await
        .unwrap();
    c.wait_all_ready().await.unwrap();
    let dir = c.node(0).data_dir.clone();
    assert_modes(&dir, "after run");

    c.stop(0).await.unwrap();
    loosen(&dir);
    c.restart(0).unwrap();
    c.wait_ready(0).await.unwrap();
    assert_modes(&dir, "after run on a loose installation");
    let log = c.log_tail(0, 200);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tightened file modes"))
        .collect();
    assert_eq!(lines.len(), 1, "one line saying what was tightened:\n{log}");
    assert!(
        lines[0].contains("0644 -> 0600") && lines[0].contains("0777 -> 0750"),
        "{}",
        lines[0]
    );
    c.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_tightens_a_loose_controller_with_bundles() {
    let bin = Path::new(env!("CARGO_BIN_EXE_outpost"));
    let spec = FleetSpec::new("modes-ctl", vec![WorkerSpec::load_balancer("lb-1")]);
    let mut f = Fleet::start(bin, spec).await.unwrap();
    f.cluster.wait_all_ready().await.unwrap();
    let dir = f.info("controller").data_dir.clone();
    assert_modes(&dir, "controller after run");
    let worker = f.info("lb-1").data_dir.clone();
    assert_modes(&worker, "worker after run");
    for entry in std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(&worker).unwrap())
    {
        let p = entry.unwrap().path();
        let m = mode_of(&p).unwrap();
        if p.file_name().unwrap() != "token" {
            assert_eq!(m & 0o077, 0, "{} is {m:04o}: owner-only", p.display());
        }
    }

    let i = f.index("controller");
    f.cluster.stop(i).await.unwrap();
    loosen(&dir);
    std::fs::create_dir_all(dir.join("bundles")).unwrap();
    std::fs::set_permissions(dir.join("bundles"), PermissionsExt::from_mode(0o755)).unwrap();
    f.cluster.restart(i).unwrap();
    f.cluster.wait_ready(i).await.unwrap();
    assert_modes(&dir, "controller after run on a loose installation");
    assert_eq!(mode_of(&dir.join("bundles")).unwrap(), 0o700);
    f.finish().await.unwrap();
}
