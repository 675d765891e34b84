//! Invariant 5 (nobody unadmitted) at the transport: real endpoints on 127.0.0.1, no sleeps;
//! timeouts are failure deadlines only.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::internal::msgs::codec::Codec;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::*;
use crate::ids::NodeId;

const DEADLINE: Duration = Duration::from_secs(20);

type Handshake = Result<(quinn::Connection, Fingerprint), NetError>;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("deadline passed")
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn identity(name: &str) -> Identity {
    Identity::generate(NodeId::random(), name).unwrap()
}

fn node(id: &Identity, pins: &PinSet) -> quinn::Endpoint {
    endpoint(local(), id, pins.clone(), TransportLimits::default()).unwrap()
}

/// Dials `server` from `client` and returns both sides' view of the handshake.
async fn dial(client: &quinn::Endpoint, server: &quinn::Endpoint) -> (Handshake, Handshake) {
    let addr = server.local_addr().unwrap();
    within(async {
        tokio::join!(connect(client, addr), async {
            accept(server.accept().await.expect("endpoint open")).await
        })
    })
    .await
}

/// Under TLS 1.3 the client may finish its half before the server refuses its certificate;
/// then the connection must close by itself, before any use.
async fn assert_refused(client: Handshake, server: Handshake) {
    assert!(server.is_err(), "server accepted a refused handshake");
    if let Ok((conn, _)) = client {
        within(conn.closed()).await;
    }
}

async fn round_trip(client: &quinn::Connection, server: &quinn::Connection) {
    within(async {
        let (mut send, mut recv) = client.open_bi().await.unwrap();
        send.write_all(b"ping").await.unwrap();
        send.finish().unwrap();
        let (mut s_send, mut s_recv) = server.accept_bi().await.unwrap();
        assert_eq!(s_recv.read_to_end(64).await.unwrap(), b"ping");
        s_send.write_all(b"pong").await.unwrap();
        s_send.finish().unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"pong");
    })
    .await
}

#[tokio::test]
async fn nobody_unadmitted_mutual_pins_connect_and_carry_a_stream() {
    let (a, b) = (identity("dc-a"), identity("dc-b"));
    let ea = node(&a, &PinSet::new([b.fingerprint]));
    let eb = node(&b, &PinSet::new([a.fingerprint]));

    let (client, server) = dial(&ea, &eb).await;
    let (c_conn, c_sees) = client.unwrap();
    let (s_conn, s_sees) = server.unwrap();
    assert_eq!(c_sees, b.fingerprint);
    assert_eq!(s_sees, a.fingerprint);
    assert_eq!(peer_fingerprint(&c_conn), Some(b.fingerprint));
    assert_eq!(peer_fingerprint(&s_conn), Some(a.fingerprint));
    let hs = c_conn.handshake_data().unwrap();
    let hs = hs
        .downcast_ref::<quinn::crypto::rustls::HandshakeData>()
        .unwrap();
    assert_eq!(hs.protocol.as_deref(), Some(ALPN));
    round_trip(&c_conn, &s_conn).await;
}

#[tokio::test]
async fn nobody_unadmitted_server_refuses_unpinned_client() {
    let (a, b) = (identity("dc-a"), identity("dc-b"));
    let client = node(&a, &PinSet::new([b.fingerprint]));
    let server = node(&b, &PinSet::new([identity("other").fingerprint]));

    let (c, s) = dial(&client, &server).await;
    assert_refused(c, s).await;
}

#[tokio::test]
async fn nobody_unadmitted_client_refuses_unpinned_server() {
    let (a, b) = (identity("dc-a"), identity("dc-b"));
    let client = node(&a, &PinSet::new([identity("other").fingerprint]));
    let server = node(&b, &PinSet::new([a.fingerprint]));

    let (c, s) = dial(&client, &server).await;
    let err = c.expect_err("client accepted an unpinned server");
    let msg = err.to_string();
    assert!(
        msg.contains(&b.fingerprint.to_string()),
        "error should name the refused fingerprint: {msg}"
    );
    assert!(s.is_err());
}

#[tokio::test]
async fn nobody_unadmitted_pin_replace_applies_to_next_handshake() {
    let (a, b) = (identity("dc-a"), identity("dc-b"));
    let server_pins = PinSet::default();
    let client = node(&a, &PinSet::new([b.fingerprint]));
    let server = node(&b, &server_pins);

    let (c, s) = dial(&client, &server).await;
    assert_refused(c, s).await;

    server_pins.replace([a.fingerprint]);
    let (c, s) = dial(&client, &server).await;
    let ((c_conn, _), (s_conn, _)) = (c.unwrap(), s.unwrap());
    round_trip(&c_conn, &s_conn).await;

    // Revocation too: no resumed session may skip the check.
    server_pins.replace([]);
    let (c, s) = dial(&client, &server).await;
    assert_refused(c, s).await;
}

/// `victim`'s certificate served with `impostor`'s key: what someone who has only seen the
/// public certificate can present.
fn stolen_cert(victim: &Identity, impostor: &Identity) -> Arc<CertifiedKey> {
    let key = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            impostor.key_der.clone(),
        )))
        .unwrap();
    Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(victim.cert_der.clone())],
        key,
    ))
}

