//! Fuzz target `tokenizer`: see `kiln_fuzz::tokenizer`. Under `cargo fuzz` (cfg `fuzzing`) libFuzzer drives
//! it; built plainly it replays the files and directories given as arguments.

#![cfg_attr(fuzzing, no_main)]
#![forbid(unsafe_code)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::tokenizer(data));

#[cfg(not(fuzzing))]
fn main() {
    kiln_fuzz::replay_main("tokenizer", kiln_fuzz::tokenizer)
}
