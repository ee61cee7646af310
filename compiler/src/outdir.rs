//! Writing kiln's output directories without ever touching what belongs to the user.
//!
//! A bundle directory is written beside its destination under a fresh hidden name and renamed
//! into place, so a failed build leaves nothing behind. The destination may be missing, an
//! empty directory, or a previous kiln bundle: a directory whose `manifest.json` is kiln's and
//! which holds nothing but the files kiln writes. Anything else (a file, a symlink, a project
//! directory, a bundle the user added files to) is refused and left untouched.

use std::path::{Path, PathBuf};

/// The files a bundle may hold, relative to its directory.
pub const BUNDLE_FILES: [&str; 7] = [
    "lib/libkiln_model.a",
    "lib/libkiln_model.so",
    "include/kiln_model.h",
    "tokenizer.json",
    "manifest.json",
    "model.kir",
    "weights.bin",
];
/// The subdirectories a bundle may hold.
pub const BUNDLE_DIRS: [&str; 2] = ["lib", "include"];

/// Why an output directory cannot be written.
#[derive(Debug)]
pub enum OutDirError {
    /// The destination exists and is not something kiln may replace.
    NotReplaceable {
        path: PathBuf,
        reason: String,
    },
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// An output file exists and `--force` was not given (or it is a directory).
    FileExists {
        path: PathBuf,
        reason: String,
    },
}

impl std::fmt::Display for OutDirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutDirError::NotReplaceable { path, reason } => write!(
                f,
                "refusing to write the bundle to {}: {reason}; kiln replaces only an empty directory or a \
                 previous kiln bundle; choose another --out",
                path.display()
            ),
            OutDirError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            OutDirError::FileExists { path, reason } => write!(f, "cannot write {}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for OutDirError {}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutDirError + '_ {
    move |error| OutDirError::Io { path: path.to_path_buf(), error }
}

/// What is at a destination that kiln may write to.
#[derive(Debug, PartialEq, Eq)]
pub enum Existing {
    Nothing,
    EmptyDir,
    Bundle,
}

/// Checks that `out` may be written: it is missing, an empty directory or a previous kiln bundle.
pub fn check_replaceable(out: &Path) -> Result<Existing, OutDirError> {
    let refuse = |reason: String| Err(OutDirError::NotReplaceable { path: out.to_path_buf(), reason });
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(OutDirError::Io { path: out.to_path_buf(), error: e }),
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link".into());
    }
    if !meta.is_dir() {
        return refuse("it exists and is not a directory".into());
    }
    let entries = list_tree(out)?;
    if entries.is_empty() {
        return Ok(Existing::EmptyDir);
    }
    if !is_kiln_manifest(&out.join("manifest.json")) {
        return refuse("it is not empty and holds no kiln manifest.json, so it is not a kiln bundle".into());
    }
    let foreign: Vec<String> = entries
        .iter()
        .filter(
            |(rel, is_dir)| {
                if *is_dir {
                    !BUNDLE_DIRS.contains(&rel.as_str())
                } else {
                    !BUNDLE_FILES.contains(&rel.as_str())
                }
            },
        )
        .map(|(rel, _)| rel.clone())
        .collect();
    if !foreign.is_empty() {
        let shown: Vec<&str> = foreign.iter().take(5).map(String::as_str).collect();
        let more = if foreign.len() > 5 { format!(" and {} more", foreign.len() - 5) } else { String::new() };
        return refuse(format!(
            "it is a kiln bundle but also holds {}{more}, which kiln did not write",
            shown.join(", ")
        ));
    }
    Ok(Existing::Bundle)
}

/// True when `path` is a JSON object with kiln's `kiln_abi_version` key.
fn is_kiln_manifest(path: &Path) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return false };
    if !meta.is_file() || meta.len() > 64 << 20 {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v.get("kiln_abi_version").is_some())
}

