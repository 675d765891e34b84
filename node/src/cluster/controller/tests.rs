//! The controller's runtime in this process, over real QUIC and HTTP on 127.0.0.1, with
//! hand-driven workers: admission (join token, pending, accept, reject), the HTTP API and the
//! CLI's view of it, refusals of hostile first frames, and a restart that keeps every key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{start, ControllerRunning};
use crate::cluster::keys::{token_proof, SealKey, SIGNING_SECRET};
use crate::config::{AdmissionConfig, Config, ConfigError};
use crate::ids::NodeId;
use crate::net::{self, close, Identity, PinSet, TransportLimits};
use crate::ops::Notifier;
use crate::wire::{
    read_frame, write_frame, Admission, Join, JoinRefusal, MachineReport, Message, Notify,
    CLUSTER_PROTOCOL_VERSION,
};

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "s3cret-join-token";

fn temp_dir(label: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "outpost-ctl-{label}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &Path, token_file: Option<PathBuf>) -> Config {
    let mut c = Config::with_defaults(crate::wire::Role::Controller, "ctl", dir);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.api = "127.0.0.1:0".parse().unwrap();
    c.cluster.down_after = Duration::from_secs(5);
    c.admission = token_file.map(|f| AdmissionConfig { join_token_file: f });
    c
}

struct Http {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Http {
    fn of(c: &ControllerRunning) -> Http {
        Http {
            base: format!("http://{}", c.api_addr),
            token: c.shared.token.clone(),
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, post: bool, path: &str, auth: bool) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut r = if post {
            self.http.post(url)
        } else {
            self.http.get(url)
        };
        if auth {
            r = r.bearer_auth(&self.token);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call(false, path, true).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        self.call(true, path, true).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn metrics(&self) -> String {
        let (status, v) = self.call(false, "/metrics", false).await;
        assert_eq!(status, 200);
        v.as_str().unwrap().to_owned()
    }
}

/// A hand-driven worker: its own identity and endpoint.
struct Worker {
    id: Identity,
    node: NodeId,
    name: String,
    seal: SealKey,
    component: &'static str,
    lb: Option<&'static str>,
}

impl Worker {
    fn new(name: &str, component: &'static str, lb: Option<&'static str>) -> Worker {
        let node = NodeId::random();
        Worker {
            id: Identity::generate(node, name).unwrap(),
            node,
            name: name.to_owned(),
            seal: SealKey::generate(),
            component,
            lb,
        }
    }

    fn join(&self, token: Option<&str>) -> Join {
        Join {
            protocol: CLUSTER_PROTOCOL_VERSION,
            node_id: self.node,
            name: self.name.clone(),
            service: "voice".into(),
            component: self.component.into(),
            load_balancer: self.lb.map(str::to_owned),
            service_addr: Some("127.0.0.1:5060".into()),
            relay_addr: (self.component == "load-balancer").then(|| "127.0.0.1:7999".into()),
            seal_key: self.seal.recipient(),
            token_proof: token.map(|t| token_proof(t.as_bytes(), &self.id.fingerprint)),
            resume: 0,
        }
    }

    async fn dial(&self, ctl: &ControllerRunning) -> Link {
        self.try_dial(ctl).await.unwrap()
    }

    async fn try_dial(&self, ctl: &ControllerRunning) -> Result<Link, String> {
        let pins = PinSet::new([ctl.shared.fingerprint]);
        let ep = net::endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &self.id,
            pins,
            TransportLimits::default(),
        )
        .unwrap();
        let (conn, fp) = net::connect(&ep, ctl.quic_addr)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(fp, ctl.shared.fingerprint);
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(Link {
            _ep: ep,
            conn,
            send,
            recv,
        })
    }

    async fn joined(&self, ctl: &ControllerRunning, token: Option<&str>) -> (Link, Admission) {
        let mut link = self.dial(ctl).await;
        link.send(&Message::Join(self.join(token))).await;
        let a = link.admission().await;
        (link, a)
    }

    fn notify(&self, machine: NodeId, seq: u64) -> Message {
        Message::Notify(Notify {
            machine,
            seq,
            report: MachineReport {
                state: "running".into(),
                software: None,
                detail: None,
                deployment: None,
            },
        })
    }
}

struct Link {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Link {
    async fn send(&mut self, m: &Message) {
        write_frame(&mut self.send, m).await.unwrap();
    }

    /// The next frame, or None once the controller closed the stream or the connection.
    async fn next(&mut self) -> Option<Message> {
        tokio::time::timeout(WAIT, read_frame(&mut self.recv, 1 << 20))
            .await
            .expect("a frame or the end within the deadline")
            .ok()
            .flatten()
    }

    /// The next Admission, skipping publications.
    async fn admission(&mut self) -> Admission {
        loop {
            match self.next().await {
                Some(Message::Admission(a)) => return a,
                Some(_) => continue,
                None => panic!(
                    "closed before an Admission: {:?}",
                    self.close_reason().await
                ),
            }
        }
    }

    /// The next frame that is not a publication.
    async fn next_control(&mut self) -> Option<Message> {
        loop {
            match self.next().await {
                Some(Message::Publication(_)) => continue,
                other => return other,
            }
        }
    }

