//! An archive entry's path and symlink target through the bundle's path rules, in memory.
//! The body is `outpost::bundle::fuzz_bundle_paths`; seeds in fixtures/fuzz/bundle_paths/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::bundle::fuzz_bundle_paths(data));
