//! The wire: frames (u32 big-endian length, then one postcard-encoded [`Message`]) and the
//! messages themselves. Pure code, fuzzed: decoding never allocates more than the frame limit
//! and never panics.

mod messages;

pub use messages::*;
