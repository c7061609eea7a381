#![no_main]
//! Fuzz target `state_files`: see [`mesh_fuzz::state_files`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::state_files(data));
