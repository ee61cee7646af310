//! kiln's tensor IR: a dataflow graph of tensor operations for decoder-only transformers.
//!
//! A [`Graph`] is plain data: a list of [`Weight`]s (named, stored in a [`QuantFormat`]) and a
//! list of [`Node`]s in execution order.
//! Every node defines exactly one value, whose [`ValueId`] is the node's index, so values are in
//! SSA form and an operand always refers to an earlier node.
//!
//! # Semantics
//!
//! A graph evaluates one *batch* of `seq` consecutive tokens of one sequence.
//! `seq` is the symbolic dimension [`Dim::Seq`]; it is bound when the graph runs
//! (1 while decoding, up to the compiled batch size while prefilling).
//! The batch starts at position `pos` of the sequence, also bound at run time.
//! Rows of every `[seq, n]` tensor are tokens; row `t` is the token at position `pos + t`.
//!
//! State that outlives one evaluation is the KV cache: [`Op::Attention`] with layer index `l`
//! stores its keys and values at positions `pos..pos + seq` of cache layer `l`, then attends
//! causally over positions `0..=pos + t` for the query row `t`.
//!
//! Weights are read-only and row-major: a weight of shape `[rows, cols]` stores `rows` rows of
//! `cols` contiguous values (GGUF's `dims` reversed).
//!
//! Activations in [`DType::Q16`] are blocks of 32 values quantized to int16 with one f32 scale
//! per block (see [`quant`] and `interp::quantize_q16`); they feed integer matmul kernels.
//!
//! The textual form ([`write`], [`parse`]) prints and parses back every graph exactly.
//! The verifier ([`verify`]) states the typing rules and runs between passes.

#![forbid(unsafe_code)]

pub mod interp;
pub mod parse;
pub mod quant;
pub mod rng;
pub mod verify;
pub mod write;

use std::fmt;

pub use quant::QuantFormat;

/// Index of a node and of the value it defines. Displays as `v7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// Index of a weight in [`Graph::weights`]. Displays as `w3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WeightId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl WeightId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl fmt::Display for WeightId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// Element type of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    I32,
    /// Blocks of 32 values stored as int16 with an f32 scale (activation quantization).
    Q16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::Q16 => "q16",
        }
    }
}

/// One dimension of a value's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// The number of tokens in the batch, bound at run time.
    Seq,
    Fixed(u32),
}

/// Type of a value: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    /// `dtype[seq]`.
    pub fn seq(dtype: DType) -> Self {
        TensorType { dtype, shape: vec![Dim::Seq] }
    }

    /// `dtype[seq, n]`, the type of almost every activation.
    pub fn rows(dtype: DType, n: u32) -> Self {
        TensorType { dtype, shape: vec![Dim::Seq, Dim::Fixed(n)] }
    }

    /// The row width `n` of a `[seq, n]` type.
    pub fn row_len(&self) -> Option<u32> {
        match self.shape.as_slice() {
            [Dim::Seq, Dim::Fixed(n)] => Some(*n),
            _ => None,
        }
    }
}

/// A named, read-only tensor of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Weight {
    /// The tensor's name in the model file (`blk.3.ffn_up.weight`); kept for dumps and symbols.
    pub name: String,
    pub format: QuantFormat,
    /// Logical shape, row-major: `[rows, cols]` for matrices, `[n]` for vectors.
    pub shape: Vec<u32>,
}

impl Weight {
    pub fn n_values(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Elementwise operation fused onto the output of a matmul (applied per output element).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    None,
    /// `out = silu(x @ w^T)`.
    Silu,
    /// `out = (x @ w^T) + other`.
    Add(ValueId),
    /// `out = (x @ w^T) * other`.
    Mul(ValueId),
}

/// How a [`Op::Rope`] stretches its rotation frequencies to reach past the context a model was
/// trained on: each pair `i` turns `d_i` times slower than plain rotary embedding would.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// `d_i = 1`.
    #[default]
    None,
    /// Position interpolation: `d_i = factor` (Hugging Face `rope_type: "linear"`, GGUF
    /// `rope.scaling.type = linear`).
    Linear { factor: f32 },
    /// Llama 3.1's frequency-dependent scaling (Hugging Face `rope_type: "llama3"`): with the
    /// pair's wavelength `w = 2 pi / theta^(-2i / head_dim)`, `d_i = 1` when
    /// `w < original_context / high_freq_factor`, `d_i = factor` when
    /// `w > original_context / low_freq_factor`, and in between `1 / ((1 - s) / factor + s)`
    /// with `s = (original_context / w - low_freq_factor) / (high_freq_factor - low_freq_factor)`.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_context: u32 },
    /// One divisor per pair, `head_dim / 2` of them (llama.cpp's `rope_freqs.weight`, which its
    /// converter computes from the Llama 3 parameters).
    Divisors(Vec<f32>),
}

