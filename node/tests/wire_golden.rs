//! Golden bytes of every wire message: `fixtures/wire/<name>.bin` holds the whole frame of one
//! sample value, `<name>.txt` its description and hexdump. A change to a message that alters
//! the bytes of an existing one breaks older peers; this test is where that shows.
//!
//! `OUTPOST_BLESS=1 cargo test -p outpost --test wire_golden` rewrites the files (only for a
//! deliberate, new message or variant: existing bytes must never change).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use outpost::cluster::keys::{token_proof, ControllerKey, ControllerVerifier};
use outpost::ids::Fingerprint;
use outpost::ids::{MsgId, NodeId};
use outpost::model::{to_canonical, ElementRecord, EventType, Version};
use outpost::replication::Core;
use outpost::wire::{
    decode_frame, encode_frame, Admission, BundleHeader, BundleRequest, CatchUpBatch,
    CatchUpRequest, ConfigNotify, ConfigReport, Elements, Goodbye, Hello, Join, JoinRefusal,
    MachineReport, Message, Notify, OriginMark, Publication, Relay, RelayHello, Role,
    SnapshotChunk, SnapshotEnd, SnapshotEntry, Software, FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION,
};
use serde_json::json;

/// Variants of [`Message`]; [`variant_index`] must name each of them.
const VARIANTS: usize = 20;

/// No wildcard arm: a new variant does not compile until it is given a golden sample here.
fn variant_index(m: &Message) -> usize {
    match m {
        Message::Hello(_) => 0,
        Message::Elements(_) => 1,
        Message::Ack { .. } => 2,
        Message::CatchUpRequest(_) => 3,
        Message::CatchUpBatch(_) => 4,
        Message::Snapshot(_) => 5,
        Message::Goodbye(_) => 6,
        Message::Join(_) => 7,
        Message::Admission(_) => 8,
        Message::Publication(_) => 9,
        Message::PublicationAck { .. } => 10,
        Message::Notify(_) => 11,
        Message::NotifyAck { .. } => 12,
        Message::Heartbeat => 13,
        Message::RelayHello(_) => 14,
        Message::Relay(_) => 15,
        Message::BundleRequest(_) => 16,
        Message::BundleHeader(_) => 17,
        Message::ConfigNotify(_) => 18,
        Message::ConfigNotifyAck { .. } => 19,
    }
}

const DC_EAST: NodeId = NodeId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
const DC_WEST: NodeId = NodeId(0xfedc_ba98_7654_3210_8899_aabb_ccdd_eeff);
const WORKER: NodeId = NodeId(0x0000_0000_0000_0000_0000_0000_0000_002a);

fn version(ms: u64, logical: u32, node: NodeId) -> Version {
    Version { ms, logical, node }
}

/// A record as an origin would log it: canonical element, correct id.
fn record(
    origin: NodeId,
    oseq: u64,
    account: &str,
    etype: EventType,
    v: Version,
    element: serde_json::Value,
) -> ElementRecord {
    let mut rec = ElementRecord {
        origin,
        oseq,
        account: account.to_string(),
        etype,
        version: v,
        element: to_canonical(&element),
        msg_id: MsgId::default(),
    };
    rec.msg_id = rec.expected_id();
    rec
}

fn register_record() -> ElementRecord {
    let v = version(1_732_250_000_123, 0, DC_EAST);
    record(
        DC_EAST,
        41,
        "acct-1001",
        EventType::Register,
        v,
        json!({"contacts": {"sip:alice@10.0.0.1:5060": {
            "expires_at_ms": 1_732_250_300_123u64,
            "v": v.to_string(),
        }}}),
    )
}

fn call_record() -> ElementRecord {
    let v = version(1_732_250_000_200, 3, DC_WEST);
    record(
        DC_WEST,
        7,
        "acct-1002",
        EventType::Call,
        v,
        json!({"calls": {"c-8f2e@pbx": {
            "active": true,
            "since_ms": 1_732_250_000_200u64,
            "v": v.to_string(),
        }}}),
    )
}

fn presence_record() -> ElementRecord {
    record(
        DC_EAST,
        42,
        "acct-1001",
        EventType::Presence,
        version(1_732_250_000_300, 0, DC_EAST),
        json!({"status": "busy", "since_ms": 1_732_250_000_300u64}),
    )
}

