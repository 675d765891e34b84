//! The plaintext of an opened publication through `cluster::body::Body::decode`: never panics,
//! and what decodes round-trips. The body is `outpost::wire::fuzz_cluster_body`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::wire::fuzz_cluster_body(data));
