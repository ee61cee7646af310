//! What every command-line program over bundles shares (the runner, the server, the
//! evaluation suites): the `--bundle`/`--threads` arguments, opening a bundle's shared library,
//! and the check of an output file before any work is done. Behind the `cli` feature, so that
//! apps linking the runtime do not compile clap.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::session::{Model, Session};

/// The bundle's shared library, relative to the bundle directory.
pub const SHARED_LIBRARY: &str = "lib/libkiln_model.so";

/// The bundle and threads, common to every command.
#[derive(Args, Clone, Debug)]
pub struct BundleArgs {
    /// The bundle directory written by `build-model`.
    #[arg(long, default_value = "bundles/x86_64-unknown-linux-gnu")]
    pub bundle: PathBuf,
    /// Worker threads (the calling thread included; default: the machine's physical cores).
    #[arg(short = 't', long, default_value_t = crate::pool::physical_cores())]
    pub threads: usize,
}

/// Loads `bundle`'s model from its shared library (`build-model` writes one for targets that
/// can run here). Apps that link `lib/libkiln_model.a` instead use [`Model::open`].
pub fn open_model(bundle: &Path, threads: usize) -> Result<Model> {
    let lib = bundle.join(SHARED_LIBRARY);
    if !lib.is_file() {
        if !bundle.join("manifest.json").is_file() {
            bail!("{} is not a kiln bundle (no manifest.json)", bundle.display());
        }
        bail!(
            "{} has no {SHARED_LIBRARY}: its target cannot run on this machine, or it was built with \
             `--shared-linker none`; link lib/libkiln_model.a into your app (see examples/rust-chat, examples/c-chat)",
            bundle.display()
        );
    }
    Model::open_shared(&lib, bundle, threads).with_context(|| format!("cannot open bundle {}", bundle.display()))
}

/// Opens a session on `bundle` (see [`open_model`]).
pub fn open_session(bundle: &Path, threads: usize) -> Result<Session> {
    Ok(Session::new(&open_model(bundle, threads)?)?)
}

/// Checks that an output file can be written before any work is done: its directory exists,
/// it is not a directory, and it does not exist unless `force`.
pub fn check_output_file(path: &Path, force: bool) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("cannot write {}: no directory {}", path.display(), parent.display());
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => bail!("cannot write {}: it is a directory", path.display()),
        Ok(_) if !force => bail!("{} exists; pass --force to replace it", path.display()),
        _ => Ok(()),
    }
}

/// A progress bar on standard error for work of `len` steps, in one style for every command
/// (what, bar, count, elapsed, time left). Hidden when standard error is not a terminal, so
/// logs and the tests' captured output get no control sequences.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, {eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// A spinner on standard error for work of unknown length, showing `what` and the time spent.
pub fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix} {msg} ({elapsed})").expect("a valid template"),
    );
    bar.set_prefix(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_files_are_checked_before_work() {
        let dir = std::env::temp_dir().join(format!("kiln-cli-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("logits.npy");
        std::fs::write(&f, b"user data").unwrap();
        assert!(check_output_file(&f, false).unwrap_err().to_string().contains("--force"));
        assert!(check_output_file(&f, true).is_ok());
        assert!(check_output_file(&dir, true).unwrap_err().to_string().contains("is a directory"));
        assert!(check_output_file(&dir.join("no/such/dir/x.npy"), false)
            .unwrap_err()
            .to_string()
            .contains("no directory"));
        assert_eq!(std::fs::read(&f).unwrap(), b"user data");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_without_a_library_is_named_for_what_it_lacks() {
        let dir = std::env::temp_dir().join(format!("kiln-cli-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = open_model(&dir, 1).err().unwrap().to_string();
        assert!(e.contains("not a kiln bundle"), "{e}");
        std::fs::write(dir.join("manifest.json"), "{}").unwrap();
        let e = open_model(&dir, 1).err().unwrap().to_string();
        assert!(e.contains("has no lib/libkiln_model.so"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
