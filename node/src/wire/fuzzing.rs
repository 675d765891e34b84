//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, as plain functions, so that the
//! stable test `tests/fuzz_corpus.rs` replays the committed corpus through exactly the same code.
//!
//! Each takes arbitrary bytes and panics only when a property of the decoders is broken; an
//! `Err` on bad input is the expected outcome, not a finding.

use std::cell::RefCell;

use serde_json::Value;

use super::{
    decode_frame, decode_message, encode_frame, Admission, Message, Publication,
    FRAME_BYTES_MAX_DEFAULT, SIGNATURE_BYTES,
};
use crate::cluster::body::Body;
use crate::cluster::keys::{publication_digest, ControllerKey, ControllerVerifier, SealKey};
use crate::cluster::worker::core::{JoinInfo, WorkerCore, WorkerRecord, WorkerRefusal};
use crate::ids::{MsgId, NodeId};
use crate::model::events::{check_element, merge};
use crate::model::{to_canonical, ElementRecord, EventType, Version};
use crate::replication::Core;

/// Target `wire_frame`: bytes from a peer's stream, through the frame decoder and, for
/// records, the checks a datacenter runs before it stores anything.
pub fn fuzz_wire_frame(data: &[u8]) {
    let Ok((msg, used)) = decode_frame(data, FRAME_BYTES_MAX_DEFAULT) else {
        return;
    };
    assert!(used <= data.len(), "consumed more than the input");
    // Postcard accepts over-long varints, so the input need not be canonical; the canonical
    // encoding is never longer, and decodes back to the same message.
    let again = encode_frame(&msg);
    assert!(again.len() <= used, "re-encoding grew the frame");
    assert_eq!(
        decode_message(&again[4..]).expect("own encoding decodes"),
        msg
    );
    match &msg {
        Message::Elements(frame) => {
            if let Ok(els) = Core::check_elements(frame) {
                assert_eq!(els.len(), frame.items.len());
                for ((_, rec), el) in frame.items.iter().zip(&els) {
                    assert_checked(rec, el);
                }
            }
        }
        Message::CatchUpBatch(batch) => {
            for rec in &batch.items {
                if let Ok(el) = Core::check_record(rec) {
                    assert_checked(rec, &el);
                }
            }
        }
        Message::Hello(_)
        | Message::Ack { .. }
        | Message::CatchUpRequest(_)
        | Message::Snapshot(_)
        | Message::Goodbye(_) => {}
        // A publication's contents are checked by the worker (`fuzz_worker_publication`).
        _ => {}
    }
}

/// Target `element_json`: arbitrary bytes as the element of an otherwise valid record (its id
/// recomputed, so only the element can be wrong), for every event type.
pub fn fuzz_element_json(data: &[u8]) {
    let node = NodeId(0x00112233_44556677_8899aabb_ccddeeff);
    for etype in EventType::ALL {
        let mut rec = ElementRecord {
            origin: node,
            oseq: 1,
            account: "fuzz".to_string(),
            etype,
            version: Version {
                ms: 1_732_250_000_000,
                logical: 0,
                node,
            },
            element: data.to_vec(),
            msg_id: MsgId::default(),
        };
        rec.msg_id = rec.expected_id();
        if let Ok(el) = Core::check_record(&rec) {
            assert_checked(&rec, &el);
        }
    }
}

/// What must hold of every record [`Core::check_record`] accepted: the element is the
/// canonical form of what it returned, of the right shape, and merging it with itself (a
/// retransmitted copy) changes nothing and stays well formed.
fn assert_checked(rec: &ElementRecord, el: &Value) {
    assert_eq!(
        to_canonical(el),
        rec.element,
        "accepted a non-canonical element"
    );
    check_element(rec.etype, el).expect("accepted element has its type's shape");
    let merged = merge(rec.etype, Some((el, rec.version)), el, rec.version);
    assert_eq!(&merged, el, "merging an element with itself changed it");
    check_element(rec.etype, &merged).expect("merge keeps the shape");
}

