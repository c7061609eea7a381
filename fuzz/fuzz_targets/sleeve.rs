#![no_main]
//! Fuzz target `sleeve`: see [`mesh_fuzz::sleeve`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::sleeve(data));
