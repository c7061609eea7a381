#![no_main]
//! Fuzz target `handshake`: see [`mesh_fuzz::handshake`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::handshake(data));
