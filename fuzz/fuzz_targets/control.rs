#![no_main]
//! Fuzz target `control`: see [`mesh_fuzz::control`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::control(data));
