//! A publication's signed envelope as an admitted worker checks it (fixed key, fast refusals).
//! The body is `outpost::wire::fuzz_worker_publication_envelope`; seeds in fixtures/fuzz/worker_publication_envelope/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::wire::fuzz_worker_publication_envelope(data));