/// Target `cluster_body`: the plaintext of an opened publication, through [`Body::decode`].
/// What decodes re-encodes canonically (never longer), decodes back to itself, and refuses a
/// trailing byte.
pub fn fuzz_cluster_body(data: &[u8]) {
    let Ok(body) = Body::decode(data) else {
        return;
    };
    let again = body.encode();
    assert!(again.len() <= data.len(), "re-encoding grew the body");
    assert_eq!(Body::decode(&again).expect("own encoding decodes"), body);
    let mut longer = again;
    longer.push(0);
    assert!(
        Body::decode(&longer).is_err(),
        "a trailing byte was accepted"
    );
}

/// The fixed keys of the `worker_publication` target, so that its corpus can hold valid
/// publications: the worker's node id, its seal key, and the controller's signing key.
pub struct FuzzWorker {
    pub node_id: NodeId,
    pub seal: SealKey,
    pub controller: ControllerKey,
    /// The worker's `applied` before each input: a publication must be `applied + 1`.
    pub applied: u64,
}

/// An x25519 secret of bytes 1..=32 (bech32), not a secret of anything real.
const FUZZ_SEAL_SECRET: &str =
    "AGE-SECRET-KEY-1QYPQXPQ9QCRSSZG2PVXQ6RS0ZQG3YYC5Z5TPWXQERGD3C8G7RUSQGPQYEE";

pub fn fuzz_worker() -> FuzzWorker {
    FuzzWorker {
        node_id: FUZZ_WORKER_NODE,
        seal: fuzz_seal_key(),
        controller: ControllerKey::from_secret(&[0x42; 32]).expect("fixed signing key"),
        applied: FUZZ_WORKER_APPLIED,
    }
}

/// The worker's node id and its `applied`, as in [`fuzz_worker`].
const FUZZ_WORKER_NODE: NodeId = NodeId(0x00f0_0000_0000_0000_0000_0000_0000_0042);
const FUZZ_WORKER_APPLIED: u64 = 5;

/// The fixed controller's public signing key (what [`fuzz_worker`]'s controller signs with).
pub fn fuzz_worker_controller_key() -> [u8; 32] {
    WORKER.with(|w| w.controller.public())
}

/// The fixed worker's seal key.
pub fn fuzz_seal_key() -> SealKey {
    SealKey::from_secret(FUZZ_SEAL_SECRET.as_bytes()).expect("fixed seal key")
}

thread_local! {
    /// Deriving the keys is slower than most inputs: once per thread.
    static WORKER: FuzzWorker = fuzz_worker();
    static VERIFIER: ControllerVerifier = WORKER
        .with(|w| ControllerVerifier::from_bytes(&w.controller.public()))
        .expect("valid key");
    /// An admitted worker core that no input changed yet (rebuilt after a change).
    static ENVELOPE_CORE: RefCell<Option<WorkerCore>> = const { RefCell::new(None) };
}

impl FuzzWorker {
    /// A worker core admitted by this controller, with `applied` publications behind it and
    /// nothing left to commit.
    pub fn core(&self) -> WorkerCore {
        let info = JoinInfo {
            node_id: self.node_id,
            name: "fuzz-dep".into(),
            service: "voice".into(),
            component: "media-processor".into(),
            load_balancer: Some("lb-fuzz".into()),
            service_addr: Some("10.0.0.2:5060".into()),
            relay_addr: None,
            token_proof: None,
        };
        let rec = WorkerRecord {
            controller_key: Some(self.controller.public()),
            heartbeat_ms: 1000,
            applied: self.applied,
            ..WorkerRecord::default()
        };
        let seal = SealKey::from_secret(&self.seal.secret_bytes()).expect("own secret");
        let mut core = WorkerCore::open(info, seal, rec).expect("valid fixed keys");
        // The admission as the controller sends it on (re)connect.
        let _ = core.join();
        core.connected();
        let _ = core.from_controller(Message::Admission(Admission::Admitted {
            controller_key: self.controller.public(),
            heartbeat_ms: 1000,
        }));
        let _ = core.take();
        core
    }

