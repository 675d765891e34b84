//! The wire: frames (u32 big-endian length, then one postcard-encoded [`Message`]) and the
//! messages themselves. Pure code, fuzzed: decoding never allocates more than the frame limit
//! and never panics.

mod cluster;
mod frame;
mod fuzzing;
mod messages;

/// The frame bound peers assume unless configured (`limits.frame_bytes_max`); defined in
/// [`crate::limits`], named here with the rest of the wire.
pub use crate::limits::FRAME_BYTES_MAX_DEFAULT;
pub use frame::*;
#[doc(hidden)]
pub use fuzzing::{
    fuzz_cluster_body, fuzz_element_json, fuzz_seal_key, fuzz_wire_frame, fuzz_worker,
    fuzz_worker_controller_key, fuzz_worker_publication, fuzz_worker_publication_envelope,
    fuzz_worker_publication_plaintext, FuzzWorker,
};
pub use messages::*;

#[cfg(test)]
pub(crate) mod strategies {
    //! proptest strategies for every wire type, arbitrary rather than valid: the codec must
    //! carry any value, checking contents is the receiver's business.

    use proptest::collection::vec;
    use proptest::option;
    use proptest::prelude::*;

    use super::*;
    use crate::ids::{MsgId, NodeId};
    use crate::model::{ElementRecord, EventType, Version};

    pub fn node_id() -> impl Strategy<Value = NodeId> {
        prop_oneof![
            Just(NodeId(0)),
            Just(NodeId(u128::MAX)),
            any::<u128>().prop_map(NodeId)
        ]
    }

