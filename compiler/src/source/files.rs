//! The files of a model directory, opened the one way every source opens them.
//!
//! A model's files are untrusted, and so is their layout. A file is named relative to the
//! model's directory by plain components (no absolute path, no `..`, nothing empty); the name
//! is resolved, symbolic links followed, and the file it resolves to must lie inside the
//! directory, or inside the repository of Hugging Face's cache the directory is (a folder of) a
//! snapshot of: the cache keeps `…/models--org--name/snapshots/<rev>/config.json` as a link to
//! `../../blobs/<sha256>`, so a snapshot's root is `…/models--org--name`. Anything else (a
//! chat template linking to `/etc/shadow`, a shard in someone else's directory) is refused with
//! the file and where it points named. The file must be a regular file (not a FIFO, which
//! would block, nor a device) and its size is checked against a limit before anything is
//! allocated. Small files (JSON, templates) are read into memory; weight files are mapped
//! ([`Mapped`]), so that a shard costs no memory until its pages are touched, and once a
//! build has packed a tensor it gives the tensor's pages back ([`Mapped::release`]): the
//! build's resident memory follows the tensors in flight, not the model.
//!
//! The directory is assumed not to change while kiln reads it (as every reader of a mapped file
//! assumes): a file swapped between the check and the open, or a mapped file truncated, is
//! outside what these checks guard against.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::frontend::{FrontendError, Hyperparameters};

/// Largest file kiln reads into memory (configs, index, tokenizer files, chat templates).
pub(crate) const MAX_TEXT_BYTES: u64 = 256 << 20;
/// Largest weight file (shard, ONNX model, external data) kiln maps. Together they are bounded
/// by [`max_weight_bytes`], which the config or graph decides.
pub(crate) const MAX_WEIGHT_FILE_BYTES: u64 = 1 << 40;
/// What a model's weight files may hold beyond its weights in F32 (see [`max_weight_bytes`]).
const EXTRA_WEIGHT_BYTES: u64 = 64 << 20;

/// The most bytes the weight files of a model with `hp` may hold: every weight kiln reads at 4
/// bytes (F32, the widest type a source takes, the head counted even when tied), an eighth more
/// and [`EXTRA_WEIGHT_BYTES`] for headers and tensors kiln does not read (rotary caches, an
/// `inv_freq`). Every byte of a model's files is hashed for the build fingerprint, so a file of
/// zeros that claims a terabyte is refused here rather than hashed for minutes.
pub(crate) fn max_weight_bytes(hp: &Hyperparameters) -> u64 {
    let f32_bytes = hp.weight_elements().saturating_mul(4);
    f32_bytes.saturating_add(f32_bytes / 8).saturating_add(EXTRA_WEIGHT_BYTES)
}

fn err(file: &Path, reason: impl Into<String>) -> FrontendError {
    FrontendError::Checkpoint { file: file.display().to_string(), reason: reason.into() }
}

/// A weight file mapped into memory, read-only.
pub(crate) struct Mapped(memmap2::Mmap);

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A mapping shared between its owner and a [`bytes::Bytes`] (`Bytes::from_owner`), so that
/// the owner can still release its pages.
pub(crate) struct SharedMapped(pub(crate) std::sync::Arc<Mapped>);

impl AsRef<[u8]> for SharedMapped {
    fn as_ref(&self) -> &[u8] {
        &self.0 .0
    }
}

impl Mapped {
    /// Drops the pages of `bytes` from this process's memory when `bytes` is a part of this
    /// mapping (anything else is ignored): a build calls it once a tensor is packed or hashed,
    /// so that a model many times the size of the machine's memory still builds. A later read
    /// of those bytes reads them from the file again (or the page cache); nothing changes.
    pub(crate) fn release(&self, bytes: &[u8]) {
        let (start, base) = (bytes.as_ptr() as usize, self.0.as_ptr() as usize);
        if bytes.is_empty() || start < base || start + bytes.len() > base + self.0.len() {
            return;
        }
        self.release_range(start - base, bytes.len());
    }