    /// A valid next publication of `body` bytes (any plaintext).
    pub fn publication(&self, plaintext: &[u8]) -> Publication {
        self.controller
            .publication(
                self.node_id,
                self.applied + 1,
                &self.seal.recipient(),
                plaintext,
            )
            .expect("seals to a valid recipient")
    }
}

/// Target `worker_publication`: what reaches an admitted worker from its controller or its
/// load balancer. The first byte picks how the rest is read:
///
/// - 0: a frame; a `Publication` or a `Relay`'s publication is fed as both a direct and a
///   relayed one,
/// - 1: a postcard `Publication`, likewise,
/// - 2: the right machine and next sequence, then a 64-byte signature and sealed bytes from
///   the input (a forged or altered publication),
/// - 3: sealed bytes from the input, validly signed by the controller (altered ciphertext
///   that a broken relay might pass on: decryption must refuse it),
/// - 4: the input as plaintext, validly sealed and signed (the body decoder behind it).
///
/// Never panics; the record changes only for a validly signed, correctly sealed next
/// publication whose body decodes, and then by exactly one sequence.
pub fn fuzz_worker_publication(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    WORKER.with(|w| worker_publication(w, mode, rest));
}

fn worker_publication(w: &FuzzWorker, mode: u8, rest: &[u8]) {
    let publications: Vec<Publication> = match mode % 5 {
        0 => match decode_frame(rest, FRAME_BYTES_MAX_DEFAULT) {
            Ok((Message::Publication(p), _)) => vec![p],
            Ok((Message::Relay(r), _)) => vec![r.publication],
            _ => vec![],
        },
        1 => postcard::from_bytes::<Publication>(rest)
            .map(|p| vec![p])
            .unwrap_or_default(),
        2 => {
            let cut = rest.len().min(SIGNATURE_BYTES);
            vec![Publication {
                machine: w.node_id,
                seq: w.applied + 1,
                signature: rest[..cut].to_vec(),
                sealed: rest[cut..].to_vec(),
            }]
        }
        3 => {
            let digest = publication_digest(w.node_id, w.applied + 1, rest);
            vec![Publication {
                machine: w.node_id,
                seq: w.applied + 1,
                sealed: rest.to_vec(),
                signature: w.controller.sign_digest(&digest),
            }]
        }
        _ => vec![w.publication(rest)],
    };
    for p in publications {
        for relayed in [false, true] {
            let mut core = w.core();
            let before = core.record().clone();
            let r = if relayed {
                core.from_relay(p.clone())
            } else {
                core.from_controller(Message::Publication(p.clone()))
            };
            if let Some(after) = changed(&mut core, &before, &r) {
                check_applied(w, &p, &before, &after);
            }
        }
    }
}

/// The record after an input, if the input changed it: then it was accepted, and the change
/// is offered for commit. Otherwise nothing is to commit.
fn changed(
    core: &mut WorkerCore,
    before: &WorkerRecord,
    r: &Result<(), WorkerRefusal>,
) -> Option<WorkerRecord> {
    let after = core.record().clone();
    let (rec, _outputs) = core.take();
    if &after == before {
        assert!(rec.is_none(), "nothing changed, yet a record to commit");
        return None;
    }
    assert!(r.is_ok(), "the record changed on a refusal: {r:?}");
    assert_eq!(
        rec.as_ref(),
        Some(&after),
        "a change not offered for commit"
    );
    Some(after)
}

