//! The body of the controller's POST /v1/deployments through its parser.
//! The body is `outpost::fuzzing::fuzz_controller_deployment`; seeds in fixtures/fuzz/controller_deployment/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::fuzzing::fuzz_controller_deployment(data));
