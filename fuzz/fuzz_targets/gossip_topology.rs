#![no_main]
//! Fuzz target `gossip_topology`: see [`mesh_fuzz::gossip_topology`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::gossip_topology(data));
