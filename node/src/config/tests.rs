use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use super::*;

const FP_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const FP_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn dc(extra: &str) -> String {
    format!("role = \"datacenter\"\nname = \"dc-east\"\n{extra}")
}

fn fails(text: &str, role: Option<Role>) -> ConfigError {
    match parse(text, "test.toml", role) {
        Ok(c) => panic!("accepted {text:?} as {c:?}"),
        Err(e) => e,
    }
}

fn fails_on(text: &str, field: &str) -> ConfigError {
    let e = fails(text, None);
    assert_eq!(e.field, field, "{e}");
    e
}

#[test]
fn starter_config_of_every_role_parses() {
    eprintln!(
        "{}",
        starter(Role::Worker, "w-1", Path::new("/var/lib/outpost"))
    );
    for role in [Role::Datacenter, Role::Controller, Role::Worker] {
        let text = starter(role, "node-1", Path::new("/srv/outpost data"));
        // The worker's placeholder fingerprint is refused until the operator replaces it.
        let text = if role == Role::Worker {
            let e = fails(&text, None);
            assert_eq!(e.field, "controller.fingerprint", "{e}");
            assert!(e.reason.contains("placeholder"), "{e}");
            text.replace(FINGERPRINT_PLACEHOLDER, FP_A)
        } else {
            text
        };
        let c = parse(&text, "starter", None).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.role, role);
        assert_eq!(c.name, "node-1");
        assert_eq!(c.data_dir, Path::new("/srv/outpost data"));
        assert_eq!(c.limits, Limits::default(), "starter shows the defaults");
        assert_eq!(c.log, LogConfig::default());
        assert_eq!(c.controller.is_some(), role == Role::Worker);
        assert_eq!(c.machine.is_some(), role == Role::Worker);
        // The role flag agrees with the file; another role must refuse its sections.
        if role != Role::Controller {
            let other = fails(&text, Some(Role::Controller));
            assert!(other.reason.contains("only a"), "{other}");
        }
    }
}

#[test]
fn starter_quotes_awkward_names_and_paths() {
    let text = starter(Role::Datacenter, "dc", Path::new("/tmp/a \"b\"\\c"));
    let c = parse(&text, "starter", None).unwrap();
    assert_eq!(c.data_dir, Path::new("/tmp/a \"b\"\\c"));
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = parse(&dc(""), "t", None).unwrap();
    assert_eq!(c.data_dir, Path::new("/var/lib/outpost"));
    assert_eq!(c.listen, "0.0.0.0:7400".parse().unwrap());
    assert_eq!(c.api, "127.0.0.1:7480".parse().unwrap());
    assert!(c.peers.is_empty());
    assert_eq!(c.replication.fanout, 0);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.cluster.down_after, Duration::from_secs(15));
    assert_eq!(c.cluster.channel_max, 256);
    assert_eq!(c.cluster.bundle_keep_unused, Duration::from_secs(24 * 3600));
    assert!(c.admission.is_none() && c.controller.is_none() && c.machine.is_none());
    let l = &c.limits;
    assert_eq!(l.log_retention, Duration::from_secs(24 * 3600));
    assert_eq!(l.log_records_max, 10_000_000);
    assert_eq!(l.frame_bytes_max, 1 << 20);
    assert_eq!(l.ingest_queue_max, 4096);
    assert_eq!(l.batch_events_max, 10_000);
    assert_eq!(l.commit_events_max, 20_000);
    assert_eq!(l.in_flight_max, 16_384);
    assert_eq!(l.api_body_bytes_max, 16 << 20);
    assert_eq!(l.peers_max, 64);
    assert_eq!(
        c,
        Config::with_defaults(Role::Datacenter, "dc-east", Path::new("/var/lib/outpost"))
    );
}

