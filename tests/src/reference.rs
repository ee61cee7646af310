//! The reference executor: an independent f32 implementation of the Llama forward pass on
//! burn (ndarray backend), used by the integration tests as the oracle for kiln's compiled
//! code.
//!
//! It shares no kernels with kiln's code generator and no code with its frontend: it reads the
//! hyperparameters and tensors straight from the GGUF file (through kiln's bounded GGUF reader)
//! and dequantizes every weight once, with the scalar reference dequantizer
//! [`ir::quant::dequantize`]; the math after that is `heal::llama`'s burn forward pass (the
//! one burn Llama of the workspace, also `heal`'s teacher and student), in f32.
//!
//! The model: token embedding; per block `h += Wo·attn(rope(Wq·n), rope(Wk·n), Wv·n)` with
//! `n = rmsnorm(h)`, causal multi-head attention with grouped KV heads, then
//! `h += Wdown·(silu(Wgate·m) * Wup·m)` with `m = rmsnorm(h)`; a final RMSNorm and the output
//! head (tied to the token embedding when `output.weight` is absent). GGUF stores Q and K
//! permuted so that rotary embedding rotates adjacent pairs `(x[2i], x[2i+1])` of each head by
//! the angle `pos * theta^(-2i/head_dim)`; that is what [`ReferenceModel::forward`] does.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context};
use burn::tensor::Tensor;
use compiler::gguf::{GgufFile, TensorInfo};

/// Hyperparameters read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// `false` when the output head reuses `token_embd.weight`.
    pub separate_output: bool,
}

/// A Llama model with every weight dequantized to f32 burn tensors.
pub struct ReferenceModel {
    config: ReferenceConfig,
    model: heal::llama::Llama,
}

/// The result of [`ReferenceModel::forward`] on `n` tokens.
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    /// `[n, vocab]` row-major: row `i` holds the logits after token `i`.
    pub logits: Vec<f32>,
    /// `n_layers + 1` entries, each `[n, d_model]` row-major, laid out like Hugging Face's
    /// `output_hidden_states`: `[0]` is the token embedding, `[i]` for `1 <= i < n_layers` the
    /// residual stream after block `i - 1`, and the last entry the output of the final
    /// RMSNorm (not the raw residual after the last block).
    pub hidden: Vec<Vec<f32>>,
    /// `n_layers + 1` entries, each `[n, d_model]` row-major: the residual stream entering
    /// each block (`[0]` the token embedding) and, last, the stream after the final block,
    /// before the final RMSNorm (`x_0 ..= x_L` of `compiler::probe`).
    pub residual: Vec<Vec<f32>>,
    pub vocab: usize,
    pub d_model: usize,
}

impl ReferenceOutput {
    /// Number of evaluated positions.
    pub fn n_tokens(&self) -> usize {
        self.logits.len() / self.vocab
    }

    /// The logits after token `pos`.
    pub fn logits_at(&self, pos: usize) -> &[f32] {
        &self.logits[pos * self.vocab..(pos + 1) * self.vocab]
    }

    /// The highest-scoring token after token `pos` (the first one on ties).
    pub fn argmax_at(&self, pos: usize) -> u32 {
        argmax(self.logits_at(pos)) as u32
    }
}

/// Index of the largest value (the first one on ties; NaN never wins).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

fn metadata_u32(file: &GgufFile, key: &str) -> anyhow::Result<usize> {
    let v = file.get_u32(key).map_err(|e| anyhow!("GGUF metadata {key}: {e}"))?;
    Ok(v as usize)
}

fn metadata_f32(file: &GgufFile, key: &str) -> anyhow::Result<f32> {
    file.get_f32(key).map_err(|e| anyhow!("GGUF metadata {key}: {e}"))
}

fn tensor_info<'a>(file: &'a GgufFile, name: &str) -> anyhow::Result<&'a TensorInfo> {
    file.tensor(name).map_err(|e| anyhow!("GGUF tensor {name}: {e}"))
}

/// Dequantizes a GGUF tensor of logical shape `[rows, cols]` (`dims = [cols, rows]`, or
/// `[cols]` with `rows == 1`) to row-major f32.
fn dequantize_tensor(file: &GgufFile, name: &str, rows: usize, cols: usize) -> anyhow::Result<Vec<f32>> {
    let info = tensor_info(file, name)?;
    let expected: Vec<u64> =
        if rows == 1 && info.dims.len() == 1 { vec![cols as u64] } else { vec![cols as u64, rows as u64] };
    ensure!(info.dims == expected, "tensor {name} has dims {:?}, expected {expected:?}", info.dims);
    let format = info
        .ggml_type
        .quant_format()
        .ok_or_else(|| anyhow!("tensor {name}: unsupported ggml type {:?}", info.ggml_type))?;
    let row_bytes = format
        .row_bytes(cols)
        .ok_or_else(|| anyhow!("tensor {name}: {cols} columns is not a whole number of blocks"))?;
    let bytes = file.tensor_data(info);
    ensure!(
        bytes.len() == row_bytes * rows,
        "tensor {name}: {} bytes of data, expected {}",
        bytes.len(),
        row_bytes * rows
    );
    Ok(ir::quant::dequantize(format, bytes, rows, cols))
}

