//! The data model shared by every datacenter: event types and their processors, element merge,
//! versions, canonical encoding and message ids. Pure code: no I/O, no clock (callers pass
//! `now_ms`), so the simulation and the real node run exactly the same rules.

pub mod canonical;
pub mod events;
pub mod version;

pub use canonical::to_canonical;
pub use events::{Event, EventError, EventType, RawEvent};
pub use version::{Hlc, Version};

use serde::{Deserialize, Serialize};

use crate::ids::{MsgId, NodeId};

/// A data element as it is logged, sent and applied: the output of one event's processor at its
/// origin, with everything a receiver needs to apply it without processing anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElementRecord {
    pub origin: NodeId,
    /// Sequence number at the origin, from 1, without gaps.
    pub oseq: u64,
    pub account: String,
    pub etype: EventType,
    pub version: Version,
    /// Canonical JSON bytes of the element.
    pub element: Vec<u8>,
    pub msg_id: MsgId,
}

impl ElementRecord {
    /// The id this record must carry: see [`message_id`].
    pub fn expected_id(&self) -> MsgId {
        message_id(
            self.origin,
            self.oseq,
            &self.account,
            self.etype,
            self.version,
            &self.element,
        )
    }
}

/// Message id = blake3 over the canonical (postcard) encoding of (origin, origin sequence,
/// account, event type, version, element bytes). Postcard is deterministic for these types.
pub fn message_id(
    origin: NodeId,
    oseq: u64,
    account: &str,
    etype: EventType,
    version: Version,
    element: &[u8],
) -> MsgId {
    #[derive(Serialize)]
    struct Canon<'a> {
        origin: NodeId,
        oseq: u64,
        account: &'a str,
        etype: EventType,
        version: Version,
        element: &'a [u8],
    }
    let bytes = postcard::to_stdvec(&Canon {
        origin,
        oseq,
        account,
        etype,
        version,
        element,
    })
    .expect("postcard encodes plain structs");
    MsgId(*blake3::hash(&bytes).as_bytes())
}
