//! The worker runtime against a scripted controller on 127.0.0.1: real QUIC, real database,
//! the controller's side written frame by frame, so each step of the runtime is observed
//! (admission, acks after commit, the pool file, the relay through a load balancer, hostile
//! frames closing only their connection, a restart resuming where it was).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::cluster::body::{Body, Dependent, LbRoute, Pool, PoolMember};
use crate::cluster::keys::ControllerKey;
use crate::config::{ControllerConfig, MachineConfig};
use crate::net::{Identity, PinPolicy};
use crate::wire::{
    read_frame, write_frame, Admission, JoinRefusal, Relay, FRAME_BYTES_MAX_DEFAULT,
};

pub(super) const WAIT: Duration = Duration::from_secs(20);

pub(super) struct FakeController {
    pub(super) ep: quinn::Endpoint,
    pub(super) id: Identity,
    pub(super) key: ControllerKey,
    pub(super) addr: SocketAddr,
}

/// The controller's end of one worker's connection.
pub(super) struct WorkerConn {
    pub(super) conn: quinn::Connection,
    pub(super) send: quinn::SendStream,
    pub(super) recv: quinn::RecvStream,
    pub(super) join: Join,
    pub(super) fp: Fingerprint,
}

impl FakeController {
    pub(super) fn new() -> FakeController {
        let id = Identity::generate(NodeId::random(), "controller").unwrap();
        let ep = crate::net::endpoint_with_policy(
            "127.0.0.1:0".parse().unwrap(),
            &id,
            PinPolicy::AllBut(PinSet::default()),
            TransportLimits::default(),
        )
        .unwrap();
        let addr = ep.local_addr().unwrap();
        FakeController {
            ep,
            id,
            key: ControllerKey::generate(),
            addr,
        }
    }

    /// The next worker connection and its Join.
    pub(super) async fn accept(&self) -> WorkerConn {
        let incoming = tokio::time::timeout(WAIT, self.ep.accept())
            .await
            .expect("a worker dials within the deadline")
            .unwrap();
        let (conn, fp) = crate::net::accept(incoming).await.unwrap();
        let (send, mut recv) = conn.accept_bi().await.unwrap();
        let first = read_frame(&mut recv, FRAME_BYTES_MAX_DEFAULT)
            .await
            .unwrap();
        let Some(Message::Join(join)) = first else {
            panic!("the first frame is not a Join: {first:?}");
        };
        WorkerConn {
            conn,
            send,
            recv,
            join,
            fp,
        }
    }
}

impl WorkerConn {
    pub(super) async fn send(&mut self, m: Message) {
        write_frame(&mut self.send, &m).await.unwrap();
    }

    pub(super) async fn admit(&mut self, key: &ControllerKey) {
        self.send(Message::Admission(Admission::Admitted {
            controller_key: key.public(),
            heartbeat_ms: 100,
        }))
        .await;
    }

    pub(super) fn publication(&self, key: &ControllerKey, seq: u64, body: &Body) -> Publication {
        key.publication(self.join.node_id, seq, &self.join.seal_key, &body.encode())
            .unwrap()
    }

