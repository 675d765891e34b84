//! Invariant 7 at the QUIC level: a pinned peer that sends a hostile frame (an element whose id
//! does not match its contents, a frame claiming 2 GiB, a protocol version we do not speak, a
//! second Hello, a node id its certificate does not prove) loses that one connection, with a reason, and nothing is stored. The node goes
//! on serving: the same peer reconnecting with a valid element is applied.

use std::time::Duration;

use outpost::config::{Config, PeerConfig};
use outpost::datacenter::{self, Running};
use outpost::ids::{MsgId, NodeId};
use outpost::model::{message_id, to_canonical, ElementRecord, EventType, Version};
use outpost::net::{self, close, Identity, PinSet, TransportLimits};
use outpost::wire::{
    encode_frame, read_frame, write_frame, Elements, Hello, Message, Role, PROTOCOL_VERSION,
};
use serde_json::json;

struct Evil {
    id: Identity,
    node_id: NodeId,
    ep: quinn::Endpoint,
}

async fn setup() -> (Running, Evil, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("outpost-hostile-{}", rand::random::<u64>()));
    let node_id = NodeId::random();
    let id = Identity::generate(node_id, "evil").unwrap();
    let info = outpost::roles::init(&dir, Role::Datacenter, Some("dc")).unwrap();
    let mut c = Config::with_defaults(Role::Datacenter, "dc", &dir);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.api = "127.0.0.1:0".parse().unwrap();
    c.peers = vec![PeerConfig {
        name: "evil".into(),
        // Never answers: the node may dial it, in vain; the test dials the node.
        addr: "127.0.0.1:9".parse().unwrap(),
        fingerprints: vec![id.fingerprint],
    }];
    let running = datacenter::start(c).await.unwrap();
    let ep = net::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &id,
        PinSet::new([info.fingerprint]),
        TransportLimits::default(),
    )
    .unwrap();
    (running, Evil { id, node_id, ep }, dir)
}

impl Evil {
    async fn session(
        &self,
        node: &Running,
    ) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
        let (conn, _) = net::connect(&self.ep, node.quic_addr).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, &Message::Hello(self.hello(PROTOCOL_VERSION)))
            .await
            .unwrap();
        match read_frame(&mut recv, 1 << 20).await.unwrap() {
            Some(Message::Hello(h)) => assert_eq!(h.protocol, PROTOCOL_VERSION),
            other => panic!("expected the node's Hello, got {other:?}"),
        }
        (conn, send, recv)
    }

    fn hello(&self, protocol: u16) -> Hello {
        Hello {
            protocol,
            node_id: self.node_id,
            role: Role::Datacenter,
            name: "evil".into(),
            log_epoch: 7,
            resume: None,
            marks: vec![],
        }
    }

    fn record(&self, oseq: u64) -> ElementRecord {
        let element = to_canonical(&json!({"status": "here"}));
        let version = Version {
            ms: 1_700_000_000_000,
            logical: 0,
            node: self.node_id,
        };
        ElementRecord {
            origin: self.node_id,
            oseq,
            account: "mallory".into(),
            etype: EventType::Presence,
            version,
            msg_id: message_id(
                self.node_id,
                oseq,
                "mallory",
                EventType::Presence,
                version,
                &element,
            ),
            element,
        }
    }
}

/// Waits for the node to close the connection and returns its code and reason.
async fn closed_with(conn: &quinn::Connection) -> (u32, String) {
    let err = tokio::time::timeout(Duration::from_secs(30), conn.closed())
        .await
        .expect("the node closes a hostile connection");
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner() as u32,
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other:?}"),
    }
}

fn entries(node: &Running) -> u64 {
    node.shared.store.digest().unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_one_connection_and_store_nothing() {
    let (node, evil, dir) = setup().await;

    // 1. An element whose message id does not match its contents.
    let (conn, mut send, _recv) = evil.session(&node).await;
    let mut forged = evil.record(1);
    forged.msg_id = MsgId([7; 32]);
    let frame = Elements {
        epoch: 7,
        after: 0,
        upto: 1,
        items: vec![(1, forged)],
    };
    write_frame(&mut send, &Message::Elements(frame))
        .await
        .unwrap();
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, close::PROTOCOL);
    assert!(reason.contains("message id"), "reason: {reason}");
    assert_eq!(entries(&node), 0);

    // 2. A frame that claims 2 GiB.
    let (conn, mut send, _recv) = evil.session(&node).await;
    send.write_all(&(2u32 << 30).to_be_bytes()).await.unwrap();
    send.write_all(&[0; 64]).await.unwrap();
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, close::PROTOCOL);
    assert!(reason.contains("exceeds"), "reason: {reason}");

    // 3. A second Hello.
    let (conn, mut send, _recv) = evil.session(&node).await;
    write_frame(&mut send, &Message::Hello(evil.hello(PROTOCOL_VERSION)))
        .await
        .unwrap();
    let (code, _) = closed_with(&conn).await;
    assert_eq!(code, close::PROTOCOL);

    // 4. A protocol version this node does not speak gets a clear refusal.
    let (conn, _) = net::connect(&evil.ep, node.quic_addr).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_frame(&Message::Hello(evil.hello(99))))
        .await
        .unwrap();
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, close::VERSION);
    assert!(reason.contains("protocol 99"), "reason: {reason}");
    assert_eq!(entries(&node), 0, "nothing stored from any hostile frame");

    // 5. A pinned peer naming a node id its certificate does not prove (another peer's): refused,
    // and that id is never listed for the peer, so it can move nobody's acks, marks or counts.
    let (conn, _) = net::connect(&evil.ep, node.quic_addr).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let other = NodeId::random();
    let mut claim = evil.hello(PROTOCOL_VERSION);
    claim.node_id = other;
    send.write_all(&encode_frame(&Message::Hello(claim)))
        .await
        .unwrap();
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, close::PROTOCOL);
    assert!(reason.contains("certificate proves"), "reason: {reason}");
    let listed = node.shared.peers.get(0).info.lock().unwrap().node_id;
    assert_ne!(listed, Some(other), "the claimed id is never believed");

    // The node goes on: the same peer with a valid element is applied and acknowledged.
    let (conn, mut send, mut recv) = evil.session(&node).await;
    let good = Elements {
        epoch: 7,
        after: 0,
        upto: 1,
        items: vec![(1, evil.record(1))],
    };
    write_frame(&mut send, &Message::Elements(good))
        .await
        .unwrap();
    // The node also streams its own log to us (here: a range covering our record, which it
    // withholds since we gave it); the Ack is what we wait for.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv, 1 << 20)).await {
            Ok(Ok(Some(Message::Ack { epoch: 7, upto: 1 }))) => break,
            Ok(Ok(Some(Message::Elements(e)))) => assert!(e.items.is_empty(), "{e:?}"),
            other => panic!("expected Ack up to 1, got {other:?}"),
        }
    }
    assert_eq!(entries(&node), 1);
    let refused = node
        .shared
        .metrics
        .frames_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(refused >= 3, "refusals are counted: {refused}");
    conn.close(0u32.into(), b"done");
    drop(evil.id);
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
