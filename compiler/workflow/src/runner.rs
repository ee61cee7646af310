//! Programs built from the workspace for a bundle: the runner for a bundle's target (run
//! natively or under qemu-user), and the example apps with a bundle's static library linked in.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::root;

fn cargo() -> Command {
    Command::new(cargo_path())
}

/// The cargo running this command (`$CARGO`), else `cargo`.
pub fn cargo_path() -> std::ffi::OsString {
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
pub fn runnable(triple: &str) -> Result<(&'static str, Option<(String, String)>)> {
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

/// Builds the runner (`runtime/chat`, which opens any bundle's shared library) for `triple`.
pub fn build_runner(triple: &str, target_dir: &Path) -> Result<App> {
    let (triple, emulator) = runnable(triple)?;
    cargo_build(triple, &["--package", "chat", "--bin", "chat"], target_dir, &[])
        .context("building the runner (runtime/chat)")?;
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

/// Builds `examples/rust-chat` linked against `bundle`'s static library, for the bundle's
/// target: the example of a Rust app with a model linked in (the runner of [`build_runner`]
/// needs no relink). `target_dir` separates builds made from inside tests from the user's.
pub fn build_rust_chat(bundle: &Path, target_dir: Option<&Path>) -> Result<App> {
    let bundle = bundle.canonicalize().with_context(|| format!("no bundle at {}", bundle.display()))?;
    if !bundle.join("lib/libkiln_model.a").exists() {
        bail!("{} is not a kiln bundle (no lib/libkiln_model.a)", bundle.display());
    }
    let (triple, emulator) = runnable(&bundle_triple(&bundle)?)?;
    let target_dir = target_dir.map(Path::to_path_buf).unwrap_or_else(|| root().join("target"));
    cargo_build(triple, &["--package", "rust-chat"], &target_dir, &[("KILN_BUNDLE", Some(&bundle))])
        .with_context(|| format!("building examples/rust-chat against {}", bundle.display()))?;
    Ok(App { binary: release_dir(&target_dir, triple).join("rust-chat"), emulator })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_for_other_machines_are_refused_with_what_to_do() {
        let e = runnable("aarch64-linux-android").unwrap_err().to_string();
        assert!(e.contains("runs on Android") && e.contains("aarch64-unknown-linux-gnu"), "{e}");
        let e = runnable("riscv64gc-unknown-linux-gnu").unwrap_err().to_string();
        assert!(e.contains("cannot run on this machine"), "{e}");
        let (triple, emulator) = runnable("aarch64-unknown-linux-gnu").unwrap();
        assert_eq!(triple, "aarch64-unknown-linux-gnu");
        assert!(emulator.is_some(), "aarch64 Linux runs under qemu-user here");
        if let Some(host) = targets::host_triple() {
            assert_eq!(runnable(host).unwrap(), (host, None));
        }
    }

    #[test]
    fn a_directory_without_a_manifest_is_not_a_bundle() {
        let dir = std::env::temp_dir().join(format!("kiln-runner-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = bundle_triple(&dir).unwrap_err().to_string();
        assert!(e.contains("is not a kiln bundle"), "{e}");
        std::fs::write(dir.join("manifest.json"), r#"{"target": {}}"#).unwrap();
        assert!(bundle_triple(&dir).unwrap_err().to_string().contains("target.triple"));
        std::fs::write(dir.join("manifest.json"), r#"{"target": {"triple": "x86_64-unknown-linux-gnu"}}"#).unwrap();
        assert_eq!(bundle_triple(&dir).unwrap(), "x86_64-unknown-linux-gnu");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