impl RopeScaling {
    /// Whether this is [`RopeScaling::None`].
    pub fn is_none(&self) -> bool {
        *self == RopeScaling::None
    }

    /// The divisor of each of the `head_dim / 2` pairs, in f64.
    pub fn divisors(&self, head_dim: u32, theta: f32) -> Vec<f64> {
        let pairs = (head_dim / 2) as usize;
        match self {
            RopeScaling::None => vec![1.0; pairs],
            RopeScaling::Linear { factor } => vec![*factor as f64; pairs],
            RopeScaling::Divisors(d) => d.iter().map(|&v| v as f64).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
                let (factor, low, high) = (*factor as f64, *low_freq_factor as f64, *high_freq_factor as f64);
                let original = *original_context as f64;
                (0..pairs)
                    .map(|i| {
                        let wavelength =
                            2.0 * std::f64::consts::PI / (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
                        if wavelength < original / high {
                            1.0
                        } else if wavelength > original / low {
                            factor
                        } else {
                            let s = (original / wavelength - low) / (high - low);
                            1.0 / ((1.0 - s) / factor + s)
                        }
                    })
                    .collect()
            }
        }
    }

    /// The rotation angle of each pair at position `p`, in f64 (dividing by 1 is exact, so
    /// without scaling these are the unscaled angles bit for bit).
    pub fn angles(&self, head_dim: u32, theta: f32, p: f64) -> Vec<f64> {
        let divisors = self.divisors(head_dim, theta);
        divisors
            .iter()
            .enumerate()
            .map(|(i, &d)| p * (theta as f64).powf(-2.0 * i as f64 / head_dim as f64) / d)
            .collect()
    }

    /// Checks the parameters: factors finite and positive (a divisor list of `head_dim / 2`
    /// such), `low_freq_factor < high_freq_factor`, a nonzero `original_context`.
    pub fn check(&self, head_dim: u32) -> Result<(), String> {
        let positive = |name: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("rope scaling {name} {v} must be finite and positive"))
            }
        };
        match self {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => positive("factor", *factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                if low_freq_factor >= high_freq_factor {
                    return Err(format!(
                        "rope scaling low_freq_factor {low_freq_factor} must be below high_freq_factor \
                         {high_freq_factor}"
                    ));
                }
                if *original_context == 0 {
                    return Err("rope scaling original_context must be nonzero".into());
                }
                Ok(())
            }
            RopeScaling::Divisors(d) => {
                if d.len() != (head_dim / 2) as usize {
                    return Err(format!(
                        "rope scaling has {} divisors, head_dim {head_dim} needs {}",
                        d.len(),
                        head_dim / 2
                    ));
                }
                d.iter().try_for_each(|&v| positive("divisor", v))
            }
        }
    }
}

