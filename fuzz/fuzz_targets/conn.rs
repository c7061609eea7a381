#![no_main]
//! Fuzz target `conn`: see [`mesh_fuzz::conn`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::conn(data));
