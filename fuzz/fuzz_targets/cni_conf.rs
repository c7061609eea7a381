#![no_main]
//! Fuzz target `cni_conf`: see [`mesh_fuzz::cni_conf`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::cni_conf(data));
