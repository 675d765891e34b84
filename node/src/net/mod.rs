//! QUIC transport: the node's identity, mutually authenticated endpoints with certificate
//! pinning (design invariant 5), and transport limits. This module owns the quinn endpoint and
//! the rustls configuration; it never decides what a frame means (see `wire`) nor who should be
//! pinned (the roles and the config hand it a [`PinSet`]).
//!
//! Crypto is always rustls' ring provider, TLS 1.3 only, and session resumption is off on both
//! sides: a resumed session would skip the certificate check, so a fingerprint removed from the
//! pin set could come back through an old ticket.

pub mod backoff;
pub mod cert_id;
mod identity;
mod pins;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, SingleCertAndKey};

pub use identity::Identity;
pub use pins::{PinPolicy, PinSet, PinVerifier, UnknownPeerCertificate};

use crate::ids::Fingerprint;
use crate::limits::STREAMS_MAX;

/// The only application protocol spoken; the protocol version travels in the Hello.
pub const ALPN: &[u8] = b"outpost";

/// The server name every client asks for, and the SAN every node certificate carries. Peers
/// are told apart by fingerprint, not by name.
pub const SERVER_NAME: &str = "outpost";

/// QUIC application close codes (`quinn::Connection::close(VarInt::from_u32(code), reason)`).
pub mod close {
    /// A bad frame or otherwise hostile input.
    pub const PROTOCOL: u32 = 1;
    /// A second connection for a pair that already has one.
    pub const DUPLICATE: u32 = 2;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 3;
    /// The reason sent with [`SHUTDOWN`], whichever path closes the connection first (the
    /// endpoint closing every connection, or a link task that saw the writer stop).
    pub const SHUTDOWN_REASON: &str = "the node is shutting down";
    /// The peer completed the handshake but is not (or no longer) known.
    pub const UNKNOWN_PEER: u32 = 4;
    /// The peer speaks a protocol version this node does not.
    pub const VERSION: u32 = 5;
    /// The peer does not read what it is sent fast enough (its bounded queue is full); what was
    /// not delivered is durable and resent when it reconnects.
    pub const OVERLOADED: u32 = 6;
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("generating the node certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("node certificate or key unusable: {0}")]
    Key(#[source] rustls::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("QUIC crypto configuration: {0}")]
    QuicCrypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("transport limits: {0}")]
    Limits(String),
    #[error("binding UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("dialling: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("handshake finished without a peer certificate")]
    NoPeerIdentity,
}

/// Transport bounds applied to every connection, both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportLimits {
    /// A connection with no traffic for this long is closed (also bounds a handshake).
    pub idle_timeout: Duration,
    /// Ping interval; must be below `idle_timeout` so a quiet but healthy link stays up.
    pub keep_alive: Duration,
    /// Receive window per stream.
    pub stream_window_bytes: u64,
    /// Receive window per connection (all streams), also used as the send window.
    pub conn_window_bytes: u64,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            // Bundles travel in chunks on their own streams; a few MiB in flight keeps a
            // high-latency link busy without letting one peer pin much memory.
            stream_window_bytes: 8 << 20,
            conn_window_bytes: 32 << 20,
        }
    }
}

impl TransportLimits {
    fn transport_config(&self) -> Result<TransportConfig, NetError> {
        let bad = |what: String| Err(NetError::Limits(what));
        if self.idle_timeout.is_zero() {
            return bad("idle_timeout must be above zero".into());
        }
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return bad(format!(
                "keep_alive ({:?}) must be above zero and below idle_timeout ({:?})",
                self.keep_alive, self.idle_timeout
            ));
        }
        if self.stream_window_bytes == 0 || self.stream_window_bytes > self.conn_window_bytes {
            return bad(format!(
                "stream_window_bytes ({}) must be above zero and at most conn_window_bytes ({})",
                self.stream_window_bytes, self.conn_window_bytes
            ));
        }
        let varint = |v: u64, what: &str| {
            VarInt::from_u64(v).map_err(|_| NetError::Limits(format!("{what} {v} too large")))
        };
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            NetError::Limits(format!("idle_timeout {:?} too large", self.idle_timeout))
        })?;

        let mut t = TransportConfig::default();
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .stream_receive_window(varint(self.stream_window_bytes, "stream_window_bytes")?)
            .receive_window(varint(self.conn_window_bytes, "conn_window_bytes")?)
            .send_window(self.conn_window_bytes)
            .max_concurrent_bidi_streams(STREAMS_MAX.into())
            .max_concurrent_uni_streams(STREAMS_MAX.into());
        Ok(t)
    }
}