impl ReferenceModel {
    /// Loads a Llama-architecture GGUF file, dequantizing every weight to f32.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = GgufFile::open(path).map_err(|e| anyhow!("opening GGUF file {}: {e}", path.display()))?;
        let arch = file
            .get_str("general.architecture")
            .map_err(|e| anyhow!("GGUF metadata general.architecture: {e}"))?
            .to_string();
        ensure!(arch == "llama", "the reference executor implements the llama architecture, not {arch:?}");
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = metadata_u32(&file, &key("block_count"))?;
        let d_model = metadata_u32(&file, &key("embedding_length"))?;
        let d_ff = metadata_u32(&file, &key("feed_forward_length"))?;
        let n_heads = metadata_u32(&file, &key("attention.head_count"))?;
        let n_kv_heads = metadata_u32(&file, &key("attention.head_count_kv"))?;
        let rope_theta = metadata_f32(&file, &key("rope.freq_base"))?;
        let rms_eps = metadata_f32(&file, &key("attention.layer_norm_rms_epsilon"))?;
        ensure!(n_layers > 0 && d_model > 0 && d_ff > 0 && n_heads > 0 && n_kv_heads > 0, "zero-sized hyperparameter");
        ensure!(d_model % n_heads == 0, "embedding_length {d_model} is not a multiple of head_count {n_heads}");
        ensure!(n_heads % n_kv_heads == 0, "head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}");
        let head_dim = d_model / n_heads;
        ensure!(head_dim % 2 == 0, "odd head dimension {head_dim}");
        if let Ok(rope_dims) = file.get_u32(&key("rope.dimension_count")) {
            ensure!(
                rope_dims as usize == head_dim,
                "partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported"
            );
        }

        let embd = tensor_info(&file, "token_embd.weight")?;
        ensure!(
            embd.dims.len() == 2 && embd.dims[0] == d_model as u64,
            "token_embd.weight has dims {:?}, expected [{d_model}, vocab]",
            embd.dims
        );
        let vocab = usize::try_from(embd.dims[1]).context("vocabulary size")?;
        ensure!(vocab > 0, "empty vocabulary");
        let separate_output = file.tensor("output.weight").is_ok();

        let config = ReferenceConfig {
            n_layers,
            d_model,
            d_ff,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            rope_theta,
            rms_eps,
            separate_output,
        };

        let shape = heal::llama::Shape { d_model, d_ff, n_heads, n_kv_heads, head_dim, vocab, rope_theta, rms_eps };
        let layers = (0..n_layers as u32).collect();
        let model = heal::llama::Llama::build(shape, layers, |name, rows, cols| {
            if file.tensor(name).is_err() {
                return Ok(None); // only output.weight may be absent (tied to the embedding)
            }
            dequantize_tensor(&file, name, rows, cols).map(Some)
        })?;
        Ok(Self { config, model })
    }

    pub fn config(&self) -> &ReferenceConfig {
        &self.config
    }

    pub fn vocab(&self) -> usize {
        self.config.vocab
    }

    pub fn d_model(&self) -> usize {
        self.config.d_model
    }

    /// Evaluates `tokens` as one sequence starting at position 0 (full causal attention, no
    /// cache), returning the logits at every position and the hidden states.
    pub fn forward(&self, tokens: &[u32]) -> anyhow::Result<ReferenceOutput> {
        let c = &self.config;
        if tokens.is_empty() {
            bail!("forward needs at least one token");
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            bail!("token id {bad} is out of range (vocabulary size {})", c.vocab);
        }
        let read = |t: &Tensor<2>| heal::llama::values(t);
        let (out, residual) = self.model.forward_traced(tokens)?;
        let residual = residual.iter().map(read).collect::<anyhow::Result<Vec<_>>>()?;
        // Hugging Face's `output_hidden_states`: the residual stream entering each block, with
        // the final RMSNorm's output in place of the stream after the last block.
        let mut hidden: Vec<Vec<f32>> = residual[..c.n_layers].to_vec();
        hidden.push(read(&out.hidden)?);
        let logits = read(&out.logits)?;
        debug_assert_eq!(logits.len(), tokens.len() * c.vocab);
        Ok(ReferenceOutput { logits, hidden, residual, vocab: c.vocab, d_model: c.d_model })
    }
}
