//! The controller's answers to a worker's Join, through the worker core.
//! The body is `outpost::fuzzing::fuzz_worker_admission`; seeds in fixtures/fuzz/worker_admission/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::fuzzing::fuzz_worker_admission(data));
