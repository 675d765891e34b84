//! An opened publication's plaintext through the worker's body decoder and its application, no crypto.
//! The body is `outpost::wire::fuzz_worker_publication_plaintext`; seeds in fixtures/fuzz/worker_publication_plaintext/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::wire::fuzz_worker_publication_plaintext(data));
