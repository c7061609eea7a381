#![no_main]
//! Fuzz target `fastdp_probe`: see [`mesh_fuzz::fastdp_probe`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::fastdp_probe(data));