    /// Reads frames until one matches, skipping heartbeats; fails on anything else.
    pub(super) async fn expect(&mut self, what: &str, want: impl Fn(&Message) -> bool) -> Message {
        let read = async {
            loop {
                let m = read_frame(&mut self.recv, FRAME_BYTES_MAX_DEFAULT)
                    .await
                    .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
                    .unwrap_or_else(|| panic!("stream ended waiting for {what}"));
                if want(&m) {
                    return m;
                }
                assert!(
                    matches!(m, Message::Heartbeat),
                    "waiting for {what}, got {m:?}"
                );
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    pub(super) async fn expect_ack(&mut self, upto: u64) {
        self.expect(
            &format!("PublicationAck {upto}"),
            |m| matches!(m, Message::PublicationAck { upto: u } if *u == upto),
        )
        .await;
    }

    /// Admits the worker and acknowledges the report it then sends.
    pub(super) async fn admit_and_ack_report(&mut self, key: &ControllerKey) {
        self.admit(key).await;
        let n = self
            .expect("the report", |m| matches!(m, Message::Notify(_)))
            .await;
        let Message::Notify(n) = n else {
            unreachable!()
        };
        assert_eq!(n.machine, self.join.node_id);
        self.send(Message::NotifyAck { upto: n.seq }).await;
    }
}

pub(super) fn temp_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "outpost-worker-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

pub(super) fn worker_config(
    dir: &Path,
    name: &str,
    ctl: &FakeController,
    component: &str,
    lb: Option<&str>,
) -> Config {
    let mut c = Config::with_defaults(Role::Worker, name, dir);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.api = "127.0.0.1:0".parse().unwrap();
    c.controller = Some(ControllerConfig {
        addr: ctl.addr,
        fingerprint: ctl.id.fingerprint,
        join_token_file: None,
    });
    c.machine = Some(MachineConfig {
        service: "voice".into(),
        component: component.into(),
        load_balancer: lb.map(str::to_owned),
        service_addr: Some("127.0.0.1:5060".parse().unwrap()),
        relay_addr: None,
        pool_file: None,
    });
    c
}

pub(super) async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) fn relay_names(w: &WorkerRunning) -> Vec<String> {
    w.shared
        .relay
        .lock()
        .unwrap()
        .connections()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

pub(super) fn lb_connected(w: &WorkerRunning) -> bool {
    w.shared.dependent.lock().unwrap().connected
}

pub(super) async fn get_json(w: &WorkerRunning, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://{}{path}", w.api_addr));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_relay_applies_in_order_and_refuses_what_is_altered() {
    let ctl = FakeController::new();
    let key = &ctl.key;
    let (lb_dir, dep_dir) = (temp_dir("lb"), temp_dir("dep"));

    // Both join; neither has a token, so nothing is sent until admitted.
    let lb = start(
        worker_config(&lb_dir, "lb-1", &ctl, "load-balancer", None),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let mut lbc = ctl.accept().await;
    assert_eq!(lbc.join.name, "lb-1");
    assert_eq!(lbc.join.component, "load-balancer");
    assert_eq!(lbc.join.relay_addr, Some(lb.quic_addr.to_string()));
    assert_eq!(lbc.join.resume, 0);
    assert_eq!(lbc.fp, lb.shared.fingerprint);
    lbc.send(Message::Admission(Admission::Pending)).await;
    wait_until("lb-1 pending", || lb.shared.standing() == Standing::Pending).await;
    lbc.admit_and_ack_report(key).await;
    wait_until("lb-1 admitted", || {
        lb.shared.standing() == Standing::Admitted
    })
    .await;
    // Heartbeats follow the admission's interval.
    lbc.expect("a heartbeat", |m| matches!(m, Message::Heartbeat))
        .await;

    let dep = start(
        worker_config(&dep_dir, "media-a", &ctl, "media-processor", Some("lb-1")),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let mut depc = ctl.accept().await;
    assert_eq!(depc.join.load_balancer.as_deref(), Some("lb-1"));
    assert_eq!(depc.join.relay_addr, None);
    assert_eq!(depc.join.service_addr.as_deref(), Some("127.0.0.1:5060"));
    depc.admit_and_ack_report(key).await;

    // The load balancer's pool: the file, acknowledged after it is stored.
    let dep_id = depc.join.node_id;
    let pool = Pool {
        members: vec![PoolMember {
            name: "media-a".into(),
            node_id: dep_id,
            service_addr: Some("127.0.0.1:5060".into()),
            fingerprint: depc.fp,
        }],
        dependents: vec![Dependent {
            name: "media-a".into(),
            node_id: dep_id,
            fingerprint: depc.fp,
        }],
    };
    let p = lbc.publication(key, 1, &Body::Pool(pool.clone()));
    lbc.send(Message::Publication(p)).await;
    lbc.expect_ack(1).await;
    let file: Value =
        serde_json::from_slice(&std::fs::read(lb_dir.join(pool_file::POOL_FILE)).unwrap()).unwrap();
    assert_eq!(file["members"][0]["name"], "media-a", "{file}");
    assert_eq!(lb.shared.record().pool, Some(pool.clone()));

    // The dependent learns where its load balancer is and dials it.
    let route = LbRoute {
        name: "lb-1".into(),
        node_id: lbc.join.node_id,
        addr: lb.quic_addr.to_string(),
        fingerprint: lbc.fp,
    };
    let body = Body::LoadBalancer(Some(route.clone()));
    depc.send(Message::Publication(depc.publication(key, 1, &body)))
        .await;
    depc.expect_ack(1).await;
    wait_until("media-a on lb-1's relay", || {
        relay_names(&lb) == ["media-a"] && lb_connected(&dep)
    })
    .await;

    // Relayed: applied by the dependent, acknowledged on its direct connection.
    let relay = |p: Publication| {
        Message::Relay(Relay {
            to: dep_id,
            publication: p,
        })
    };
    lbc.send(relay(depc.publication(key, 2, &body))).await;
    depc.expect_ack(2).await;
    assert_eq!(lb.shared.metrics.relay_forwarded.load(Ordering::Relaxed), 1);

    // Altered on the way: refused before anything is stored; only the relay link closes.
    let mut bad = depc.publication(key, 3, &body);
    bad.sealed[20] ^= 1;
    let refused = dep.shared.metrics.refused.load(Ordering::Relaxed);
    lbc.send(relay(bad)).await;
    wait_until("the altered publication refused", || {
        dep.shared.metrics.refused.load(Ordering::Relaxed) > refused
    })
    .await;
    assert_eq!(dep.shared.record().applied, 2);
    assert!(dep.shared.controller_connected());
    wait_until("media-a back on the relay", || {
        relay_names(&lb) == ["media-a"] && lb_connected(&dep)
    })
    .await;
    lbc.send(relay(depc.publication(key, 3, &body))).await;
    depc.expect_ack(3).await;
    // A replay is acknowledged again and changes nothing.
    lbc.send(relay(depc.publication(key, 2, &body))).await;
    depc.expect_ack(3).await;

    // A machine that is not a dependent cannot even finish its handshake with the relay.
    let stranger = Identity::generate(NodeId::random(), "stranger").unwrap();
    let sep = crate::net::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &stranger,
        PinSet::new([lbc.fp]),
        TransportLimits::default(),
    )
    .unwrap();
    if let Ok((conn, _)) = crate::net::connect(&sep, lb.quic_addr).await {
        let closed = tokio::time::timeout(WAIT, conn.closed()).await;
        assert!(closed.is_ok(), "the stranger's connection stays open");
    }
    assert_eq!(relay_names(&lb), ["media-a"]);

    // The API: status behind the token, metrics without it, anything else 404.
    let (code, _) = get_json(&dep, "/v1/status", None).await;
    assert_eq!(code, 401);
    let (code, text) = get_json(&dep, "/v1/status", Some(&dep.shared.token)).await;
    assert_eq!(code, 200, "{text}");
    let s: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(s["role"], "worker");
    assert_eq!(s["standing"], "admitted");
    assert_eq!(s["applied"], 3);
    assert_eq!(s["controller"]["connected"], true);
    assert_eq!(s["route"]["name"], "lb-1");
    assert_eq!(s["route"]["connected"], true);
    let (_, text) = get_json(&lb, "/v1/status", Some(&lb.shared.token)).await;
    let s: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(s["pool"]["members"][0]["name"], "media-a", "{s}");
    assert_eq!(s["relay_connections"][0]["name"], "media-a", "{s}");
    let (code, text) = get_json(&dep, "/metrics", None).await;
    assert_eq!(code, 200);
    assert!(
        text.contains("outpost_worker_publications_applied 3"),
        "{text}"
    );
    assert!(
        text.contains("outpost_worker_controller_connected 1"),
        "{text}"
    );
    let (code, text) = get_json(&dep, "/v1/keys", Some(&dep.shared.token)).await;
    assert_eq!(code, 404);
    assert!(text.contains("error"), "{text}");

    // A hostile frame from the controller closes that connection; the worker dials again and
    // resumes after what it applied.
    depc.send(Message::NotifyAck { upto: 99 }).await;
    let closed = tokio::time::timeout(WAIT, depc.conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(close::PROTOCOL)),
        "{closed:?}"
    );
    let mut depc = ctl.accept().await;
    assert_eq!(depc.join.resume, 3);
    depc.admit(key).await;

    // Restarted: it resumes from the record and dials its load balancer again at once.
    dep.shutdown().await;
    assert!(!lb_connected_to(&lb, "media-a").await);
    let dep = start(
        worker_config(&dep_dir, "media-a", &ctl, "media-processor", Some("lb-1")),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let mut depc = ctl.accept().await;
    assert_eq!(depc.join.resume, 3);
    assert_eq!(depc.join.node_id, dep_id);
    wait_until("media-a on the relay after its restart", || {
        relay_names(&lb) == ["media-a"] && lb_connected(&dep)
    })
    .await;
    depc.admit(key).await;

    // Out of the pool: the relay drops it and no longer lets it in.
    let empty = Pool::default();
    lbc.send(Message::Publication(lbc.publication(
        key,
        2,
        &Body::Pool(empty),
    )))
    .await;
    lbc.expect_ack(2).await;
    wait_until("media-a off the relay", || {
        relay_names(&lb).is_empty() && !lb_connected(&dep)
    })
    .await;
    let file: Value =
        serde_json::from_slice(&std::fs::read(lb_dir.join(pool_file::POOL_FILE)).unwrap()).unwrap();
    assert_eq!(file["members"], serde_json::json!([]));

    // Rejected: shown, and nothing more is applied.
    depc.send(Message::Admission(Admission::Rejected {
        reason: "key rejected by an operator".into(),
    }))
    .await;
    wait_until("media-a rejected", || {
        dep.shared.standing() == Standing::Rejected
    })
    .await;
    let (_, text) = get_json(&dep, "/v1/status", Some(&dep.shared.token)).await;
    let s: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(s["standing"], "rejected");
    assert!(
        s["controller"]["rejected"]
            .as_str()
            .is_some_and(|r| r.contains("operator")),
        "{s}"
    );

    drop(lbc);
    dep.shutdown().await;
    lb.shutdown().await;
    ctl.ep.close(0u32.into(), b"done");
    let _ = std::fs::remove_dir_all(&lb_dir);
    let _ = std::fs::remove_dir_all(&dep_dir);
}

/// Whether `name` is still on the load balancer's relay, once its old connection had time to go.
async fn lb_connected_to(lb: &WorkerRunning, name: &str) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay_names(lb).iter().any(|n| n == name) {
        if tokio::time::Instant::now() >= deadline {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[test]
fn seal_key_is_generated_once_and_kept() {
    let dir = temp_dir("seal");
    let store = Store::open(&dir).unwrap();
    let a = ensure_seal_key(&store).unwrap();
    let b = ensure_seal_key(&store).unwrap();
    assert_eq!(a.recipient(), b.recipient());
    drop(store);
    let store = Store::open(&dir).unwrap();
    assert_eq!(ensure_seal_key(&store).unwrap().recipient(), a.recipient());
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn join_token_file_errors_name_the_field() {
    let dir = temp_dir("token");
    std::fs::create_dir_all(&dir).unwrap();
    let missing = read_join_token(&dir.join("absent")).unwrap_err();
    assert_eq!(missing.field, "controller.join_token_file");
    let empty = dir.join("empty");
    std::fs::write(&empty, " \n").unwrap();
    let e = read_join_token(&empty).unwrap_err();
    assert!(e.reason.contains("empty"), "{e}");
    let ok = dir.join("ok");
    std::fs::write(&ok, "  secret\n").unwrap();
    assert_eq!(read_join_token(&ok).unwrap(), b"secret");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_worker_shows_why_in_its_status_and_log() {
    let ctl = FakeController::new();
    let dir = temp_dir("refused");
    let w = start(
        worker_config(&dir, "w7", &ctl, "call-router", None),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let status = || async {
        let (code, text) = get_json(&w, "/v1/status", Some(&w.shared.token)).await;
        assert_eq!(code, 200, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let last_error = |s: &Value| s["controller"]["last_error"].as_str().map(str::to_owned);
    let logged = |s: &Value, what: &str| {
        s["last_errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains(what))
    };

    // Pending, and the token it presented was not accepted.
    let mut c = ctl.accept().await;
    c.send(Message::Admission(Admission::PendingTokenNotAccepted))
        .await;
    wait_until("pending, and why", || {
        w.shared.standing() == Standing::Pending
            && w.shared.controller.lock().unwrap().last_error.is_some()
    })
    .await;
    let s = status().await;
    assert_eq!(s["standing"], "pending", "{s}");
    assert_eq!(
        last_error(&s).as_deref(),
        Some("join token not accepted: waiting for an operator"),
        "{s}"
    );
    assert!(
        logged(&s, "join token not accepted: waiting for an operator"),
        "{s}"
    );

    // Refused: the name belongs to another key. The controller closes after saying so.
    c.send(Message::Admission(Admission::Refused(
        JoinRefusal::NameTaken,
    )))
    .await;
    let _ = c.send.finish();
    wait_until("refused shown", || {
        w.shared.controller.lock().unwrap().last_error.as_deref()
            == Some("the controller refused this machine: name taken by another key")
    })
    .await;
    c.conn
        .close(close::UNKNOWN_PEER.into(), b"name taken by another key");
    let s = status().await;
    assert_eq!(s["controller"]["connected"], false, "{s}");
    assert_eq!(
        s["controller"]["rejected"],
        Value::Null,
        "not rejected: {s}"
    );
    assert!(logged(&s, "name taken by another key"), "{s}");

    w.shutdown().await;
    ctl.ep.close(0u32.into(), b"done");
    let _ = std::fs::remove_dir_all(&dir);
}
