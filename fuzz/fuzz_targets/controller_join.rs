//! A worker's Join and the frames after it, through the controller core.
//! The body is `outpost::fuzzing::fuzz_controller_join`; seeds in fixtures/fuzz/controller_join/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::fuzzing::fuzz_controller_join(data));
