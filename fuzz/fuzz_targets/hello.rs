#![no_main]
//! Fuzz target `hello`: see [`mesh_fuzz::hello`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::hello(data));