/// An operation. Each variant documents its typing rules, which [`verify`] checks.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Graph input number `index`.
    ///
    /// Typing rules: the node's type is `i32[seq]` or `f32[seq, n]`; input indices are `0..n`
    /// without gaps or repeats.
    Input { index: u32 },
    /// Row lookup: `out[t] = dequantize(table[ids[t]])`.
    ///
    /// Typing rules: `ids: i32[seq]`, `table: [vocab, n]`; result `f32[seq, n]`.
    /// Ids outside `0..vocab` give a zero row.
    Embed { ids: ValueId, table: WeightId },
    /// `out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight`, quantized to q16 when `quantize`.
    ///
    /// Typing rules: `x: f32[seq, n]`, `weight: [n]`; result `f32[seq, n]`, or `q16[seq, n]` with
    /// `quantize` (then `n` is a multiple of 32).
    RmsNorm { x: ValueId, weight: WeightId, eps: f32, quantize: bool },
    /// Quantizes each row in blocks of 32 to int16 with a per-block scale.
    ///
    /// Typing rules: `x: f32[seq, n]`, `n` a multiple of 32; result `q16[seq, n]`.
    Quantize { x: ValueId },
    /// `out[t, r] = epilogue(sum_k x[t, k] * weight[r, k])`.
    ///
    /// Typing rules: `x: f32[seq, k]` or `q16[seq, k]`, `weight: [n, k]`; result `f32[seq, n]`;
    /// an epilogue operand has the result's type. A block-quantized weight takes `q16`
    /// activations and a float weight `f32` ones (before `quantize_activations`, see
    /// [`verify::verify_unlowered`], any weight takes `f32`).
    MatMul { x: ValueId, weight: WeightId, epilogue: Epilogue },
    /// Rotary position embedding on adjacent pairs `(x[2i], x[2i+1])` of every head:
    /// the pair `i` of the row at position `p` turns by `p * theta^(-2i / head_dim) / d_i`,
    /// where `d_i` is the divisor [`RopeScaling::divisors`] gives (1 without scaling).
    ///
    /// Typing rules: `x: f32[seq, n]`, `head_dim` even and dividing `n`; result as `x`;
    /// `scaling` as [`RopeScaling::check`] requires.
    Rope { x: ValueId, head_dim: u32, theta: f32, scaling: RopeScaling },
    /// Stores `k`, `v` in KV cache layer `layer`, then computes causal grouped-query attention
    /// with scale `1/sqrt(head_dim)`; query head `h` reads KV head `h / (n_heads / n_kv_heads)`.
    ///
    /// Typing rules: `q: f32[seq, n_heads * head_dim]`, `k, v: f32[seq, n_kv_heads * head_dim]`,
    /// `n_kv_heads` divides `n_heads`; result as `q`; each layer index is used once and
    /// layer indices are `0..n` without gaps.
    Attention { q: ValueId, k: ValueId, v: ValueId, layer: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32 },
    /// `out = x * sigmoid(x)`. Typing rules: `x: f32[seq, n]`; result as `x`.
    Silu { x: ValueId },
    /// `out = a * b`. Typing rules: `a`, `b` and the result have one `f32[seq, n]` type.
    Mul { a: ValueId, b: ValueId },
    /// `out = a + b`. Typing rules: `a`, `b` and the result have one `f32[seq, n]` type.
    Add { a: ValueId, b: ValueId },
}

impl Op {
    /// The mnemonic used in the textual form.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Quantize { .. } => "quantize",
            Op::MatMul { .. } => "matmul",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Silu { .. } => "silu",
            Op::Mul { .. } => "mul",
            Op::Add { .. } => "add",
        }
    }

    /// Value operands, epilogue operands included, in textual order.
    pub fn operands(&self) -> Vec<ValueId> {
        match *self {
            Op::Input { .. } => vec![],
            Op::Embed { ids, .. } => vec![ids],
            Op::RmsNorm { x, .. } | Op::Quantize { x } | Op::Rope { x, .. } | Op::Silu { x } => {
                vec![x]
            }
            Op::MatMul { x, epilogue, .. } => match epilogue {
                Epilogue::Add(o) | Epilogue::Mul(o) => vec![x, o],
                Epilogue::None | Epilogue::Silu => vec![x],
            },
            Op::Attention { q, k, v, .. } => vec![q, k, v],
            Op::Mul { a, b } | Op::Add { a, b } => vec![a, b],
        }
    }

    /// Rewrites every value operand through `f`.
    pub fn map_operands(&mut self, mut f: impl FnMut(ValueId) -> ValueId) {
        match self {
            Op::Input { .. } => {}
            Op::Embed { ids, .. } => *ids = f(*ids),
            Op::RmsNorm { x, .. } | Op::Quantize { x } | Op::Rope { x, .. } | Op::Silu { x } => *x = f(*x),
            Op::MatMul { x, epilogue, .. } => {
                *x = f(*x);
                match epilogue {
                    Epilogue::Add(o) | Epilogue::Mul(o) => *o = f(*o),
                    Epilogue::None | Epilogue::Silu => {}
                }
            }
            Op::Attention { q, k, v, .. } => {
                *q = f(*q);
                *k = f(*k);
                *v = f(*v);
            }
            Op::Mul { a, b } | Op::Add { a, b } => {
                *a = f(*a);
                *b = f(*b);
            }
        }
    }

    /// The weight the op reads, if any.
    pub fn weight(&self) -> Option<WeightId> {
        match *self {
            Op::Embed { table, .. } => Some(table),
            Op::RmsNorm { weight, .. } | Op::MatMul { weight, .. } => Some(weight),
            _ => None,
        }
    }

    /// Applies `f` to the weight the op reads, if any (for passes that renumber weights).
    pub fn for_each_weight_mut(&mut self, f: impl FnOnce(&mut WeightId)) {
        match self {
            Op::Embed { table, .. } => f(table),
            Op::RmsNorm { weight, .. } | Op::MatMul { weight, .. } => f(weight),
            _ => {}
        }
    }
}

