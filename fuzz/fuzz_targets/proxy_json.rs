#![no_main]
//! Fuzz target `proxy_json`: see [`mesh_fuzz::proxy_json`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::proxy_json(data));
