//! Replays the committed fuzz corpora (`fixtures/fuzz/<target>/`) through the same functions the
//! cargo-fuzz targets run, on stable Rust, so CI catches a regression on any input a fuzzer once
//! found interesting. Also measures what postcard allocates for hostile length prefixes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use outpost::cluster::body::{Body, Dependent, DeployOrder, LbRoute, Pool, PoolMember};
use outpost::cluster::keys::ControllerKey;
use outpost::fuzzing::{
    fuzz_api_event, fuzz_api_event_batch, fuzz_config, fuzz_controller_deployment,
    fuzz_controller_join, fuzz_controller_keys, fuzz_datacenter_hello, fuzz_fingerprints,
    fuzz_token_proof, fuzz_worker_admission,
};
use outpost::ids::{Fingerprint, NodeId};
use outpost::wire::{
    decode_frame, decode_message, encode_frame, fuzz_cluster_body, fuzz_element_json,
    fuzz_seal_key, fuzz_wire_frame, fuzz_worker, fuzz_worker_publication,
    fuzz_worker_publication_envelope, fuzz_worker_publication_plaintext, Admission, FrameError,
    Hello, Join, MachineReport, Message, Notify, OriginMark, Publication, Relay, Role,
    CLUSTER_PROTOCOL_VERSION, FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION,
};
use serde_json::json;

/// A fuzz target's body.
type Target = fn(&[u8]);

/// Every fuzz target but the bundle ones (`bundle_fuzz_corpus.rs`), by name, as
/// `fuzz/fuzz_targets/<name>.rs` runs it.
const TARGETS: [(&str, Target); 14] = [
    ("wire_frame", fuzz_wire_frame),
    ("element_json", fuzz_element_json),
    ("cluster_body", fuzz_cluster_body),
    ("worker_publication", fuzz_worker_publication),
    (
        "worker_publication_envelope",
        fuzz_worker_publication_envelope,
    ),
    (
        "worker_publication_plaintext",
        fuzz_worker_publication_plaintext,
    ),
    ("api_event", fuzz_api_event),
    ("api_event_batch", fuzz_api_event_batch),
    ("controller_deployment", fuzz_controller_deployment),
    ("controller_keys", fuzz_controller_keys),
    ("config_toml", fuzz_config),
    ("datacenter_hello", fuzz_datacenter_hello),
    ("controller_join", fuzz_controller_join),
    ("worker_admission", fuzz_worker_admission),
];