/// What must hold when a worker applied publication `p`: the controller signed it, for this
/// machine, as the next one, and its body opens, decodes and explains the change.
fn check_applied(w: &FuzzWorker, p: &Publication, before: &WorkerRecord, after: &WorkerRecord) {
    VERIFIER.with(|v| {
        v.verify_publication(p)
            .expect("accepted a publication the controller did not sign")
    });
    assert_eq!(
        p.machine, w.node_id,
        "accepted another machine's publication"
    );
    assert_eq!(p.seq, after.applied, "accepted out of order");
    let plain = w
        .seal
        .open(&p.sealed)
        .expect("accepted a publication that does not open");
    check_body_applied(&plain, before, after);
}

/// What must hold when a worker applied the plaintext `plain` as its next publication: it
/// decodes, `applied` moved by exactly one, and at most what the body says changed (a worker
/// may ignore a body, but never makes up another).
fn check_body_applied(plain: &[u8], before: &WorkerRecord, after: &WorkerRecord) {
    let body = Body::decode(plain).expect("accepted a publication whose body does not decode");
    assert_eq!(
        after.applied,
        before.applied + 1,
        "applied moved by other than one"
    );
    match body {
        Body::Pool(pool) => {
            assert!(after.pool == before.pool || after.pool == Some(pool));
            assert_eq!(after.route, before.route);
            assert_eq!(after.deploy, before.deploy);
        }
        Body::LoadBalancer(route) => {
            assert!(after.route == before.route || after.route == route);
            assert_eq!(after.pool, before.pool);
            assert_eq!(after.deploy, before.deploy);
        }
        Body::Config(order) => {
            assert_eq!(after.pool, before.pool);
            assert_eq!(after.route, before.route);
            assert_eq!(after.deploy, before.deploy);
            assert_eq!(after.config.pending.as_ref(), Some(&order));
            assert_eq!(after.config.current, before.config.current);
        }
        Body::Coupled(endpoint) => {
            assert_eq!(after.pool, before.pool);
            assert_eq!(after.route, before.route);
            assert_eq!(after.deploy, before.deploy);
            assert_eq!(after.config, before.config);
            assert_eq!(after.coupling.endpoint, endpoint);
            assert_eq!(after.coupling.router, before.coupling.router);
        }
        Body::Router(router) => {
            assert_eq!(after.pool, before.pool);
            assert_eq!(after.route, before.route);
            assert_eq!(after.deploy, before.deploy);
            assert_eq!(after.config, before.config);
            assert_eq!(after.coupling.router, router);
            assert_eq!(after.coupling.endpoint, before.coupling.endpoint);
        }
        Body::Deploy(order) => {
            assert_eq!(after.pool, before.pool);
            assert_eq!(after.route, before.route);
            assert_eq!(after.config, before.config);
            if after.deploy != before.deploy {
                let newest = before.deploy.as_ref().map_or(before.last_deployment, |d| {
                    d.deployment.max(before.last_deployment)
                });
                assert!(
                    order.deployment > newest,
                    "ran a deployment that is not newer"
                );
                assert_eq!(after.deploy.as_ref(), Some(&order));
            }
        }
    }
    assert_eq!(after.controller_key, before.controller_key);
    assert_eq!(after.report, before.report);
    assert_eq!(after.last_deployment, before.last_deployment);
}

