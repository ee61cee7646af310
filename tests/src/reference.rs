//! The reference executor: an independent f32 implementation of the Llama forward pass on
//! burn (ndarray backend), used by the integration tests as the oracle for kiln's compiled
//! code.
//!
//! It shares no kernels with kiln's code generator. It reads the model through kiln's GGUF
//! reader and dequantizes every weight once, with the scalar reference dequantizer
//! [`ir::quant::dequantize`]; all the math after that is burn tensor operations in f32.
//!
//! The model: token embedding; per block `h += Wo·attn(rope(Wq·n), rope(Wk·n), Wv·n)` with
//! `n = rmsnorm(h)`, causal multi-head attention with grouped KV heads, then
//! `h += Wdown·(silu(Wgate·m) * Wup·m)` with `m = rmsnorm(h)`; a final RMSNorm and the output
//! head (tied to the token embedding when `output.weight` is absent). GGUF stores Q and K
//! permuted so that rotary embedding rotates adjacent pairs `(x[2i], x[2i+1])` of each head by
//! the angle `pos * theta^(-2i/head_dim)`; that is what [`ReferenceModel::forward`] does.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
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

/// One decoder block. Linear weights are stored transposed, `[in, out]`, so that a layer is
/// `x.matmul(w)` for activations `x: [n, in]`. Norm weights are `[1, d]` rows that broadcast.
struct Block {
    attn_norm: Tensor<2>,
    wq: Tensor<2>,
    wk: Tensor<2>,
    wv: Tensor<2>,
    wo: Tensor<2>,
    ffn_norm: Tensor<2>,
    w_gate: Tensor<2>,
    w_up: Tensor<2>,
    w_down: Tensor<2>,
}

/// A Llama model with every weight dequantized to f32 burn tensors.
pub struct ReferenceModel {
    config: ReferenceConfig,
    device: Device,
    /// `[vocab, d]`, the token embedding (row lookup).
    embedding: Tensor<2>,
    blocks: Vec<Block>,
    /// `[1, d]`.
    output_norm: Tensor<2>,
    /// `[d, vocab]`, the output head transposed (a copy of the embedding when tied).
    output: Tensor<2>,
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

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
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

        #[allow(deprecated)] // the brief asks for the ndarray backend (flex is its successor)
        let device = Device::ndarray();
        let matrix = |data: Vec<f32>, rows: usize, cols: usize| -> Tensor<2> {
            Tensor::from_data(TensorData::new(data, [rows, cols]), &device)
        };
        // A linear layer mapping `inp` inputs to `out` outputs: stored [out, inp], kept [inp, out].
        let linear = |name: &str, inp: usize, out: usize| -> anyhow::Result<Tensor<2>> {
            let w = dequantize_tensor(&file, name, out, inp)?;
            Ok(matrix(transpose(&w, out, inp), inp, out))
        };
        let norm = |name: &str| -> anyhow::Result<Tensor<2>> {
            Ok(matrix(dequantize_tensor(&file, name, 1, d_model)?, 1, d_model))
        };