/// One operation and the type of the value it defines.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
}

/// How the KV cache holds keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvDType {
    /// f32, exactly as attention's inputs.
    #[default]
    F32,
    /// IEEE half precision, rounded to nearest even when stored, saturating at +-65504 (a
    /// key or value beyond f16's range, or NaN, is held as the largest f16 of its sign, not
    /// as infinity); half the memory and half the reads of attention.
    F16,
}

impl KvDType {
    pub fn name(self) -> &'static str {
        match self {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(KvDType::F32),
            "f16" => Some(KvDType::F16),
            _ => None,
        }
    }

    /// Bytes per key or value element.
    pub fn bytes(self) -> u32 {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }

    /// `x` as the cache holds it.
    pub fn round(self, x: f32) -> f32 {
        match self {
            KvDType::F32 => x,
            KvDType::F16 => {
                let x = if x.is_nan() { 65504f32.copysign(x) } else { x.clamp(-65504.0, 65504.0) };
                half::f16::from_f32(x).to_f32()
            }
        }
    }
}

/// The integer grid of quantized activations (`q16` values): how finely `quantize` (and a
/// quantizing RMSNorm) rounds each block of 32 values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActDType {
    /// Integers in -32767..=32767 (`max|x| / 32767` per block): float32-level accuracy.
    #[default]
    Q16,
    /// Integers in -127..=127 (`max|x| / 127` per block), as llama.cpp's q8_0 activations:
    /// a coarser grid that lets a target multiply 4-bit weights by 8-bit activations
    /// (`vpmaddubsw`), at an accuracy cost `eval` reports. The values are still held as int16,
    /// so every kernel reads them; blocks also carry them as int8.
    Q8,
}

impl ActDType {
    pub fn name(self) -> &'static str {
        match self {
            ActDType::Q16 => "q16",
            ActDType::Q8 => "q8",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "q16" => Some(ActDType::Q16),
            "q8" => Some(ActDType::Q8),
            _ => None,
        }
    }

    /// The largest integer magnitude of the grid.
    pub fn max(self) -> f32 {
        match self {
            ActDType::Q16 => 32767.0,
            ActDType::Q8 => 127.0,
        }
    }
}

/// A model (or a test program) as a dataflow graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    /// Name, used in dumps and symbol names.
    pub name: String,
    /// Largest number of positions (`pos + seq`) the graph is evaluated with: the KV cache size.
    pub context: u32,
    /// Element type of the KV cache (`kv=f16` on the graph line; f32 when absent).
    pub kv_dtype: KvDType,
    /// Grid of quantized activations (`act=q8` on the graph line; q16 when absent).
    pub act_dtype: ActDType,
    pub weights: Vec<Weight>,
    /// Nodes in execution order; node `i` defines value `v{i}`.
    pub nodes: Vec<Node>,
    /// Values returned by the graph, in output order.
    pub outputs: Vec<ValueId>,
}

impl Graph {
    pub fn new(name: impl Into<String>, context: u32) -> Self {
        Graph {
            name: name.into(),
            context,
            kv_dtype: KvDType::F32,
            act_dtype: ActDType::Q16,
            weights: vec![],
            nodes: vec![],
            outputs: vec![],
        }
    }

    pub fn add_weight(&mut self, name: impl Into<String>, format: QuantFormat, shape: Vec<u32>) -> WeightId {
        self.weights.push(Weight { name: name.into(), format, shape });
        WeightId(self.weights.len() as u32 - 1)
    }

    /// Appends a node and returns the value it defines.
    pub fn push(&mut self, op: Op, ty: TensorType) -> ValueId {
        self.nodes.push(Node { op, ty });
        ValueId(self.nodes.len() as u32 - 1)
    }

