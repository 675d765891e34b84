//! The bodies of the fuzz targets for the decoders outside the wire and the bundle (those are
//! `wire::fuzz_*` and `bundle::fuzz_*`): the HTTP bodies of every endpoint, the config file,
//! and the first frames of each role's connections. Plain functions, so that the stable test
//! `tests/fuzz_corpus.rs` replays the committed corpus through exactly the code the cargo-fuzz
//! targets in `fuzz/fuzz_targets/` run.
//!
//! Each takes arbitrary bytes and panics only when a property of the code behind the decoder
//! is broken; an `Err` on bad input is the expected outcome, not a finding. Each goes through
//! the same library function the node uses (`api::parse_event_body`, `config::parse`,
//! `ControllerCore::joined`, ...), never a copy of its logic.

use std::cell::RefCell;

use axum::http::StatusCode;

use crate::cluster::controller::core::{
    ControllerCore, KeyStatus, MachineRecord, Output, Settings,
};
use crate::cluster::controller::parse_deployment_request;
use crate::cluster::keys::{token_proof, token_proof_matches, AgeSealer, ControllerKey};
use crate::cluster::worker::core::{JoinInfo, Standing, WorkerCore, WorkerRecord, WorkerRefusal};
use crate::config::{self, Limits, SERVICES};
use crate::datacenter::api::{parse_batch_body, parse_event_body};
use crate::ids::{Fingerprint, NodeId};
use crate::model::events::{check_element, validate_account, Event};
use crate::model::to_canonical;
use crate::replication::core::resume_point;
use crate::replication::mem::MemStore;
use crate::replication::{Core, IngestError, Mark, PeerProgress};
use crate::wire::Role;
use crate::wire::{decode_frame, Admission, Message, FRAME_BYTES_MAX_DEFAULT};

/// The clock of every target: a fixed instant, so that a replay is exact.
const NOW_MS: u64 = 1_732_250_000_000;

/// The node every event target ingests on.
const FUZZ_NODE: NodeId = NodeId(0x00f0_0000_0000_0000_0000_0000_0000_0017);

/// Target `api_event`: bytes as the body of `POST /v1/events`, through the parser the API
/// uses. A refusal is a 400; an accepted event is ingested (as the writer does) into an
/// in-memory store, and what that logs is a record every peer accepts.
pub fn fuzz_api_event(data: &[u8]) {
    match parse_event_body(data) {
        Ok(ev) => ingest_accepted(&[ev]),
        Err(e) => assert_eq!(
            e.status(),
            StatusCode::BAD_REQUEST,
            "a refusal that is not a 400"
        ),
    }
}

/// Target `api_event_batch`: bytes as the body of `POST /v1/events/batch`, with the default
/// `limits.batch_events_max`. A refusal is a 400 (a 413 for too many events); accepted events
/// are ingested in order, each one onto what the ones before it left.
pub fn fuzz_api_event_batch(data: &[u8]) {
    let max = Limits::default().batch_events_max;
    match parse_batch_body(data, max) {
        Ok(evs) => {
            assert!(
                evs.len() <= max,
                "accepted {} events, at most {max}",
                evs.len()
            );
            ingest_accepted(&evs);
        }
        Err(e) => assert!(
            matches!(
                e.status(),
                StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE
            ),
            "a refusal answered {}",
            e.status()
        ),
    }
}

/// What must hold of events the API accepted: the parser checked what it promises, ingesting
/// them fails only for an element that would grow too large (never in storage), and every
/// record logged is one [`Core::check_record`] accepts, so what one datacenter takes from a
/// client never becomes a record its peers refuse.
fn ingest_accepted(evs: &[Event]) {
    let mut t = MemStore::new(1);
    let mut core = Core::open(FUZZ_NODE, "fuzz", &t).expect("an empty store opens");
    for ev in evs {
        validate_account(&ev.account).expect("accepted an invalid account");
        // Twice: a client's retry merges onto what the first one left.
        for _ in 0..2 {
            match core.ingest(&mut t, NOW_MS, ev) {
                Ok(got) => {
                    let rec = t.log.get(&got.lseq).expect("the ingested record is logged");
                    let el = Core::check_record(rec)
                        .unwrap_or_else(|e| panic!("logged a record peers refuse: {e}"));
                    assert_eq!(
                        to_canonical(&el),
                        got.element,
                        "the answer is not what was logged"
                    );
                    assert_eq!(to_canonical(&el), rec.element);
                    check_element(ev.etype, &el).expect("ingested element has its shape");
                }
                Err(IngestError::Event(_)) => {}
                Err(e) => panic!("ingesting an accepted event failed: {e}"),
            }
        }
    }
}

