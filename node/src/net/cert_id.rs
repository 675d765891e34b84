//! The node id a certificate proves. Every node certificate is self-signed with the subject
//! CN `outpost <name> <node id>` ([`super::Identity::generate`]); the TLS handshake proves the
//! peer holds the certificate's key, so the node id in the CN is the one that key claims, and a
//! Hello or Join naming any other node id is a peer speaking for someone else.
//!
//! Parsing is x509-parser's (a maintained DER parser); this module only reads the CN.

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ids::NodeId;

/// What every node certificate's CN starts with.
const CN_PREFIX: &str = "outpost ";

/// The node id in the CN `outpost <name> <node id>` of a DER certificate; `None` when the bytes
/// are not one whole certificate, it has no CN or more than one, or the CN is not of that form.
pub fn node_id_of_cert(der: &[u8]) -> Option<NodeId> {
    let (rest, cert) = X509Certificate::from_der(der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?;
    if cns.next().is_some() {
        return None;
    }
    node_id_of_cn(cn)
}

/// `outpost <name> <node id>`: a non-empty name without spaces and 32 lowercase hex digits.
fn node_id_of_cn(cn: &str) -> Option<NodeId> {
    let (name, id) = cn.strip_prefix(CN_PREFIX)?.split_once(' ')?;
    if name.is_empty() || id.contains(' ') {
        return None;
    }
    // NodeId's Display is lowercase; accept only that exact form.
    let node: NodeId = id.parse().ok()?;
    (node.to_string() == id).then_some(node)
}

/// The peer's end-entity certificate, once the handshake is done.
pub fn peer_cert_der(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    chain.first().map(|leaf| leaf.to_vec())
}

/// The node id the peer's certificate proves (see [`node_id_of_cert`]).
pub fn peer_node_id(conn: &quinn::Connection) -> Option<NodeId> {
    node_id_of_cert(&peer_cert_der(conn)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Identity;

    #[test]
    fn node_id_is_read_from_a_generated_certificate() {
        let node = NodeId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let id = Identity::generate(node, "w7").unwrap();
        assert_eq!(node_id_of_cert(&id.cert_der), Some(node));
    }

    #[test]
    fn a_certificate_without_a_node_id_proves_none() {
        let plain = |cn: &str| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["outpost".into()]).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn.to_owned());
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let id = "0123456789abcdef0011223344556677";
        assert!(node_id_of_cert(&plain(&format!("outpost w7 {id}"))).is_some());
        for cn in [
            "w7".to_owned(),
            format!("outpost {id}"),
            format!("outpost  {id}"),
            format!("outpost w7 {}", id.to_uppercase()),
            format!("outpost w7 {id} extra"),
            format!("notpost w7 {id}"),
            format!("outpost w7 {}", &id[..30]),
        ] {
            assert_eq!(node_id_of_cert(&plain(&cn)), None, "CN {cn:?}");
        }
        let good = plain(&format!("outpost w7 {id}"));
        assert_eq!(node_id_of_cert(&good[..good.len() - 1]), None, "cut short");
        let mut long = good.clone();
        long.push(0);
        assert_eq!(node_id_of_cert(&long), None, "trailing bytes");
        assert_eq!(node_id_of_cert(b"not a certificate"), None);
    }
}
