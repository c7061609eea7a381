#![no_main]
//! Fuzz target `proxy_head`: see [`mesh_fuzz::proxy_head`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::proxy_head(data));
