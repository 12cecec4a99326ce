//! `agent::fuzzing::policy` on arbitrary bytes (see agent/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agent::fuzzing::policy(data));