/// Every target's `fuzz/fuzz_targets/<name>.rs` exists and is replayed here or in
/// `bundle_fuzz_corpus.rs`, and every committed corpus belongs to a target.
#[test]
fn fuzz_corpus_covers_every_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut targets: Vec<String> = std::fs::read_dir(root.join("fuzz/fuzz_targets"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    targets.sort();
    let mut replayed: Vec<String> = TARGETS
        .iter()
        .map(|(t, _)| t.to_string())
        .chain(["bundle_manifest", "bundle_archive", "bundle_paths"].map(String::from))
        .collect();
    replayed.sort();
    assert_eq!(targets, replayed, "a fuzz target that CI does not replay");
    let mut corpora: Vec<String> = std::fs::read_dir(root.join("fixtures/fuzz"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    corpora.sort();
    assert_eq!(
        corpora, replayed,
        "a corpus without a target, or a target without one"
    );
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/fuzz")
        .join(target)
}

#[test]
fn fuzz_corpus_replays_without_panic() {
    let mut failures = Vec::new();
    for (target, run) in TARGETS {
        let dir = corpus_dir(target);
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        for path in files {
            let data = std::fs::read(&path).unwrap();
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "panicked on: {}", failures.join(", "));
}

fn blessing() -> bool {
    std::env::var_os("OUTPOST_BLESS").is_some_and(|v| v == "1")
}

fn sample_pool() -> Pool {
    Pool {
        members: vec![PoolMember {
            name: "media-1".into(),
            node_id: NodeId(0x11),
            service_addr: Some("10.0.1.5:5060".into()),
            fingerprint: Fingerprint([0xa5; 32]),
        }],
        dependents: vec![
            Dependent {
                name: "media-1".into(),
                node_id: NodeId(0x11),
                fingerprint: Fingerprint([0xa5; 32]),
            },
            Dependent {
                name: "media-2".into(),
                node_id: NodeId(0x12),
                fingerprint: Fingerprint([0xa6; 32]),
            },
        ],
    }
}

fn sample_route() -> LbRoute {
    LbRoute {
        name: "lb-1".into(),
        node_id: NodeId(0x07),
        addr: "10.0.1.1:7443".into(),
        fingerprint: Fingerprint([0x5a; 32]),
    }
}

/// Seed inputs of the cluster targets: valid ones and broken ones. `worker_publication` seeds
/// start with the mode byte that `fuzz_worker_publication` documents.
fn cluster_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let pool = Body::Pool(sample_pool()).encode();
    let route = Body::LoadBalancer(Some(sample_route())).encode();
    let deploy = Body::Deploy(DeployOrder {
        deployment: 3,
        bundle_id: "9f2c4e1a".repeat(8),
        service: "voice".into(),
        version: "1.4.2".into(),
        sealed_bytes: 1 << 20,
        sealed_hash: [0x3c; 32],
    })
    .encode();
    let mut seeds = vec![
        ("cluster_body", "pool", pool.clone()),
        (
            "cluster_body",
            "pool_empty",
            Body::Pool(Pool::default()).encode(),
        ),
        ("cluster_body", "route", route.clone()),
        (
            "cluster_body",
            "route_none",
            Body::LoadBalancer(None).encode(),
        ),
        ("cluster_body", "empty", vec![]),
        ("cluster_body", "bad_variant", vec![9, 0, 0]),
        ("cluster_body", "deploy", deploy.clone()),
        (
            "cluster_body",
            "deploy_truncated",
            deploy[..deploy.len() - 1].to_vec(),
        ),
        ("cluster_body", "trailing", [&pool[..], &[0]].concat()),
        ("cluster_body", "truncated", pool[..pool.len() / 2].to_vec()),
        // A member count of 2^35 and nothing behind it.
        (
            "cluster_body",
            "huge_count",
            vec![0, 0x80, 0x80, 0x80, 0x80, 0x01],
        ),
        // Members: one, name of 2 bytes that are not UTF-8.
        ("cluster_body", "bad_utf8", vec![0, 1, 2, 0xc3, 0x28]),
        // Route Some, the name's length (4) as an over-long varint.
        (
            "cluster_body",
            "overlong_varint",
            [&[1u8, 1, 0x84, 0x80, 0x00][..], &route[3..]].concat(),
        ),
        ("cluster_body", "bad_option_tag", vec![1, 7]),
    ];
    let w = fuzz_worker();
    let next = w.publication(&pool);
    let mut old = w
        .controller
        .publication(w.node_id, w.applied, &w.seal.recipient(), &pool)
        .unwrap();
    old.seq = w.applied; // already applied: acknowledged again, nothing changes
    let other = w
        .controller
        .publication(NodeId(0xdead), w.applied + 1, &w.seal.recipient(), &pool)
        .unwrap();
    let forger = ControllerKey::from_secret(&[0x99; 32]).unwrap();
    let forged = forger
        .publication(w.node_id, w.applied + 1, &w.seal.recipient(), &pool)
        .unwrap();
    let mut altered = next.clone();
    altered.sealed[40] ^= 1;
    let garbage_body = w.publication(b"\x05 not a body");
    let frame = |mode: u8, m: Message| [&[mode][..], &encode_frame(&m)].concat();
    let relay = |p: &Publication| {
        Message::Relay(Relay {
            to: w.node_id,
            publication: p.clone(),
        })
    };
    // Mode 3 signs these itself.
    let signed_sealed = |sealed: &[u8]| [&[3u8][..], sealed].concat();
    seeds.extend([
        (
            "worker_publication",
            "frame_next",
            frame(0, Message::Publication(next.clone())),
        ),
        (
            "worker_publication",
            "frame_next_route",
            frame(0, Message::Publication(w.publication(&route))),
        ),
        (
            "worker_publication",
            "frame_relay_next",
            frame(0, relay(&next)),
        ),
        (
            "worker_publication",
            "frame_old",
            frame(0, Message::Publication(old)),
        ),
        (
            "worker_publication",
            "frame_other_machine",
            frame(0, Message::Publication(other)),
        ),
        (
            "worker_publication",
            "frame_forged",
            frame(0, Message::Publication(forged)),
        ),
        (
            "worker_publication",
            "frame_altered",
            frame(0, relay(&altered)),
        ),
        (
            "worker_publication",
            "frame_not_a_body",
            frame(0, Message::Publication(garbage_body)),
        ),
        (
            "worker_publication",
            "frame_heartbeat",
            frame(0, Message::Heartbeat),
        ),
        ("worker_publication", "frame_truncated", {
            let f = frame(0, Message::Publication(next.clone()));
            f[..f.len() - 10].to_vec()
        }),
        (
            "worker_publication",
            "postcard_next",
            [&[1u8][..], &postcard::to_stdvec(&next).unwrap()].concat(),
        ),
        (
            "worker_publication",
            "postcard_garbage",
            vec![1, 0xff, 0xff, 0xff],
        ),
        (
            "worker_publication",
            "forged_zero_signature",
            [&[2u8][..], &[0u8; 64], b"age-encryption.org/v1\n"].concat(),
        ),
        ("worker_publication", "forged_short", vec![2, 1, 2, 3]),
        (
            "worker_publication",
            "signed_garbage",
            signed_sealed(b"not age at all"),
        ),
        (
            "worker_publication",
            "signed_age_header_only",
            signed_sealed(b"age-encryption.org/v1\n-> X25519 AAAA\n--- AAAA\n"),
        ),
        (
            "worker_publication",
            "signed_altered_ciphertext",
            signed_sealed(&altered.sealed),
        ),
        (
            "worker_publication",
            "plain_pool",
            [&[4u8][..], &pool].concat(),
        ),
        (
            "worker_publication",
            "plain_route",
            [&[4u8][..], &route].concat(),
        ),
        (
            "worker_publication",
            "plain_route_none",
            [&[4u8][..], &Body::LoadBalancer(None).encode()].concat(),
        ),
        (
            "worker_publication",
            "plain_deploy",
            [&[4u8][..], &deploy].concat(),
        ),
        ("worker_publication", "plain_garbage", vec![4, 9, 9, 9]),
        ("worker_publication", "plain_empty", vec![4]),
        ("worker_publication", "empty", vec![]),
    ]);
    seeds
}

fn frame(m: &Message) -> Vec<u8> {
    encode_frame(m)
}

fn with(first: u8, rest: &[u8]) -> Vec<u8> {
    [&[first][..], rest].concat()
}

/// Seed inputs of the decoder targets (HTTP bodies, config, first frames), valid and broken.
fn decoder_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let j = |v: serde_json::Value| v.to_string().into_bytes();
    let register = json!({"account": "alice", "type": "register",
        "data": {"contact": "sip:alice@10.1.2.3", "expires_s": 600}});
    let call = json!({"account": "alice", "type": "call",
        "data": {"call_id": "call-1", "action": "start"}});
    let presence = json!({"account": "bob", "type": "presence", "data": {"status": "busy"}});
    let setting = json!({"account": "bob", "type": "setting", "data": {"key": "k1", "value": 3}});
    let element = json!({"account": "carol", "type": "element", "data": {"n": 1, "s": [1, "x"]}});
    let bundle_id = "9f2c4e1a".repeat(8);
    let w = fuzz_worker();
    let fps = fuzz_fingerprints();
    let join = |node: u128, name: &str, proof: Option<[u8; 32]>| {
        frame(&Message::Join(Join {
            protocol: CLUSTER_PROTOCOL_VERSION,
            node_id: NodeId(node),
            name: name.into(),
            service: "voice".into(),
            component: "media-processor".into(),
            load_balancer: Some("lb-1".into()),
            service_addr: Some("10.0.0.9:5060".into()),
            relay_addr: None,
            seal_key: fuzz_seal_key().recipient(),
            token_proof: proof,
            resume: 0,
        }))
    };
    let new_fp = fps.len() as u8 - 1;
    let notify = frame(&Message::Notify(Notify {
        machine: NodeId(0xaaaa_aaaa_0000_0000_0000_0000_0000_0001),
        seq: 1,
        report: MachineReport {
            state: "running".into(),
            software: None,
            detail: None,
            deployment: None,
        },
    }));
    let hello = |marks: Vec<OriginMark>, resume: Option<(u64, u64)>| {
        frame(&Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            node_id: NodeId(0x99),
            role: Role::Datacenter,
            name: "dc2".into(),
            log_epoch: 3,
            resume,
            marks,
        }))
    };
    let own = NodeId(0x00f0_0000_0000_0000_0000_0000_0000_0017);
    let next = w.publication(&Body::Pool(sample_pool()).encode());
    let admitted = |key: [u8; 32]| {
        frame(&Message::Admission(Admission::Admitted {
            controller_key: key,
            heartbeat_ms: 1000,
        }))
    };
    let deploy = |n: u64| {
        Body::Deploy(DeployOrder {
            deployment: n,
            bundle_id: bundle_id.clone(),
            service: "voice".into(),
            version: "1.4.2".into(),
            sealed_bytes: 1 << 20,
            sealed_hash: [0x3c; 32],
        })
        .encode()
    };
    let config = |role: Role| {
        outpost::config::starter(role, "node-1", Path::new("/var/lib/outpost")).into_bytes()
    };
    vec![
        ("api_event", "register", j(register.clone())),
        ("api_event", "call", j(call.clone())),
        ("api_event", "presence", j(presence.clone())),
        ("api_event", "setting", j(setting.clone())),
        ("api_event", "element", j(element.clone())),
        ("api_event", "bad_type", j(json!({"account": "a", "type": "fax", "data": {}}))),
        ("api_event", "empty_account", j(json!({"account": "", "type": "presence", "data": {"status": "x"}}))),
        ("api_event", "extra_field", j(json!({"account": "a", "type": "presence", "data": {"status": "x"}, "x": 1}))),
        ("api_event", "deep_nesting", format!("{{\"account\":\"a\",\"type\":\"element\",\"data\":{}1{}}}", "[".repeat(200), "]".repeat(200)).into_bytes()),
        ("api_event", "not_json", b"account=a".to_vec()),
        ("api_event_batch", "two", j(json!([register, presence]))),
        ("api_event_batch", "all_types", j(json!([call, setting, element, presence]))),
        ("api_event_batch", "empty", b"[]".to_vec()),
        ("api_event_batch", "second_bad", j(json!([presence, {"account": "a", "type": "call", "data": {"call_id": "c"}}]))),
        ("api_event_batch", "not_an_array", j(presence.clone())),
        ("controller_deployment", "valid", j(json!({"service": "voice", "bundle_id": bundle_id}))),
        ("controller_deployment", "machines", j(json!({"service": "video", "bundle_id": bundle_id, "machines": ["w-adm", "lb-1"]}))),
        ("controller_deployment", "bad_service", j(json!({"service": "fax", "bundle_id": bundle_id}))),
        ("controller_deployment", "traversal_id", j(json!({"service": "voice", "bundle_id": "../../../../etc/passwd"}))),
        ("controller_deployment", "unknown_field", j(json!({"service": "voice", "bundle_id": bundle_id, "force": true}))),
        ("controller_keys", "accept_name", with(0, b"w-pend")),
        ("controller_keys", "reject_name", with(1, b"w-adm")),
        ("controller_keys", "accept_id", with(0, NodeId(0xbbbb_0000_0000_0000_0000_0000_0000_0003).to_string().as_bytes())),
        ("controller_keys", "reject_prefix", with(1, b"cccc0000")),
        ("controller_keys", "ambiguous_prefix", with(0, b"AAAAAAAA")),
        ("controller_keys", "short_prefix", with(0, b"cccc")),
        ("controller_keys", "unknown", with(1, b" nobody ")),
        ("config_toml", "datacenter", config(Role::Datacenter)),
        ("config_toml", "controller", config(Role::Controller)),
        ("config_toml", "worker", config(Role::Worker)),
        ("config_toml", "peers", [config(Role::Datacenter), format!("\n[[peers]]\nname = \"dc2\"\naddr = \"192.0.2.2:7400\"\nfingerprints = [\"{}\"]\n", "ab".repeat(32)).into_bytes()].concat()),
        ("config_toml", "bad_role", b"role = \"router\"\nname = \"x\"\n".to_vec()),
        ("datacenter_hello", "no_marks", hello(vec![], None)),
        ("datacenter_hello", "resume", hello(vec![OriginMark { origin: NodeId(0x99), contiguous: 10, above: vec![12, 13] }], Some((7, 900)))),
        ("datacenter_hello", "holds_our_log", hello(vec![OriginMark { origin: own, contiguous: 60, above: vec![70] }], Some((7, 2000)))),
        ("datacenter_hello", "not_a_hello", frame(&Message::Heartbeat)),
        ("controller_join", "new_with_token", [with(new_fp, &join(0x77, "w-new", Some(fuzz_token_proof(&fps[new_fp as usize])))), frame(&Message::Heartbeat)].concat()),
        ("controller_join", "new_without_token", join(0x77, "w-new", None).iter().fold(vec![new_fp], |mut v, b| { v.push(*b); v })),
        ("controller_join", "new_token_other_cert", with(new_fp, &join(0x77, "w-new", Some(fuzz_token_proof(&fps[0]))))),
        ("controller_join", "admitted_reconnects", [with(0, &join(0xaaaa_aaaa_0000_0000_0000_0000_0000_0001, "w-adm", None)), notify, frame(&Message::PublicationAck { upto: 0 })].concat()),
        ("controller_join", "pending_with_token", with(1, &join(0xaaaa_aaaa_0000_0000_0000_0000_0000_0002, "w-pend", Some(fuzz_token_proof(&fps[1]))))),
        ("controller_join", "rejected_returns", with(2, &join(0xbbbb_0000_0000_0000_0000_0000_0000_0003, "w-rej", None))),
        ("controller_join", "id_on_another_key", with(new_fp, &join(0xaaaa_aaaa_0000_0000_0000_0000_0000_0001, "w-adm", None))),
        ("controller_join", "name_squatting", with(new_fp, &join(0x78, "w-adm", None))),
        ("controller_join", "heartbeat_first", with(0, &frame(&Message::Heartbeat))),
        ("worker_admission", "pending_then_admitted", [vec![0], frame(&Message::Admission(Admission::Pending)), admitted(w.controller.public()), frame(&Message::Publication(next.clone()))].concat()),
        ("worker_admission", "known_key_changed", [vec![1], admitted([7; 32])].concat()),
        ("worker_admission", "known_key_same", [vec![1], admitted(w.controller.public()), frame(&Message::NotifyAck { upto: 0 })].concat()),
        ("worker_admission", "rejected", [vec![0], frame(&Message::Admission(Admission::Rejected { reason: "no".into() }))].concat()),
        ("worker_admission", "publication_first", [vec![0], frame(&Message::Publication(next.clone()))].concat()),
        ("worker_publication_envelope", "frame_next", with(0, &frame(&Message::Publication(next.clone())))),
        ("worker_publication_envelope", "postcard_next", with(1, &postcard::to_stdvec(&next).unwrap())),
        ("worker_publication_envelope", "forged", [&[2u8][..], &[0u8; 64], &next.sealed].concat()),
        ("worker_publication_envelope", "relayed_next", with(3, &frame(&Message::Relay(Relay { to: w.node_id, publication: next.clone() })))),
        ("worker_publication_plaintext", "pool_on_lb", with(1, &Body::Pool(sample_pool()).encode())),
        ("worker_publication_plaintext", "route", with(0, &Body::LoadBalancer(Some(sample_route())).encode())),
        ("worker_publication_plaintext", "route_none", with(4, &Body::LoadBalancer(None).encode())),
        ("worker_publication_plaintext", "deploy_newer", with(2, &deploy(5))),
        ("worker_publication_plaintext", "deploy_replayed", with(2, &deploy(3))),
        ("worker_publication_plaintext", "garbage", vec![0, 9, 9, 9]),
    ]
}