/// The one crypto provider of the process (see traps.md: never let rustls pick one).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn server_tls(
    key: Arc<CertifiedKey>,
    verifier: Arc<PinVerifier>,
) -> Result<rustls::ServerConfig, NetError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(NetError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

fn client_tls(
    key: Arc<CertifiedKey>,
    verifier: Arc<PinVerifier>,
) -> Result<rustls::ClientConfig, NetError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(NetError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}

/// Builds the quinn endpoint from already-checked parts; tests use it to present a
/// certificate with a key that does not belong to it.
/// The stateless-reset key: a blake3 MAC keyed from the node's private key, so it is the same
/// after a restart. A node restarted after kill -9 then answers packets of its peers' stale
/// connections with a reset they accept, and they reconnect at once instead of waiting out the
/// idle timeout.
struct ResetKey([u8; 32]);

impl ResetKey {
    fn derive(private_key_der: &[u8]) -> Self {
        ResetKey(blake3::derive_key(
            "outpost 2026-11 quic stateless reset key",
            private_key_der,
        ))
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], out: &mut [u8]) {
        out.copy_from_slice(blake3::keyed_hash(&self.0, data).as_bytes());
    }
    fn signature_len(&self) -> usize {
        32
    }
    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let Ok(sig) = <[u8; 32]>::try_from(signature) else {
            return Err(quinn::crypto::CryptoError);
        };
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(&self.0, data) == blake3::Hash::from(sig) {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

fn endpoint_from_parts(
    listen: SocketAddr,
    key: Arc<CertifiedKey>,
    reset: ResetKey,
    policy: PinPolicy,
    limits: TransportLimits,
) -> Result<quinn::Endpoint, NetError> {
    let transport = Arc::new(limits.transport_config()?);
    let verifier = Arc::new(PinVerifier::new(policy));

    let server_crypto = QuicServerConfig::try_from(server_tls(key.clone(), verifier.clone())?)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());

    let client_crypto = QuicClientConfig::try_from(client_tls(key, verifier)?)?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);

    let bind_err = |source| NetError::Bind {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind_err)?;
    // Connection ids are validated with a keyed hash; the key must outlive the process too,
    // or a restarted node drops its peers' stale packets as invalid instead of resetting them.
    let cid_key = u64::from_le_bytes(reset.0[..8].try_into().expect("8 bytes"));
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let mut ep = quinn::Endpoint::new(
        endpoint_config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_err)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// One endpoint that accepts (mandatory client certificates, checked against `pins`) and dials
/// (server certificates checked against the same `pins`). Must be called inside a tokio
/// runtime. `pins` stays live: [`PinSet::replace`] applies to the next handshake.
pub fn endpoint(
    listen: SocketAddr,
    id: &Identity,
    pins: PinSet,
    limits: TransportLimits,
) -> Result<quinn::Endpoint, NetError> {
    endpoint_with_policy(listen, id, PinPolicy::Pinned(pins), limits)
}

/// [`endpoint`] with an explicit policy, for roles that need more than a plain pin set.
pub fn endpoint_with_policy(
    listen: SocketAddr,
    id: &Identity,
    policy: PinPolicy,
    limits: TransportLimits,
) -> Result<quinn::Endpoint, NetError> {
    endpoint_from_parts(
        listen,
        id.certified_key()?,
        ResetKey::derive(&id.key_der),
        policy,
        limits,
    )
}

/// Dials `addr` and completes the handshake. The server's certificate has been pinned by then;
/// ours is checked by the server, which (TLS 1.3) may refuse it after this returns: the
/// connection then closes with a crypto error before the first stream is answered.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<(quinn::Connection, Fingerprint), NetError> {
    let conn = ep.connect(addr, SERVER_NAME)?.await?;
    let fp = peer_fingerprint(&conn).ok_or(NetError::NoPeerIdentity)?;
    Ok((conn, fp))
}

/// Completes an incoming handshake (from `Endpoint::accept`); the client's certificate has been
/// pinned when this returns Ok.
pub async fn accept(
    incoming: quinn::Incoming,
) -> Result<(quinn::Connection, Fingerprint), NetError> {
    let conn = incoming.await?;
    let fp = peer_fingerprint(&conn).ok_or(NetError::NoPeerIdentity)?;
    Ok((conn, fp))
}

/// The fingerprint of the peer's end-entity certificate, once the handshake is done.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    chain.first().map(|leaf| Fingerprint::of_der(leaf))
}
