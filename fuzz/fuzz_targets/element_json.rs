//! Arbitrary bytes as the element of an otherwise valid record, for every event type. The body
//! is `outpost::wire::fuzz_element_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::wire::fuzz_element_json(data));