#[test]
fn limits_are_read_from_the_file() {
    let c = parse(
        &dc("[limits]\nlog_retention = \"90m\"\nframe_bytes_max = 65536\npeers_max = 3\n"),
        "t",
        None,
    )
    .unwrap();
    assert_eq!(c.limits.log_retention, Duration::from_secs(90 * 60));
    assert_eq!(c.limits.frame_bytes_max, 65536);
    assert_eq!(c.limits.peers_max, 3);
}

#[test]
fn fingerprint_is_a_string_or_a_list_of_two() {
    let one = parse(
        &dc(&format!(
            "[[peers]]\nname = \"dc-west\"\naddr = \"192.0.2.10:7400\"\nfingerprint = \"{FP_A}\"\n"
        )),
        "t",
        None,
    )
    .unwrap();
    assert_eq!(one.peers[0].fingerprints, vec![FP_A.parse().unwrap()]);
    assert_eq!(one.peers[0].addr, "192.0.2.10:7400".parse().unwrap());

    let two = parse(
        &dc(&format!(
            "[[peers]]\nname = \"dc-west\"\naddr = \"192.0.2.10:7400\"\nfingerprint = [\"{FP_A}\", \"{FP_B}\"]\n"
        )),
        "t",
        None,
    )
    .unwrap();
    let expected: Vec<Fingerprint> = vec![FP_A.parse().unwrap(), FP_B.parse().unwrap()];
    assert_eq!(two.peers[0].fingerprints, expected);

    let three = dc(&format!(
        "[[peers]]\nname = \"dc-west\"\naddr = \"192.0.2.10:7400\"\nfingerprint = [\"{FP_A}\", \"{FP_B}\", \"{FP_A}\"]\n"
    ));
    fails_on(&three, "peers[0].fingerprint");
    let empty = dc("[[peers]]\nname = \"dc-west\"\naddr = \"192.0.2.10:7400\"\nfingerprint = []\n");
    fails_on(&empty, "peers[0].fingerprint");
}

fn peer(name: &str, fp: &str) -> String {
    format!("[[peers]]\nname = \"{name}\"\naddr = \"127.0.0.1:7401\"\nfingerprint = \"{fp}\"\n")
}

#[test]
fn peer_errors_name_the_peer_and_field() {
    let no_fp = dc(&format!(
        "{}[[peers]]\nname = \"dc-b\"\naddr = \"127.0.0.1:1\"\n",
        peer("dc-a", FP_A)
    ));
    fails_on(&no_fp, "peers[1].fingerprint");
    let bad_hex = dc(&peer("dc-a", "xyz"));
    let e = fails_on(&bad_hex, "peers[0].fingerprint");
    assert!(e.reason.contains("64 hex"), "{e}");
    let in_list = dc(&format!(
        "[[peers]]\nname = \"dc-a\"\naddr = \"127.0.0.1:1\"\nfingerprint = [\"{FP_A}\", 7]\n"
    ));
    fails_on(&in_list, "peers[0].fingerprint[1]");
    let dup = dc(&format!("{}{}", peer("dc-a", FP_A), peer("dc-a", FP_B)));
    let e = fails_on(&dup, "peers[1].name");
    assert!(e.reason.contains("duplicate"), "{e}");
    fails_on(&dc(&peer("dc-east", FP_A)), "peers[0].name");
    let unresolvable = dc(&format!(
        "[[peers]]\nname = \"dc-a\"\naddr = \"no port here\"\nfingerprint = \"{FP_A}\"\n"
    ));
    fails_on(&unresolvable, "peers[0].addr");
}

#[test]
fn more_peers_than_peers_max_is_refused() {
    let text = dc(&format!(
        "{}{}[limits]\npeers_max = 1\n",
        peer("dc-a", FP_A),
        peer("dc-b", FP_B)
    ));
    let e = fails_on(&text, "peers");
    assert!(e.reason.contains("limits.peers_max"), "{e}");
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    let e = fails_on(&dc("[limits]\nframe_bytes = 1\n"), "limits.frame_bytes");
    assert!(e.reason.contains("unknown key"), "{e}");
    assert!(e.reason.contains("line 4"), "{e}");
    fails_on(&dc("colour = \"blue\"\n"), "colour");
    let in_second_peer = dc(&format!(
        "{}{}port = 1\n",
        peer("dc-a", FP_A),
        peer("dc-b", FP_B)
    ));
    fails_on(&in_second_peer, "peers[1].port");
}

