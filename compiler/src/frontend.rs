//! The Llama frontend: a [`ModelSource`]'s hyperparameters and tensors in, an IR [`Graph`] and
//! its weights out.
//!
//! Hyperparameters come from the source (GGUF metadata, `config.json`), never from constants,
//! and every tensor's format and shape is checked by the source against what the graph needs
//! before it is built. After this module, weights are [`WeightId`]s with their raw bytes in
//! [`LoweredModel::weights`] (slices of the source's bytes where it can lend them); nothing
//! downstream reads a file format.

use std::borrow::Cow;
use std::fmt;

use ir::{DType, Epilogue, Graph, Op, TensorType, ValueId, WeightId};
use serde::Serialize;

use crate::gguf::{clip, GgufError};
use crate::source::ModelSource;
use crate::tokenizer_json::TokenizerError;

/// Architectures the frontend lowers.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Hyperparameters of a Llama-family model, as read from GGUF metadata.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hyperparameters {
    pub architecture: String,
    pub n_layers: u32,
    pub d_model: u32,
    pub d_ff: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub vocab: u32,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// The context length the model was trained with.
    pub train_context: u32,
    pub tied_embedding: bool,
}

/// A model lowered to IR: the graph, and the raw bytes of each weight (indexed by [`WeightId`]),
/// borrowed from the source where it could hand them out unchanged.
pub struct LoweredModel<'a> {
    pub graph: Graph,
    pub weights: Vec<Cow<'a, [u8]>>,
    pub hyper: Hyperparameters,
}

/// Why a GGUF file could not be lowered. Always a problem with the input file or the options.
#[derive(Debug)]
pub enum FrontendError {
    Gguf(GgufError),
    UnsupportedArchitecture {
        architecture: String,
    },
    BadHyperparameter {
        key: String,
        value: String,
        reason: String,
    },
    UnsupportedTensorType {
        tensor: String,
        ggml_type: String,
    },
    BadTensorShape {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    BadContext {
        requested: u32,
        reason: String,
    },
    /// No context length was given and the file's `llama.context_length` is 0.
    NoContextLength {
        key: String,
    },
    /// The embedding (or output) matrix has a different number of rows than the tokenizer has tokens.
    VocabMismatch {
        tensor: String,
        rows: u64,
        tokens: usize,
    },
    /// `general.name` cannot name a model library.
    BadModelName {
        reason: String,
    },
    /// The model's tokenizer cannot be read or built.
    Tokenizer(TokenizerError),
    /// A file of a checkpoint is missing, unreadable or contradicts the rest; `file` names it
    /// (and the tensor, when one is at fault).
    Checkpoint {
        file: String,
        reason: String,
    },
}

impl fmt::Display for FrontendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontendError::Gguf(e) => write!(f, "{e}"),
            FrontendError::UnsupportedArchitecture { architecture } => write!(
                f,
                "unsupported architecture '{architecture}' (general.architecture); supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
            FrontendError::BadHyperparameter { key, value, reason } => write!(f, "bad hyperparameter {key} = {value}: {reason}"),
            FrontendError::UnsupportedTensorType { tensor, ggml_type } => write!(
                f,
                "tensor '{tensor}' has type {ggml_type}, which kiln cannot compile yet (supported: f32, f16, q4_0, q4_1, q8_0)"
            ),
            FrontendError::BadTensorShape { tensor, expected, found } => write!(
                f,
                "tensor '{tensor}' has shape {found:?} but the hyperparameters require {expected:?} (GGUF dims order)"
            ),
            FrontendError::BadContext { requested, reason } => write!(f, "context length {requested}: {reason}"),
            FrontendError::NoContextLength { key } => write!(
                f,
                "the model's {key} is 0 or absent, so there is no default context length; pass --context N \
                 (1..={MAX_CONTEXT})"
            ),
            FrontendError::VocabMismatch { tensor, rows, tokens } => write!(
                f,
                "tensor '{tensor}' has {rows} rows but the tokenizer (tokenizer.ggml.tokens) has {tokens} tokens; \
                 they must be equal"
            ),
            FrontendError::BadModelName { reason } => write!(f, "bad model name (general.name): {reason}"),
            FrontendError::Tokenizer(e) => write!(f, "{e}"),
            FrontendError::Checkpoint { file, reason } => write!(f, "{file}: {reason}"),
        }
    }
}

