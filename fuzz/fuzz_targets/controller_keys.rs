//! The key of POST /v1/keys/{key}/accept and /reject through the controller core's resolution.
//! The body is `outpost::fuzzing::fuzz_controller_keys`; seeds in fixtures/fuzz/controller_keys/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::fuzzing::fuzz_controller_keys(data));