/// Every golden sample: file name, what it shows, value.
fn samples() -> Vec<(&'static str, &'static str, Message)> {
    vec![
        (
            "hello",
            "Hello from a worker: no log, no resume point, no marks",
            Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                node_id: WORKER,
                role: Role::Worker,
                name: "lb-1".into(),
                log_epoch: 0,
                resume: None,
                marks: vec![],
            }),
        ),
        (
            "hello_marks",
            "Hello from a datacenter with a resume point and two origin marks, one with sequences above its watermark",
            Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                node_id: DC_EAST,
                role: Role::Datacenter,
                name: "dc-east".into(),
                log_epoch: 0x5eed_0000_0000_0001,
                resume: Some((0x5eed_0000_0000_0002, 1_000)),
                marks: vec![
                    OriginMark {
                        origin: DC_EAST,
                        contiguous: 42,
                        above: vec![],
                    },
                    OriginMark {
                        origin: DC_WEST,
                        contiguous: 7,
                        above: vec![9, 10, 300],
                    },
                ],
            }),
        ),
        (
            "elements",
            "Elements: two records (register, call) of the sender's log slice (40, 45]",
            Message::Elements(Elements {
                epoch: 0x5eed_0000_0000_0001,
                after: 40,
                upto: 45,
                items: vec![(41, register_record()), (44, call_record())],
            }),
        ),
        (
            "elements_empty",
            "Elements: an empty slice (every record's origin was the receiver)",
            Message::Elements(Elements {
                epoch: 3,
                after: 100,
                upto: 102,
                items: vec![],
            }),
        ),
        (
            "ack",
            "Ack of the receiver's log up to 45 in an epoch",
            Message::Ack {
                epoch: 0x5eed_0000_0000_0001,
                upto: 45,
            },
        ),
        (
            "catch_up_request",
            "CatchUpRequest for dc-west's log above sequence 7, at most 256 records",
            Message::CatchUpRequest(CatchUpRequest {
                origin: DC_WEST,
                after_oseq: 7,
                max: 256,
            }),
        ),
        (
            "catch_up_batch",
            "CatchUpBatch of two dc-east records, the last one held",
            Message::CatchUpBatch(CatchUpBatch {
                origin: DC_EAST,
                items: vec![register_record(), presence_record()],
                done: true,
            }),
        ),
        (
            "snapshot",
            "Snapshot: the last chunk, one entry, with its marks and resume point",
            Message::Snapshot(SnapshotChunk {
                epoch: 9,
                entries: vec![snapshot_entry(register_record())],
                end: Some(SnapshotEnd {
                    marks: vec![OriginMark {
                        origin: DC_EAST,
                        contiguous: 41,
                        above: vec![],
                    }],
                    resume_after: 512,
                }),
            }),
        ),
        (
            "snapshot_partial",
            "Snapshot: a chunk that is not the last, two entries",
            Message::Snapshot(SnapshotChunk {
                epoch: 9,
                entries: vec![
                    snapshot_entry(call_record()),
                    snapshot_entry(presence_record()),
                ],
                end: None,
            }),
        ),
        (
            "goodbye",
            "Goodbye with a code and a reason",
            Message::Goodbye(Goodbye {
                code: 2,
                reason: "protocol version 2 is not 1".into(),
            }),
        ),
        (
            "join",
            "Join from a dependent behind lb-1, with a join-token proof, resuming after publication 17",
            Message::Join(Join {
                protocol: PROTOCOL_VERSION,
                node_id: WORKER,
                name: "media-1".into(),
                service: "voice".into(),
                component: "media-processor".into(),
                load_balancer: Some("lb-1".into()),
                service_addr: Some("10.0.1.5:5060".into()),
                relay_addr: None,
                seal_key: SEAL_RECIPIENT.into(),
                token_proof: Some(token_proof(b"join-token", &WORKER_FP)),
                resume: 17,
            }),
        ),
        (
            "join_lb",
            "Join from a load balancer: its relay address, no token, nothing applied yet",
            Message::Join(Join {
                protocol: PROTOCOL_VERSION,
                node_id: LB,
                name: "lb-1".into(),
                service: "voice".into(),
                component: "load-balancer".into(),
                load_balancer: None,
                service_addr: Some("10.0.1.1:5060".into()),
                relay_addr: Some("10.0.1.1:7443".into()),
                seal_key: SEAL_RECIPIENT.into(),
                token_proof: None,
                resume: 0,
            }),
        ),
        (
            "admission_pending",
            "Admission: recorded as pending, waiting for an operator",
            Message::Admission(Admission::Pending),
        ),
        (
            "admission_admitted",
            "Admission: admitted, with the controller's Ed25519 key and the heartbeat period",
            Message::Admission(Admission::Admitted {
                controller_key: controller_key().public(),
                heartbeat_ms: 2_500,
            }),
        ),
        (
            "admission_rejected",
            "Admission: rejected, with the reason",
            Message::Admission(Admission::Rejected {
                reason: "key rejected by an operator".into(),
            }),
        ),
        (
            "admission_pending_token_not_accepted",
            "Admission: recorded as pending; the join token it presented was not accepted",
            Message::Admission(Admission::PendingTokenNotAccepted),
        ),
        (
            "admission_refused_name_taken",
            "Admission: refused for now, the name belongs to another key",
            Message::Admission(Admission::Refused(JoinRefusal::NameTaken)),
        ),
        (
            "admission_refused_too_many_waiting",
            "Admission: refused for now, too many machines wait for an operator",
            Message::Admission(Admission::Refused(JoinRefusal::TooManyWaiting)),
        ),
        (
            "admission_refused_node_id_not_proven",
            "Admission: refused, the node id is not the one its certificate carries",
            Message::Admission(Admission::Refused(JoinRefusal::NodeIdNotProven)),
        ),
        (
            "admission_refused_node_id_taken",
            "Admission: refused, the node id belongs to another key",
            Message::Admission(Admission::Refused(JoinRefusal::NodeIdTaken)),
        ),
        (
            "publication",
            "Publication 18 of a dependent's channel, signed by the controller (the sealed bytes are a short placeholder, not real age output)",
            Message::Publication(publication()),
        ),
        (
            "publication_ack",
            "PublicationAck: the sender's channel applied up to 18",
            Message::PublicationAck { upto: 18 },
        ),
        (
            "notify",
            "Notify: a machine reports it runs a bundle",
            Message::Notify(Notify {
                machine: WORKER,
                seq: 3,
                report: MachineReport {
                    state: "running".into(),
                    software: Some(Software {
                        service: "voice".into(),
                        bundle_id: "9f2c4e1a".into(),
                        version: "1.4.2".into(),
                    }),
                    detail: None,
                    deployment: Some(3),
                },
            }),
        ),
        (
            "notify_rolled_back",
            "Notify: a failed health check rolled back, with the reason and no software",
            Message::Notify(Notify {
                machine: WORKER,
                seq: 4,
                report: MachineReport {
                    state: "rolled_back".into(),
                    software: None,
                    detail: Some("health check: connection refused".into()),
                    deployment: Some(4),
                },
            }),
        ),
        (
            "notify_ack",
            "NotifyAck: the receiver's notifications recorded up to 4",
            Message::NotifyAck { upto: 4 },
        ),
        ("heartbeat", "Heartbeat: the worker is alive", Message::Heartbeat),
        (
            "relay_hello",
            "RelayHello: a dependent's first frame to its load balancer",
            Message::RelayHello(RelayHello {
                protocol: PROTOCOL_VERSION,
                node_id: WORKER,
                name: "media-1".into(),
            }),
        ),
        (
            "relay",
            "Relay: the controller asks lb-1 to forward publication 18 to its dependent",
            Message::Relay(Relay {
                to: WORKER,
                publication: publication(),
            }),
        ),
        (
            "bundle_request",
            "BundleRequest: a dependent resumes the bundle of deployment 4, sealed to it, at byte 65536",
            Message::BundleRequest(BundleRequest {
                deployment: 4,
                machine: WORKER,
                offset: 65_536,
            }),
        ),
        (
            "bundle_header",
            "BundleHeader: the sealed bundle is 3 MiB; the bytes that follow start at 65536",
            Message::BundleHeader(BundleHeader {
                total: 3 << 20,
                offset: 65_536,
            }),
        ),
        (
            "config_notify",
            "ConfigNotify: the worker's 3rd configuration report, version 12 rolled back",
            Message::ConfigNotify(ConfigNotify {
                machine: WORKER,
                seq: 3,
                report: ConfigReport {
                    version: 12,
                    state: "rolled_back".into(),
                    detail: Some("the software failed its health check after it".into()),
                },
            }),
        ),
        (
            "config_notify_ack",
            "ConfigNotifyAck: configuration reports up to 3 recorded",
            Message::ConfigNotifyAck { upto: 3 },
        ),
    ]
}