    #[allow(unsafe_code)]
    fn release_range(&self, offset: usize, len: usize) {
        // SAFETY: the range lies inside the mapping (checked by the caller), and the mapping is
        // read-only and private: it is never written, so it has no copied-on-write pages, and
        // dropping its pages (MADV_DONTNEED, which memmap2 widens to whole pages, all of this
        // mapping) only unmaps them from this process; the next read of any of those bytes
        // faults the same file bytes back in. No reference into the mapping sees a change.
        let r = unsafe { self.0.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
        // An error leaves the pages where they were: memory, not correctness.
        let _ = r;
    }
}

/// Opens the regular file `path` (shown as `shown`) of at most `max` bytes: its handle and length.
fn open_regular(path: &Path, shown: &Path, max: u64) -> Result<(File, u64), FrontendError> {
    // Checked before opening: opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(|e| err(shown, e.to_string()))?;
    if !meta.is_file() {
        return Err(err(shown, "not a regular file"));
    }
    let file = File::open(path).map_err(|e| err(shown, e.to_string()))?;
    let len = file.metadata().map_err(|e| err(shown, e.to_string()))?.len();
    if len > max {
        return Err(err(shown, format!("{len} bytes, more than kiln reads from such a file ({max})")));
    }
    Ok((file, len))
}

/// Reads `file` of `len` bytes (at most `max`, checked again as it is read).
fn read_all(file: File, len: u64, max: u64, shown: &Path) -> Result<Vec<u8>, FrontendError> {
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(|e| err(shown, e.to_string()))?;
    if bytes.len() as u64 > max {
        return Err(err(shown, format!("grew past {max} bytes while read")));
    }
    Ok(bytes)
}

/// Maps `file` of `len` bytes, read-only.
fn map(file: &File, len: u64, shown: &Path) -> Result<Mapped, FrontendError> {
    map_file(file, len).map_err(|e| err(shown, format!("cannot be mapped: {e}")))
}

/// Maps `file` of `len` bytes (its length, checked by the caller), read-only.
#[allow(unsafe_code)]
pub(crate) fn map_file(file: &File, len: u64) -> std::io::Result<Mapped> {
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("too large to map"))?;
    // SAFETY: the mapping is read-only and private (copy-on-write, never written), so nothing
    // kiln does reaches the file; it covers `len` bytes, the length just checked. What the
    // `&[u8]` it hands out assumes, like every mapping of a file, is that no other process
    // writes or truncates the file while kiln holds it (a model being compiled is not being
    // rewritten); if one did, kiln could see changing bytes or be stopped by SIGBUS, the module
    // doc states this assumption.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map_copy_read_only(file) };
    map.map(Mapped)
}

/// Maps the weight file `path` the user named (an ONNX model), of at most
/// [`MAX_WEIGHT_FILE_BYTES`]: a regular file, wherever it is.
pub(crate) fn map_named_file(path: &Path) -> Result<Mapped, FrontendError> {
    let (file, len) = open_regular(path, path, MAX_WEIGHT_FILE_BYTES)?;
    map(&file, len, path)
}

/// A model's directory: the files in it are opened by relative name, confined to it (see the
/// module doc).
pub(crate) struct ModelDir {
    /// As the user gave it, for messages.
    shown: PathBuf,
    /// The directory resolved, then the Hugging Face cache repository it is a snapshot of, if any.
    roots: Vec<PathBuf>,
}

impl ModelDir {
    /// The model directory `dir` (resolved now: a link to the directory itself is the user's choice).
    pub(crate) fn new(dir: &Path) -> Result<Self, FrontendError> {
        let real = std::fs::canonicalize(dir).map_err(|e| err(dir, e.to_string()))?;
        // `…/models--org--name/snapshots/<rev>` or a folder of it (ONNX exports often sit in
        // `<rev>/onnx/`): files link into `…/models--org--name/blobs`.
        let repo = real.ancestors().skip(1).find_map(|a| {
            let repo = a.parent().filter(|_| a.file_name().is_some_and(|n| n == "snapshots"))?;
            repo.file_name()?.to_str()?.starts_with("models--").then(|| repo.to_path_buf())
        });
        Ok(ModelDir { shown: dir.to_path_buf(), roots: std::iter::once(real).chain(repo).collect() })
    }

