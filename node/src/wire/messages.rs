//! Every message that crosses a QUIC stream between nodes. Postcard-encoded, externally tagged:
//! new variants and new messages are only ever added at the end, so older decoders keep working.
//! `fixtures/wire/` holds golden bytes of each; a test checks them.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::model::ElementRecord;

pub use super::cluster::*;

/// The version of this protocol. A peer speaking another one gets a clear error, not a hang.
pub const PROTOCOL_VERSION: u16 = 1;
/// The version of the cluster protocol (controller, workers, relays: `Join` and `RelayHello`).
/// 2 added configuration data (`Body::Config`, `ConfigNotify`, `ConfigNotifyAck`): a worker
/// of version 1 could not decode them, so it is refused at its Join with the reason. 3 added
/// the coupling of call routers and load balancers (`Body::Coupled`, `Body::Router`).
pub const CLUSTER_PROTOCOL_VERSION: u16 = 3;

/// A stored record `base` followed by `tail` (both postcard): how a record gains fields without
/// breaking the ones already stored (postcard has no optional trailing fields). The tail's
/// fields are `#[serde(skip)]` in the record.
pub fn encode_with_tail<B: Serialize, T: Serialize>(base: &B, tail: &T) -> Vec<u8> {
    let mut out = postcard::to_stdvec(base).expect("a record always encodes");
    out.extend(postcard::to_stdvec(tail).expect("a record always encodes"));
    out
}

/// [`encode_with_tail`]'s bytes back; a record stored before the tail existed (nothing after
/// it) gets the tail's default.
pub fn decode_with_tail<
    B: serde::de::DeserializeOwned,
    T: serde::de::DeserializeOwned + Default,
>(
    bytes: &[u8],
) -> Result<(B, T), postcard::Error> {
    let (base, rest) = postcard::take_from_bytes::<B>(bytes)?;
    if rest.is_empty() {
        return Ok((base, T::default()));
    }
    Ok((base, postcard::from_bytes(rest)?))
}

/// Like [`decode_with_tail`] for a record whose tail grew a second part (encoded with
/// `encode_with_tail(base, &(first, second))`): a record stored with only the first part, or
/// none, gets the defaults of what is missing.
pub fn decode_with_tail2<
    B: serde::de::DeserializeOwned,
    T: serde::de::DeserializeOwned + Default,
    U: serde::de::DeserializeOwned + Default,
>(
    bytes: &[u8],
) -> Result<(B, T, U), postcard::Error> {
    let (base, rest) = postcard::take_from_bytes::<B>(bytes)?;
    if rest.is_empty() {
        return Ok((base, T::default(), U::default()));
    }
    let (first, rest) = postcard::take_from_bytes::<T>(rest)?;
    if rest.is_empty() {
        return Ok((base, first, U::default()));
    }
    Ok((base, first, postcard::from_bytes(rest)?))
}

/// What a node is. Postcard encodes the variant index, so the serde names (used by TOML and
/// JSON) are free to be lowercase words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Datacenter,
    Controller,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Datacenter => "datacenter",
            Role::Controller => "controller",
            Role::Worker => "worker",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "datacenter" => Ok(Role::Datacenter),
            "controller" => Ok(Role::Controller),
            "worker" => Ok(Role::Worker),
            _ => Err(format!(
                "unknown role {s:?} (expected datacenter, controller or worker)"
            )),
        }
    }
}

/// What a node knows of one origin's log: every sequence up to `contiguous`, and a bounded set
/// of sequences above it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginMark {
    pub origin: NodeId,
    pub contiguous: u64,
    pub above: Vec<u64>,
}

/// First frame on every connection, from both sides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    pub node_id: NodeId,
    pub role: Role,
    pub name: String,
    /// Identifies this incarnation of the sender's local log (new on a fresh or restored
    /// database), so a receiver's cursor into an older incarnation is not reused.
    pub log_epoch: u64,
    /// How far the sender has durably received the *receiver's* log, if it knows that log's
    /// epoch: `(epoch, lseq)`. The receiver resumes sending from there.
    pub resume: Option<(u64, u64)>,
    /// Per-origin high-water marks of the sender.
    pub marks: Vec<OriginMark>,
}

