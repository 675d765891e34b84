//! Identifiers that travel between nodes: node ids, message ids and certificate fingerprints.
//! Pure values; nothing here does I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A random 128-bit node id, created with the database and never changed. It names the origin of
/// every data element and breaks version ties. Printed as 32 lowercase hex characters.
#[derive(Copy, Clone, Default, Eq, PartialEq, Ord, PartialOrd, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u128);

impl NodeId {
    pub fn random() -> Self {
        NodeId(rand::random::<u128>())
    }
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
    pub fn from_bytes(b: [u8; 16]) -> Self {
        NodeId(u128::from_be_bytes(b))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form keeps logs and test failures readable.
        write!(f, "n{:08x}", (self.0 >> 96) as u32)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected {expected} hex characters, got {got:?}")]
pub struct ParseHexError {
    pub expected: usize,
    pub got: String,
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], ParseHexError> {
    let err = || ParseHexError {
        expected: N * 2,
        got: s.chars().take(80).collect(),
    };
    if s.len() != N * 2 {
        return Err(err());
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
    Ok(out)
}

impl FromStr for NodeId {
    type Err = ParseHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<16>(s).map(NodeId::from_bytes)
    }
}

/// blake3 id of a replicated message (see [`crate::model::message_id`]).
#[derive(Copy, Clone, Default, Eq, PartialEq, Ord, PartialOrd, Hash, Serialize, Deserialize)]
pub struct MsgId(pub [u8; 32]);

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "m{}", &hex::encode(&self.0[..4]))
    }
}

impl FromStr for MsgId {
    type Err = ParseHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<32>(s).map(MsgId)
    }
}

/// Hex blake3 of a node's certificate (DER). Peers pin it.
#[derive(Copy, Clone, Default, Eq, PartialEq, Ord, PartialOrd, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_der(cert_der: &[u8]) -> Self {
        Fingerprint(*blake3::hash(cert_der).as_bytes())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fp{}", &hex::encode(&self.0[..4]))
    }
}

impl FromStr for Fingerprint {
    type Err = ParseHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<32>(s).map(Fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let n = NodeId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(n.to_string(), "0123456789abcdef0011223344556677");
        assert_eq!(n.to_string().parse::<NodeId>().unwrap(), n);
        assert!("xyz".parse::<NodeId>().is_err());
        assert!("0123456789abcdef001122334455667".parse::<NodeId>().is_err());
        let f = Fingerprint::of_der(b"cert");
        assert_eq!(f.to_string().parse::<Fingerprint>().unwrap(), f);
    }
}