#[test]
fn wrong_types_name_the_key() {
    fails_on(&dc("[limits]\npeers_max = \"many\"\n"), "limits.peers_max");
    fails_on(
        &dc("[limits]\nin_flight_max = -1\n"),
        "limits.in_flight_max",
    );
    let e = fails_on("role = \"datacenter\"\nname = \n", "line 2, column 8");
    assert!(e.to_string().starts_with("test.toml: line 2"), "{e}");
}

#[test]
fn bad_values_name_the_field() {
    let e = fails_on(
        &dc("[limits]\nlog_retention = \"5 parsecs\"\n"),
        "limits.log_retention",
    );
    assert!(
        e.reason.starts_with("invalid duration \"5 parsecs\": "),
        "{e}"
    );
    fails_on(
        &dc("[limits]\nframe_bytes_max = 1024\n"),
        "limits.frame_bytes_max",
    );
    fails_on(
        &dc("[limits]\nbatch_events_max = 0\n"),
        "limits.batch_events_max",
    );
    fails_on(
        &dc("[limits]\ncommit_events_max = 10\n"),
        "limits.commit_events_max",
    );
    fails_on(&dc("[log]\nlevel = \"info,[[\"\n"), "log.level");
    fails_on(&dc("listen = \"0.0.0.0\"\n"), "listen");
    fails_on("role = \"datacenter\"\nname = \"a b\"\n", "name");
    fails_on("role = \"datacenter\"\nname = \"\"\n", "name");
    fails_on(
        &format!("role = \"datacenter\"\nname = \"{}\"\n", "a".repeat(65)),
        "name",
    );
    fails_on("role = \"datacenter\"\n", "name");
    fails_on("role = \"chief\"\nname = \"x\"\n", "role");
}

#[test]
fn role_comes_from_the_flag_or_the_file() {
    let e = fails("name = \"x\"\n", None);
    assert_eq!(e.field, "role");
    let c = parse("name = \"x\"\n", "t", Some(Role::Controller)).unwrap();
    assert_eq!(c.role, Role::Controller);
    let c = parse(&dc(""), "t", Some(Role::Controller)).unwrap();
    assert_eq!(c.role, Role::Controller, "--role overrides the file");
}

#[test]
fn sections_of_another_role_are_refused() {
    let e = fails_on(&dc("[machine]\nservice = \"voice\"\n"), "machine");
    assert!(e.reason.contains("only a worker"), "{e}");
    let e = fails_on(&dc("[cluster]\ndown_after = \"5s\"\n"), "cluster");
    assert!(e.reason.contains("only a controller"), "{e}");
    let e = fails(&peer("dc-a", FP_A), Some(Role::Worker));
    assert_eq!(e.field, "peers");
}

fn worker(controller: &str, machine: &str) -> String {
    format!("role = \"worker\"\nname = \"w1\"\n{controller}{machine}")
}

#[test]
fn worker_needs_controller_and_machine() {
    let controller = format!("[controller]\naddr = \"127.0.0.1:7400\"\nfingerprint = \"{FP_A}\"\n");
    let machine = "[machine]\nservice = \"video\"\ncomponent = \"proxy\"\nload_balancer = \"lb-1\"\nservice_addr = \"127.0.0.1:5060\"\n";
    let c = parse(&worker(&controller, machine), "t", None).unwrap();
    let m = c.machine.unwrap();
    assert_eq!(
        (m.service.as_str(), m.component.as_str()),
        ("video", "proxy")
    );
    assert_eq!(m.load_balancer.as_deref(), Some("lb-1"));
    assert_eq!(c.controller.unwrap().fingerprint, FP_A.parse().unwrap());

    fails_on(&worker(&controller, ""), "machine");
    fails_on(&worker("", machine), "controller");
    fails_on(
        &worker(&controller, "[machine]\nservice = \"voice\"\n"),
        "machine.component",
    );
    fails_on(
        &worker(
            &controller,
            "[machine]\nservice = \"fax\"\ncomponent = \"proxy\"\n",
        ),
        "machine.service",
    );
    fails_on(
        &worker("[controller]\naddr = \"127.0.0.1:7400\"\n", machine),
        "controller.fingerprint",
    );
}