    /// The file `name` of the directory, for messages.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.shown.join(name)
    }

    /// The regular file `name` resolved inside the roots, opened, with its length (at most
    /// `max`); `None` when there is no such file.
    fn open(&self, name: &str, max: u64) -> Result<Option<(File, u64)>, FrontendError> {
        let shown = self.path(name);
        let plain = !name.is_empty() && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(err(&shown, "not a relative path of plain names inside the model's directory"));
        }
        let joined = self.roots[0].join(name);
        let real = match std::fs::canonicalize(&joined) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A link to nothing is not a missing file: it says where it wanted to go.
                return match std::fs::read_link(&joined) {
                    Ok(to) => Err(err(&shown, format!("a symbolic link to {}, which does not exist", to.display()))),
                    Err(_) => Ok(None),
                };
            }
            Err(e) => return Err(err(&shown, e.to_string())),
        };
        if !self.roots.iter().any(|r| real.starts_with(r)) {
            let within = match &self.roots[..] {
                [dir, repo] => format!("{} (and its Hugging Face cache repository {})", dir.display(), repo.display()),
                _ => self.roots[0].display().to_string(),
            };
            return Err(err(&shown, format!("resolves to {}, outside the model's directory {within}", real.display())));
        }
        open_regular(&real, &shown, max).map(Some)
    }

    /// The bytes of the file `name` (at most `max`, checked before reading); `None` when absent.
    pub(crate) fn read(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, FrontendError> {
        let shown = self.path(name);
        self.open(name, max)?.map(|(file, len)| read_all(file, len, max, &shown)).transpose()
    }

    /// The file `name` mapped (at most [`MAX_WEIGHT_FILE_BYTES`]); `None` when absent.
    pub(crate) fn map(&self, name: &str) -> Result<Option<Mapped>, FrontendError> {
        let shown = self.path(name);
        self.open(name, MAX_WEIGHT_FILE_BYTES)?.map(|(file, len)| map(&file, len, &shown)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn message(e: FrontendError) -> String {
        e.to_string()
    }

    #[test]
    fn names_must_be_plain_and_files_inside() {
        let d = scratch("plain");
        let model = d.join("model");
        std::fs::create_dir_all(model.join("sub")).unwrap();
        std::fs::write(d.join("secret"), "s").unwrap();
        std::fs::write(model.join("sub/a.json"), "{}").unwrap();
        std::os::unix::fs::symlink("../secret", model.join("out")).unwrap();
        std::os::unix::fs::symlink("sub/a.json", model.join("in")).unwrap();
        std::os::unix::fs::symlink("nowhere", model.join("dangling")).unwrap();
        let m = ModelDir::new(&model).unwrap();
        for bad in ["", "/etc/passwd", "../secret", "sub/../../secret", "./in", "sub//a.json/.."] {
            let e = message(m.read(bad, 10).expect_err(bad));
            assert!(e.contains("not a relative path of plain names"), "{bad}: {e}");
        }
        let e = message(m.read("out", 10).unwrap_err());
        assert!(e.contains("resolves to") && e.contains("secret") && e.contains("outside"), "{e}");
        assert_eq!(m.read("in", 10).unwrap().unwrap(), b"{}");
        assert_eq!(m.read("sub/a.json", 10).unwrap().unwrap(), b"{}");
        assert!(m.read("absent", 10).unwrap().is_none());
        let e = message(m.read("dangling", 10).unwrap_err());
        assert!(e.contains("symbolic link to nowhere"), "{e}");
        let e = message(m.read("sub", 10).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        let e = message(m.read("in", 1).unwrap_err());
        assert!(e.contains("2 bytes, more than"), "{e}");
        assert_eq!(&m.map("in").unwrap().unwrap()[..], b"{}");
        std::fs::write(model.join("empty"), "").unwrap();
        assert!(m.map("empty").unwrap().unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_cache_snapshot_may_link_into_its_own_repository_only() {
        let d = scratch("cache");
        let repo = d.join("models--org--x");
        let snap = repo.join("snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(d.join("models--org--y/blobs")).unwrap();
        std::fs::write(repo.join("blobs/1"), "mine").unwrap();
        std::fs::write(d.join("models--org--y/blobs/2"), "theirs").unwrap();
        std::os::unix::fs::symlink("../../blobs/1", snap.join("config.json")).unwrap();
        std::os::unix::fs::symlink("../../../models--org--y/blobs/2", snap.join("tokenizer.json")).unwrap();
        let m = ModelDir::new(&snap).unwrap();
        assert_eq!(m.read("config.json", 10).unwrap().unwrap(), b"mine");
        let e = message(m.read("tokenizer.json", 10).unwrap_err());
        assert!(e.contains("models--org--y") && e.contains("Hugging Face cache repository"), "{e}");
        // A folder of a snapshot (`<rev>/onnx/`) belongs to the repository too.
        std::fs::create_dir_all(snap.join("onnx")).unwrap();
        std::os::unix::fs::symlink("../../../blobs/1", snap.join("onnx/model.onnx.data")).unwrap();
        let m = ModelDir::new(&snap.join("onnx")).unwrap();
        assert_eq!(&m.map("model.onnx.data").unwrap().unwrap()[..], b"mine");
        // The snapshots folder itself is no snapshot.
        std::fs::create_dir_all(repo.join("snapshots/x")).unwrap();
        std::os::unix::fs::symlink("../blobs/1", repo.join("snapshots/c")).unwrap();
        let e = message(ModelDir::new(&repo.join("snapshots")).unwrap().read("c", 10).unwrap_err());
        assert!(e.contains("outside"), "{e}");
        // The same layout without the `models--` prefix is not a cache.
        let plain = d.join("other/snapshots/abc");
        std::fs::create_dir_all(&plain).unwrap();
        std::os::unix::fs::symlink("../../../models--org--x/blobs/1", plain.join("config.json")).unwrap();
        let e = message(ModelDir::new(&plain).unwrap().read("config.json", 10).unwrap_err());
        assert!(e.contains("outside"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
