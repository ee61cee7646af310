//! `cargo fuzz` sets `--cfg fuzzing`; declare it so plain builds do not warn about it.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
}
