//! A peer datacenter's first frame (its Hello) and what the link computes from it.
//! The body is `outpost::fuzzing::fuzz_datacenter_hello`; seeds in fixtures/fuzz/datacenter_hello/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::fuzzing::fuzz_datacenter_hello(data));
