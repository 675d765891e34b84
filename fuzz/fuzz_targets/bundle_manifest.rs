//! Arbitrary bytes through `outpost::bundle::fuzz_manifest` (the bundle's manifest reader): never
//! panics, never writes outside its scratch directory. Seeds: fixtures/fuzz/bundle_manifest/, replayed in CI by
//! node/tests/bundle_fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::bundle::fuzz_manifest(data));