    pub fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.index()]
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.nodes[v.index()].ty
    }

    pub fn weight(&self, w: WeightId) -> &Weight {
        &self.weights[w.index()]
    }

    /// Number of uses of each value (operands and graph outputs).
    pub fn use_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.nodes.len()];
        for node in &self.nodes {
            for v in node.op.operands() {
                counts[v.index()] += 1;
            }
        }
        for v in &self.outputs {
            counts[v.index()] += 1;
        }
        counts
    }

    /// Removes nodes whose value is unused (and not an input) and renumbers the rest in order.
    ///
    /// One backward sweep finds every node an output (or a kept node) depends on, so the cost
    /// is linear in the graph size however long the chains of dead nodes are.
    pub fn remove_dead_nodes(&mut self) {
        let mut live = vec![false; self.nodes.len()];
        for v in &self.outputs {
            live[v.index()] = true;
        }
        for i in (0..self.nodes.len()).rev() {
            if matches!(self.nodes[i].op, Op::Input { .. }) {
                live[i] = true;
            }
            if live[i] {
                for v in self.nodes[i].op.operands() {
                    live[v.index()] = true;
                }
            }
        }
        if live.iter().all(|&l| l) {
            return;
        }
        let mut new_index = vec![u32::MAX; self.nodes.len()];
        let mut kept = Vec::with_capacity(self.nodes.len());
        for (i, node) in std::mem::take(&mut self.nodes).into_iter().enumerate() {
            if live[i] {
                new_index[i] = kept.len() as u32;
                kept.push(node);
            }
        }
        for node in &mut kept {
            node.op.map_operands(|v| ValueId(new_index[v.index()]));
        }
        for v in &mut self.outputs {
            *v = ValueId(new_index[v.index()]);
        }
        self.nodes = kept;
    }

    /// Makes every use of `old` (operands and outputs) a use of `new`.
    ///
    /// This scans the whole graph: a pass that replaces many values should collect them in a
    /// substitution map and apply it with [`Graph::substitute`] in one sweep instead.
    pub fn replace_uses(&mut self, old: ValueId, new: ValueId) {
        let mut map: Vec<ValueId> = (0..self.nodes.len() as u32).map(ValueId).collect();
        map[old.index()] = new;
        self.substitute(&map);
    }

    /// Rewrites every operand and output `v` to `map[v]`, in one sweep over the graph.
    /// `map` has one entry per node (the identity for values that stay).
    pub fn substitute(&mut self, map: &[ValueId]) {
        assert_eq!(map.len(), self.nodes.len(), "one substitution entry per node");
        for node in &mut self.nodes {
            node.op.map_operands(|v| map[v.index()]);
        }
        for v in &mut self.outputs {
            *v = map[v.index()];
        }
    }

    /// Inserts `node` so that it becomes value `at`, renumbering the values from `at` on.
    ///
    /// This renumbers the whole graph: a pass that inserts many nodes should build the new
    /// node list in one sweep instead (as `quantize_activations` does).
    pub fn insert(&mut self, at: ValueId, node: Node) {
        let shift = |v: ValueId| if v.0 >= at.0 { ValueId(v.0 + 1) } else { v };
        for n in &mut self.nodes {
            n.op.map_operands(shift);
        }
        for v in &mut self.outputs {
            *v = shift(*v);
        }
        self.nodes.insert(at.index(), node);
    }

    /// Number of KV cache layers: one per attention node.
    pub fn kv_layers(&self) -> u32 {
        self.nodes.iter().filter(|n| matches!(n.op, Op::Attention { .. })).count() as u32
    }

    /// Floats per position in one KV cache layer for keys (and the same again for values).
    /// All attention nodes of a graph share one KV geometry (the verifier checks it).
    pub fn kv_width(&self) -> u32 {
        self.nodes
            .iter()
            .find_map(|n| match n.op {
                Op::Attention { n_kv_heads, head_dim, .. } => Some(n_kv_heads * head_dim),
                _ => None,
            })
            .unwrap_or(0)
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&write::write_graph(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_scaling_divides_low_frequencies_and_blends_the_middle() {
        // head_dim 16, theta 10000: pair i has wavelength 2 pi 10000^(i/8), i.e. 6.3, 19.9,
        // 62.8, 198.7, ... With original_context 64, low 1 and high 4 the cut-offs are 16 and
        // 64: pair 0 keeps its frequency, pair 2 (62.8) is blended, pairs 3.. are divided by 8.
        let s = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_context: 64 };
        let d = s.divisors(16, 10000.0);
        assert_eq!(d.len(), 8);
        assert_eq!(d[0], 1.0);
        assert!(d[3..].iter().all(|&x| x == 8.0), "{d:?}");
        let wavelength = 2.0 * std::f64::consts::PI * 10.0; // 10000^(4/16) = 10
        let blend = (64.0 / wavelength - 1.0) / 3.0;
        assert!((d[2] - 1.0 / ((1.0 - blend) / 8.0 + blend)).abs() < 1e-12, "{d:?}");
        assert!(d[2] > 1.0 && d[2] < 8.0);
        // Pair 1 (19.9) is between 16 and 64 too.
        assert!(d[1] > 1.0 && d[1] < d[2], "{d:?}");
        assert_eq!(RopeScaling::Linear { factor: 4.0 }.divisors(16, 10000.0), vec![4.0; 8]);
        // Without scaling the angles are the plain ones bit for bit.
        let plain: Vec<f64> = (0..8).map(|i| 5.0 * 10000f64.powf(-2.0 * i as f64 / 16.0)).collect();
        assert_eq!(RopeScaling::None.angles(16, 10000.0, 5.0), plain);
        let scaled = s.angles(16, 10000.0, 5.0);
        assert!(scaled.iter().zip(&plain).zip(&d).all(|((a, p), d)| (a - p / d).abs() < 1e-15));
    }

    #[test]
    fn rope_scaling_checks_its_parameters() {
        let llama3 = |factor, low, high, original| RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_context: original,
        };
        assert!(llama3(8.0, 1.0, 4.0, 8192).check(16).is_ok());
        for (bad, needle) in [
            (llama3(8.0, 4.0, 4.0, 8192), "below"),
            (llama3(8.0, 4.0, 1.0, 8192), "below"),
            (llama3(0.0, 1.0, 4.0, 8192), "factor"),
            (llama3(f32::NAN, 1.0, 4.0, 8192), "factor"),
            (llama3(8.0, -1.0, 4.0, 8192), "low_freq_factor"),
            (llama3(8.0, 1.0, f32::INFINITY, 8192), "high_freq_factor"),
            (llama3(8.0, 1.0, 4.0, 0), "original_context"),
            (RopeScaling::Linear { factor: -2.0 }, "factor"),
            (RopeScaling::Divisors(vec![1.0; 7]), "8"),
            (RopeScaling::Divisors(vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), "divisor"),
        ] {
            let err = bad.check(16).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn remove_dead_nodes_drops_whole_dead_chains_in_one_sweep() {
        let mut g = Graph::new("t", 8);
        let x = g.push(Op::Input { index: 0 }, TensorType::rows(DType::F32, 4));
        // A long dead chain hanging off the input, then a live node.
        let mut v = x;
        for _ in 0..100_000 {
            v = g.push(Op::Silu { x: v }, TensorType::rows(DType::F32, 4));
        }
        let live = g.push(Op::Add { a: x, b: x }, TensorType::rows(DType::F32, 4));
        let _unused_input = g.push(Op::Input { index: 1 }, TensorType::rows(DType::F32, 4));
        g.outputs.push(live);
        g.remove_dead_nodes();
        assert_eq!(g.nodes.len(), 3);
        assert_eq!(g.nodes[1].op, Op::Add { a: ValueId(0), b: ValueId(0) });
        assert_eq!(g.outputs, [ValueId(1)]);
        assert!(matches!(g.nodes[2].op, Op::Input { index: 1 }));
    }

    #[test]
    fn substitute_and_replace_uses() {
        let mut g = Graph::new("t", 8);
        let x = g.push(Op::Input { index: 0 }, TensorType::rows(DType::F32, 4));
        let a = g.push(Op::Silu { x }, TensorType::rows(DType::F32, 4));
        let b = g.push(Op::Silu { x: a }, TensorType::rows(DType::F32, 4));
        let c = g.push(Op::Add { a, b }, TensorType::rows(DType::F32, 4));
        g.outputs.push(c);
        g.outputs.push(a);
        g.replace_uses(a, x);
        assert_eq!(g.nodes[2].op, Op::Silu { x });
        assert_eq!(g.nodes[3].op, Op::Add { a: x, b });
        assert_eq!(g.outputs, [c, x]);
        assert_eq!(g.use_counts(), [4, 0, 1, 1]);
        let mut map: Vec<ValueId> = (0..4).map(ValueId).collect();
        map[3] = b;
        g.substitute(&map);
        assert_eq!(g.outputs, [b, x]);
    }
}
