#![no_main]
//! Fuzz target `gossip_ipam`: see [`mesh_fuzz::gossip_ipam`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::gossip_ipam(data));