impl std::error::Error for FrontendError {}

impl From<GgufError> for FrontendError {
    fn from(e: GgufError) -> Self {
        FrontendError::Gguf(e)
    }
}

impl From<TokenizerError> for FrontendError {
    fn from(e: TokenizerError) -> Self {
        FrontendError::Tokenizer(e)
    }
}

/// Largest context length kiln compiles for (positions are i32 in kernels, and the rotary
/// table grows linearly with it).
pub const MAX_CONTEXT: u32 = 1 << 17;

pub(crate) fn bad(key: &str, value: impl fmt::Display, reason: &str) -> FrontendError {
    FrontendError::BadHyperparameter { key: key.to_string(), value: value.to_string(), reason: reason.to_string() }
}

impl Hyperparameters {
    /// Checks the counts and constants every source must satisfy (not `vocab`, which sources
    /// take from the embedding's shape); `key` names a field (given
    /// by its GGUF key suffix, e.g. `attention.head_count`) as the source stores it.
    pub fn check(&self, key: impl Fn(&str) -> String) -> Result<(), FrontendError> {
        for (k, v, max) in [
            ("block_count", self.n_layers, 1024),
            ("embedding_length", self.d_model, 1 << 16),
            ("feed_forward_length", self.d_ff, 1 << 18),
            ("attention.head_count", self.n_heads, 1024),
            ("attention.head_count_kv", self.n_kv_heads, 1024),
        ] {
            if v == 0 || v > max {
                return Err(bad(&key(k), v, &format!("must be in 1..={max}")));
            }
        }
        if self.d_model % self.n_heads != 0 {
            return Err(bad(&key("attention.head_count"), self.n_heads, "must divide the embedding length"));
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(bad(&key("attention.head_count_kv"), self.n_kv_heads, "must divide the head count"));
        }
        if self.head_dim != self.d_model / self.n_heads {
            return Err(bad(
                &key("attention.head_count"),
                self.n_heads,
                "the head dimension must be the embedding length / heads",
            ));
        }
        if self.head_dim % 4 != 0 {
            return Err(bad(&key("attention.head_count"), self.n_heads, "the head dimension must be a multiple of 4"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(bad(&key("rope.freq_base"), self.rope_theta, "must be finite and > 1"));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0 && self.rms_eps < 1.0) {
            return Err(bad(&key("attention.layer_norm_rms_epsilon"), self.rms_eps, "must be in [0, 1)"));
        }
        Ok(())
    }

    /// How many weight elements [`lower`] asks a source for, the head counted even when tied
    /// (saturating: for a bound, never an allocation).
    pub fn weight_elements(&self) -> u64 {
        let (d, ff, vocab) = (self.d_model as u64, self.d_ff as u64, self.vocab as u64);
        let kv = self.n_kv_heads as u64 * self.head_dim as u64;
        // Two norms, q and o (d x d), k and v (d x kv), gate, up and down (d x ff).
        let layer = [2 * d, d.saturating_mul(d), d.saturating_mul(d), d.saturating_mul(kv), d.saturating_mul(kv)]
            .into_iter()
            .chain([d.saturating_mul(ff); 3])
            .fold(0u64, u64::saturating_add);
        // The embedding and the head, then the final norm.
        (self.n_layers as u64)
            .saturating_mul(layer)
            .saturating_add(vocab.saturating_mul(d).saturating_mul(2))
            .saturating_add(d)
    }
}

/// The checked hyperparameters of the model in `source`.
pub fn hyperparameters(source: &dyn ModelSource) -> Result<Hyperparameters, FrontendError> {
    source.hyperparameters()
}

/// The context length to compile for: `requested`, or the training context capped at
/// `default_cap` (an error naming where `source` keeps it when it is 0).
pub fn choose_context(
    source: &dyn ModelSource,
    hp: &Hyperparameters,
    requested: Option<u32>,
    default_cap: u32,
) -> Result<u32, FrontendError> {
    match requested {
        Some(c) => Ok(c),
        None if hp.train_context == 0 => Err(FrontendError::NoContextLength { key: source.context_key() }),
        None => Ok(hp.train_context.min(default_cap)),
    }
}

/// Longest model name accepted from `general.name`, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// The model's name: `general.name` when present, else `fallback` (the file name).
///
/// The name goes into the object file, the C header's comment and the manifest, so
/// `general.name` is refused when it holds a control character (NUL, newline, ...) or is
/// longer than [`MAX_NAME_BYTES`]; the fallback is cleaned instead (control characters become
/// `_`, and it is cut to [`MAX_NAME_BYTES`]).
pub fn model_name(source: &dyn ModelSource, fallback: &str) -> Result<String, FrontendError> {
    let Some(name) = source.declared_name()? else {
        return Ok(clean_name(fallback));
    };
    let name = name.as_str();
    if let Some((at, c)) = name.char_indices().find(|(_, c)| c.is_control()) {
        return Err(FrontendError::BadModelName {
            reason: format!("{:?} holds the control character {c:?} at byte {at}", clip(name)),
        });
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(FrontendError::BadModelName {
            reason: format!("{:?} is longer than {MAX_NAME_BYTES} bytes", clip(name)),
        });
    }
    Ok(name.to_owned())
}

fn clean_name(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > MAX_NAME_BYTES {
            break;
        }
        out.push(if c.is_control() { '_' } else { c });
    }
    if out.is_empty() {
        out.push_str("model");
    }
    out
}

struct Builder<'a> {
    source: &'a dyn ModelSource,
    graph: Graph,
    weights: Vec<Cow<'a, [u8]>>,
}