/// Target `worker_publication_envelope`: the signed envelope of a publication as an admitted
/// worker checks it, with the fixed controller key and no per-input key derivation, so that
/// the fast refusals (decoding, signature shape, machine, sequence) run at full speed. The
/// first byte picks how the rest is read: 0 a frame (`Publication` or `Relay`), 1 a postcard
/// `Publication`, 2 the right machine and next sequence with a signature and sealed bytes
/// from the input. Odd modes arrive relayed, even ones direct. Beyond what
/// `worker_publication` checks: a signature accepted for a publication is refused for the
/// same publication with its machine, sequence or sealed bytes changed.
pub fn fuzz_worker_publication_envelope(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let p = match mode % 3 {
        0 => match decode_frame(rest, FRAME_BYTES_MAX_DEFAULT) {
            Ok((Message::Publication(p), _)) => p,
            Ok((Message::Relay(r), _)) => r.publication,
            _ => return,
        },
        1 => match postcard::from_bytes::<Publication>(rest) {
            Ok(p) => p,
            Err(_) => return,
        },
        _ => {
            let cut = rest.len().min(SIGNATURE_BYTES);
            Publication {
                machine: FUZZ_WORKER_NODE,
                seq: FUZZ_WORKER_APPLIED + 1,
                signature: rest[..cut].to_vec(),
                sealed: rest[cut..].to_vec(),
            }
        }
    };
    WORKER.with(|w| {
        ENVELOPE_CORE.with(|slot| {
            let mut slot = slot.borrow_mut();
            let core = slot.get_or_insert_with(|| w.core());
            let before = core.record().clone();
            let r = if mode % 2 == 1 {
                core.from_relay(p.clone())
            } else {
                core.from_controller(Message::Publication(p.clone()))
            };
            if let Some(after) = changed(core, &before, &r) {
                check_applied(w, &p, &before, &after);
                *slot = None;
            }
        })
    });
    // The signature binds every field.
    VERIFIER.with(|v| {
        if v.verify_publication(&p).is_ok() {
            let mut other = p.clone();
            other.seq = other.seq.wrapping_add(1);
            assert!(
                v.verify_publication(&other).is_err(),
                "signature ignores seq"
            );
            let mut other = p.clone();
            other.machine = NodeId(other.machine.0 ^ 1);
            assert!(
                v.verify_publication(&other).is_err(),
                "signature ignores machine"
            );
            let mut other = p.clone();
            other.sealed.push(0);
            assert!(
                v.verify_publication(&other).is_err(),
                "signature ignores sealed"
            );
        }
    });
}

/// Target `worker_publication_plaintext`: the input as the opened plaintext of the next
/// publication of an admitted worker, through the body decoder and its application
/// (`WorkerCore::apply_opened`, what follows the signature check and the decryption), without
/// the crypto. The first byte picks the worker's state before: bit 0 a load balancer
/// (else a dependent), bit 1 a deployment in progress, bit 2 a pool and a route applied.
pub fn fuzz_worker_publication_plaintext(data: &[u8]) {
    let Some((&state, plain)) = data.split_first() else {
        return;
    };
    let lb = state & 1 != 0;
    let info = JoinInfo {
        node_id: FUZZ_WORKER_NODE,
        name: if lb { "lb-fuzz" } else { "fuzz-dep" }.into(),
        service: "voice".into(),
        component: if lb {
            "load-balancer"
        } else {
            "media-processor"
        }
        .into(),
        load_balancer: (!lb).then(|| "lb-fuzz".into()),
        service_addr: Some("10.0.0.2:5060".into()),
        relay_addr: lb.then(|| "10.0.0.1:7443".into()),
        token_proof: None,
    };
    let mut rec = WorkerRecord {
        heartbeat_ms: 1000,
        applied: FUZZ_WORKER_APPLIED,
        last_deployment: 3,
        ..WorkerRecord::default()
    };
    if state & 2 != 0 {
        rec.deploy = Some(crate::cluster::body::DeployOrder {
            deployment: 4,
            bundle_id: "9f2c4e1a".repeat(8),
            service: "voice".into(),
            version: "1.4.2".into(),
            sealed_bytes: 1 << 20,
            sealed_hash: [0x3c; 32],
        });
    }
    if state & 4 != 0 {
        rec.pool = Some(crate::cluster::body::Pool::default());
        rec.route = None;
    }
    let mut core = WorkerCore::open(info, fuzz_seal_key(), rec).expect("no controller key");
    let _ = core.take();
    let before = core.record().clone();
    let r = core.apply_opened(FUZZ_WORKER_APPLIED + 1, plain);
    assert_eq!(
        r.is_ok(),
        Body::decode(plain).is_ok(),
        "applied iff the body decodes"
    );
    if let Some(after) = changed(&mut core, &before, &r) {
        check_body_applied(plain, &before, &after);
    }
}