/// A slice `(after, upto]` of the sender's local log. Records the receiver originated and gave
/// the sender itself are left out, so `items` may be shorter than the range; `upto` still
/// covers them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Elements {
    pub epoch: u64,
    pub after: u64,
    pub upto: u64,
    pub items: Vec<(u64, ElementRecord)>,
}

/// Ask for an origin's log above `after_oseq` from the receiver's copy of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUpRequest {
    pub origin: NodeId,
    pub after_oseq: u64,
    pub max: u32,
}

/// Records of one origin's log in sequence order. `done` when nothing more is held above them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUpBatch {
    pub origin: NodeId,
    pub items: Vec<ElementRecord>,
    pub done: bool,
}

/// One state entry of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub account: String,
    pub etype: crate::model::EventType,
    pub version: crate::model::Version,
    pub origin: NodeId,
    pub msg_id: crate::ids::MsgId,
    pub element: Vec<u8>,
}

/// Part of a snapshot of the sender's state table, sent when the receiver is behind the
/// sender's log retention. The last chunk carries the marks the snapshot reflects and the log
/// position from which the sender continues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub epoch: u64,
    pub entries: Vec<SnapshotEntry>,
    /// Present on the last chunk only.
    pub end: Option<SnapshotEnd>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    pub marks: Vec<OriginMark>,
    /// The receiver's cursor into the sender's log becomes this.
    pub resume_after: u64,
}

/// Why a connection is being closed, in words for the other side's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    pub code: u32,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    Elements(Elements),
    /// Everything of the receiver's log up to `upto` (in `epoch`) is durably applied here.
    Ack {
        epoch: u64,
        upto: u64,
    },
    CatchUpRequest(CatchUpRequest),
    CatchUpBatch(CatchUpBatch),
    Snapshot(SnapshotChunk),
    Goodbye(Goodbye),
    // Cluster (controller and worker), see `wire::cluster`.
    Join(Join),
    Admission(Admission),
    Publication(Publication),
    /// Every publication of the sender's channel up to `upto` is durably applied.
    PublicationAck {
        upto: u64,
    },
    Notify(Notify),
    /// Every notification of the receiver up to `upto` is durably recorded.
    NotifyAck {
        upto: u64,
    },
    /// A worker is alive (sent every `heartbeat_ms`).
    Heartbeat,
    RelayHello(RelayHello),
    Relay(Relay),
    BundleRequest(BundleRequest),
    BundleHeader(BundleHeader),
    /// A worker's report on its configuration data (its own sequence, like `Notify`'s).
    ConfigNotify(ConfigNotify),
    /// Every configuration report of the receiver up to `upto` is durably recorded.
    ConfigNotifyAck {
        upto: u64,
    },
}

impl Message {
    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Elements(_) => "Elements",
            Message::Ack { .. } => "Ack",
            Message::CatchUpRequest(_) => "CatchUpRequest",
            Message::CatchUpBatch(_) => "CatchUpBatch",
            Message::Snapshot(_) => "Snapshot",
            Message::Goodbye(_) => "Goodbye",
            Message::Join(_) => "Join",
            Message::Admission(_) => "Admission",
            Message::Publication(_) => "Publication",
            Message::PublicationAck { .. } => "PublicationAck",
            Message::Notify(_) => "Notify",
            Message::NotifyAck { .. } => "NotifyAck",
            Message::Heartbeat => "Heartbeat",
            Message::RelayHello(_) => "RelayHello",
            Message::Relay(_) => "Relay",
            Message::BundleRequest(_) => "BundleRequest",
            Message::BundleHeader(_) => "BundleHeader",
            Message::ConfigNotify(_) => "ConfigNotify",
            Message::ConfigNotifyAck { .. } => "ConfigNotifyAck",
        }
    }
}
