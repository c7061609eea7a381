#![no_main]
//! Fuzz target `dns_query`: see [`mesh_fuzz::dns_query`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::dns_query(data));