#[test]
fn unreadable_join_token_file_names_the_field() {
    let text = "role = \"controller\"\nname = \"c\"\n[admission]\njoin_token_file = \"/nonexistent/outpost/join-token\"\n";
    let e = fails_on(text, "admission.join_token_file");
    assert!(e.reason.contains("No such file"), "{e}");
}

#[test]
fn token_is_created_once_with_mode_0640() {
    let dir = std::env::temp_dir().join(format!("outpost-token-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let t = ensure_token(&dir).unwrap();
    assert_eq!(t.len(), 64);
    assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(ensure_token(&dir).unwrap(), t, "an existing token is kept");
    assert_eq!(read_token(&dir).unwrap(), t);
    let mode = fs::metadata(dir.join(TOKEN_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    fs::remove_dir_all(&dir).unwrap();
}

/// The Debian package installs these as /etc/outpost/ROLE.toml (conffiles): each role's starter
/// config with `data_dir = "/var/lib/outpost/ROLE"`, the unit's StateDirectory.
const PACKAGED: [(Role, &str, &str); 3] = [
    (
        Role::Datacenter,
        "dc-1",
        include_str!("../../../systemd/deb/datacenter.toml"),
    ),
    (
        Role::Controller,
        "controller-1",
        include_str!("../../../systemd/deb/controller.toml"),
    ),
    (
        Role::Worker,
        "worker-1",
        include_str!("../../../systemd/deb/worker.toml"),
    ),
];

/// `UPDATE_PACKAGED_CONFIGS=1 cargo test ... packaged_configs` rewrites them from the starter.
#[test]
fn packaged_configs_are_the_role_starters_with_per_role_data_dirs() {
    for (role, name, shipped) in PACKAGED {
        let data_dir = Path::new(DEFAULT_DATA_DIR).join(role.as_str());
        let expected = starter(role, name, &data_dir);
        if shipped != expected && std::env::var_os("UPDATE_PACKAGED_CONFIGS").is_some() {
            let path =
                Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../systemd/deb/{role}.toml"));
            fs::write(&path, &expected).unwrap();
            continue;
        }
        assert_eq!(
            shipped, expected,
            "regenerate systemd/deb/{role}.toml: UPDATE_PACKAGED_CONFIGS=1 cargo test packaged_configs"
        );
        let shipped = shipped.replace(FINGERPRINT_PLACEHOLDER, FP_A);
        let c = parse(&shipped, "packaged", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.role, c.data_dir), (role, data_dir));
    }
}

#[test]
fn cluster_bounds_are_read_and_bad_ones_name_their_field() {
    let ctl = |extra: &str| format!("role = \"controller\"\nname = \"ctl\"\n[cluster]\n{extra}");
    let c = parse(
        &ctl("channel_max = 64\nbundle_keep_unused = \"2h\"\n"),
        "t",
        None,
    )
    .unwrap();
    assert_eq!(c.cluster.channel_max, 64);
    assert_eq!(c.cluster.bundle_keep_unused, Duration::from_secs(7200));
    for (text, field) in [
        ("channel_max = 4\n", "cluster.channel_max"),
        ("channel_max = 1000000\n", "cluster.channel_max"),
        (
            "bundle_keep_unused = \"10s\"\n",
            "cluster.bundle_keep_unused",
        ),
        (
            "bundle_keep_unused = \"soon\"\n",
            "cluster.bundle_keep_unused",
        ),
    ] {
        fails_on(&ctl(text), field);
    }
}