/// `OUTPOST_BLESS=1 cargo test -p outpost --test fuzz_corpus` writes the decoder targets'
/// seeds; otherwise each must be in the committed corpus, and it replays.
#[test]
fn fuzz_corpus_holds_the_decoder_seeds() {
    for (target, name, data) in decoder_seeds() {
        let path = corpus_dir(target).join(name);
        if blessing() {
            std::fs::create_dir_all(corpus_dir(target)).unwrap();
            std::fs::write(&path, &data).unwrap();
        } else {
            assert!(
                path.exists(),
                "{} is missing (OUTPOST_BLESS=1 writes it)",
                path.display()
            );
        }
        let run = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
        run(&data);
    }
}

/// `OUTPOST_BLESS=1 cargo test -p outpost --test fuzz_corpus` writes the cluster targets'
/// seeds (their publications are sealed anew, so the bytes change; any valid ones will do).
/// Otherwise each seed must be in the committed corpus.
#[test]
fn fuzz_corpus_holds_the_cluster_seeds() {
    let seeds = cluster_seeds();
    for (target, name, data) in &seeds {
        let path = corpus_dir(target).join(name);
        if blessing() {
            std::fs::create_dir_all(corpus_dir(target)).unwrap();
            std::fs::write(&path, data).unwrap();
        } else {
            assert!(
                path.exists(),
                "{} is missing (OUTPOST_BLESS=1 writes it)",
                path.display()
            );
        }
    }
    // The seeds do what their names say: the valid publication applies.
    let (_, _, next) = seeds.iter().find(|(_, n, _)| *n == "frame_next").unwrap();
    let Ok((Message::Publication(p), _)) = decode_frame(&next[1..], FRAME_BYTES_MAX_DEFAULT) else {
        panic!("frame_next is a publication");
    };
    let w = fuzz_worker();
    let mut core = w.core();
    core.from_controller(Message::Publication(p)).unwrap();
    assert_eq!(core.record().applied, w.applied + 1);
    for (target, name, data) in &seeds {
        let run = TARGETS.iter().find(|(t, _)| t == target).unwrap().1;
        run(data);
        if *target == "cluster_body" {
            assert_eq!(
                Body::decode(data).is_ok(),
                [
                    "pool",
                    "pool_empty",
                    "route",
                    "route_none",
                    "overlong_varint",
                    "deploy"
                ]
                .contains(name),
                "{name}"
            );
        }
    }
}

