//! Model sources: the seam between a model as a user has it and the compiler.
//!
//! A source answers four questions: the hyperparameters, a tensor by kiln's name (GGUF's names,
//! `blk.3.attn_q.weight`, with GGUF's dims order, innermost first, and GGUF's rotary row order
//! for `attn_q`/`attn_k`), the tokenizer (a `tokenizer.json` with its special tokens and chat
//! template), and a digest of every input byte (for the build fingerprint). The frontend and
//! the bundle writer ask only these; neither reads a file format.
//!
//! Sources, one file each: [`gguf`] (a GGUF file), [`hf`] (a Hugging Face checkpoint
//! directory: `config.json`, safetensors, tokenizer files), [`onnx`] (an ONNX export of the
//! decoder, recognized pattern by pattern). [`open`] picks one from the path. The files of a
//! model's directory are opened through [`files::ModelDir`] (confined to the directory, sizes
//! bounded, weights mapped).

use std::borrow::Cow;
use std::path::Path;

use ir::QuantFormat;

use crate::frontend::{FrontendError, Hyperparameters};

pub(crate) mod files;
pub mod gguf;
pub mod hf;
pub mod onnx;
pub(crate) mod onnx_proto;

/// One tensor of a source, as the frontend asked for it.
pub struct SourceTensor<'a> {
    pub format: QuantFormat,
    /// The stored bytes in `format` (borrowed from the source unless it had to reorder rows).
    pub bytes: Cow<'a, [u8]>,
}

/// The tokenizer of a model and what the runtime needs to know of its special tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerSpec {
    /// A Hugging Face `tokenizer.json`.
    pub json: String,
    /// Beginning-of-sequence token id and text.
    pub bos: (u32, String),
    /// End-of-sequence token id and text.
    pub eos: (u32, String),
    /// Whether a prompt starts with BOS (when the tokenizer's own post-processor does not add it).
    pub add_bos: bool,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Token ids that end a reply, sorted and unique.
    pub stop_ids: Vec<u32>,
}

/// A model as a user has it. Implementations check what they hand out against what the
/// frontend asked for, and name their own files and tensors in errors.
pub trait ModelSource: Sync {
    /// The source's kind, for the manifest and messages: `gguf`, `safetensors`.
    fn kind(&self) -> &'static str;

    /// The hyperparameters, checked ([`Hyperparameters::check`]).
    fn hyperparameters(&self) -> Result<Hyperparameters, FrontendError>;

    /// The name the model gives itself (GGUF's `general.name`), unchecked; `None` when it has
    /// none ([`crate::frontend::model_name`] then uses the file name).
    fn declared_name(&self) -> Result<Option<String>, FrontendError>;

    /// The tensor kiln calls `name`, which must have `dims` (innermost first).
    fn tensor(&self, name: &str, dims: &[u64]) -> Result<SourceTensor<'_>, FrontendError>;

    /// The tokenizer and its special tokens.
    fn tokenizer(&self) -> Result<TokenizerSpec, FrontendError>;

    /// Lowercase hex SHA-256 of every byte the source read (one file's digest for a GGUF).
    fn sha256(&self) -> String;

    /// Where the source keeps the training context length, for the message when it is 0.
    fn context_key(&self) -> String;

    /// Tells the source that `bytes`, a slice it handed out ([`ModelSource::tensor`]), will not
    /// be read again soon: a mapped source gives its pages back (a later read maps them in
    /// again), so that a build's memory follows the tensors it is packing, not the model.
    fn release(&self, _bytes: &[u8]) {}
}

/// Bytes hashed before their pages are given back ([`ModelSource::sha256`] of mapped files).
pub(crate) const HASH_CHUNK: usize = 64 << 20;

/// Opens the model at `path`: a directory is a Hugging Face checkpoint, a `.onnx` file an ONNX
/// export, anything else a GGUF file.
pub fn open(path: &Path) -> Result<Box<dyn ModelSource>, FrontendError> {
    if path.is_dir() {
        return Ok(Box::new(hf::HfCheckpoint::open(path)?));
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        return Ok(Box::new(onnx::OnnxModel::open(path)?));
    }
    Ok(Box::new(crate::gguf::GgufFile::open(path)?))
}

/// The ids of the usual end-of-turn markers present in a vocabulary, with `ids`, sorted and unique.
pub(crate) fn stop_ids(mut ids: Vec<u32>, token_id: impl Fn(&str) -> Option<u32>) -> Vec<u32> {
    for marker in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"] {
        ids.extend(token_id(marker));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}
