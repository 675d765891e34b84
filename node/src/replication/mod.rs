//! Datacenter role: replication of data elements between datacenters. `core`, `link` and
//! `session` are state machines (no I/O, no clock); `mem` is the in-memory storage model the simulation uses;
//! the driver feeds them QUIC, redb and time.

pub mod core;
pub mod link;
pub mod mem;
pub mod session;
pub mod tables;

pub use self::core::{digest, Applied, ApplyError, Core, IngestError, Ingested, Received};
pub use tables::{
    id_prefix, Entry, LogRead, Mark, MsgKey, MsgRecord, PeerProgress, StoreError, Tables,
};
