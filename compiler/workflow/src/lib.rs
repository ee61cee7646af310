//! kiln's workflow over bundles, on the machine that builds them: the budgeted build
//! `build-model` goes through, the calibration of `--prune-layers auto:N`, the evaluation of
//! several bundles (footprint, energy, the report), offload evaluation, benchmarks against
//! llama.cpp (of a bundle, and of a Llama-3.1-8B-shaped model) and load tests of a server. The commands of `cargo xtask` parse their arguments
//! and call these.
//!
//! Programs that run a bundle elsewhere than in this process (the runner for aarch64 under
//! qemu-user, the apps with a bundle linked in) are built from the workspace by [`runner`];
//! the Python peers live in kiln's own virtual environment (the `peers` crate).

// Two functions need `unsafe`, and allow it: `bench::wait_with_rusage` (std has no wait4) and
// `bench::sum_words` (a call of a function compiled for AVX2, once the CPU is known to have it).
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};

pub mod bench;
pub mod bench_large;
pub mod calibrate;
pub mod evaluate;
pub mod offload_eval;
pub mod report;
pub mod runner;
pub mod serve_load;

pub use runner::{build_runner, bundle_triple, default_shared_linker, App};

/// The workspace kiln was built from: where the runner and the apps are built from source
/// (for another target, or linked with a bundle), and whose `target/` holds their builds.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("compiler/workflow is two levels deep")
        .to_path_buf()
}
