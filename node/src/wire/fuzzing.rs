//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, as plain functions, so that the
//! stable test `tests/fuzz_corpus.rs` replays the committed corpus through exactly the same code.
//!
//! Each takes arbitrary bytes and panics only when a property of the decoders is broken; an
//! `Err` on bad input is the expected outcome, not a finding.

use serde_json::Value;

use super::{decode_frame, decode_message, encode_frame, Message, FRAME_BYTES_MAX_DEFAULT};
use crate::ids::{MsgId, NodeId};
use crate::model::events::{check_element, merge};
use crate::model::{to_canonical, ElementRecord, EventType, Version};
use crate::replication::Core;

/// Target `wire_frame`: bytes from a peer's stream, through the frame decoder and, for
/// records, the checks a datacenter runs before it stores anything.
pub fn fuzz_wire_frame(data: &[u8]) {
    let Ok((msg, used)) = decode_frame(data, FRAME_BYTES_MAX_DEFAULT) else {
        return;
    };
    assert!(used <= data.len(), "consumed more than the input");
    // Postcard accepts over-long varints, so the input need not be canonical; the canonical
    // encoding is never longer, and decodes back to the same message.
    let again = encode_frame(&msg);
    assert!(again.len() <= used, "re-encoding grew the frame");
    assert_eq!(
        decode_message(&again[4..]).expect("own encoding decodes"),
        msg
    );
    match &msg {
        Message::Elements(frame) => {
            if let Ok(els) = Core::check_elements(frame) {
                assert_eq!(els.len(), frame.items.len());
                for ((_, rec), el) in frame.items.iter().zip(&els) {
                    assert_checked(rec, el);
                }
            }
        }
        Message::CatchUpBatch(batch) => {
            for rec in &batch.items {
                if let Ok(el) = Core::check_record(rec) {
                    assert_checked(rec, &el);
                }
            }
        }
        Message::Hello(_)
        | Message::Ack { .. }
        | Message::CatchUpRequest(_)
        | Message::Snapshot(_)
        | Message::Goodbye(_) => {}
        // Cluster messages are checked by their own target (`fuzz_cluster_message`).
        _ => {}
    }
}

/// Target `element_json`: arbitrary bytes as the element of an otherwise valid record (its id
/// recomputed, so only the element can be wrong), for every event type.
pub fn fuzz_element_json(data: &[u8]) {
    let node = NodeId(0x00112233_44556677_8899aabb_ccddeeff);
    for etype in EventType::ALL {
        let mut rec = ElementRecord {
            origin: node,
            oseq: 1,
            account: "fuzz".to_string(),
            etype,
            version: Version {
                ms: 1_732_250_000_000,
                logical: 0,
                node,
            },
            element: data.to_vec(),
            msg_id: MsgId::default(),
        };
        rec.msg_id = rec.expected_id();
        if let Ok(el) = Core::check_record(&rec) {
            assert_checked(&rec, &el);
        }
    }
}

/// What must hold of every record [`Core::check_record`] accepted: the element is the
/// canonical form of what it returned, of the right shape, and merging it with itself (a
/// retransmitted copy) changes nothing and stays well formed.
fn assert_checked(rec: &ElementRecord, el: &Value) {
    assert_eq!(
        to_canonical(el),
        rec.element,
        "accepted a non-canonical element"
    );
    check_element(rec.etype, el).expect("accepted element has its type's shape");
    let merged = merge(rec.etype, Some((el, rec.version)), el, rec.version);
    assert_eq!(&merged, el, "merging an element with itself changed it");
    check_element(rec.etype, &merged).expect("merge keeps the shape");
}