/// Target `controller_deployment`: bytes as the body of `POST /v1/deployments`, through the
/// controller's parser. A refusal is a 400; an accepted request names a known service and a
/// well-formed bundle id (so it can be used in a path).
pub fn fuzz_controller_deployment(data: &[u8]) {
    match parse_deployment_request(data) {
        Ok(req) => {
            assert!(SERVICES.contains(&req.service.as_str()));
            assert!(crate::bundle::is_bundle_id(&req.bundle_id));
            assert!(!req.bundle_id.contains(['/', '.']));
        }
        Err(e) => assert_eq!(e.status(), StatusCode::BAD_REQUEST),
    }
}

type FixedMachine = (
    u128,
    &'static str,
    u8,
    KeyStatus,
    &'static str,
    Option<&'static str>,
);

/// The machines of the controller targets: (node id, name, fingerprint byte, status,
/// component, load balancer). Two ids share their first 8 hex digits, so that a prefix can be
/// ambiguous.
const MACHINES: &[FixedMachine] = &[
    (
        0xaaaa_aaaa_0000_0000_0000_0000_0000_0001,
        "w-adm",
        1,
        KeyStatus::Admitted,
        "media-processor",
        Some("lb-1"),
    ),
    (
        0xaaaa_aaaa_0000_0000_0000_0000_0000_0002,
        "w-pend",
        2,
        KeyStatus::Pending,
        "media-processor",
        Some("lb-1"),
    ),
    (
        0xbbbb_0000_0000_0000_0000_0000_0000_0003,
        "w-rej",
        3,
        KeyStatus::Rejected,
        "media-processor",
        None,
    ),
    (
        0xcccc_0000_0000_0000_0000_0000_0000_0004,
        "lb-1",
        4,
        KeyStatus::Admitted,
        "load-balancer",
        None,
    ),
];

/// The join token of the controller targets.
pub const FUZZ_JOIN_TOKEN: &[u8] = b"fuzz-join-token";

/// The fingerprints a `controller_join` input can present: each known machine's, then one no
/// machine has.
pub fn fuzz_fingerprints() -> Vec<Fingerprint> {
    MACHINES
        .iter()
        .map(|m| Fingerprint([m.2; 32]))
        .chain([Fingerprint([0xee; 32])])
        .collect()
}

/// The proof a worker holding [`FUZZ_JOIN_TOKEN`] presents with `fingerprint`, for seeds.
pub fn fuzz_token_proof(fingerprint: &Fingerprint) -> [u8; 32] {
    token_proof(FUZZ_JOIN_TOKEN, fingerprint)
}

fn machine_records() -> Vec<MachineRecord> {
    MACHINE_RECORDS.with(Clone::clone)
}

/// The fixed machines as records; their seal key is `wire::fuzz_worker`'s, so that what is
/// published to them can be sealed.
fn build_machine_records() -> Vec<MachineRecord> {
    let recipient = crate::wire::fuzz_seal_key().recipient();
    MACHINES
        .iter()
        .map(|&(id, name, fp, key_status, component, lb)| MachineRecord {
            node_id: NodeId(id),
            name: name.into(),
            fingerprint: Fingerprint([fp; 32]),
            seal_key: recipient.clone(),
            key_status,
            service: "voice".into(),
            component: component.into(),
            load_balancer: lb.map(Into::into),
            service_addr: Some("10.0.0.2:5060".into()),
            relay_addr: (component == "load-balancer").then(|| "10.0.0.1:7443".into()),
            up: key_status == KeyStatus::Admitted,
            report: None,
            first_seen_ms: NOW_MS - 1000,
            last_seen_ms: NOW_MS - 1000,
            notify_seq: 0,
            pub_seq: 0,
            pub_acked: 0,
            pool: None,
            route: None,
            route_seq: 0,
            deploys: Vec::new(),
            config: Default::default(),
            balancing: Default::default(),
        })
        .collect()
}