/// The load balancer of the cluster samples.
const LB: NodeId = NodeId(0x0000_0000_0000_0000_0000_0000_0000_0007);
/// The worker's certificate fingerprint (what its token proof is bound to).
const WORKER_FP: Fingerprint = Fingerprint([0xa5; 32]);
/// An age X25519 recipient (of a throwaway identity).
const SEAL_RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

/// A fixed signing key: Ed25519 signatures are deterministic, so the golden bytes are too.
fn controller_key() -> ControllerKey {
    ControllerKey::from_secret(&[0x11; 32]).unwrap()
}

/// Sealed bytes stand in for age output (which is randomized); the signature is real.
fn publication() -> Publication {
    let key = controller_key();
    let sealed = b"age-encryption.org/v1\n-> X25519 placeholder\n".to_vec();
    let digest = outpost::cluster::keys::publication_digest(WORKER, 18, &sealed);
    Publication {
        machine: WORKER,
        seq: 18,
        signature: key.sign_digest(&digest),
        sealed,
    }
}

fn snapshot_entry(rec: ElementRecord) -> SnapshotEntry {
    SnapshotEntry {
        account: rec.account,
        etype: rec.etype,
        version: rec.version,
        origin: rec.origin,
        msg_id: rec.msg_id,
        element: rec.element,
    }
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/wire")
}

