//! Software delivery on the controller, in this process over real QUIC and HTTP on 127.0.0.1,
//! with hand-driven workers: uploads, deployment requests and their refusals, the Deploy
//! publication each target gets, sealed bundles fetched whole and resumed, who may fetch
//! what, the status the workers' reports make, the sweep of sealed files, and a restart that
//! finishes a deployment left unsent.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};

use super::deploy::{sweep_once, DeploymentRecord};
use super::{start, ControllerRunning};
use crate::cluster::body::{Body, DeployOrder};
use crate::cluster::controller::core::Dirty;
use crate::cluster::keys::{token_proof, ControllerVerifier, SealKey};
use crate::config::{AdmissionConfig, Config};
use crate::ids::NodeId;
use crate::net::{self, close, Identity, PinSet, TransportLimits};
use crate::ops::Notifier;
use crate::store::Store;
use crate::wire::{
    read_frame, write_frame, Admission, BundleHeader, BundleRequest, Goodbye, Join, MachineReport,
    Message, Notify, Software, CLUSTER_PROTOCOL_VERSION,
};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "deploy-join-token";

fn temp_dir(label: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "outpost-ctl-deploy-{label}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &Path) -> Config {
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut c = Config::with_defaults(crate::wire::Role::Controller, "ctl", &dir.join("data"));
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.api = "127.0.0.1:0".parse().unwrap();
    c.cluster.down_after = Duration::from_secs(30);
    c.admission = Some(AdmissionConfig {
        join_token_file: token_file,
    });
    c
}

