//! Who may complete a handshake with this node: the pin set, the policy over it, and the rustls
//! verifiers (both directions) that enforce it. A verifier decides on the certificate's
//! fingerprint and then still checks the handshake signature, so a copied public certificate
//! is worth nothing without its key. Nothing here does I/O.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    PeerIncompatible, SignatureScheme,
};

use super::provider;
use crate::ids::Fingerprint;

/// The certificate fingerprints a node accepts. Clones share one set, so `replace` (SIGHUP,
/// admission) is seen by every endpoint built from it, from the next handshake on.
#[derive(Clone, Default)]
pub struct PinSet {
    inner: Arc<RwLock<BTreeSet<Fingerprint>>>,
}

impl PinSet {
    pub fn new(fps: impl IntoIterator<Item = Fingerprint>) -> Self {
        PinSet {
            inner: Arc::new(RwLock::new(fps.into_iter().collect())),
        }
    }

    /// Swaps the whole set. Established connections are not touched: the caller closes those
    /// it no longer trusts.
    pub fn replace(&self, fps: impl IntoIterator<Item = Fingerprint>) {
        let next: BTreeSet<Fingerprint> = fps.into_iter().collect();
        // A panic while holding the lock cannot leave a half-written set (we only swap whole
        // values), so a poisoned lock is still safe to use.
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(fp)
    }

    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for PinSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f.debug_set().entries(set.iter()).finish()
    }
}

/// How a verifier decides on a peer's certificate once its signature is known to be good.
///
/// Whatever the policy, the verifiers check the handshake signature unconditionally.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PinPolicy {
    /// Only certificates whose fingerprint is in the set.
    Pinned(PinSet),
    /// Every certificate except those in the set: the controller lets an unknown worker finish
    /// the handshake so that it can be recorded as pending (design invariant 5), and refuses a
    /// rejected key in the handshake itself.
    AllBut(PinSet),
}

impl PinPolicy {
    pub fn admits(&self, fp: &Fingerprint) -> bool {
        match self {
            PinPolicy::Pinned(pins) => pins.contains(fp),
            PinPolicy::AllBut(denied) => !denied.contains(fp),
        }
    }
}

/// The peer's certificate is not one this node accepts.
#[derive(thiserror::Error)]
#[error("unknown peer certificate {fingerprint}")]
pub struct UnknownPeerCertificate {
    pub fingerprint: Fingerprint,
}

// rustls shows a `CertificateError::Other` with `{:?}`, and that string is what quinn reports;
// print the full fingerprint there so an operator can pin (or hunt) it.
impl fmt::Debug for UnknownPeerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Enforces a [`PinPolicy`] on the server certificate (when dialling) and on the mandatory
/// client certificate (when accepting). Names, chains and validity dates are ignored: the
/// certificates are self-signed and trusted by fingerprint alone.
#[derive(Debug)]
pub struct PinVerifier {
    policy: PinPolicy,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinVerifier {
    pub fn new(policy: PinPolicy) -> Self {
        PinVerifier {
            policy,
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>, role: &'static str) -> Result<(), Error> {
        let fingerprint = Fingerprint::of_der(end_entity);
        if self.policy.admits(&fingerprint) {
            return Ok(());
        }
        // rustls calls the certificate check once per handshake, so this is one line per
        // refused attempt.
        tracing::warn!(%fingerprint, peer = role, "unknown peer certificate {fingerprint}, refusing handshake");
        Err(Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(UnknownPeerCertificate { fingerprint })),
        )))
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// TLS 1.2 is never negotiated (configs are TLS 1.3 only); refuse rather than verify.
fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::PeerIncompatible(
        PeerIncompatible::Tls13RequiredForQuic,
    ))
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity, "server")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.supported_schemes()
    }
}

impl ClientCertVerifier for PinVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.supported_schemes()
    }
}
