//! The teacher and the student of `heal` and `finetune`: a Llama forward pass on burn tensors
//! (f32, ndarray backend), built from a lowered `compiler::model::Model` after whatever model
//! passes made it (so the student's frozen weights are the compressed ones, dequantized with
//! the scalar reference dequantizer), with LoRA on any of the seven linear layers of a block.
//!
//! Only the LoRA factors are autodiff leaves: the frozen weights are plain tensors, which burn
//! treats as constants where they meet tracked ones, so backward computes the gradients of
//! the factors and of the activations on the way, never of a frozen matrix.
//!
//! Weights are in GGUF's order (the frontend's): query and key rows interleave each rotary
//! pair, so rotary embedding turns adjacent pairs `(x[2i], x[2i+1])` of each head.

use anyhow::{anyhow, bail, ensure, Result};
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::lora::transpose;

/// The burn device every tensor of a run lives on.
pub fn device() -> Device {
    #[allow(deprecated)] // burn 0.22 marks ndarray deprecated in favour of flex; the brief asks for ndarray
    Device::ndarray()
}

/// The hyperparameters the forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
}

impl Shape {
    pub fn from_hyper(hp: &compiler::frontend::Hyperparameters) -> Self {
        Shape {
            d_model: hp.d_model as usize,
            d_ff: hp.d_ff as usize,
            n_heads: hp.n_heads as usize,
            n_kv_heads: hp.n_kv_heads as usize,
            head_dim: hp.head_dim as usize,
            vocab: hp.vocab as usize,
            rope_theta: hp.rope_theta,
            rms_eps: hp.rms_eps,
        }
    }
}

/// A linear layer of a block that LoRA can adapt, in the order of [`Target::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// The Hugging Face / PEFT module name (`q_proj`).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module path under `model.layers.N.` (`self_attn.q_proj`).
    pub fn module_path(self) -> String {
        let parent = if matches!(self, Target::Gate | Target::Up | Target::Down) { "mlp" } else { "self_attn" };
        format!("{parent}.{}", self.peft_name())
    }

    /// The GGUF tensor name part (`attn_q`).
    pub fn gguf_part(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    /// `(inputs, outputs)` of the layer.
    pub fn dims(self, s: &Shape) -> (usize, usize) {
        let q = s.n_heads * s.head_dim;
        let kv = s.n_kv_heads * s.head_dim;
        match self {
            Target::Q => (s.d_model, q),
            Target::K | Target::V => (s.d_model, kv),
            Target::O => (q, s.d_model),
            Target::Gate | Target::Up => (s.d_model, s.d_ff),
            Target::Down => (s.d_ff, s.d_model),
        }
    }

    /// Parses a list of module names (`q_proj,v_proj`, GGUF's `attn_q` too, or `all-linear`).
    pub fn parse_list(text: &str) -> Result<Vec<Target>> {
        let mut out = vec![];
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "all-linear" || item == "all" {
                out.extend(Target::ALL);
                continue;
            }
            let t =
                Target::ALL.into_iter().find(|t| t.peft_name() == item || t.gguf_part() == item).ok_or_else(|| {
                    let known: Vec<&str> = Target::ALL.iter().map(|t| t.peft_name()).collect();
                    anyhow!(
                        "unknown target module {item:?}: the Llama linear layers are {} (or all-linear)",
                        known.join(", ")
                    )
                })?;
            out.push(t);
        }
        out.sort();
        out.dedup();
        ensure!(!out.is_empty(), "no target modules given (e.g. q_proj,v_proj or all-linear)");
        Ok(out)
    }
}

/// One block's frozen weights; linear layers transposed to `[in, out]` so that a layer is
/// `x.matmul(w)`, norms `[1, d]`.
struct Block {
    attn_norm: Tensor<2>,
    ffn_norm: Tensor<2>,
    /// By [`Target`] order.
    linear: Vec<Tensor<2>>,
}

/// A Llama model with frozen f32 weights.
pub struct Llama {
    pub shape: Shape,
    /// The source model's number of each block (pruned models skip some).
    pub layers: Vec<u32>,
    device: Device,
    embedding: Tensor<2>,
    blocks: Vec<Block>,
    output_norm: Tensor<2>,
    /// `[d, vocab]`.
    output: Tensor<2>,
}

/// What [`Llama::forward`] returns for `n` tokens.
pub struct Forward {
    /// `[n, vocab]`.
    pub logits: Tensor<2>,
    /// `[n, d]`: the output of the final RMSNorm.
    pub hidden: Tensor<2>,
}