    /// The application close code and reason the controller gave, or the error.
    async fn close_reason(&self) -> Result<(u32, String), String> {
        match tokio::time::timeout(WAIT, self.conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(a)) => Ok((
                a.error_code.into_inner() as u32,
                String::from_utf8_lossy(&a.reason).into_owned(),
            )),
            Ok(e) => Err(e.to_string()),
            Err(_) => Err("still open".into()),
        }
    }
}

fn key_status(keys: &Value, name: &str) -> String {
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .map(|k| k["status"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no key {name} in {keys}"))
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start} in\n{text}"))
}

/// Polls `f` until it returns Some, or panics after the deadline.
async fn until<T, F: std::future::Future<Output = Option<T>>>(what: &str, f: impl Fn() -> F) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_unadmitted_token_pending_accept_reject_and_restart() {
    let dir = temp_dir("admit");
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, format!("  {TOKEN}\n")).unwrap();
    let data = dir.join("data");
    let ctl = start(
        config(&data, Some(token_file.clone())),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let api = Http::of(&ctl);

    // A join token admits at once and hands over the signing key.
    let lb = Worker::new("lb-1", "load-balancer", None);
    let (mut lb_link, a) = lb.joined(&ctl, Some(TOKEN)).await;
    let Admission::Admitted { controller_key, .. } = a else {
        panic!("{a:?}")
    };
    // Without one (or with a wrong one) a machine waits, and gets nothing more.
    let mp = Worker::new("mp-1", "media-processor", Some("lb-1"));
    let (mut mp_link, a) = mp.joined(&ctl, Some("wrong token")).await;
    assert_eq!(
        a,
        Admission::PendingTokenNotAccepted,
        "a wrong token is said"
    );
    let keys = api.get("/v1/keys").await;
    assert_eq!(keys[0]["name"], "mp-1", "pending first: {keys}");
    assert_eq!(key_status(&keys, "mp-1"), "pending");
    assert_eq!(key_status(&keys, "lb-1"), "admitted");
    assert_eq!(keys[0]["id"], mp.node.to_string());
    assert_eq!(keys[0]["fingerprint"], mp.id.fingerprint.to_string());
    let machines = api.get("/v1/machines").await;
    assert_eq!(machines.as_array().unwrap().len(), 1, "{machines}");
    assert_eq!(machines[0]["name"], "lb-1");
    assert_eq!(machines[0]["component"], "load-balancer");
    assert!(machines[0]["pool"].is_array(), "{machines}");
    let (status, v) = api.call(false, "/v1/machines/mp-1", true).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("pending"), "{v}");

    // A pending machine that publishes is refused and changes nothing.
    let intruder = Worker::new("mp-2", "media-processor", Some("lb-1"));
    let (mut in_link, a) = intruder.joined(&ctl, None).await;
    assert_eq!(a, Admission::Pending);
    in_link.send(&intruder.notify(intruder.node, 1)).await;
    let (code, reason) = in_link.close_reason().await.unwrap();
    assert_eq!(code, close::PROTOCOL, "{reason}");
    assert!(reason.contains("not admitted"), "{reason}");

    // An operator accepts mp-1 by name; it is told at once.
    let (status, k) = api.post("/v1/keys/mp-1/accept").await;
    assert_eq!(status, 200, "{k}");
    assert_eq!(k["status"], "admitted");
    assert_eq!(k["id"], mp.node.to_string());
    assert_eq!(
        mp_link.admission().await,
        Admission::Admitted {
            controller_key,
            heartbeat_ms: 1250
        }
    );
    // Its notification is recorded, acknowledged, and puts it in its load balancer's pool.
    mp_link.send(&mp.notify(mp.node, 1)).await;
    assert_eq!(
        mp_link.next_control().await,
        Some(Message::NotifyAck { upto: 1 })
    );
    let m = api.get("/v1/machines/mp-1").await;
    assert_eq!(m["state"], "running", "{m}");
    assert_eq!(m["status"], "up", "{m}");
    assert_eq!(m["load_balancer"], "lb-1", "{m}");
    assert_eq!(m["connected"], true, "{m}");
    let pool = until("mp-1 in lb-1's pool", || async {
        let lb = api.get("/v1/machines/lb-1").await;
        let pool = lb["pool"].as_array().unwrap().clone();
        (!pool.is_empty()).then_some(pool)
    })
    .await;
    assert_eq!(pool[0]["name"], "mp-1");
    assert_eq!(pool[0]["node_id"], mp.node.to_string());
    assert_eq!(pool[0]["service_addr"], "127.0.0.1:5060");

    // A machine may notify only about itself.
    mp_link.send(&mp.notify(lb.node, 7)).await;
    let (code, reason) = mp_link.close_reason().await.unwrap();
    assert_eq!(code, close::PROTOCOL, "{reason}");

    // Unknown and ambiguous keys.
    let (status, v) = api.post("/v1/keys/nobody/accept").await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().is_some(), "{v}");

    // Rejecting lb-1 drops its connection; the key is refused in the handshake from then on.
    let (status, k) = api.post("/v1/keys/lb-1/reject").await;
    assert_eq!(status, 200, "{k}");
    assert_eq!(k["status"], "rejected");
    loop {
        match lb_link.next().await {
            Some(Message::Admission(Admission::Rejected { .. })) | None => break,
            Some(_) => {}
        }
    }
    let (code, _) = lb_link.close_reason().await.unwrap();
    assert_eq!(code, close::UNKNOWN_PEER);
    // TLS 1.3 may let the client finish before the server refuses its certificate: either
    // way the key gets nothing.
    match lb.try_dial(&ctl).await {
        Err(e) => assert!(e.contains("certificate"), "{e}"),
        Ok(mut again) => {
            let _ = tokio::time::timeout(
                WAIT,
                write_frame(&mut again.send, &Message::Join(lb.join(Some(TOKEN)))),
            )
            .await;
            assert_eq!(again.next().await, None, "a rejected key gets nothing");
            assert!(again.close_reason().await.is_err(), "refused by TLS");
        }
    }

