//! The data the runner's commands default to, embedded in the binary: a runner installed with
//! `cargo install` or moved elsewhere reads no file of the checkout it was built from.
//!
//! A default is named by a path of its own, `kiln:NAME` (such as `kiln:eval.txt`), which the
//! readers here resolve to the embedded text; any other path is a file. The texts are
//! `runtime/eval/data/` (written for kiln, CC0; see its README).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The prefix of the embedded texts' paths.
const PREFIX: &str = "kiln:";

/// The embedded texts by name.
const SHIPPED: [(&str, &str); 4] = [
    ("eval.txt", include_str!("../data/eval.txt")),
    ("calib.txt", include_str!("../data/calib.txt")),
    ("qa.jsonl", include_str!("../data/qa.jsonl")),
    ("bio.jsonl", include_str!("../data/bio.jsonl")),
];

/// The path that names the embedded text `name` (one of `eval.txt`, `calib.txt`, `qa.jsonl`,
/// `bio.jsonl`).
pub fn shipped(name: &str) -> PathBuf {
    debug_assert!(SHIPPED.iter().any(|(n, _)| *n == name), "no shipped text {name}");
    PathBuf::from(format!("{PREFIX}{name}"))
}

/// The embedded text a path names, if it names one.
pub fn embedded(path: &Path) -> Option<&'static str> {
    let name = path.to_str()?.strip_prefix(PREFIX)?;
    SHIPPED.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

/// Whether `path` is an embedded text or a file.
pub fn exists(path: &Path) -> bool {
    embedded(path).is_some() || path.is_file()
}

/// The length in bytes of an embedded text or a file.
pub fn len(path: &Path) -> Result<u64> {
    match embedded(path) {
        Some(text) => Ok(text.len() as u64),
        None => {
            let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
            anyhow::ensure!(meta.is_file(), "{} is not a file", path.display());
            Ok(meta.len())
        }
    }
}

/// The text of an embedded text or a UTF-8 file.
pub fn read(path: &Path) -> Result<String> {
    match embedded(path) {
        Some(text) => Ok(text.to_string()),
        None => std::fs::read_to_string(path).with_context(|| format!("cannot read {} as UTF-8 text", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_texts_resolve_and_files_stay_files() {
        for name in ["eval.txt", "calib.txt", "qa.jsonl", "bio.jsonl"] {
            let p = shipped(name);
            assert!(exists(&p) && !read(&p).unwrap().is_empty(), "{name}");
            assert_eq!(len(&p).unwrap(), read(&p).unwrap().len() as u64);
        }
        assert!(embedded(Path::new("kiln:other.txt")).is_none());
        assert!(embedded(Path::new("eval.txt")).is_none());
        assert!(!exists(Path::new("kiln:nothing")));
        assert!(read(Path::new("/nonexistent/kiln-data")).is_err());
    }
}