/// Description, then a hexdump of the frame, 16 bytes a line.
fn describe(what: &str, frame: &[u8]) -> String {
    let mut s = format!(
        "{what}\n{} bytes: u32 BE payload length, then postcard(Message)\n",
        frame.len()
    );
    for (i, line) in frame.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        s.push_str(&format!(
            "{:06x}  {:<47}  |{ascii}|\n",
            i * 16,
            hex.join(" ")
        ));
    }
    s
}

fn blessing() -> bool {
    std::env::var_os("OUTPOST_BLESS").is_some_and(|v| v == "1")
}

#[test]
fn golden_bytes_of_every_message() {
    let dir = dir();
    if blessing() {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut failures = Vec::new();
    for (name, what, msg) in samples() {
        let frame = encode_frame(&msg);
        let text = describe(what, &frame);
        let bin_path = dir.join(format!("{name}.bin"));
        let txt_path = dir.join(format!("{name}.txt"));
        if blessing() {
            std::fs::write(&bin_path, &frame).unwrap();
            std::fs::write(&txt_path, &text).unwrap();
            continue;
        }
        let golden = std::fs::read(&bin_path)
            .unwrap_or_else(|e| panic!("{}: {e} (OUTPOST_BLESS=1 writes it)", bin_path.display()));
        if golden != frame {
            failures.push(format!(
                "{name}: encoding differs from {}",
                bin_path.display()
            ));
        }
        match decode_frame(&golden, FRAME_BYTES_MAX_DEFAULT) {
            Ok((back, used)) if back == msg && used == golden.len() => {}
            other => failures.push(format!("{name}: golden bytes decode to {other:?}")),
        }
        if std::fs::read_to_string(&txt_path).ok().as_deref() != Some(text.as_str()) {
            failures.push(format!("{name}: {} is stale", txt_path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_samples_cover_every_variant_and_file() {
    let samples = samples();
    let covered: BTreeSet<usize> = samples.iter().map(|(_, _, m)| variant_index(m)).collect();
    assert_eq!(
        covered,
        (0..VARIANTS).collect(),
        "a Message variant has no golden sample"
    );
    if blessing() {
        return;
    }
    let names: BTreeSet<String> = samples.iter().map(|(n, _, _)| n.to_string()).collect();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        assert!(
            names.contains(&stem),
            "{} has no sample in this test",
            path.display()
        );
    }
}

#[test]
fn golden_records_pass_the_receivers_checks() {
    for (name, _, msg) in samples() {
        match &msg {
            Message::Elements(e) => {
                Core::check_elements(e).unwrap_or_else(|err| panic!("{name}: {err}"));
            }
            Message::CatchUpBatch(b) => {
                for rec in &b.items {
                    Core::check_record(rec).unwrap_or_else(|err| panic!("{name}: {err}"));
                }
            }
            Message::Publication(p) | Message::Relay(Relay { publication: p, .. }) => {
                ControllerVerifier::from_bytes(&controller_key().public())
                    .unwrap()
                    .verify_publication(p)
                    .unwrap_or_else(|err| panic!("{name}: {err}"));
            }
            Message::Join(j) => {
                outpost::cluster::keys::parse_recipient(&j.seal_key)
                    .unwrap_or_else(|err| panic!("{name}: {err}"));
            }
            _ => {}
        }
    }
}