impl<'a> Builder<'a> {
    /// Adds the tensor kiln calls `name` as a weight; the source checks its `dims` (innermost first).
    fn weight(&mut self, name: &str, dims: &[u64]) -> Result<WeightId, FrontendError> {
        let source: &'a dyn ModelSource = self.source;
        let tensor = source.tensor(name, dims)?;
        let shape = dims.iter().rev().map(|&d| d as u32).collect();
        self.weights.push(tensor.bytes);
        Ok(self.graph.add_weight(name, tensor.format, shape))
    }

    fn node(&mut self, op: Op, dtype: DType, n: u32) -> ValueId {
        self.graph.push(op, TensorType::rows(dtype, n))
    }
}

/// Lowers a Llama-family GGUF to IR for a KV cache of `context` positions.
///
/// The graph takes token ids (`input 0 : i32[seq]`) and returns the logits of every row
/// (`f32[seq, vocab]`).
pub fn lower<'a>(source: &'a dyn ModelSource, name: &str, context: u32) -> Result<LoweredModel<'a>, FrontendError> {
    let hp = source.hyperparameters()?;
    if context == 0 || context > MAX_CONTEXT {
        return Err(FrontendError::BadContext { requested: context, reason: format!("must be in 1..={MAX_CONTEXT}") });
    }
    // A training context of 0 means the file does not say; the caller chose `context`.
    if hp.train_context != 0 && context > hp.train_context {
        return Err(FrontendError::BadContext {
            requested: context,
            reason: format!("the model was trained for {} positions", hp.train_context),
        });
    }
    let (d, ff, kv) = (hp.d_model as u64, hp.d_ff as u64, (hp.n_kv_heads * hp.head_dim) as u64);
    let mut b = Builder { source, graph: Graph::new(name, context), weights: vec![] };
    let embd = b.weight("token_embd.weight", &[d, hp.vocab as u64])?;
    let ids = b.graph.push(Op::Input { index: 0 }, TensorType::seq(DType::I32));
    let mut x = b.node(Op::Embed { ids, table: embd }, DType::F32, hp.d_model);
    let eps = hp.rms_eps;
    for l in 0..hp.n_layers {
        let t = |s: &str| format!("blk.{l}.{s}.weight");
        let attn_norm = b.weight(&t("attn_norm"), &[d])?;
        let wq = b.weight(&t("attn_q"), &[d, d])?;
        let wk = b.weight(&t("attn_k"), &[d, kv])?;
        let wv = b.weight(&t("attn_v"), &[d, kv])?;
        let wo = b.weight(&t("attn_output"), &[d, d])?;
        let ffn_norm = b.weight(&t("ffn_norm"), &[d])?;
        let gate = b.weight(&t("ffn_gate"), &[d, ff])?;
        let up = b.weight(&t("ffn_up"), &[d, ff])?;
        let down = b.weight(&t("ffn_down"), &[ff, d])?;

        // (seq, d_model) -> attention -> (seq, d_model), added to the residual stream.
        let h = b.node(Op::RmsNorm { x, weight: attn_norm, eps, quantize: false }, DType::F32, hp.d_model);
        let q = b.node(Op::MatMul { x: h, weight: wq, epilogue: Epilogue::None }, DType::F32, hp.d_model);
        let k = b.node(Op::MatMul { x: h, weight: wk, epilogue: Epilogue::None }, DType::F32, kv as u32);
        let v = b.node(Op::MatMul { x: h, weight: wv, epilogue: Epilogue::None }, DType::F32, kv as u32);
        let (hd, theta) = (hp.head_dim, hp.rope_theta);
        let q = b.node(Op::Rope { x: q, head_dim: hd, theta }, DType::F32, hp.d_model);
        let k = b.node(Op::Rope { x: k, head_dim: hd, theta }, DType::F32, kv as u32);
        let attn = Op::Attention { q, k, v, layer: l, n_heads: hp.n_heads, n_kv_heads: hp.n_kv_heads, head_dim: hd };
        let a = b.node(attn, DType::F32, hp.d_model);
        let o = b.node(Op::MatMul { x: a, weight: wo, epilogue: Epilogue::None }, DType::F32, hp.d_model);
        x = b.node(Op::Add { a: x, b: o }, DType::F32, hp.d_model);

        // (seq, d_model) -> SwiGLU MLP (seq, d_ff) -> (seq, d_model), added to the residual.
        let h = b.node(Op::RmsNorm { x, weight: ffn_norm, eps, quantize: false }, DType::F32, hp.d_model);
        let g = b.node(Op::MatMul { x: h, weight: gate, epilogue: Epilogue::None }, DType::F32, hp.d_ff);
        let g = b.node(Op::Silu { x: g }, DType::F32, hp.d_ff);
        let u = b.node(Op::MatMul { x: h, weight: up, epilogue: Epilogue::None }, DType::F32, hp.d_ff);
        let m = b.node(Op::Mul { a: g, b: u }, DType::F32, hp.d_ff);
        let down = b.node(Op::MatMul { x: m, weight: down, epilogue: Epilogue::None }, DType::F32, hp.d_model);
        x = b.node(Op::Add { a: x, b: down }, DType::F32, hp.d_model);
    }
    let out_norm = b.weight("output_norm.weight", &[d])?;
    let x = b.node(Op::RmsNorm { x, weight: out_norm, eps, quantize: false }, DType::F32, hp.d_model);
    let head = if hp.tied_embedding { embd } else { b.weight("output.weight", &[d, hp.vocab as u64])? };
    let logits = b.node(Op::MatMul { x, weight: head, epilogue: Epilogue::None }, DType::F32, hp.vocab);
    b.graph.outputs.push(logits);
    Ok(LoweredModel { graph: b.graph, weights: b.weights, hyper: hp })
}