/// Packs a fixture bundle into `dir`; returns its path and bytes.
fn pack(dir: &Path, fixture: &str) -> (PathBuf, Vec<u8>, crate::bundle::PackInfo) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/bundles")
        .join(fixture);
    let out = dir.join(format!("{fixture}.bundle"));
    let info = crate::bundle::pack(&src, &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    (out, bytes, info)
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

    async fn answer(resp: reqwest::Response) -> (u16, Value) {
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        Self::answer(r).await
    }

    async fn get_ok(&self, path: &str) -> Value {
        let (status, v) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .await;
        match r {
            Ok(r) => Self::answer(r).await,
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    async fn deploy(&self, body: Value) -> (u16, Value) {
        self.post("/v1/deployments", serde_json::to_vec(&body).unwrap())
            .await
    }

    async fn metrics(&self) -> String {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// Expects a 4xx whose error names `field`.
fn refused(answer: (u16, Value), status: u16, field: &str) -> String {
    let (s, v) = answer;
    assert_eq!(s, status, "{v}");
    let e = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned();
    assert!(
        e.starts_with(&format!("{field}:")),
        "{field} not named: {e}"
    );
    e
}

/// A hand-driven worker.
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

    /// Dials, joins, and waits for the admission.
    async fn joined(&self, ctl: &ControllerRunning, token: Option<&str>) -> (Link, Admission) {
        let pins = PinSet::new([ctl.shared.fingerprint]);
        let ep = net::endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &self.id,
            pins,
            TransportLimits::default(),
        )
        .unwrap();
        let (conn, _) = net::connect(&ep, ctl.quic_addr).await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut link = Link {
            _ep: ep,
            conn,
            send,
            recv,
            verifier: None,
        };
        link.send(&Message::Join(self.join(token))).await;
        let a = loop {
            match link.next().await {
                Some(Message::Admission(a)) => break a,
                Some(_) => {}
                None => panic!("{} closed before its admission", self.name),
            }
        };
        if let Admission::Admitted { controller_key, .. } = &a {
            link.verifier = Some(ControllerVerifier::from_bytes(controller_key).unwrap());
        }
        (link, a)
    }

    fn report(&self, seq: u64, state: &str, detail: Option<&str>, deployment: u64) -> Message {
        Message::Notify(Notify {
            machine: self.node,
            seq,
            report: MachineReport {
                state: state.into(),
                software: Some(Software {
                    service: "voice".into(),
                    bundle_id: "b".repeat(64),
                    version: "1.0.0".into(),
                }),
                detail: detail.map(str::to_owned),
                deployment: Some(deployment),
            },
        })
    }
}

struct Link {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    verifier: Option<ControllerVerifier>,
}

/// What a fetch got: the header and the bytes, or the refusal.
#[derive(Debug)]
enum Fetched {
    Bytes(BundleHeader, Vec<u8>),
    Refused(Goodbye),
}

impl Link {
    async fn send(&mut self, m: &Message) {
        write_frame(&mut self.send, m).await.unwrap();
    }

    async fn next(&mut self) -> Option<Message> {
        tokio::time::timeout(WAIT, read_frame(&mut self.recv, 1 << 20))
            .await
            .expect("a frame or the end within the deadline")
            .ok()
            .flatten()
    }

    /// The next Deploy order (signature checked, opened with `seal`), acknowledging every
    /// publication on the way.
    async fn next_deploy(&mut self, seal: &SealKey) -> DeployOrder {
        loop {
            match self.next().await {
                Some(Message::Publication(p)) => {
                    let v = self.verifier.as_ref().expect("admitted");
                    v.verify_publication(&p).expect("signed by the controller");
                    let body = Body::decode(&seal.open(&p.sealed).unwrap()).unwrap();
                    self.send(&Message::PublicationAck { upto: p.seq }).await;
                    if let Body::Deploy(order) = body {
                        return order;
                    }
                }
                Some(_) => {}
                None => panic!("closed before a Deploy"),
            }
        }
    }

    /// Reads until the NotifyAck of `seq` (skipping publications).
    async fn acked(&mut self, seq: u64) {
        loop {
            match self.next().await {
                Some(Message::NotifyAck { upto }) if upto >= seq => return,
                Some(_) => {}
                None => panic!("closed before NotifyAck {seq}"),
            }
        }
    }

    /// One transfer on a stream of its own, with `first` as its first frame.
    async fn fetch_with(&self, first: &Message) -> Fetched {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        write_frame(&mut send, first).await.unwrap();
        let header = tokio::time::timeout(WAIT, read_frame(&mut recv, 1 << 20))
            .await
            .unwrap()
            .unwrap();
        match header {
            Some(Message::BundleHeader(h)) => {
                let bytes = tokio::time::timeout(WAIT, recv.read_to_end(usize::MAX))
                    .await
                    .unwrap()
                    .unwrap();
                Fetched::Bytes(h, bytes)
            }
            Some(Message::Goodbye(g)) => {
                let rest = recv.read_to_end(1024).await.unwrap();
                assert!(rest.is_empty(), "the stream ends after a refusal");
                Fetched::Refused(g)
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }

    async fn fetch(&self, deployment: u64, machine: NodeId, offset: u64) -> Fetched {
        self.fetch_with(&Message::BundleRequest(BundleRequest {
            deployment,
            machine,
            offset,
        }))
        .await
    }
}

fn got(f: Fetched) -> (BundleHeader, Vec<u8>) {
    match f {
        Fetched::Bytes(h, b) => (h, b),
        Fetched::Refused(g) => panic!("refused: {g:?}"),
    }
}

fn refusal(f: Fetched) -> Goodbye {
    match f {
        Fetched::Refused(g) => g,
        Fetched::Bytes(h, _) => panic!("served {h:?}"),
    }
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

fn status_of(dep: &Value, name: &str) -> (String, Option<String>) {
    let m = dep["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {dep}"));
    (
        m["status"].as_str().unwrap().to_owned(),
        m["reason"].as_str().map(str::to_owned),
    )
}

fn tmp_is_empty(ctl: &ControllerRunning) -> bool {
    std::fs::read_dir(ctl.shared.bundles.tmp_dir())
        .unwrap()
        .next()
        .is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_streamed_checked_and_content_addressed() {
    let dir = temp_dir("upload");
    let ctl = start(config(&dir), Notifier::disabled()).await.unwrap();
    let api = Http::of(&ctl);
    let (_, bytes, info) = pack(&dir, "voice");

    let (status, v) = api.post("/v1/bundles", bytes.clone()).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["bundle_id"], info.bundle_id);
    assert_eq!(v["service"], "voice");
    assert_eq!(v["version"], info.manifest.version);
    assert_eq!(v["bytes"], bytes.len() as u64);
    let stored = ctl.shared.bundles.bundle_path(&info.bundle_id);
    assert_eq!(std::fs::read(&stored).unwrap(), bytes);
    // Again, streamed without a length: the same id, the file kept.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let (status, v) = api.post("/v1/bundles", body).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["bundle_id"], info.bundle_id);
    assert!(tmp_is_empty(&ctl));

    // Not bundles: refused, nothing kept.
    let e = refused(
        api.post("/v1/bundles", vec![0x55u8; 10_000]).await,
        400,
        "body",
    );
    assert!(e.contains("not a bundle"), "{e}");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_cksum();
    b.append_data(&mut h, "readme.txt", &b"hi\n"[..]).unwrap();
    let e = refused(
        api.post("/v1/bundles", b.into_inner().unwrap()).await,
        400,
        "body",
    );
    assert!(e.contains("outpost-bundle.toml"), "{e}");
    // A manifest that does not parse: the error names its field.
    let mut b = tar::Builder::new(Vec::new());
    let toml = b"service = \"fax\"\nversion = \"1\"\nexec = [\"run\"]\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(toml.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "outpost-bundle.toml", &toml[..])
        .unwrap();
    let e = refused(
        api.post("/v1/bundles", b.into_inner().unwrap()).await,
        400,
        "body",
    );
    assert!(e.contains("service"), "{e}");
    assert!(tmp_is_empty(&ctl));

    // Over the limit: 413, with a declared length and streamed without one.
    ctl.shared.upload_bytes_max.store(4096, Ordering::Relaxed);
    let e = refused(api.post("/v1/bundles", bytes.clone()).await, 413, "body");
    assert!(e.contains("4096"), "{e}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let (status, v) = api.post("/v1/bundles", body).await;
    // The server may close before the client finished sending; either way nothing is kept.
    assert!(status == 413 || status == 0, "{status} {v}");
    until("the refused upload removed", || async {
        tmp_is_empty(&ctl).then_some(())
    })
    .await;

    let text = api.metrics().await;
    assert_eq!(metric(&text, "outpost_bundles_uploaded_total"), 2);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_requests_are_refused_naming_the_field() {
    let dir = temp_dir("refuse");
    let ctl = start(config(&dir), Notifier::disabled()).await.unwrap();
    let api = Http::of(&ctl);
    let (_, bytes, info) = pack(&dir, "voice");

    // No machine admitted yet.
    let (status, v) = api.post("/v1/bundles", bytes).await;
    assert_eq!(status, 201, "{v}");
    let id = info.bundle_id.clone();
    refused(
        api.deploy(json!({"service": "voice", "bundle_id": id}))
            .await,
        400,
        "machines",
    );
    let w = Worker::new("w-1", "call-router", None);
    let (_w_link, a) = w.joined(&ctl, Some(TOKEN)).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    let p = Worker::new("p-1", "call-router", None);
    let (_p_link, a) = p.joined(&ctl, None).await;
    assert_eq!(a, Admission::Pending);

    refused(
        api.deploy(json!({"service": "fax", "bundle_id": id})).await,
        400,
        "service",
    );
    let e = refused(
        api.deploy(json!({"service": "messaging", "bundle_id": id}))
            .await,
        400,
        "service",
    );
    assert!(e.contains("voice"), "{e}");
    refused(
        api.deploy(json!({"service": "voice", "bundle_id": "../etc/passwd"}))
            .await,
        400,
        "bundle_id",
    );
    refused(
        api.deploy(json!({"service": "voice", "bundle_id": "a".repeat(64)}))
            .await,
        404,
        "bundle_id",
    );
    refused(
        api.deploy(json!({"service": "voice", "bundle_id": id, "machines": ["nobody"]}))
            .await,
        400,
        "machines",
    );
    let e = refused(
        api.deploy(json!({"service": "voice", "bundle_id": id, "machines": ["p-1"]}))
            .await,
        400,
        "machines",
    );
    assert!(e.contains("not admitted"), "{e}");
    refused(
        api.deploy(json!({"service": "voice", "bundle_id": id, "machines": []}))
            .await,
        400,
        "machines",
    );
    refused(
        api.deploy(json!({"service": "voice", "bundle_id": id, "extra": 1}))
            .await,
        400,
        "body",
    );
    refused(api.deploy(json!({"bundle_id": id})).await, 400, "body");
    refused(api.get("/v1/deployments/1").await, 404, "id");
    refused(api.get("/v1/deployments/one").await, 400, "id");
    refused(api.get("/v1/deployments?limit=0").await, 400, "limit");
    assert_eq!(api.get_ok("/v1/deployments").await, json!([]));

    // A commit that fails creates nothing and uses up no id.
    ctl.shared.fail_commits.store(true, Ordering::Relaxed);
    let (status, v) = api
        .deploy(json!({"service": "voice", "bundle_id": id}))
        .await;
    assert_eq!(status, 503, "{v}");
    ctl.shared.fail_commits.store(false, Ordering::Relaxed);
    let v = until("the database reopened", || async {
        let (status, v) = api
            .deploy(json!({"service": "voice", "bundle_id": id}))
            .await;
        (status == 201).then_some(v)
    })
    .await;
    assert_eq!(v["deployment_id"], 1, "{v}");
    let text = api.metrics().await;
    assert_eq!(metric(&text, "outpost_deployments_created_total"), 1);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_sealed_published_fetched_resumed_and_reported() {
    let dir = temp_dir("deliver");
    let ctl = start(config(&dir), Notifier::disabled()).await.unwrap();
    let api = Http::of(&ctl);
    let (_, bundle, info) = pack(&dir, "voice");
    let (status, v) = api.post("/v1/bundles", bundle.clone()).await;
    assert_eq!(status, 201, "{v}");

    let lb = Worker::new("lb-1", "load-balancer", None);
    let mp = Worker::new("mp-1", "media-processor", Some("lb-1"));
    let cr = Worker::new("cr-1", "call-router", None);
    let (mut lb_link, _) = lb.joined(&ctl, Some(TOKEN)).await;
    let (mut mp_link, _) = mp.joined(&ctl, Some(TOKEN)).await;
    let (mut cr_link, _) = cr.joined(&ctl, Some(TOKEN)).await;

    // Every admitted worker by default.
    let (status, v) = api
        .deploy(json!({"service": "voice", "bundle_id": info.bundle_id}))
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v, json!({"deployment_id": 1}));

    let mut orders = Vec::new();
    for (w, link) in [
        (&lb, &mut lb_link),
        (&mp, &mut mp_link),
        (&cr, &mut cr_link),
    ] {
        let order = link.next_deploy(&w.seal).await;
        assert_eq!(order.deployment, 1);
        assert_eq!(order.bundle_id, info.bundle_id);
        assert_eq!(order.service, "voice");
        assert_eq!(order.version, info.manifest.version);
        let sealed = std::fs::read(ctl.shared.bundles.sealed_path(1, w.node)).unwrap();
        assert_eq!(order.sealed_bytes, sealed.len() as u64);
        assert_eq!(&order.sealed_hash, blake3::hash(&sealed).as_bytes());
        orders.push(order);
    }

    // Fetched whole: the bytes hash to the order's, and open, with this machine's key only,
    // to exactly the bundle.
    let (h, whole) = got(mp_link.fetch(1, mp.node, 0).await);
    let total = orders[1].sealed_bytes;
    assert_eq!(h, BundleHeader { total, offset: 0 });
    assert_eq!(whole.len() as u64, total);
    assert_eq!(blake3::hash(&whole).as_bytes(), &orders[1].sealed_hash);
    assert_eq!(mp.seal.open(&whole).unwrap(), bundle);
    assert!(cr.seal.open(&whole).is_err());
    // Resumed from the middle: exactly the tail; from the end: nothing.
    let mid = total / 2;
    let (h, tail) = got(mp_link.fetch(1, mp.node, mid).await);
    assert_eq!(h, BundleHeader { total, offset: mid });
    assert_eq!(tail, whole[mid as usize..]);
    let (h, none) = got(mp_link.fetch(1, mp.node, total).await);
    assert_eq!((h.offset, none.len()), (total, 0));

    // Refusals answer on the stream and leave the connection up.
    let g = refusal(mp_link.fetch(1, mp.node, total + 1).await);
    assert_eq!(g.code, close::PROTOCOL, "{g:?}");
    let g = refusal(cr_link.fetch(1, mp.node, 0).await);
    assert_eq!(g.code, close::UNKNOWN_PEER, "{g:?}");
    let g = refusal(mp_link.fetch(1, lb.node, 0).await);
    assert_eq!(g.code, close::UNKNOWN_PEER, "{g:?}");
    let g = refusal(mp_link.fetch(2, mp.node, 0).await);
    assert_eq!(g.code, close::PROTOCOL, "{g:?}");
    let g = refusal(cr_link.fetch_with(&Message::Heartbeat).await);
    assert_eq!(g.code, close::PROTOCOL, "{g:?}");
    // The load balancer relays its dependent's bundle: the same bytes, which it cannot open.
    let (_, relayed) = got(lb_link.fetch(1, mp.node, 0).await);
    assert_eq!(relayed, whole);
    assert!(lb.seal.open(&relayed).is_err());
    let (_, own) = got(cr_link.fetch(1, cr.node, 0).await);
    assert_eq!(cr.seal.open(&own).unwrap(), bundle);

    // Acknowledged orders are being delivered; reports move them on.
    let dep = until("every order acknowledged", || async {
        let d = api.get_ok("/v1/deployments/1").await;
        d["machines"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["status"] == "delivering")
            .then_some(d)
    })
    .await;
    assert_eq!(dep["service"], "voice");
    assert_eq!(dep["bundle_id"], info.bundle_id);
    assert_eq!(dep["version"], info.manifest.version);
    assert!(dep["created_ms"].as_u64().unwrap() > 0);
    let names: Vec<&str> = dep["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cr-1", "lb-1", "mp-1"]);
    mp_link.send(&mp.report(1, "running", None, 1)).await;
    mp_link.acked(1).await;
    cr_link
        .send(&cr.report(
            1,
            "rolled_back",
            Some("health check failed: port 5060 closed"),
            1,
        ))
        .await;
    cr_link.acked(1).await;
    lb_link.send(&lb.report(1, "installed", None, 1)).await;
    lb_link.acked(1).await;
    let dep = api.get_ok("/v1/deployments/1").await;
    assert_eq!(status_of(&dep, "mp-1"), ("running".into(), None));
    assert_eq!(
        status_of(&dep, "cr-1"),
        (
            "rolled_back".into(),
            Some("health check failed: port 5060 closed".into())
        )
    );
    assert_eq!(status_of(&dep, "lb-1").0, "installed");
    let m = api.get_ok("/v1/machines/mp-1").await;
    assert_eq!(m["software"]["service"], "voice", "{m}");
    assert_eq!(m["deployment"]["deployment_id"], 1, "{m}");
    assert_eq!(m["deployment"]["status"], "running", "{m}");
    let list = api.get_ok("/v1/deployments").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0], dep);

    // Sealed files go once their machine is done with them.
    assert_eq!(sweep_once(&ctl.shared).await, 2);
    assert!(!ctl.shared.bundles.sealed_path(1, mp.node).exists());
    assert!(!ctl.shared.bundles.sealed_path(1, cr.node).exists());
    assert!(ctl.shared.bundles.sealed_path(1, lb.node).exists());
    let g = refusal(mp_link.fetch(1, mp.node, 0).await);
    assert_eq!(g.code, close::PROTOCOL, "{g:?}");

    // A deployment to one machine, by name.
    let (status, v) = api
        .deploy(json!({"service": "voice", "bundle_id": info.bundle_id, "machines": ["lb-1"]}))
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["deployment_id"], 2);
    let order = lb_link.next_deploy(&lb.seal).await;
    assert_eq!(order.deployment, 2);
    let dep2 = api.get_ok("/v1/deployments/2").await;
    assert_eq!(dep2["machines"].as_array().unwrap().len(), 1, "{dep2}");
    // The newer deployment makes lb-1's first sealed file unneeded.
    assert_eq!(sweep_once(&ctl.shared).await, 1);
    assert!(!ctl.shared.bundles.sealed_path(1, lb.node).exists());

    let text = api.metrics().await;
    assert_eq!(metric(&text, "outpost_deployments_created_total"), 2);
    assert!(
        metric(&text, "outpost_bundle_served_bytes_total") >= 3 * total,
        "{text}"
    );
    assert!(metric(&text, "outpost_bundle_transfers_refused_total") >= 6);
    assert_eq!(metric(&text, "outpost_bundle_transfers_in_flight"), 0);
    assert!(metric(&text, "outpost_bundle_sealed_bytes_total") >= 3 * total);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The voice fixture at another version: another bundle id.
fn pack_version(dir: &Path, version: &str) -> (Vec<u8>, crate::bundle::PackInfo) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles/voice");
    let copy = dir.join(format!("voice-{version}"));
    std::fs::create_dir_all(copy.join("bin")).unwrap();
    std::fs::copy(src.join("bin/start"), copy.join("bin/start")).unwrap();
    let manifest = std::fs::read_to_string(src.join("outpost-bundle.toml"))
        .unwrap()
        .replace("version = \"1.0.0\"", &format!("version = \"{version}\""));
    std::fs::write(copy.join("outpost-bundle.toml"), manifest).unwrap();
    let out = dir.join(format!("voice-{version}.bundle"));
    let info = crate::bundle::pack(&copy, &out).unwrap();
    (std::fs::read(&out).unwrap(), info)
}

/// Makes an uploaded bundle look uploaded `ago` before now.
fn age(ctl: &ControllerRunning, bundle_id: &str, ago: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(ctl.shared.bundles.bundle_path(bundle_id))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - ago).unwrap();
}

/// Invariant (bundle garbage collection): an uploaded bundle is deleted only when no
/// deployment needs it (the newest of its service, or one with a target not yet sent) and it
/// was uploaded longer than `cluster.bundle_keep_unused` ago; a deployment is never created
/// for a deleted bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_bundles_no_deployment_needs_are_deleted_after_their_keep_time() {
    let dir = temp_dir("gc");
    let mut c = config(&dir);
    c.cluster.bundle_keep_unused = Duration::from_secs(3600);
    let ctl = start(c, Notifier::disabled()).await.unwrap();
    let api = Http::of(&ctl);
    let (v1, b1) = pack_version(&dir, "1.0.0");
    let (v2, b2) = pack_version(&dir, "2.0.0");
    assert_ne!(b1.bundle_id, b2.bundle_id);
    for bytes in [&v1, &v2] {
        let (status, v) = api.post("/v1/bundles", bytes.clone()).await;
        assert_eq!(status, 201, "{v}");
    }
    let exists = |id: &str| ctl.shared.bundles.bundle_path(id).exists();
    // Fresh uploads stay, needed or not.
    assert_eq!(sweep_once(&ctl.shared).await, 0);
    assert!(exists(&b1.bundle_id) && exists(&b2.bundle_id));
    // Unused and old: deleted; deploying it then says to upload it again.
    age(&ctl, &b2.bundle_id, Duration::from_secs(7200));
    assert_eq!(sweep_once(&ctl.shared).await, 1);
    assert!(!exists(&b2.bundle_id) && exists(&b1.bundle_id));
    let (status, v) = api
        .deploy(json!({"service": "voice", "bundle_id": b2.bundle_id}))
        .await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("bundle_id"), "{v}");
    // Uploaded again, it is fresh again.
    let (status, _) = api.post("/v1/bundles", v2.clone()).await;
    assert_eq!(status, 201);
    assert_eq!(sweep_once(&ctl.shared).await, 0);
    assert!(exists(&b2.bundle_id));

    // The newest deployment's bundle is needed however old it is.
    let w = Worker::new("cr-1", "call-router", None);
    let (mut link, _) = w.joined(&ctl, Some(TOKEN)).await;
    let (status, v) = api
        .deploy(json!({"service": "voice", "bundle_id": b1.bundle_id}))
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(link.next_deploy(&w.seal).await.deployment, 1);
    age(&ctl, &b1.bundle_id, Duration::from_secs(7200));
    age(&ctl, &b2.bundle_id, Duration::from_secs(7200));
    // (b2 is unused and old: it goes; b1 is deployment 1's, the newest: it stays.)
    sweep_once(&ctl.shared).await;
    assert!(
        exists(&b1.bundle_id),
        "the newest deployment's bundle was deleted"
    );
    assert!(!exists(&b2.bundle_id));
    // A newer deployment, sent to its only target: deployment 1's bundle is needed no more.
    let (status, _) = api.post("/v1/bundles", v2.clone()).await;
    assert_eq!(status, 201);
    let (status, v) = api
        .deploy(json!({"service": "voice", "bundle_id": b2.bundle_id}))
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(link.next_deploy(&w.seal).await.deployment, 2);
    age(&ctl, &b1.bundle_id, Duration::from_secs(7200));
    age(&ctl, &b2.bundle_id, Duration::from_secs(7200));
    sweep_once(&ctl.shared).await;
    assert!(!exists(&b1.bundle_id));
    assert!(
        exists(&b2.bundle_id),
        "the newest deployment's bundle was deleted"
    );
    let text = api.metrics().await;
    assert_eq!(metric(&text, "outpost_bundles_deleted_total"), 3);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_finishes_a_deployment_left_unsent() {
    let dir = temp_dir("resume");
    let cfg = config(&dir);
    let ctl = start(cfg.clone(), Notifier::disabled()).await.unwrap();
    let api = Http::of(&ctl);
    let (_, bundle, info) = pack(&dir, "voice");
    let (status, v) = api.post("/v1/bundles", bundle.clone()).await;
    assert_eq!(status, 201, "{v}");
    let w = Worker::new("w-1", "call-router", None);
    let (link, _) = w.joined(&ctl, Some(TOKEN)).await;
    drop(link);
    ctl.shutdown().await;

    // A deployment recorded but never sealed nor sent (the controller stopped in between).
    let store = Store::open(&cfg.data_dir).unwrap();
    let rec = DeploymentRecord {
        id: 7,
        service: "voice".into(),
        bundle_id: info.bundle_id.clone(),
        version: info.manifest.version.clone(),
        created_ms: 1,
        targets: vec![(w.node, w.name.clone())],
        failures: vec![],
        // As stored before rollouts existed: every target was to be sent at once.
        rollout: Default::default(),
    };
    store
        .controller_commit_with(&Dirty::default(), &[rec])
        .unwrap();
    drop(store);

    let ctl = start(cfg, Notifier::disabled()).await.unwrap();
    let api = Http::of(&ctl);
    let (mut link, _) = w.joined(&ctl, Some(TOKEN)).await;
    let order = link.next_deploy(&w.seal).await;
    assert_eq!(order.deployment, 7);
    let (_, sealed) = got(link.fetch(7, w.node, 0).await);
    assert_eq!(w.seal.open(&sealed).unwrap(), bundle);
    // The next id is above every stored one.
    let (status, v) = api
        .deploy(json!({"service": "voice", "bundle_id": info.bundle_id}))
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["deployment_id"], 8);
    assert_eq!(link.next_deploy(&w.seal).await.deployment, 8);
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Measures upload, sealing and serving of a large bundle to one worker. Run by hand:
/// `OUTPOST_DEPLOY_BENCH_MIB=256 cargo nextest run --release -p outpost --lib --run-ignored only
/// -E 'test(delivery_speed)' --no-capture` (on the real disk: `TMPDIR` decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn delivery_speed() {
    use std::time::Instant;
    let mib: usize = std::env::var("OUTPOST_DEPLOY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let dir = temp_dir("speed");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles/voice");
    std::fs::copy(
        fixture.join("outpost-bundle.toml"),
        src.join("outpost-bundle.toml"),
    )
    .unwrap();
    std::fs::copy(fixture.join("bin/start"), src.join("bin/start")).unwrap();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(src.join("blob")).unwrap());
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..mib {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i * 31 + j * 7 + (j >> 9)) as u8;
            }
            f.write_all(&chunk).unwrap();
        }
    }
    let out = dir.join("big.bundle");
    let info = crate::bundle::pack(&src, &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let mb = bytes.len() as f64 / 1e6;

    let ctl = start(config(&dir), Notifier::disabled()).await.unwrap();
    let api = Http::of(&ctl);
    let w = Worker::new("w-1", "call-router", None);
    let (mut link, _) = w.joined(&ctl, Some(TOKEN)).await;

    let t = Instant::now();
    let (status, v) = api.post("/v1/bundles", bytes.clone()).await;
    assert_eq!(status, 201, "{v}");
    let upload = t.elapsed();
    let t = Instant::now();
    let (status, v) = api
        .deploy(json!({"service": "voice", "bundle_id": info.bundle_id}))
        .await;
    assert_eq!(status, 201, "{v}");
    let order = link.next_deploy(&w.seal).await;
    let seal = t.elapsed();
    let t = Instant::now();
    let (_, sealed) = got(link.fetch(order.deployment, w.node, 0).await);
    let serve = t.elapsed();
    assert_eq!(sealed.len() as u64, order.sealed_bytes);
    assert_eq!(blake3::hash(&sealed).as_bytes(), &order.sealed_hash);
    let rate = |d: Duration| mb / d.as_secs_f64();
    println!(
        "{mb:.0} MB: upload {:.0} MB/s ({upload:?}), seal+publish {:.0} MB/s ({seal:?}), serve {:.0} MB/s ({serve:?})",
        rate(upload),
        rate(seal),
        rate(serve)
    );
    ctl.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
