//! What a publication carries once opened: new state computed by the controller for one
//! machine. Postcard, like the wire; variants only ever added at the end.

use serde::{Deserialize, Serialize};

use crate::ids::{Fingerprint, NodeId};

/// A publication's plaintext.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// To a load balancer: its backend pool (dependents that are up), and every dependent's
    /// key (only those may dial it).
    Pool(Pool),
    /// To a dependent: where its load balancer is (`None`: it has none that is admitted).
    LoadBalancer(Option<LbRoute>),
    /// Install and run this software. The publication carrying it is the signed envelope: the
    /// controller's signature covers the machine, the channel sequence and (sealed inside) the
    /// deployment, the bundle id and the hash of the bundle sealed to this machine.
    Deploy(DeployOrder),
    /// Write this configuration where the software expects it and tell the software. The
    /// machine's effective configuration (service, then component, then machine overrides),
    /// as the controller computed it.
    Config(ConfigOrder),
    /// To a call router: the load balancer dedicated to it, the one it hands its jobs to
    /// (`None`: it names none that is admitted, or that load balancer serves another router).
    /// Sent again whenever that load balancer goes down, comes back or is replaced.
    Coupled(Option<LbEndpoint>),
    /// To a load balancer: the call router it serves (`None`: none). Its dependents come in
    /// its [`Pool`].
    Router(Option<RouterPeer>),
}

/// A call router's load balancer, as the router's software needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbEndpoint {
    pub name: String,
    pub node_id: NodeId,
    /// Where its software takes jobs (`host:port`).
    pub service_addr: Option<String>,
    /// Its relay's QUIC `host:port`.
    pub relay_addr: Option<String>,
    pub fingerprint: Fingerprint,
    /// Heard from within the controller's `down_after`.
    pub up: bool,
}

/// The call router a load balancer serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterPeer {
    pub name: String,
    pub node_id: NodeId,
    pub service_addr: Option<String>,
    pub fingerprint: Fingerprint,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigOrder {
    /// The configuration version: the cluster-wide number of the change that made this
    /// machine's configuration what it is. Reported back once applied.
    pub version: u64,
    /// The effective configuration, a JSON object (compact, keys sorted).
    pub doc: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployOrder {
    /// Increases with every deployment; a worker refuses one not above the last it ran.
    pub deployment: u64,
    /// blake3 hex of the bundle's plaintext.
    pub bundle_id: String,
    pub service: String,
    pub version: String,
    /// The bundle sealed to this machine, as the controller serves it: its size and blake3.
    pub sealed_bytes: u64,
    pub sealed_hash: [u8; 32],
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Sorted by name.
    pub members: Vec<PoolMember>,
    /// Sorted by name.
    pub dependents: Vec<Dependent>,
}

/// One backend of a load balancer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMember {
    pub name: String,
    pub node_id: NodeId,
    pub service_addr: Option<String>,
    pub fingerprint: Fingerprint,
}

/// A machine behind a load balancer, up or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependent {
    pub name: String,
    pub node_id: NodeId,
    pub fingerprint: Fingerprint,
}

/// Where a dependent reaches its load balancer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbRoute {
    pub name: String,
    pub node_id: NodeId,
    /// QUIC `host:port`.
    pub addr: String,
    pub fingerprint: Fingerprint,
}

impl Body {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a body always encodes")
    }

    /// Decodes an opened publication; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Body, postcard::Error> {
        let (b, rest) = postcard::take_from_bytes::<Body>(bytes)?;
        if !rest.is_empty() {
            return Err(postcard::Error::DeserializeUnexpectedEnd);
        }
        Ok(b)
    }
}