thread_local! {
    static MACHINE_RECORDS: Vec<MachineRecord> = build_machine_records();
    /// The signing key's secret: deriving the key is the slow part of building a core.
    static CONTROLLER_SECRET: Vec<u8> =
        ControllerKey::from_secret(&[0x42; 32]).expect("fixed signing key").secret_bytes();
    /// A core that no input changed yet (`controller_keys` rebuilds it after a change).
    static KEYS_CORE: RefCell<Option<ControllerCore>> = const { RefCell::new(None) };
}

/// A controller core with the fixed machines, the join token and at most `pending_max`
/// pending keys.
fn controller_core(pending_max: usize) -> ControllerCore {
    let key = CONTROLLER_SECRET
        .with(|s| ControllerKey::from_secret(s))
        .expect("own secret");
    let settings = Settings {
        pending_max,
        join_token: Some(FUZZ_JOIN_TOKEN.to_vec()),
        ..Settings::new(4000)
    };
    let mut core = ControllerCore::open(
        settings,
        key,
        Box::new(AgeSealer),
        machine_records(),
        Vec::new(),
        NOW_MS,
    );
    let _ = core.take();
    core
}

/// Target `controller_keys`: bytes as the key of `POST /v1/keys/{key}/accept` and
/// `/reject` (a node id, a unique prefix of one, or a name), through the core's resolution.
/// The first byte picks accept or reject. A key that resolves names a known machine (the one
/// whose id or name it is exactly, when there is one) and leaves it admitted or rejected;
/// a key that does not changes nothing.
pub fn fuzz_controller_keys(data: &[u8]) {
    let Some((&op, rest)) = data.split_first() else {
        return;
    };
    let Ok(key) = std::str::from_utf8(rest) else {
        return; // axum refuses a path that is not UTF-8
    };
    KEYS_CORE.with(|slot| {
        let mut slot = slot.borrow_mut();
        let core = slot.get_or_insert_with(|| controller_core(1024));
        let accept = op % 2 == 0;
        let r = if accept {
            core.accept(key, NOW_MS)
        } else {
            core.reject(key, NOW_MS)
        };
        let Ok(node) = r else {
            // Nothing resolved: nothing to commit and nothing sent.
            let (dirty, out) = core.take();
            assert!(
                dirty.is_empty() && out.is_empty(),
                "a refused key changed something"
            );
            return;
        };
        let m = core.machine(node).expect("resolved to a known machine");
        let k = key.trim();
        if let Some(exact) = MACHINES
            .iter()
            .find(|x| NodeId(x.0).to_string() == k || x.1 == k)
        {
            assert_eq!(node, NodeId(exact.0), "{k:?} resolved to another machine");
        } else {
            assert!(k.len() >= 8, "{k:?} resolved as a prefix shorter than 8");
            assert!(node.to_string().starts_with(&k.to_ascii_lowercase()));
        }
        let want = if accept {
            KeyStatus::Admitted
        } else {
            KeyStatus::Rejected
        };
        assert_eq!(m.key_status, want);
        // Changed: start the next input from the fixed machines again.
        *slot = None;
    });
}

