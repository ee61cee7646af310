//! `cargo xtask`: the way users and CI run kiln from a checkout.
//!
//! This binary is small on purpose. `cargo xtask test` first makes the machine ready for the
//! test suite ([`setup`]: programs, rustup targets, cargo-fuzz, kiln's Python environment),
//! and on a machine that lacks a tool it stops within seconds of the first build, naming every
//! missing tool and the command that installs it, before the compiler is compiled. Every
//! command (`test` included, once the machine is ready) then runs the `kiln` command line
//! (`compiler/kiln`) with the same arguments, built and started by cargo.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

mod setup;

/// The cargo running this command (`$CARGO`), else `cargo`.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut kiln = Command::new(cargo());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    kiln.args(["run", "--release", "--quiet", "--package", "kiln", "--manifest-path"]).arg(manifest).arg("--");
    kiln.args(&args);
    let wants_help = args.iter().any(|a| a == "--help" || a == "-h");
    if args.first().is_some_and(|a| a == "test") && !wants_help {
        match setup::prepare_for_tests() {
            Ok(python) => {
                kiln.env("KILN_PYTHON", python);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
    }
    // The command line, built now (the first time: the compiler and the runtime).
    match kiln.status() {
        Ok(status) => std::process::exit(status.code().unwrap_or(1)),
        Err(e) => {
            eprintln!("error: cannot run cargo: {e}");
            std::process::exit(1);
        }
    }
}
