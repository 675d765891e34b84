//! What reaches an admitted worker from its controller or its load balancer (a frame, a
//! publication, forged or altered ones, arbitrary sealed plaintext): never panics, and the
//! worker's record changes only for a validly signed next publication. The body is
//! `outpost::wire::fuzz_worker_publication`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::wire::fuzz_worker_publication(data));
