//! Fuzz target `onnx_model`: see `kiln_fuzz::onnx_model`. Under `cargo fuzz` (cfg `fuzzing`) libFuzzer drives
//! it; built plainly it replays the files and directories given as arguments.

#![cfg_attr(fuzzing, no_main)]
#![forbid(unsafe_code)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::onnx_model(data));

#[cfg(not(fuzzing))]
fn main() {
    kiln_fuzz::replay_main("onnx_model", kiln_fuzz::onnx_model)
}