    let text = api.metrics().await;
    assert_eq!(metric(&text, "outpost_machines{status=\"up\"}"), 1);
    assert_eq!(metric(&text, "outpost_machines{status=\"pending\"}"), 1);
    assert_eq!(metric(&text, "outpost_machines{status=\"rejected\"}"), 1);
    assert!(metric(&text, "outpost_controller_commits_total") >= 3);
    assert!(metric(&text, "outpost_frames_refused_total") >= 2);
    let status = api.get("/v1/status").await;
    assert_eq!(status["role"], "controller");
    assert_eq!(status["machines"]["pending"], 1);
    drop((lb_link, mp_link, in_link));
    ctl.shutdown().await;

    // A restart keeps every key and the signing key.
    let ctl = start(config(&data, Some(token_file)), Notifier::disabled())
        .await
        .unwrap();
    let api = Http::of(&ctl);
    let keys = api.get("/v1/keys").await;
    assert_eq!(key_status(&keys, "mp-1"), "admitted");
    assert_eq!(key_status(&keys, "mp-2"), "pending");
    assert_eq!(key_status(&keys, "lb-1"), "rejected");
    assert_eq!(keys.as_array().unwrap().len(), 3);
    let m = api.get("/v1/machines/mp-1").await;
    assert_eq!(m["state"], "running", "{m}");
    let (_link, a) = mp.joined(&ctl, None).await;
    assert!(
        matches!(a, Admission::Admitted { controller_key: k, .. } if k == controller_key),
        "{a:?}"
    );
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_refused_first_frame_must_be_a_join_of_this_version() {
    let dir = temp_dir("first");
    let ctl = start(config(&dir, None), Notifier::disabled())
        .await
        .unwrap();
    let api = Http::of(&ctl);
    let w = Worker::new("w-1", "proxy", None);

    let mut link = w.dial(&ctl).await;
    link.send(&Message::Heartbeat).await;
    let (code, reason) = link.close_reason().await.unwrap();
    assert_eq!(code, close::PROTOCOL, "{reason}");
    assert!(reason.contains("Join"), "{reason}");

    let mut link = w.dial(&ctl).await;
    let mut join = w.join(None);
    join.protocol = CLUSTER_PROTOCOL_VERSION + 1;
    link.send(&Message::Join(join)).await;
    let (code, reason) = link.close_reason().await.unwrap();
    assert_eq!(code, close::VERSION, "{reason}");
    assert!(reason.contains("protocol"), "{reason}");

    // A frame over the limit is refused from its header.
    let mut link = w.dial(&ctl).await;
    link.send
        .write_all(&(64u32 << 20).to_be_bytes())
        .await
        .unwrap();
    let (code, reason) = link.close_reason().await.unwrap();
    assert_eq!(code, close::PROTOCOL, "{reason}");

    // Garbage after a good Join closes that connection only, and stores nothing more.
    let (mut link, a) = w.joined(&ctl, None).await;
    assert_eq!(a, Admission::Pending);
    link.send
        .write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let (code, _) = link.close_reason().await.unwrap();
    assert_eq!(code, close::PROTOCOL);

    let keys = api.get("/v1/keys").await;
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    let text = api.metrics().await;
    assert!(metric(&text, "outpost_frames_refused_total") >= 4, "{text}");
    let status = api.get("/v1/status").await;
    assert!(
        !status["last_errors"].as_array().unwrap().is_empty(),
        "{status}"
    );
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_needs_the_token_and_names_the_role() {
    let dir = temp_dir("api");
    let ctl = start(config(&dir, None), Notifier::disabled())
        .await
        .unwrap();
    let api = Http::of(&ctl);
    let (status, v) = api.call(false, "/v1/machines", false).await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = api.call(true, "/v1/keys/x/accept", false).await;
    assert_eq!(status, 401, "{v}");
    for path in ["/v1/events", "/v1/digest", "/v1/state/alice"] {
        let (status, v) = api.call(path == "/v1/events", path, true).await;
        assert_eq!(status, 404, "{path}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("controller"),
            "{path}: {v}"
        );
    }
    let (status, v) = api.post("/v1/keys/0123456789abcdef/reject").await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(api.get("/v1/machines").await, Value::Array(vec![]));
    let (status, _) = api.call(false, "/v1/machines/nobody", true).await;
    assert_eq!(status, 404);
    let text = api.metrics().await;
    assert_eq!(metric(&text, "outpost_publications_unacked"), 0);
    assert_eq!(metric(&text, "outpost_api_unauthorized_total"), 2);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_an_empty_or_missing_join_token_file() {
    let dir = temp_dir("token");
    let empty = dir.join("empty");
    std::fs::write(&empty, " \n").unwrap();
    for file in [empty, dir.join("missing")] {
        let e = match start(config(&dir.join("data"), Some(file)), Notifier::disabled()).await {
            Ok(_) => panic!("started with a bad join token file"),
            Err(e) => e,
        };
        let ce = e.downcast_ref::<ConfigError>().expect("a config error");
        assert_eq!(ce.field, "admission.join_token_file", "{e}");
    }
    // Refused before anything was created.
    assert!(!dir.join("data").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Invariant: a machine removed for good is refused from then on (across a restart), is in no
/// pool, keeps no stored publication, and its name is free for a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_machine_is_refused_for_good_and_leaves_its_pool() {
    let dir = temp_dir("remove");
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let data = dir.join("data");
    let ctl = start(
        config(&data, Some(token_file.clone())),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let api = Http::of(&ctl);
    let lb = Worker::new("lb-1", "load-balancer", None);
    let (_lb_link, a) = lb.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    let mp = Worker::new("mp-1", "media-processor", Some("lb-1"));
    let (mut mp_link, a) = mp.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    mp_link.send(&mp.notify(mp.node, 1)).await;
    assert_eq!(
        mp_link.next_control().await,
        Some(Message::NotifyAck { upto: 1 })
    );
    until("mp-1 in lb-1's pool", || async {
        let lb = api.get("/v1/machines/lb-1").await;
        (lb["pool"].as_array().unwrap().len() == 1).then_some(())
    })
    .await;

    // Unknown names answer 404 with a JSON reason; nothing changes.
    let (status, v) = api.delete("/v1/machines/nobody").await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("nobody"), "{v}");

    let (status, k) = api.delete("/v1/machines/mp-1").await;
    assert_eq!(status, 200, "{k}");
    assert_eq!(k["status"], "removed");
    assert_eq!(k["id"], mp.node.to_string());
    // Its connection is told and closed.
    loop {
        match mp_link.next().await {
            Some(Message::Admission(Admission::Rejected { reason })) => {
                assert!(reason.contains("removed"), "{reason}");
                break;
            }
            None => break,
            Some(_) => {}
        }
    }
    assert_eq!(mp_link.close_reason().await.unwrap().0, close::UNKNOWN_PEER);
    // It leaves its load balancer's pool, and /v1/machines.
    let lb_view = api.get("/v1/machines/lb-1").await;
    assert_eq!(lb_view["pool"], serde_json::json!([]), "{lb_view}");
    let machines = api.get("/v1/machines").await;
    assert_eq!(machines.as_array().unwrap().len(), 1, "{machines}");
    let keys = api.get("/v1/keys").await;
    assert_eq!(key_status(&keys, "mp-1"), "removed");
    // Accepting it again is refused with the reason.
    let (status, v) = api.post("/v1/keys/mp-1/accept").await;
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("removed"), "{v}");
    let text = api.metrics().await;
    assert_eq!(metric(&text, "outpost_machines{status=\"removed\"}"), 1);
    ctl.shutdown().await;

    // After a restart the key is still refused, even with the join token.
    let ctl = start(config(&data, Some(token_file)), Notifier::disabled())
        .await
        .unwrap();
    let api = Http::of(&ctl);
    match mp.try_dial(&ctl).await {
        Err(e) => assert!(e.contains("certificate"), "{e}"),
        Ok(mut again) => {
            let _ = tokio::time::timeout(
                WAIT,
                write_frame(&mut again.send, &Message::Join(mp.join(Some(TOKEN)))),
            )
            .await;
            assert_eq!(again.next().await, None, "a removed key gets nothing");
        }
    }
    let keys = api.get("/v1/keys").await;
    assert_eq!(key_status(&keys, "mp-1"), "removed");
    // The name is free: a new key called mp-1 joins with the token and is the one meant.
    let fresh = Worker::new("mp-1", "media-processor", Some("lb-1"));
    let (_fresh_link, a) = fresh.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    let m = api.get("/v1/machines/mp-1").await;
    assert_eq!(m["node_id"], fresh.node.to_string(), "{m}");
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Lines of a controller's `GET /v1/watch`.
struct Feed {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Feed {
    async fn open(api: &Http, query: &str) -> (u16, Feed) {
        let resp = api
            .http
            .get(format!("{}/v1/watch{query}", api.base))
            .bearer_auth(&api.token)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            Feed {
                resp,
                buf: Vec::new(),
            },
        )
    }

    async fn next(&mut self) -> Value {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let chunk = tokio::time::timeout(WAIT, self.resp.chunk())
                .await
                .expect("a line within the deadline")
                .unwrap();
            match chunk {
                Some(c) => self.buf.extend_from_slice(&c),
                None if !self.buf.is_empty() => {
                    return serde_json::from_slice(&std::mem::take(&mut self.buf)).unwrap()
                }
                None => panic!("the stream ended"),
            }
        }
    }

    /// The next line about machine `name`, skipping others.
    async fn about(&mut self, name: &str) -> Value {
        loop {
            let v = self.next().await;
            if v["name"] == name {
                return v;
            }
        }
    }
}

/// Invariant: a controller's watch feed carries every machine change it committed, in order;
/// a client resuming from its cursor gets what came after, and a cursor of another run is
/// told to re-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_feed_carries_machine_changes_and_resumes_from_its_cursor() {
    let dir = temp_dir("watch");
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let ctl = start(
        config(&dir.join("data"), Some(token_file)),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let api = Http::of(&ctl);
    for (q, field) in [
        ("?kind=cat", "kind"),
        ("?cursor=x", "cursor"),
        ("?x=1", "query"),
    ] {
        let (status, mut f) = Feed::open(&api, q).await;
        assert_eq!(status, 400, "{q}");
        assert!(f.next().await["error"].as_str().unwrap().starts_with(field));
    }
    let (status, mut feed) = Feed::open(&api, "?kind=machine").await;
    assert_eq!(status, 200);
    let mp = Worker::new("mp-1", "media-processor", None);
    let (mut link, a) = mp.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    let joined = feed.about("mp-1").await;
    assert_eq!(joined["kind"], "machine");
    assert_eq!(joined["machine"]["status"], "up", "{joined}");
    let cursor = joined["cursor"].as_str().unwrap().to_owned();
    drop(feed);
    // Away while the machine reports; back with the cursor: the report is there.
    link.send(&mp.notify(mp.node, 1)).await;
    assert_eq!(
        link.next_control().await,
        Some(Message::NotifyAck { upto: 1 })
    );
    let (_, mut feed) = Feed::open(&api, &format!("?kind=machine&cursor={cursor}")).await;
    let reported = loop {
        let v = feed.about("mp-1").await;
        if v["machine"]["state"] == "running" {
            break v;
        }
    };
    let seq = |v: &Value| -> u64 {
        v["cursor"]
            .as_str()
            .unwrap()
            .split_once('-')
            .unwrap()
            .1
            .parse()
            .unwrap()
    };
    assert!(seq(&reported) > seq(&joined));
    drop(feed);
    // From the oldest kept change, the whole history of mp-1 in order.
    let (_, mut feed) = Feed::open(&api, "?from=oldest&name=mp-1").await;
    let first = feed.about("mp-1").await;
    assert!(seq(&first) <= seq(&joined));
    drop(feed);
    // A cursor of another run: reset.
    let epoch: u64 = cursor.split_once('-').unwrap().0.parse().unwrap();
    let (_, mut feed) = Feed::open(&api, &format!("?cursor={}-1", epoch + 1)).await;
    let v = feed.next().await;
    assert_eq!(v["reset"], true, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("restarted"), "{v}");
    drop(feed);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn init_creates_the_signing_key_once() {
    let dir = temp_dir("init");
    crate::roles::init(&dir, crate::wire::Role::Controller, Some("ctl")).unwrap();
    let first = crate::store::Store::open(&dir)
        .unwrap()
        .secret(SIGNING_SECRET)
        .unwrap()
        .expect("init stores the signing key");
    crate::roles::init(&dir, crate::wire::Role::Controller, Some("ctl")).unwrap();
    let second = crate::store::Store::open(&dir)
        .unwrap()
        .secret(SIGNING_SECRET)
        .unwrap();
    assert_eq!(Some(first), second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_ack_a_failed_commit_sends_nothing_and_reloads() {
    use std::sync::atomic::Ordering;
    let dir = temp_dir("fail");
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let ctl = start(
        config(&dir.join("data"), Some(token_file)),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let api = Http::of(&ctl);
    let w = Worker::new("rdb-1", "resource-db", None);
    let (mut link, a) = w.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    let p = Worker::new("rdb-2", "resource-db", None);
    let (mut p_link, a) = p.joined(&ctl, None).await;
    assert_eq!(a, Admission::Pending);

    ctl.shared.fail_commits.store(true, Ordering::Relaxed);
    // The notification is not acknowledged, the accept is not answered as done, and every
    // connection goes so that the workers resend.
    link.send(&w.notify(w.node, 1)).await;
    let (status, v) = api.post("/v1/keys/rdb-2/accept").await;
    assert_eq!(status, 503, "{v}");
    assert_ne!(
        link.next_control().await,
        Some(Message::NotifyAck { upto: 1 })
    );
    let (code, _) = link.close_reason().await.unwrap();
    assert_eq!(code, close::SHUTDOWN);
    assert_eq!(p_link.next_control().await, None);
    let text = api.metrics().await;
    assert!(metric(&text, "outpost_controller_commit_failures_total") >= 1);

    ctl.shared.fail_commits.store(false, Ordering::Relaxed);
    let keys = api.get("/v1/keys").await;
    assert_eq!(key_status(&keys, "rdb-2"), "pending", "nothing was changed");
    let m = api.get("/v1/machines/rdb-1").await;
    assert_eq!(m["state"], Value::Null, "the report was not recorded: {m}");
    // The worker reconnects and resends; now it is recorded and acknowledged.
    let (mut link, a) = w.joined(&ctl, None).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    link.send(&w.notify(w.node, 1)).await;
    assert_eq!(
        link.next_control().await,
        Some(Message::NotifyAck { upto: 1 })
    );
    let (status, v) = api.post("/v1/keys/rdb-2/accept").await;
    assert_eq!(status, 200, "{v}");
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_for_a_node_id_its_certificate_does_not_carry_is_refused() {
    let dir = temp_dir("node-id");
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let ctl = start(
        config(&dir.join("data"), Some(token_file)),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let api = Http::of(&ctl);
    let a = Worker::new("router-a", "call-router", None);
    let (_a_link, adm) = a.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(adm, Admission::Admitted { .. }), "{adm:?}");
    let before = api.get("/v1/keys").await;

    // b, with the token, speaks for a; then for the controller itself.
    let b = Worker::new("router-b", "call-router", None);
    for claimed in [a.node, ctl.shared.meta.node_id] {
        let mut link = b.dial(&ctl).await;
        let mut join = b.join(Some(TOKEN));
        join.node_id = claimed;
        link.send(&Message::Join(join)).await;
        assert_eq!(
            link.admission().await,
            Admission::Refused(JoinRefusal::NodeIdNotProven)
        );
        let (code, reason) = link.close_reason().await.unwrap();
        assert_eq!(code, close::UNKNOWN_PEER, "{reason}");
        assert!(reason.starts_with("node id not proven"), "{reason}");
    }
    // The controller's own certificate proves its own id: still never a machine.
    let own = Worker {
        id: Identity::generate(ctl.shared.meta.node_id, "router-c").unwrap(),
        node: ctl.shared.meta.node_id,
        ..Worker::new("router-c", "call-router", None)
    };
    let mut link = own.dial(&ctl).await;
    link.send(&Message::Join(own.join(Some(TOKEN)))).await;
    assert_eq!(
        link.admission().await,
        Admission::Refused(JoinRefusal::NodeIdNotProven)
    );
    assert_eq!(api.get("/v1/keys").await, before, "nothing stored");
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_worker_gets_in_during_a_flood_of_silent_handshakes() {
    /// Connections before their Join, lowered so that the flood overflows it many times.
    const SLOTS: usize = 16;
    /// Silent handshakes, all held open while the workers join.
    const FLOOD: usize = SLOTS * 4;
    let dir = temp_dir("flood");
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let ctl = start(
        config(&dir.join("data"), Some(token_file)),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    ctl.shared
        .joining_max
        .store(SLOTS, std::sync::atomic::Ordering::Relaxed);
    // An admitted worker, away during the flood.
    let old = Worker::new("router-old", "call-router", None);
    let (old_link, adm) = old.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(adm, Admission::Admitted { .. }), "{adm:?}");
    drop(old_link);

    // Handshakes that never open a stream nor send a frame, kept open.
    let stranger = Identity::generate(NodeId::random(), "stranger").unwrap();
    let ep = net::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &stranger,
        PinSet::new([ctl.shared.fingerprint]),
        TransportLimits::default(),
    )
    .unwrap();
    let mut silent = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        if let Ok((conn, _)) = net::connect(&ep, ctl.quic_addr).await {
            silent.push(conn);
        }
    }
    assert_eq!(silent.len(), FLOOD, "every handshake completes");

    // Every place before a Join is held by the flood; a worker with the token still gets in,
    // and so does the admitted one.
    let new = Worker::new("router-new", "call-router", None);
    let (_new_link, adm) = new.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(adm, Admission::Admitted { .. }), "{adm:?}");
    let (_old_link, adm) = old.joined(&ctl, None).await;
    assert!(matches!(adm, Admission::Admitted { .. }), "{adm:?}");

    // The flood was cut down to the bound, oldest first, and logged once, not per connection.
    let cut = ctl
        .shared
        .metrics
        .connections_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(cut >= (FLOOD - SLOTS) as u64, "{cut} cut");
    // The oldest is closed by the controller (with OVERLOADED when it was past its handshake,
    // silently when it was cut inside it).
    tokio::time::timeout(WAIT, silent[0].closed())
        .await
        .expect("the oldest silent connection is cut");
    let lines = ctl
        .shared
        .last_errors()
        .into_iter()
        .filter(|e| e.contains("without a Join"))
        .count();
    assert!(lines <= 1, "{:?}", ctl.shared.last_errors());
    drop(silent);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_at_the_first_frame_deadline() {
    let dir = temp_dir("silent");
    let ctl = start(config(&dir, None), Notifier::disabled())
        .await
        .unwrap();
    let w = Worker::new("w-1", "proxy", None);
    let link = w.dial(&ctl).await;
    let started = std::time::Instant::now();
    let (code, reason) = link.close_reason().await.unwrap();
    assert_eq!(code, close::PROTOCOL, "{reason}");
    assert_eq!(
        reason,
        format!("no Join within {:?}", crate::limits::FIRST_FRAME_TIMEOUT)
    );
    assert!(started.elapsed() < WAIT);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refusal_log_writes_the_first_of_each_kind_and_one_summary_per_interval() {
    use super::refusal::RefusalLog;
    let every = Duration::from_secs(10);
    let mut log = RefusalLog::new(every);
    let t0 = tokio::time::Instant::now();
    let mut full = 0;
    for i in 0..1_000u64 {
        let kind = if i % 4 == 0 {
            "no Join in time"
        } else {
            "too many machines waiting"
        };
        let (f, summary) = log.note(kind, t0 + Duration::from_millis(i));
        assert_eq!(summary, None, "no summary inside the interval");
        full += usize::from(f);
    }
    assert_eq!(full, 2, "the first of each kind in full");
    assert_eq!(log.flush(t0 + every - Duration::from_millis(1)), None);
    let summary = log
        .flush(t0 + every)
        .expect("a summary at the interval's end");
    assert_eq!(
        summary,
        "refused 1000 connections in the last 10s (250 no Join in time, 750 too many machines \
         waiting); 998 of them not logged one by one"
    );
    assert_eq!(log.flush(t0 + every * 3), None, "said once");
    // The next interval starts over: its first refusal is logged in full again, and an
    // interval whose refusals were all logged needs no summary.
    let (f, summary) = log.note("too many machines waiting", t0 + every * 4);
    assert!(f);
    assert_eq!(summary, None);
    assert_eq!(log.flush(t0 + every * 6), None);
    // Kinds are bounded.
    for k in 0..100 {
        log.note(&format!("kind {k}"), t0 + every * 7);
    }
    let summary = log.flush(t0 + every * 8).unwrap();
    assert!(summary.contains("84 other"), "{summary}");
}

impl Http {
    /// A request with a raw body; the answer's status and JSON.
    async fn send_body(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn put_config(&self, scope: &str, doc: &str) -> Value {
        let (status, v) = self
            .send_body(
                reqwest::Method::PUT,
                &format!("/v1/config/{scope}"),
                "application/json",
                doc.to_owned(),
            )
            .await;
        assert_eq!(status, 200, "PUT {scope}: {v}");
        v
    }
}

impl Link {
    /// The next configuration publication (opened with `seal`), acknowledging every
    /// publication on the way.
    async fn next_config(&mut self, seal: &SealKey) -> crate::cluster::body::ConfigOrder {
        use crate::cluster::body::Body;
        loop {
            match self.next().await {
                Some(Message::Publication(p)) => {
                    let body = Body::decode(&seal.open(&p.sealed).unwrap()).unwrap();
                    self.send(&Message::PublicationAck { upto: p.seq }).await;
                    if let Body::Config(order) = body {
                        return order;
                    }
                }
                Some(_) => {}
                None => panic!("closed before a configuration"),
            }
        }
    }
}

fn names(v: &Value) -> Vec<String> {
    v["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}

/// Invariant: every configuration change gets the next version and is published, as the
/// machine's effective configuration (service, then component, then machine), to exactly the
/// admitted machines whose effective configuration changed; what a machine reports applied is
/// shown; history and rollback make new versions; versions and documents survive a restart;
/// bad requests get a 4xx with the reason and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_data_is_versioned_merged_and_sent_only_where_it_changed() {
    use crate::wire::{ConfigNotify, ConfigReport};
    use reqwest::Method;
    use serde_json::json;
    let dir = temp_dir("config");
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let data = dir.join("data");
    let ctl = start(
        config(&data, Some(token_file.clone())),
        Notifier::disabled(),
    )
    .await
    .unwrap();
    let api = Http::of(&ctl);
    let cr = Worker::new("cr-1", "call-router", None);
    let mp1 = Worker::new("mp-1", "media-processor", None);
    let mp2 = Worker::new("mp-2", "media-processor", None);
    let mut links = Vec::new();
    for w in [&cr, &mp1, &mp2] {
        let (link, a) = w.joined(&ctl, Some(TOKEN)).await;
        assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
        links.push(link);
    }
    let [cr_link, mp1_link, mp2_link] = &mut links[..] else {
        unreachable!()
    };
    let doc =
        |o: &crate::cluster::body::ConfigOrder| -> Value { serde_json::from_str(&o.doc).unwrap() };

    let (status, mut feed) = Feed::open(&api, "?kind=config").await;
    assert_eq!(status, 200);
    let v = api.put_config("service/voice", r#"{"log": "info"}"#).await;
    assert_eq!(
        (v["version"].as_u64(), names(&v)),
        (Some(1), vec!["cr-1".into(), "mp-1".into(), "mp-2".into()])
    );
    for (link, w) in [
        (&mut *cr_link, &cr),
        (&mut *mp1_link, &mp1),
        (&mut *mp2_link, &mp2),
    ] {
        let o = link.next_config(&w.seal).await;
        assert_eq!((o.version, doc(&o)), (1, json!({"log": "info"})));
    }
    // The watch feed carries the change.
    let c = feed.next().await;
    assert_eq!(
        (
            &c["kind"],
            &c["name"],
            &c["config"]["version"],
            &c["config"]["doc"]
        ),
        (
            &json!("config"),
            &json!("service/voice"),
            &json!(1),
            &json!({"log": "info"})
        ),
        "{c}"
    );
    drop(feed);
    // TOML for a component: only its machines.
    let (status, v) = api
        .send_body(
            Method::PUT,
            "/v1/config/component/voice/media-processor",
            "application/toml",
            "[limits]\ncalls = 5\n",
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["version"].as_u64(), names(&v)),
        (Some(2), vec!["mp-1".into(), "mp-2".into()])
    );
    for (link, w) in [(&mut *mp1_link, &mp1), (&mut *mp2_link, &mp2)] {
        let o = link.next_config(&w.seal).await;
        assert_eq!(
            (o.version, doc(&o)),
            (2, json!({"log": "info", "limits": {"calls": 5}}))
        );
    }
    // A machine override removing a key.
    let v = api.put_config("machine/mp-2", r#"{"log": null}"#).await;
    assert_eq!(names(&v), vec!["mp-2".to_owned()]);
    let o = mp2_link.next_config(&mp2.seal).await;
    assert_eq!((o.version, doc(&o)), (3, json!({"limits": {"calls": 5}})));
    // The same document again: a new version, nobody's configuration changed.
    let v = api.put_config("service/voice", r#"{"log": "info"}"#).await;
    assert_eq!(
        (v["version"].as_u64(), names(&v)),
        (Some(4), Vec::<String>::new())
    );
    // mp-2 does not take the service's log level: only cr-1 and mp-1 are sent it.
    let v = api.put_config("service/voice", r#"{"log": "debug"}"#).await;
    assert_eq!(names(&v), vec!["cr-1".to_owned(), "mp-1".to_owned()]);
    let o = mp1_link.next_config(&mp1.seal).await;
    assert_eq!(
        (o.version, doc(&o)),
        (5, json!({"log": "debug", "limits": {"calls": 5}}))
    );

    // mp-1 reports it applied; the machines list shows it.
    mp1_link
        .send(&Message::ConfigNotify(ConfigNotify {
            machine: mp1.node,
            seq: 1,
            report: ConfigReport {
                version: 5,
                state: "applied".into(),
                detail: None,
            },
        }))
        .await;
    assert_eq!(
        mp1_link.next_control().await,
        Some(Message::ConfigNotifyAck { upto: 1 })
    );
    let m = api.get("/v1/machines/mp-1").await;
    assert_eq!(
        m["config"],
        json!({"version": 5, "applied": 5, "state": "applied", "detail": null}),
        "{m}"
    );
    let m = api.get("/v1/machines/mp-2").await;
    assert_eq!(m["config"]["version"], 3, "{m}");
    assert_eq!(m["config"]["applied"], Value::Null, "{m}");
    let e = api.get("/v1/machines/mp-2/config").await;
    assert_eq!(e["doc"], json!({"limits": {"calls": 5}}), "{e}");

    // History, newest first, and a rollback that is a new version.
    let h = api.get("/v1/config/service/voice/history").await;
    let versions: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [5, 4, 1]);
    let (status, v) = api
        .send_body(
            Method::POST,
            "/v1/config/service/voice/rollback",
            "application/json",
            r#"{"version": 1}"#,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["version"].as_u64(), names(&v)),
        (Some(6), vec!["cr-1".into(), "mp-1".into()])
    );
    let g = api.get("/v1/config/service/voice").await;
    assert_eq!(
        (g["version"].as_u64(), &g["doc"], &g["note"]),
        (Some(6), &json!({"log": "info"}), &json!("rollback to 1"))
    );
    // Deleting the component's document: its machines fall back to the service's.
    let (status, v) = api
        .delete("/v1/config/component/voice/media-processor")
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(names(&v), vec!["mp-1".to_owned(), "mp-2".to_owned()]);
    let o = mp2_link.next_config(&mp2.seal).await;
    assert_eq!((o.version, doc(&o)), (7, json!({})));

    // Bad requests: the reason, nothing changed.
    for (method, path, ct, body, want, field) in [
        (
            Method::PUT,
            "/v1/config/service/voice",
            "application/json",
            "[1]".to_owned(),
            400,
            "body",
        ),
        (
            Method::PUT,
            "/v1/config/service/voice",
            "application/json",
            "{".to_owned(),
            400,
            "body",
        ),
        (
            Method::PUT,
            "/v1/config/service/voice",
            "application/toml",
            "a = ".to_owned(),
            400,
            "body",
        ),
        (
            Method::PUT,
            "/v1/config/service/fax",
            "application/json",
            "{}".to_owned(),
            404,
            "path",
        ),
        (
            Method::PUT,
            "/v1/config/service/voice",
            "application/json",
            format!("{{\"a\": \"{}\"}}", "x".repeat(70_000)),
            413,
            "body",
        ),
        (
            Method::POST,
            "/v1/config/service/voice/rollback",
            "application/json",
            r#"{"version": 99}"#.to_owned(),
            404,
            "service/voice has no version 99",
        ),
        (
            Method::POST,
            "/v1/config/service/voice/rollback",
            "application/json",
            "{}".to_owned(),
            400,
            "version",
        ),
        (
            Method::DELETE,
            "/v1/config/component/voice/media-processor",
            "application/json",
            String::new(),
            404,
            "component/voice/media-processor has no",
        ),
        (
            Method::GET,
            "/v1/config/machine/nobody",
            "application/json",
            String::new(),
            404,
            "machine/nobody has no",
        ),
    ] {
        let (status, v) = api.send_body(method.clone(), path, ct, body).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        let e = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
        assert!(e.starts_with(field), "{method} {path}: {e}");
    }
    let g = api.get("/v1/config/service/voice").await;
    assert_eq!(g["version"], 6);

    // A report about a version never sent is hostile: the connection goes.
    cr_link
        .send(&Message::ConfigNotify(ConfigNotify {
            machine: cr.node,
            seq: 1,
            report: ConfigReport {
                version: 99,
                state: "applied".into(),
                detail: None,
            },
        }))
        .await;
    let (code, reason) = cr_link.close_reason().await.unwrap();
    assert_eq!(code, close::PROTOCOL, "{reason}");
    assert!(reason.contains("only 6 was sent"), "{reason}");
    drop(links);
    ctl.shutdown().await;

    // Restarted: the documents, versions and what mp-1 applied are all there.
    let ctl = start(config(&data, Some(token_file)), Notifier::disabled())
        .await
        .unwrap();
    let api = Http::of(&ctl);
    let g = api.get("/v1/config/service/voice").await;
    assert_eq!(
        (g["version"].as_u64(), &g["doc"]),
        (Some(6), &json!({"log": "info"}))
    );
    let m = api.get("/v1/machines/mp-1").await;
    assert_eq!(m["config"]["applied"], 5, "{m}");
    let v = api.put_config("machine/mp-1", r#"{"x": 1}"#).await;
    assert_eq!(v["version"], 8, "versions go on after a restart: {v}");
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
