//! A config file through config::parse, with each --role.
//! The body is `outpost::fuzzing::fuzz_config`; seeds in fixtures/fuzz/config_toml/, replayed on stable by
//! node/tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost::fuzzing::fuzz_config(data));