/// Target `config_toml`: bytes as a config file, through `config::parse` (what `load` runs
/// once it has read at most `CONFIG_BYTES_MAX` bytes of UTF-8), with the file's role and with
/// each `--role`. What validates is a config the roles can start from.
pub fn fuzz_config(data: &[u8]) {
    if data.len() as u64 > crate::limits::CONFIG_BYTES_MAX {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for role in [
        None,
        Some(Role::Datacenter),
        Some(Role::Controller),
        Some(Role::Worker),
    ] {
        let Ok(c) = config::parse(text, "fuzz.toml", role) else {
            continue;
        };
        if let Some(r) = role {
            assert_eq!(c.role, r, "--role was not honoured");
        }
        config::check_name(&c.name).expect("accepted a bad node name");
        assert!(c.limits.commit_events_max >= c.limits.batch_events_max);
        assert!(
            (crate::limits::FRAME_BYTES_MAX_LOWEST..=crate::limits::FRAME_BYTES_MAX_HIGHEST)
                .contains(&c.limits.frame_bytes_max)
        );
        for p in &c.peers {
            config::check_name(&p.name).expect("accepted a bad peer name");
            assert!((1..=crate::limits::PEER_FINGERPRINTS_MAX).contains(&p.fingerprints.len()));
        }
        if c.role == Role::Worker {
            assert!(
                c.controller.is_some() && c.machine.is_some(),
                "a worker without its sections"
            );
        }
        // Deterministic: the same text gives the same config.
        assert_eq!(config::parse(text, "fuzz.toml", role).ok(), Some(c));
    }
}

/// Target `datacenter_hello`: bytes as the first frame of a peer datacenter's stream, then
/// what the link does with its Hello before anything else: where to resume sending
/// (`resume_point`) and whether to ask for our own log back (`own_log_request_for`).
pub fn fuzz_datacenter_hello(data: &[u8]) {
    let Ok((Message::Hello(h), _)) = decode_frame(data, FRAME_BYTES_MAX_DEFAULT) else {
        return;
    };
    let tail = 1000;
    let epoch = 7;
    let stored = PeerProgress {
        acked: 400,
        acked_epoch: epoch,
        acked_peer_epoch: h.log_epoch,
        ..PeerProgress::default()
    };
    let start = resume_point(&stored, epoch, &h, tail);
    assert!(start <= tail, "resumes past the log's tail");
    assert!(start >= 400, "resumes before what was acknowledged");
    let own = Mark {
        contiguous: 50,
        ..Mark::default()
    };
    if let Some(req) = Core::own_log_request_for(FUZZ_NODE, &own, &h) {
        assert_eq!(req.origin, FUZZ_NODE);
        assert_eq!(req.after_oseq, own.contiguous);
    }
    // Every mark the peer sent, as the replication reads one: bounded, and holding what it
    // said it holds up to the contiguous point.
    for m in &h.marks {
        let mark = Mark::from_wire(m);
        assert!(mark.contiguous >= m.contiguous);
        assert!(mark.above.len() <= crate::limits::MARK_ABOVE_MAX);
        assert!(mark
            .above
            .iter()
            .all(|&s| s > mark.contiguous.saturating_add(1)));
    }
}

/// Target `controller_join`: what a worker sends a controller on a new connection. The first
/// byte picks the certificate fingerprint the connection was made with (a known machine's, or
/// a new one); the rest is frames, the first of which must be a Join (as `conn` requires),
/// fed to the core as the runtime does, then a tick. Whatever the frames:
///
/// - a node id stays bound to the fingerprint it was first seen with,
/// - a rejected key stays rejected, and an unknown one is admitted only with a valid token
///   proof for the fingerprint it connected with,
/// - at most one machine is added, and pending keys never exceed `pending_max`.
pub fn fuzz_controller_join(data: &[u8]) {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let fps = fuzz_fingerprints();
    let fp = fps[pick as usize % fps.len()];
    let frame = |rest: &mut &[u8]| {
        let (msg, used) = decode_frame(rest, FRAME_BYTES_MAX_DEFAULT).ok()?;
        *rest = &rest[used..];
        Some(msg)
    };
    let Some(Message::Join(join)) = frame(&mut rest) else {
        return;
    };
    if join.protocol != crate::wire::CLUSTER_PROTOCOL_VERSION {
        return; // refused by `conn` before the core sees it
    }
    const PENDING_MAX: usize = 2;
    let mut core = controller_core(PENDING_MAX);
    let before: Vec<MachineRecord> = core.machines().cloned().collect();
    let conn = 1;
    let token_ok = join
        .token_proof
        .is_some_and(|p| token_proof_matches(FUZZ_JOIN_TOKEN, &fp, &p));
    // The certificate carries the Join's node id (the refusal of one that does not is tested
    // in the simulation), so the fuzzer reaches admission itself.
    let peer = crate::cluster::controller::core::Peer::new(fp, join.node_id);
    core.joined(conn, peer, join.clone(), NOW_MS);
    let mut frames = 0;
    while let Some(msg) = frame(&mut rest) {
        core.frame(conn, msg, NOW_MS + frames);
        frames += 1;
    }
    core.tick(NOW_MS + 10_000);
    let (_, out) = core.take();
    let after: Vec<MachineRecord> = core.machines().cloned().collect();
    assert!(
        after.len() <= before.len() + 1,
        "one Join added more than one machine"
    );
    let pending = after
        .iter()
        .filter(|m| m.key_status == KeyStatus::Pending)
        .count();
    assert!(pending <= PENDING_MAX.max(2), "{pending} pending keys");
    for m in &after {
        let old = before.iter().find(|b| b.node_id == m.node_id);
        match old {
            Some(old) => {
                assert_eq!(
                    m.fingerprint, old.fingerprint,
                    "a node id moved to another key"
                );
                if old.key_status == KeyStatus::Rejected {
                    assert_eq!(
                        m.key_status,
                        KeyStatus::Rejected,
                        "a rejected key came back"
                    );
                }
                if old.key_status == KeyStatus::Pending && m.key_status == KeyStatus::Admitted {
                    assert!(token_ok, "a pending key admitted without a token");
                }
            }
            None => {
                assert_eq!(m.node_id, join.node_id);
                assert_eq!(m.fingerprint, fp);
                if m.key_status == KeyStatus::Admitted {
                    assert!(token_ok, "an unknown key admitted without a token");
                }
            }
        }
    }
    for o in &out {
        if let Output::Send {
            conn: c,
            msg: Message::Admission(Admission::Admitted { .. }),
        } = o
        {
            assert_eq!(*c, conn);
            let m = core
                .machine(join.node_id)
                .expect("admitted a known machine");
            assert_eq!(
                m.key_status,
                KeyStatus::Admitted,
                "told admitted, recorded otherwise"
            );
        }
    }
}

/// Target `worker_admission`: the controller's answers to a worker's Join, as frames fed to a
/// worker that just sent its Join. The first byte picks the worker: bit 0 one that already
/// knows the controller's signing key (admitted before), else a new one. Whatever the frames:
/// a known signing key is never replaced, a worker is admitted only with a key it keeps, a
/// rejection is reported as one, and nothing is applied before admission.
pub fn fuzz_worker_admission(data: &[u8]) {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let known = pick & 1 != 0;
    let w_key = crate::wire::fuzz_worker_controller_key();
    let info = JoinInfo {
        node_id: NodeId(0x00f0_0000_0000_0000_0000_0000_0000_0042),
        name: "fuzz-dep".into(),
        service: "voice".into(),
        component: "media-processor".into(),
        load_balancer: Some("lb-fuzz".into()),
        service_addr: Some("10.0.0.2:5060".into()),
        relay_addr: None,
        token_proof: None,
    };
    let rec = WorkerRecord {
        controller_key: known.then_some(w_key),
        heartbeat_ms: 1000,
        applied: 5,
        ..WorkerRecord::default()
    };
    let mut core =
        WorkerCore::open(info, crate::wire::fuzz_seal_key(), rec).expect("valid fixed keys");
    let _ = core.join();
    core.connected();
    let _ = core.take();
    let mut first_key: Option<[u8; 32]> = known.then_some(w_key);
    while let Ok((msg, used)) = decode_frame(rest, FRAME_BYTES_MAX_DEFAULT) {
        rest = &rest[used..];
        let standing = core.standing();
        let before = core.record().clone();
        let r = core.from_controller(msg.clone());
        let after = core.record().clone();
        match (&msg, &r) {
            (Message::Admission(Admission::Rejected { .. }), r) => {
                assert!(matches!(r, Err(WorkerRefusal::Rejected(_))));
                assert_eq!(core.standing(), Standing::Rejected);
            }
            (Message::Admission(Admission::Admitted { controller_key, .. }), Ok(())) => {
                assert_eq!(core.standing(), Standing::Admitted);
                if let Some(k) = first_key {
                    assert_eq!(&k, controller_key, "admitted under another signing key");
                }
                first_key = Some(*controller_key);
                assert_eq!(after.controller_key, Some(*controller_key));
            }
            (Message::Publication(_), Ok(())) => {
                assert_eq!(
                    standing,
                    Standing::Admitted,
                    "a publication taken before admission"
                );
            }
            _ => {}
        }
        if let Some(k) = first_key {
            if after.controller_key.is_some() {
                assert_eq!(
                    after.controller_key,
                    Some(k),
                    "the signing key was replaced"
                );
            }
        }
        if r.is_err() {
            assert_eq!(after, before, "a refused frame changed the record");
        }
        let _ = core.take();
    }
}
