#![no_main]
//! Fuzz target `gossip_names`: see [`mesh_fuzz::gossip_names`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::gossip_names(data));