/// A `[rows, cols]` tensor of row-major `data`.
pub fn matrix(data: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

/// The values of a tensor, row-major.
pub fn values<const D: usize>(t: &Tensor<D>) -> Result<Vec<f32>> {
    t.clone().into_data().try_to_vec::<f32>().map_err(|e| anyhow!("reading a tensor back: {e:?}"))
}

/// The value of a one-element tensor.
pub fn scalar(t: &Tensor<1>) -> Result<f32> {
    values(t)?.first().copied().ok_or_else(|| anyhow!("empty tensor"))
}

impl Llama {
    /// Builds the model from `get(name, rows, cols)`, which returns a weight by GGUF name as
    /// row-major f32 (`rows = 1` for a norm), or `None` when absent (only `output.weight`,
    /// tied to the embedding, may be). `layers[i]` is the source numbering of block `i`.
    pub fn build(
        shape: Shape,
        layers: Vec<u32>,
        mut get: impl FnMut(&str, usize, usize) -> Result<Option<Vec<f32>>>,
    ) -> Result<Self> {
        let device = device();
        let s = &shape;
        ensure!(s.n_heads % s.n_kv_heads.max(1) == 0 && s.n_kv_heads > 0, "bad head counts");
        let mut need = |name: &str, rows: usize, cols: usize| -> Result<Vec<f32>> {
            let v = get(name, rows, cols)?.ok_or_else(|| anyhow!("the model has no tensor {name}"))?;
            ensure!(v.len() == rows * cols, "tensor {name}: {} values, expected {rows}x{cols}", v.len());
            Ok(v)
        };
        let embd = need("token_embd.weight", s.vocab, s.d_model)?;
        let mut blocks = vec![];
        for i in 0..layers.len() {
            let norm = |v: Vec<f32>| matrix(v, 1, s.d_model, &device);
            let attn_norm = norm(need(&format!("blk.{i}.attn_norm.weight"), 1, s.d_model)?);
            let ffn_norm = norm(need(&format!("blk.{i}.ffn_norm.weight"), 1, s.d_model)?);
            let mut linear = vec![];
            for t in Target::ALL {
                let (inp, out) = t.dims(s);
                let w = need(&format!("blk.{i}.{}.weight", t.gguf_part()), out, inp)?;
                linear.push(matrix(transpose(&w, out, inp), inp, out, &device));
            }
            blocks.push(Block { attn_norm, ffn_norm, linear });
        }
        let output_norm = matrix(need("output_norm.weight", 1, s.d_model)?, 1, s.d_model, &device);
        let output = match get("output.weight", s.vocab, s.d_model)? {
            Some(w) => {
                ensure!(w.len() == s.vocab * s.d_model, "output.weight has {} values", w.len());
                matrix(transpose(&w, s.vocab, s.d_model), s.d_model, s.vocab, &device)
            }
            None => matrix(transpose(&embd, s.vocab, s.d_model), s.d_model, s.vocab, &device),
        };
        let embedding = matrix(embd, s.vocab, s.d_model, &device);
        Ok(Llama { shape, layers, device, embedding, blocks, output_norm, output })
    }

    /// The model a build would compile from `model` (after its passes): every weight
    /// dequantized. `layers[i]` is the source numbering of block `i`.
    pub fn from_model(model: &compiler::model::Model<'_>, shape: Shape, layers: Vec<u32>) -> Result<Self> {
        let by_name: std::collections::HashMap<&str, usize> =
            model.graph.weights.iter().enumerate().map(|(i, w)| (w.name.as_str(), i)).collect();
        Llama::build(shape, layers, |name, rows, cols| {
            let Some(&i) = by_name.get(name) else { return Ok(None) };
            let w = &model.graph.weights[i];
            let n: u64 = w.shape.iter().map(|&d| d as u64).product();
            ensure!(n == (rows * cols) as u64, "tensor {name} has shape {:?}, expected {rows}x{cols}", w.shape);
            let bytes = model.weight_bytes(ir::WeightId(i as u32));
            Ok(Some(ir::quant::dequantize(w.format, &bytes, rows, cols)))
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn rms_norm(&self, x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
        let inv = x.clone().square().mean_dim(1).add_scalar(self.shape.rms_eps).sqrt().recip();
        x.mul(inv).mul(w.clone())
    }

    fn rope_tables(&self, n: usize) -> (Tensor<4>, Tensor<4>) {
        let half = self.shape.head_dim / 2;
        let hd = self.shape.head_dim as f64;
        let theta = self.shape.rope_theta as f64;
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
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

    /// `[n, heads * head_dim]` with adjacent pairs turned, as `[n, heads, head_dim]`.
    fn rope(&self, x: Tensor<2>, heads: usize, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<3> {
        let n = x.dims()[0];
        let hd = self.shape.head_dim;
        let pairs: Tensor<4> = x.reshape([n, heads, hd / 2, 2]);
        let x0 = pairs.clone().narrow(3, 0, 1);
        let x1 = pairs.narrow(3, 1, 1);
        let r0 = x0.clone().mul(cos.clone()).sub(x1.clone().mul(sin.clone()));
        let r1 = x0.mul(sin.clone()).add(x1.mul(cos.clone()));
        Tensor::cat(vec![r0, r1], 3).reshape([n, heads, hd])
    }

    fn linear(&self, block: usize, t: Target, x: Tensor<2>, lora: Option<&super::lora::Lora>) -> Tensor<2> {
        let y = x.clone().matmul(self.blocks[block].linear[t as usize].clone());
        match lora.and_then(|l| l.module(block, t).map(|m| (l.scale, m))) {
            Some((scale, m)) => y.add(x.matmul(m.a.clone()).matmul(m.b.clone()).mul_scalar(scale)),
            None => y,
        }
    }

    fn attention(
        &self,
        block: usize,
        x: Tensor<2>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        lora: Option<&super::lora::Lora>,
    ) -> Tensor<2> {
        let s = &self.shape;
        let n = x.dims()[0];
        let (h, kv, hd) = (s.n_heads, s.n_kv_heads, s.head_dim);
        let group = h / kv;
        let q = self.rope(self.linear(block, Target::Q, x.clone(), lora), h, cos, sin).swap_dims(0, 1);
        let k = self.rope(self.linear(block, Target::K, x.clone(), lora), kv, cos, sin);
        let v: Tensor<3> = self.linear(block, Target::V, x, lora).reshape([n, kv, hd]);
        // Query head j reads KV head j / group.
        let expand = |t: Tensor<3>| -> Tensor<3> {
            let t: Tensor<4> = t.swap_dims(0, 1).reshape([kv, 1, n, hd]);
            t.repeat_dim(1, group).reshape([h, n, hd])
        };
        let (k, v) = (expand(k), expand(v));
        let scores = q.matmul(k.swap_dims(1, 2)).div_scalar((hd as f32).sqrt());
        // tril_mask marks the kept (lower) triangle `false`.
        let mask: Tensor<3, Bool> = Tensor::<3, Bool>::tril_mask([1, n, n], 0, &self.device);
        let probs = softmax(scores.mask_fill(mask.expand([h, n, n]), f32::NEG_INFINITY), 2);
        let out: Tensor<2> = probs.matmul(v).swap_dims(0, 1).reshape([n, h * hd]);
        self.linear(block, Target::O, out, lora)
    }

    /// Evaluates `tokens` as one sequence from position 0, with `lora` added where it has a
    /// module. The outputs are tracked when `lora`'s factors are.
    pub fn forward(&self, tokens: &[u32], lora: Option<&super::lora::Lora>) -> Result<Forward> {
        self.run(tokens, lora, None)
    }

    /// [`Llama::forward`] without LoRA that also returns the residual stream entering each
    /// block (`[0]` the token embedding) and, last, the stream after the final block, before
    /// the final RMSNorm (the states `compiler::probe` measures); each `[n, d_model]`.
    pub fn forward_traced(&self, tokens: &[u32]) -> Result<(Forward, Vec<Tensor<2>>)> {
        let mut residual = vec![];
        let f = self.run(tokens, None, Some(&mut residual))?;
        Ok((f, residual))
    }

    fn run(
        &self,
        tokens: &[u32],
        lora: Option<&super::lora::Lora>,
        mut residual: Option<&mut Vec<Tensor<2>>>,
    ) -> Result<Forward> {
        let s = &self.shape;
        if tokens.is_empty() {
            bail!("forward needs at least one token");
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= s.vocab) {
            bail!("token id {bad} is out of range (vocabulary size {})", s.vocab);
        }
        let n = tokens.len();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids: Tensor<1, Int> = Tensor::from_data(TensorData::new(ids, [n]), &self.device);
        let (cos, sin) = self.rope_tables(n);
        let mut h = self.embedding.clone().select(0, ids);
        for (i, block) in self.blocks.iter().enumerate() {
            if let Some(r) = residual.as_deref_mut() {
                r.push(h.clone());
            }
            let a = self.attention(i, self.rms_norm(h.clone(), &block.attn_norm), &cos, &sin, lora);
            h = h.add(a);
            let m = self.rms_norm(h.clone(), &block.ffn_norm);
            let gate = silu(self.linear(i, Target::Gate, m.clone(), lora));
            let up = self.linear(i, Target::Up, m, lora);
            h = h.add(self.linear(i, Target::Down, gate.mul(up), lora));
        }
        if let Some(r) = residual {
            r.push(h.clone());
        }
        let hidden = self.rms_norm(h, &self.output_norm);
        let logits = hidden.clone().matmul(self.output.clone());
        Ok(Forward { logits, hidden })
    }

    /// Row-wise log-probabilities of `logits`.
    pub fn log_probs(logits: Tensor<2>) -> Tensor<2> {
        log_softmax(logits, 1)
    }
}