fn impostor_node(victim: &Identity, pins: &PinSet) -> quinn::Endpoint {
    let key = stolen_cert(victim, &identity("impostor"));
    let policy = PinPolicy::Pinned(pins.clone());
    endpoint_from_parts(
        local(),
        key,
        ResetKey::derive(b"impostor"),
        policy,
        TransportLimits::default(),
    )
    .unwrap()
}

#[tokio::test]
async fn nobody_unadmitted_impostor_server_with_copied_certificate_is_refused() {
    let (a, b) = (identity("dc-a"), identity("dc-b"));
    let client = node(&a, &PinSet::new([b.fingerprint]));
    let fake_b = impostor_node(&b, &PinSet::new([a.fingerprint]));

    let (c, s) = dial(&client, &fake_b).await;
    let err = c.expect_err("client accepted a server without its key");
    assert!(err.to_string().contains("BadSignature"), "{err}");
    assert!(s.is_err());
}

#[tokio::test]
async fn nobody_unadmitted_impostor_client_with_copied_certificate_is_refused() {
    let (a, b) = (identity("dc-a"), identity("dc-b"));
    let fake_a = impostor_node(&a, &PinSet::new([b.fingerprint]));
    let server = node(&b, &PinSet::new([a.fingerprint]));

    let (c, s) = dial(&fake_a, &server).await;
    let err = s
        .as_ref()
        .expect_err("server accepted a client without its key");
    assert!(err.to_string().contains("BadSignature"), "{err}");
    assert_refused(c, s).await;
}

fn sign(key_der: &[u8], message: &[u8]) -> DigitallySignedStruct {
    let key = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key_der.to_vec(),
        )))
        .unwrap();
    let signer = key
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .unwrap();
    let sig = signer.sign(message).unwrap();
    // rustls builds this struct only from the wire: scheme, u16 length, signature.
    let mut wire = signer.scheme().to_array().to_vec();
    wire.extend_from_slice(&u16::try_from(sig.len()).unwrap().to_be_bytes());
    wire.extend_from_slice(&sig);
    DigitallySignedStruct::read_bytes(&wire).unwrap()
}

#[test]
fn nobody_unadmitted_verifier_checks_signature_not_just_fingerprint() {
    let (victim, impostor) = (identity("victim"), identity("impostor"));
    let v = PinVerifier::new(PinPolicy::Pinned(PinSet::new([victim.fingerprint])));
    let cert = CertificateDer::from(victim.cert_der.clone());
    let msg = b"handshake transcript";

    let forged = sign(&impostor.key_der, msg);
    assert!(ServerCertVerifier::verify_tls13_signature(&v, msg, &cert, &forged).is_err());
    assert!(ClientCertVerifier::verify_tls13_signature(&v, msg, &cert, &forged).is_err());

    let genuine = sign(&victim.key_der, msg);
    assert!(ServerCertVerifier::verify_tls13_signature(&v, msg, &cert, &genuine).is_ok());
    assert!(ClientCertVerifier::verify_tls13_signature(&v, b"other", &cert, &genuine).is_err());
    assert!(ServerCertVerifier::verify_tls12_signature(&v, msg, &cert, &genuine).is_err());
    assert!(ClientCertVerifier::verify_tls12_signature(&v, msg, &cert, &genuine).is_err());
    assert!(ClientCertVerifier::client_auth_mandatory(&v));
}

#[test]
fn identity_from_der_keeps_fingerprint_and_generate_is_distinct() {
    let a = identity("dc-a");
    let b = identity("dc-a");
    assert_ne!(a.fingerprint, b.fingerprint);
    assert_eq!(a.fingerprint, Fingerprint::of_der(&a.cert_der));

    let loaded = Identity::from_der(a.cert_der.clone(), a.key_der.clone()).unwrap();
    assert_eq!(loaded.fingerprint, a.fingerprint);
    assert!(!format!("{loaded:?}").contains(&hex::encode(&a.key_der[..8])));

    assert!(matches!(
        Identity::from_der(a.cert_der.clone(), b.key_der.clone()),
        Err(NetError::Key(_))
    ));
    assert!(Identity::from_der(a.cert_der.clone(), b"not a key".to_vec()).is_err());
}

#[test]
fn transport_limits_refuse_keep_alive_at_or_above_idle() {
    assert!(TransportLimits::default().transport_config().is_ok());
    let bad = TransportLimits {
        keep_alive: Duration::from_secs(30),
        ..TransportLimits::default()
    };
    assert!(matches!(bad.transport_config(), Err(NetError::Limits(_))));
}

#[test]
fn pin_set_clones_share_replacements() {
    let (x, y) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
    let pins = PinSet::new([x]);
    let seen_by_endpoint = pins.clone();
    pins.replace([y]);
    assert!(!seen_by_endpoint.contains(&x));
    assert!(seen_by_endpoint.contains(&y));
    assert_eq!(seen_by_endpoint.len(), 1);
}