// Counts the bytes allocated by the current thread while tracking is on. Tests run on threads
// of their own, so one test's measurement is not disturbed by another's.
//
// `unsafe` is the price of a global allocator: it only forwards to `System`, unchanged.
struct Tracking;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let on = TRACKING.try_with(Cell::get).unwrap_or(false);
    if on {
        let live = LIVE.with(|l| {
            l.set(l.get() + delta);
            l.get()
        });
        PEAK.with(|p| p.set(p.get().max(live)));
    }
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Peak bytes allocated (and not yet freed) on this thread while `f` runs.
fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, PEAK.with(Cell::get).max(0) as usize)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A frame: `prefix`, a varint claiming 2^60, then `pad` zero bytes.
fn claiming_frame(prefix: &[u8], pad: usize) -> Vec<u8> {
    let mut payload = prefix.to_vec();
    varint(1 << 60, &mut payload);
    payload.resize(payload.len() + pad, 0);
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend(payload);
    f
}

#[test]
fn bounded_memory_hostile_length_prefix_is_not_preallocated() {
    // Payload prefixes up to a sequence or string length, one for every place a length
    // travels. Variant indexes: Hello 0, Elements 1, CatchUpBatch 4, Snapshot 5, Goodbye 6.
    let record_head: &[u8] = &[1, 1]; // origin 1, oseq 1; the account length follows
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Hello: protocol 1, node 1, role 0, name "", epoch 0, resume None; then marks.
        ("hello.marks", vec![0, 1, 1, 0, 0, 0, 0]),
        // Hello with one mark (origin 1, contiguous 0); then its `above`.
        ("hello.marks[0].above", vec![0, 1, 1, 0, 0, 0, 0, 1, 1, 0]),
        // Elements: epoch, after, upto; then items.
        ("elements.items", vec![1, 0, 0, 9]),
        // Elements with one item (lseq 1), record head; then the account.
        (
            "elements.items[0].account",
            [&[1u8, 0, 0, 9, 1, 1][..], record_head].concat(),
        ),
        // ... account "a", etype 0, version (1, 0, 1); then the element bytes.
        (
            "elements.items[0].element",
            [
                &[1u8, 0, 0, 9, 1, 1][..],
                record_head,
                &[1, b'a', 0, 1, 0, 1],
            ]
            .concat(),
        ),
        // CatchUpBatch: origin; then items.
        ("catch_up_batch.items", vec![4, 1]),
        // Snapshot: epoch; then entries.
        ("snapshot.entries", vec![5, 0]),
        // Goodbye: code; then the reason.
        ("goodbye.reason", vec![6, 0]),
    ];
    for (what, prefix) in cases {
        let f = claiming_frame(&prefix, 96);
        let (r, peak) = peak_bytes(|| decode_frame(&f, FRAME_BYTES_MAX_DEFAULT));
        assert!(matches!(r, Err(FrameError::Decode(_))), "{what}: {r:?}");
        assert!(
            peak < 16 * 1024,
            "{what}: decoding a {}-byte frame that claims 2^60 items peaked at {peak} bytes",
            f.len()
        );
    }
}

#[test]
fn bounded_memory_decoded_size_stays_proportional_to_the_frame() {
    // The densest expansion there is: a Hello whose whole payload is empty marks, 3 bytes on
    // the wire and 48 in memory each, in a frame at the default limit. Decoding is bounded by
    // the frame limit times this ratio (plus vector growth); a lower limit bounds it lower.
    let marks = (FRAME_BYTES_MAX_DEFAULT - 16) / 3;
    let mut payload = vec![0, 1, 1, 0, 0, 0, 0];
    varint(marks as u64, &mut payload);
    payload.resize(payload.len() + marks * 3, 0);
    assert!(payload.len() <= FRAME_BYTES_MAX_DEFAULT);
    let (r, peak) = peak_bytes(|| decode_message(&payload).map(|_| ()));
    r.unwrap();
    let ratio = peak / payload.len();
    eprintln!(
        "densest Hello: {} payload bytes decode with a peak of {peak} bytes ({ratio}x)",
        payload.len()
    );
    assert!(ratio <= 40, "decoding peaked at {ratio}x the payload");
}
