//! Fuzz target `hf_checkpoint`: see `kiln_fuzz::hf_checkpoint`. Under `cargo fuzz` (cfg `fuzzing`) libFuzzer drives
//! it; built plainly it replays the files and directories given as arguments.

#![cfg_attr(fuzzing, no_main)]
#![forbid(unsafe_code)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::hf_checkpoint(data));

#[cfg(not(fuzzing))]
fn main() {
    kiln_fuzz::replay_main("hf_checkpoint", kiln_fuzz::hf_checkpoint)
}