    /// Small and extreme values, where varint edges are.
    pub fn num() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..300, Just(u64::MAX), any::<u64>()]
    }

    pub fn version() -> impl Strategy<Value = Version> {
        (num(), any::<u32>(), node_id()).prop_map(|(ms, logical, node)| Version {
            ms,
            logical,
            node,
        })
    }

    pub fn etype() -> impl Strategy<Value = EventType> {
        proptest::sample::select(EventType::ALL.to_vec())
    }

    pub fn text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z:@.0-9-]{1,24}", any::<String>()]
    }

    pub fn bytes() -> impl Strategy<Value = Vec<u8>> {
        vec(any::<u8>(), 0..64)
    }

    pub fn record() -> impl Strategy<Value = ElementRecord> {
        (
            node_id(),
            num(),
            text(),
            etype(),
            version(),
            bytes(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(origin, oseq, account, etype, version, element, id)| {
                ElementRecord {
                    origin,
                    oseq,
                    account,
                    etype,
                    version,
                    element,
                    msg_id: MsgId(id),
                }
            })
    }

    pub fn mark() -> impl Strategy<Value = OriginMark> {
        (node_id(), num(), vec(num(), 0..4)).prop_map(|(origin, contiguous, above)| OriginMark {
            origin,
            contiguous,
            above,
        })
    }

    pub fn role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::Datacenter),
            Just(Role::Controller),
            Just(Role::Worker)
        ]
    }

    pub fn hello() -> impl Strategy<Value = Hello> {
        (
            any::<u16>(),
            node_id(),
            role(),
            text(),
            num(),
            option::of((num(), num())),
            vec(mark(), 0..4),
        )
            .prop_map(
                |(protocol, node_id, role, name, log_epoch, resume, marks)| Hello {
                    protocol,
                    node_id,
                    role,
                    name,
                    log_epoch,
                    resume,
                    marks,
                },
            )
    }

    pub fn snapshot_entry() -> impl Strategy<Value = SnapshotEntry> {
        (
            text(),
            etype(),
            version(),
            node_id(),
            any::<[u8; 32]>(),
            bytes(),
        )
            .prop_map(
                |(account, etype, version, origin, id, element)| SnapshotEntry {
                    account,
                    etype,
                    version,
                    origin,
                    msg_id: MsgId(id),
                    element,
                },
            )
    }

    pub fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            hello().prop_map(Message::Hello),
            (num(), num(), num(), vec((num(), record()), 0..3)).prop_map(
                |(epoch, after, upto, items)| Message::Elements(Elements {
                    epoch,
                    after,
                    upto,
                    items,
                })
            ),
            (num(), num()).prop_map(|(epoch, upto)| Message::Ack { epoch, upto }),
            (node_id(), num(), any::<u32>()).prop_map(|(origin, after_oseq, max)| {
                Message::CatchUpRequest(CatchUpRequest {
                    origin,
                    after_oseq,
                    max,
                })
            }),
            (node_id(), vec(record(), 0..3), any::<bool>()).prop_map(|(origin, items, done)| {
                Message::CatchUpBatch(CatchUpBatch {
                    origin,
                    items,
                    done,
                })
            }),
            (
                num(),
                vec(snapshot_entry(), 0..3),
                option::of((vec(mark(), 0..3), num()))
            )
                .prop_map(|(epoch, entries, end)| Message::Snapshot(SnapshotChunk {
                    epoch,
                    entries,
                    end: end.map(|(marks, resume_after)| SnapshotEnd {
                        marks,
                        resume_after
                    }),
                })),
            (any::<u32>(), text())
                .prop_map(|(code, reason)| Message::Goodbye(Goodbye { code, reason })),
        ]
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::strategies::message;
    use super::*;

    proptest! {
        #[test]
        fn wire_any_message_round_trips(msg in message()) {
            let f = encode_frame(&msg);
            let (back, used) = decode_frame(&f, FRAME_BYTES_MAX_DEFAULT).unwrap();
            prop_assert_eq!(used, f.len());
            prop_assert_eq!(&back, &msg);
            prop_assert_eq!(decode_message(&f[4..]).unwrap(), msg);
        }

        #[test]
        fn wire_every_strict_prefix_is_truncated(msg in message()) {
            let f = encode_frame(&msg);
            for cut in 0..f.len() {
                let r = decode_frame(&f[..cut], FRAME_BYTES_MAX_DEFAULT);
                prop_assert!(matches!(r, Err(FrameError::Truncated)), "cut {}: {:?}", cut, r);
            }
        }

        #[test]
        fn wire_length_over_limit_is_too_large(msg in message(), below in 1usize..64) {
            let f = encode_frame(&msg);
            let len = f.len() - 4;
            let max = len.saturating_sub(below);
            prop_assume!(max < len);
            // Even with only the header present.
            for input in [&f[..], &f[..4]] {
                let r = decode_frame(input, max);
                prop_assert!(
                    matches!(r, Err(FrameError::TooLarge { len: l, max: m }) if l == len && m == max),
                    "{:?}", r
                );
            }
        }

        #[test]
        fn wire_trailing_junk_in_payload_is_refused(
            msg in message(),
            junk in proptest::collection::vec(any::<u8>(), 1..16),
        ) {
            let mut payload = postcard::to_stdvec(&msg).unwrap();
            payload.extend_from_slice(&junk);
            prop_assert!(matches!(decode_message(&payload), Err(FrameError::Decode(_))));
            let mut f = (payload.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&payload);
            prop_assert!(matches!(
                decode_frame(&f, FRAME_BYTES_MAX_DEFAULT),
                Err(FrameError::Decode(_))
            ));
        }

        #[test]
        fn wire_random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            fuzz_wire_frame(&data);
            fuzz_element_json(&data);
            // With a plausible header in front, so the payload decoder sees them too.
            let mut f = (data.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&data);
            fuzz_wire_frame(&f);
        }

        #[test]
        fn wire_mutated_frames_never_panic(
            msg in message(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut f = encode_frame(&msg);
            for (at, byte) in flips {
                let i = at.index(f.len() - 4) + 4;
                f[i] = byte;
            }
            fuzz_wire_frame(&f);
        }
    }
}