/// Every entry under `dir`, as (`/`-separated relative path, is a directory), two levels deep:
/// deeper entries are reported by their first two components (enough to find foreign ones).
fn list_tree(dir: &Path) -> Result<Vec<(String, bool)>, OutDirError> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ty = entry.file_type().map_err(io(dir))?;
        out.push((name.clone(), ty.is_dir()));
        if ty.is_dir() {
            let sub = entry.path();
            for e in std::fs::read_dir(&sub).map_err(io(&sub))? {
                let e = e.map_err(io(&sub))?;
                let ty = e.file_type().map_err(io(&sub))?;
                out.push((format!("{name}/{}", e.file_name().to_string_lossy()), ty.is_dir()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A fresh hidden directory beside `out`, created by this call (so kiln owns it).
fn fresh_sibling(out: &Path, what: &str) -> Result<PathBuf, OutDirError> {
    let parent = parent_of(out);
    let stem = out.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "bundle".into());
    for i in 0..1000u32 {
        let p = parent.join(format!(".{stem}.kiln-{what}-{}-{i}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(OutDirError::Io { path: p, error: e }),
        }
    }
    Err(OutDirError::Io {
        path: parent.to_path_buf(),
        error: std::io::Error::other("no free temporary directory name"),
    })
}

/// A file a build writes before its bundle directory exists (`weights.bin`, written as the
/// weights are packed), in a fresh hidden directory beside the destination (same file system,
/// so it can be renamed into the bundle). Dropping it removes the file, if still there, and
/// the directory: both kiln's own.
pub struct StagedFile {
    dir: PathBuf,
    path: PathBuf,
}

impl StagedFile {
    /// Makes the parent of `out` if needed and a fresh directory beside `out` holding the empty
    /// file `name`, open for writing.
    pub fn create(out: &Path, name: &str) -> Result<(Self, std::fs::File), OutDirError> {
        let parent = parent_of(out);
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let dir = fresh_sibling(out, "stage")?;
        let path = dir.join(name);
        let staged = StagedFile { dir, path };
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&staged.path);
        let file = file.map_err(io(&staged.path))?;
        Ok((staged, file))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn parent_of(out: &Path) -> &Path {
    out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Removes a bundle kiln wrote: its known files, then its known directories, never anything else.
fn remove_bundle(dir: &Path) {
    for f in BUNDLE_FILES {
        let _ = std::fs::remove_file(dir.join(f));
    }
    for d in BUNDLE_DIRS {
        let _ = std::fs::remove_dir(dir.join(d));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Writes `files` (relative path, bytes) as the bundle directory `out`, replacing `out` only when
/// [`check_replaceable`] allows it, after `finish` has run on the complete temporary directory
/// (to add files made from the written ones, such as a linked shared library). Nothing is left
/// behind on failure.
pub fn write_bundle_dir<E: From<OutDirError>>(
    out: &Path,
    files: &[(&str, &[u8])],
    finish: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    for (rel, _) in files {
        debug_assert!(BUNDLE_FILES.contains(rel), "{rel} is not a bundle file");
    }
    let parent = parent_of(out);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    check_replaceable(out)?;
    let tmp = fresh_sibling(out, "tmp")?;
    let write = || -> Result<(), OutDirError> {
        for d in BUNDLE_DIRS {
            let p = tmp.join(d);
            std::fs::create_dir(&p).map_err(io(&p))?;
        }
        for (rel, data) in files {
            let p = tmp.join(rel);
            std::fs::write(&p, data).map_err(io(&p))?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp); // created by this call: kiln's own
        return Err(e.into());
    }
    if let Err(e) = finish(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp); // created by this call: kiln's own
        return Err(e);
    }
    // Check again right before replacing: the directory may have changed during the build.
    let replace = || -> Result<(), OutDirError> {
        match check_replaceable(out)? {
            Existing::Nothing => std::fs::rename(&tmp, out).map_err(io(out)),
            Existing::EmptyDir => std::fs::remove_dir(out).and_then(|()| std::fs::rename(&tmp, out)).map_err(io(out)),
            Existing::Bundle => {
                // Move the old bundle aside, move the new one in, then delete the old one's files.
                let old = fresh_sibling(out, "old")?;
                std::fs::remove_dir(&old).map_err(io(&old))?;
                std::fs::rename(out, &old).map_err(io(out))?;
                match std::fs::rename(&tmp, out) {
                    Ok(()) => {
                        remove_bundle(&old);
                        Ok(())
                    }
                    Err(e) => {
                        let _ = std::fs::rename(&old, out);
                        Err(OutDirError::Io { path: out.to_path_buf(), error: e })
                    }
                }
            }
        }
    };
    let result = replace();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp); // created by this call: kiln's own
    }
    Ok(result?)
}

/// Checks that the output file `path` may be written before any work: its directory exists,
/// and it is missing, or (with `force`) an existing file, never a directory. The rule of the
/// runner's output files.
pub fn check_output_file(path: &Path, force: bool) -> Result<(), OutDirError> {
    let refuse = |reason: String| Err(OutDirError::FileExists { path: path.to_path_buf(), reason });
    let parent = parent_of(path);
    if !parent.is_dir() {
        return refuse(format!("no directory {}", parent.display()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => refuse("it is a directory".into()),
        Ok(_) if !force => refuse("it exists; pass --force to replace it".into()),
        _ => Ok(()),
    }
}

/// Writes the file `path` through `write` into a fresh temporary file beside it, then renames
/// it into place (after [`check_output_file`] once more), so that a failure leaves nothing and
/// a reader never sees half a file.
pub fn write_file_atomically(
    path: &Path,
    force: bool,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), OutDirError> {
    check_output_file(path, force)?;
    let parent = parent_of(path);
    let stem = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let mut created = None;
    for i in 0..1000u32 {
        let p = parent.join(format!(".{stem}.kiln-tmp-{}-{i}", std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => {
                created = Some((p, f));
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(OutDirError::Io { path: p, error: e }),
        }
    }
    let Some((tmp, file)) = created else {
        return Err(OutDirError::Io {
            path: parent.to_path_buf(),
            error: std::io::Error::other("no free temporary file name"),
        });
    };
    let result = (|| -> Result<(), OutDirError> {
        let mut out = std::io::BufWriter::new(file);
        write(&mut out).map_err(io(&tmp))?;
        let file = out.into_inner().map_err(|e| OutDirError::Io { path: tmp.clone(), error: e.into_error() })?;
        file.sync_all().map_err(io(&tmp))?;
        check_output_file(path, force)?;
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp); // created by this call: kiln's own
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-outdir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn no_finish(_: &Path) -> Result<(), OutDirError> {
        Ok(())
    }

    const MANIFEST: &[u8] = b"{\"kiln_abi_version\": 1}\n";

    fn files() -> Vec<(&'static str, &'static [u8])> {
        vec![("manifest.json", MANIFEST), ("lib/libkiln_model.a", b"new"), ("tokenizer.json", b"{}")]
    }

    #[test]
    fn a_directory_holding_user_files_is_refused_and_untouched() {
        let dir = scratch("user");
        let out = dir.join("project");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let err = write_bundle_dir(&out, &files(), no_finish).unwrap_err().to_string();
        assert!(err.contains("not a kiln bundle"), "{err}");
        assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
        // Nothing left beside it either.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporary directory left behind");
    }

    #[test]
    fn a_bundle_with_a_foreign_file_is_refused_and_a_file_is_refused() {
        let dir = scratch("foreign");
        let out = dir.join("b");
        write_bundle_dir(&out, &files(), no_finish).unwrap();
        std::fs::write(out.join("lib/my.c"), b"int x;").unwrap();
        let err = write_bundle_dir(&out, &files(), no_finish).unwrap_err().to_string();
        assert!(err.contains("lib/my.c"), "{err}");
        assert_eq!(std::fs::read(out.join("lib/my.c")).unwrap(), b"int x;");

        let file = dir.join("file");
        std::fs::write(&file, b"data").unwrap();
        let err = write_bundle_dir(&file, &files(), no_finish).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }

    #[test]
    fn a_previous_bundle_and_an_empty_directory_are_replaced() {
        let dir = scratch("replace");
        let out = dir.join("b");
        std::fs::create_dir(&out).unwrap();
        write_bundle_dir(&out, &files(), no_finish).unwrap();
        assert_eq!(std::fs::read(out.join("lib/libkiln_model.a")).unwrap(), b"new");
        let newer = vec![("manifest.json", MANIFEST), ("lib/libkiln_model.a", &b"newer"[..])];
        write_bundle_dir(&out, &newer, no_finish).unwrap();
        assert_eq!(std::fs::read(out.join("lib/libkiln_model.a")).unwrap(), b"newer");
        assert!(!out.join("tokenizer.json").exists(), "files of the old bundle must go");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("b")], "only the bundle remains");
    }

    #[cfg(unix)]
    /// A staged file lives beside the destination and leaves nothing behind when dropped,
    /// moved into the bundle or not.
    #[test]
    fn a_staged_file_is_moved_in_or_removed() {
        let out = scratch("staged").join("bundle");
        let (staged, file) = StagedFile::create(&out, "weights.bin").unwrap();
        std::io::Write::write_all(&mut &file, b"packed").unwrap();
        let dir = staged.path().parent().unwrap().to_path_buf();
        assert_eq!(dir.parent(), out.parent());
        drop(staged);
        assert!(!dir.exists(), "removed when not moved");
        let (staged, _) = StagedFile::create(&out, "weights.bin").unwrap();
        write_bundle_dir(&out, &files(), |d: &Path| {
            std::fs::rename(staged.path(), d.join("weights.bin")).map_err(io(d))
        })
        .unwrap();
        let dir = staged.path().parent().unwrap().to_path_buf();
        drop(staged);
        assert!(out.join("weights.bin").is_file() && !dir.exists());
        let left: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("bundle")], "only the bundle is left");
    }

    #[test]
    fn a_symlink_is_refused() {
        let dir = scratch("symlink");
        let target = dir.join("real");
        std::fs::create_dir(&target).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = write_bundle_dir(&link, &files(), no_finish).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    }
}