        let embd_data = dequantize_tensor(&file, "token_embd.weight", vocab, d_model)?;
        let output = if separate_output {
            linear("output.weight", d_model, vocab)?
        } else {
            matrix(transpose(&embd_data, vocab, d_model), d_model, vocab)
        };
        let embedding = matrix(embd_data, vocab, d_model);
        let kv_dim = n_kv_heads * head_dim;
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            blocks.push(Block {
                attn_norm: norm(&p("attn_norm"))?,
                wq: linear(&p("attn_q"), d_model, d_model)?,
                wk: linear(&p("attn_k"), d_model, kv_dim)?,
                wv: linear(&p("attn_v"), d_model, kv_dim)?,
                wo: linear(&p("attn_output"), d_model, d_model)?,
                ffn_norm: norm(&p("ffn_norm"))?,
                w_gate: linear(&p("ffn_gate"), d_model, d_ff)?,
                w_up: linear(&p("ffn_up"), d_model, d_ff)?,
                w_down: linear(&p("ffn_down"), d_ff, d_model)?,
            });
        }
        let output_norm = norm("output_norm.weight")?;
        Ok(Self { config, device, embedding, blocks, output_norm, output })
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

    /// `x * w / sqrt(mean(x²) + eps)` over the last dimension of `x: [n, d]`.
    fn rms_norm(&self, x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
        let mean_sq = x.clone().square().mean_dim(1); // [n, 1]
        let inv = mean_sq.add_scalar(self.config.rms_eps).sqrt().recip();
        x.mul(inv).mul(w.clone())
    }

    /// `cos` and `sin` of the rotary angles, each `[n, 1, head_dim / 2, 1]` (broadcast over
    /// heads): angle `pos * theta^(-2i/head_dim)` for pair `i`.
    fn rope_tables(&self, n: usize) -> (Tensor<4>, Tensor<4>) {
        let half = self.config.head_dim / 2;
        let hd = self.config.head_dim as f64;
        let theta = self.config.rope_theta as f64;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for pos in 0..n {
            for i in 0..half {
                let angle = pos as f64 * theta.powf(-2.0 * i as f64 / hd);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let t = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [n, 1, half, 1]), &self.device);
        (t(cos), t(sin))
    }

    /// Rotates adjacent pairs of `x: [n, heads * head_dim]`, returning `[n, heads, head_dim]`.
    fn rope(&self, x: Tensor<2>, heads: usize, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<3> {
        let n = x.dims()[0];
        let hd = self.config.head_dim;
        let pairs: Tensor<4> = x.reshape([n, heads, hd / 2, 2]);
        let x0 = pairs.clone().narrow(3, 0, 1);
        let x1 = pairs.narrow(3, 1, 1);
        let r0 = x0.clone().mul(cos.clone()).sub(x1.clone().mul(sin.clone()));
        let r1 = x0.mul(sin.clone()).add(x1.mul(cos.clone()));
        Tensor::cat(vec![r0, r1], 3).reshape([n, heads, hd])
    }

    /// Causal grouped-query self-attention of the normalized input `x: [n, d]`; returns the
    /// attention output after the output projection, `[n, d]`.
    fn attention(&self, block: &Block, x: Tensor<2>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<2> {
        let c = &self.config;
        let n = x.dims()[0];
        let (h, kv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let group = h / kv;
        let q = self.rope(x.clone().matmul(block.wq.clone()), h, cos, sin); // [n, h, hd]
        let k = self.rope(x.clone().matmul(block.wk.clone()), kv, cos, sin); // [n, kv, hd]
        let v: Tensor<3> = x.matmul(block.wv.clone()).reshape([n, kv, hd]);

        let q = q.swap_dims(0, 1); // [h, n, hd]
                                   // Query head j reads KV head j / group: repeat each KV head `group` times in place.
        let expand_kv = |t: Tensor<3>| -> Tensor<3> {
            let t: Tensor<4> = t.swap_dims(0, 1).reshape([kv, 1, n, hd]);
            t.repeat_dim(1, group).reshape([h, n, hd])
        };
        let k = expand_kv(k);
        let v = expand_kv(v);

        let scores = q.matmul(k.swap_dims(1, 2)).div_scalar((hd as f32).sqrt()); // [h, n, n]
                                                                                 // tril_mask marks the kept (lower) triangle `false`: fill the `true` future positions.
        let mask: Tensor<3, Bool> = Tensor::<3, Bool>::tril_mask([1, n, n], 0, &self.device);
        let scores = scores.mask_fill(mask.expand([h, n, n]), f32::NEG_INFINITY);
        let probs = softmax(scores, 2);
        let out = probs.matmul(v); // [h, n, hd]
        let out: Tensor<2> = out.swap_dims(0, 1).reshape([n, h * hd]);
        out.matmul(block.wo.clone())
    }

    /// `Wdown·(silu(Wgate·x) * Wup·x)` for the normalized input `x: [n, d]`.
    fn mlp(&self, block: &Block, x: Tensor<2>) -> Tensor<2> {
        let gate = silu(x.clone().matmul(block.w_gate.clone()));
        let up = x.matmul(block.w_up.clone());
        gate.mul(up).matmul(block.w_down.clone())
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
        let n = tokens.len();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids: Tensor<1, Int> = Tensor::from_data(TensorData::new(ids, [n]), &self.device);
        let (cos, sin) = self.rope_tables(n);
        let read = |t: &Tensor<2>| -> anyhow::Result<Vec<f32>> {
            t.clone().into_data().try_to_vec::<f32>().map_err(|e| anyhow!("reading a tensor back: {e:?}"))
        };

        let mut h = self.embedding.clone().select(0, ids); // [n, d]
        let mut hidden = Vec::with_capacity(c.n_layers + 1);
        hidden.push(read(&h)?);
        let mut residual = vec![hidden[0].clone()];
        for (i, block) in self.blocks.iter().enumerate() {
            let attn = self.attention(block, self.rms_norm(h.clone(), &block.attn_norm), &cos, &sin);
            h = h.add(attn);
            let mlp = self.mlp(block, self.rms_norm(h.clone(), &block.ffn_norm));
            h = h.add(mlp);
            residual.push(read(&h)?);
            if i + 1 < c.n_layers {
                hidden.push(residual[i + 1].clone());
            }
        }
        let normed = self.rms_norm(h, &self.output_norm);
        hidden.push(read(&normed)?);
        let logits = read(&normed.matmul(self.output.clone()))?;
        debug_assert_eq!(logits.len(), n * c.vocab);
        Ok(ReferenceOutput { logits, hidden, residual, vocab: c.vocab, d_model: c.d_model })
    }
}
