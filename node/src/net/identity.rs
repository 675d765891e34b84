//! A node's TLS identity: a self-signed certificate and its PKCS#8 key, named by the blake3
//! fingerprint of the certificate DER. Generating and loading only; it never touches the disk
//! (the store keeps the bytes) and never decides who is trusted (see `pins`).

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::{provider, NetError, SERVER_NAME};
use crate::ids::{Fingerprint, NodeId};

/// A node's certificate and private key. `Debug` never prints the key.
#[derive(Clone)]
pub struct Identity {
    pub cert_der: Vec<u8>,
    /// PKCS#8.
    pub key_der: Vec<u8>,
    pub fingerprint: Fingerprint,
}

impl Identity {
    /// A fresh ECDSA P-256 key and a self-signed certificate with CN `outpost <name> <node id>`
    /// and SAN `outpost` (the name every client dials). Valid 1975..4096: peers pin the
    /// fingerprint and ignore dates, and a certificate must never expire under a running fleet.
    pub fn generate(node_id: NodeId, name: &str) -> Result<Identity, NetError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("outpost {name} {node_id}"),
        );
        let cert = params.self_signed(&key)?;
        Identity::from_der(cert.der().to_vec(), key.serialize_der())
    }

    /// Loads stored bytes: recomputes the fingerprint and refuses a key that does not parse or
    /// does not belong to the certificate.
    pub fn from_der(cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<Identity, NetError> {
        let id = Identity {
            fingerprint: Fingerprint::of_der(&cert_der),
            cert_der,
            key_der,
        };
        id.certified_key()?;
        Ok(id)
    }

    /// The rustls form, checked: the key parses with the ring provider and its public half is
    /// the certificate's.
    pub(crate) fn certified_key(&self) -> Result<Arc<CertifiedKey>, NetError> {
        let cert = CertificateDer::from(self.cert_der.clone());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        CertifiedKey::from_der(vec![cert], key, &provider())
            .map(Arc::new)
            .map_err(NetError::Key)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint.to_string())
            .finish_non_exhaustive()
    }
}
