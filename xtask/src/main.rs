//! `cargo xtask`: the way users and CI run kiln from a checkout.
//!
//! This binary is small on purpose. `cargo xtask test` first makes the machine ready for the
//! test suite ([`setup`]: programs, rustup targets, cargo-fuzz, kiln's Python environment),
//! and on a machine that lacks a tool it stops within seconds of the first build, naming every
//! missing tool and the command that installs it, before the compiler is compiled. Every
//! command (`test` included, once the machine is ready) then runs the `kiln` command line
//! (`compiler/kiln`) with the same arguments: built by cargo first, with a progress line while
//! crates compile (a first build takes minutes) and nothing when it is up to date.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

mod setup;

/// The cargo running this command (`$CARGO`), else `cargo`.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &[OsString]) -> Result<i32> {
    let wants_help = args.iter().any(|a| a == "--help" || a == "-h");
    let mut python = None;
    if args.first().is_some_and(|a| a == "test") && !wants_help {
        python = Some(setup::prepare_for_tests()?);
    }
    let kiln = build_kiln()?;
    let mut cmd = Command::new(kiln);
    cmd.args(args);
    if let Some(p) = python {
        cmd.env("KILN_PYTHON", p);
    }
    let status = cmd.status().context("cannot run the kiln command line")?;
    Ok(status.code().unwrap_or(1))
}

/// Builds the `kiln` binary (release) and returns its path. Cargo's messages are read as JSON:
/// the crates compiled are counted on one line of standard error (on a terminal), and a build
/// with nothing to do prints nothing; compiler errors are shown as cargo renders them.
fn build_kiln() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut child = Command::new(cargo())
        // Quiet: cargo's own status lines ("Compiling", "Finished") are left out; its JSON
        // messages still arrive on stdout, and errors are rendered on stderr.
        .args(["build", "--release", "--quiet", "--package", "kiln", "--bin", "kiln"])
        .args(["--message-format", "json-render-diagnostics", "--manifest-path"])
        .arg(manifest)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo")?;
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let (mut compiled, mut executable) = (0usize, None);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.context("reading cargo's messages")?;
        if !line.contains(r#""reason":"compiler-artifact""#) {
            continue;
        }
        if line.contains(r#""fresh":false"#) {
            compiled += 1;
            if tty {
                let name = json_string(&line, "name").unwrap_or_default();
                eprint!("\r\x1b[2Kbuilding the kiln command line: {compiled} crates compiled ({name})");
                let _ = std::io::stderr().flush();
            }
        }
        if line.contains(r#""name":"kiln""#) {
            if let Some(path) = json_string(&line, "executable") {
                executable = Some(PathBuf::from(path));
            }
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if tty && compiled > 0 {
        eprint!("\r\x1b[2K");
    }
    if compiled > 0 {
        eprintln!("built the kiln command line: {compiled} crates in {:.0} s", started.elapsed().as_secs_f64());
    }
    if !status.success() {
        bail!("building the kiln command line failed (cargo's messages are above)");
    }
    executable.context("cargo built no kiln executable")
}

/// The string value of `"key":"..."` in one of cargo's JSON lines (paths and crate names:
/// cargo escapes only `"` and `\`, which kiln's paths and names do not hold; such a value is
/// not returned).
fn json_string<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = line[start..].find('"')?;
    let value = &line[start..start + len];
    (!value.contains('\\')).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn values_are_read_from_cargo_messages() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"kiln","src_path":"/a"},"executable":"/w/target/release/kiln","fresh":true}"#;
        assert_eq!(json_string(line, "executable"), Some("/w/target/release/kiln"));
        assert_eq!(json_string(line, "name"), Some("kiln"));
        assert_eq!(json_string(line, "missing"), None);
        assert_eq!(json_string(r#"{"executable":"C:\\x"}"#, "executable"), None);
        assert_eq!(json_string(r#"{"executable":null}"#, "executable"), None);
    }
}
