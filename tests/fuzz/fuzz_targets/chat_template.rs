//! Fuzz target `chat_template`: see `kiln_fuzz::chat_template`. Under `cargo fuzz` (cfg `fuzzing`) libFuzzer drives
//! it; built plainly it replays the files and directories given as arguments.

#![cfg_attr(fuzzing, no_main)]
#![forbid(unsafe_code)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::chat_template(data));

#[cfg(not(fuzzing))]
fn main() {
    kiln_fuzz::replay_main("chat_template", kiln_fuzz::chat_template)
}
