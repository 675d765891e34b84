//! The body of POST /v1/events through the datacenter API's parser, then ingested in memory.
//! The body is `outpost::fuzzing::fuzz_api_event`; seeds in fixtures/fuzz/api_event/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::fuzzing::fuzz_api_event(data));
