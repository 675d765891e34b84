//! Bytes from a peer's stream: frame decoder, then the record checks a datacenter runs before
//! it stores anything. The body is `outpost::wire::fuzz_wire_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::wire::fuzz_wire_frame(data));
