#![no_main]
//! Fuzz target `proxy_chunked`: see [`mesh_fuzz::proxy_chunked`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::proxy_chunked(data));
