//! Fuzz target `gguf_build`: see `kiln_fuzz::gguf_build`. Under `cargo fuzz` (cfg `fuzzing`) libFuzzer drives
//! it; built plainly it replays the files and directories given as arguments.

#![cfg_attr(fuzzing, no_main)]
#![forbid(unsafe_code)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::gguf_build(data));

#[cfg(not(fuzzing))]
fn main() {
    kiln_fuzz::replay_main("gguf_build", kiln_fuzz::gguf_build)
}
