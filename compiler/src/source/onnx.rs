//! An ONNX export of a Llama-family decoder as a model source.
//!
//! The form read is what `torch.onnx.export` produces for Hugging Face's `LlamaForCausalLM`
//! (opset 17 or 18, decomposed operators, no KV cache inputs): `Gather` for the embedding,
//! RMSNorm as `Pow`/`ReduceMean`/`Add`/`Sqrt`/`Div`(or `Reciprocal`)/`Mul`/`Mul`, Linear layers
//! as `MatMul` by `[in, out]` initializers, heads split by `Reshape`/`Transpose`, rotary
//! embedding as `q * cos + rotate_half(q) * sin` with `rotate_half` from `Slice`/`Neg`/`Concat`
//! and cos/sin computed from `inv_freq`, grouped-query heads repeated by
//! `Unsqueeze`/`Expand`/`Reshape`, scores scaled by `1/sqrt(head_dim)`, a causal mask built with
//! `Trilu`, `Softmax`, SiLU as `x * Sigmoid(x)`. Shape arithmetic (`Shape`, `Gather`,
//! `Concat`, ...) is not interpreted: kiln builds its own graph and KV cache.
//!
//! The reader walks the residual stream from the embedding: every step must be the pattern
//! above, and every constant that decides the arithmetic (the norm's epsilon and exponent, the
//! rotary frequencies, the rotate-half split, the score scale, the mask, the head-repeat
//! axis) is checked; anything else is an error naming the node and what was expected, never a
//! different model. Weights may be inline or external data beside the file. The tokenizer
//! files (`tokenizer.json`, ...) and `config.json`, if any, are read from the model's
//! directory, as Hugging Face exporters write them.
//!
//! The model file and its external data are mapped, not read. External data and the files
//! beside the model are opened through [`ModelDir`]: relative to the model's directory and
//! required to resolve inside it (or inside the Hugging Face cache repository it is a snapshot
//! of), and together the weight files may hold no more than the recognized model can need
//! ([`max_weight_bytes`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use ir::QuantFormat;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::frontend::{FrontendError, Hyperparameters};
use crate::source::files::{map_named_file, max_weight_bytes, Mapped, ModelDir, SharedMapped};
use crate::source::hf::{read_tokenizer_files, tokenizer_spec};
use crate::source::onnx_proto::{self, dtype, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::source::{ModelSource, SourceTensor, TokenizerSpec};

/// How a kiln tensor is taken from an initializer.
#[derive(Clone, Debug)]
struct Take {
    initializer: String,
    /// `MatMul` weights are stored `[in, out]`: transposed to kiln's rows.
    transpose: bool,
    /// Rotary heads of `attn_q`/`attn_k`: rows permuted from rotate-half order.
    rotary_heads: Option<u32>,
}

/// A parsed and recognized ONNX model.
pub struct OnnxModel {
    path: PathBuf,
    model: ModelProto,
    hyper: Hyperparameters,
    tensors: HashMap<String, Take>,
    /// External data files by location.
    external: BTreeMap<String, Bytes>,
    /// The model file, then the tokenizer and config files beside it, for the digest.
    file: Bytes,
    files: BTreeMap<String, Vec<u8>>,
    config: Value,
    /// The mappings behind `file` and `external`, whose pages a build gives back.
    maps: Vec<Arc<Mapped>>,
}

fn err(path: &Path, reason: impl Into<String>) -> FrontendError {
    FrontendError::Checkpoint { file: path.display().to_string(), reason: reason.into() }
}

/// Walks the graph: producers and consumers of values, constants.
struct Matcher<'g> {
    g: &'g GraphProto,
    path: &'g Path,
    external: &'g BTreeMap<String, Bytes>,
    producer: HashMap<&'g str, usize>,
    consumers: HashMap<&'g str, Vec<usize>>,
    initializers: HashMap<&'g str, &'g TensorProto>,
}

/// A walk's result, or the node where the graph is not what kiln knows.
type Found<T> = Result<T, FrontendError>;

impl<'g> Matcher<'g> {
    fn new(g: &'g GraphProto, path: &'g Path, external: &'g BTreeMap<String, Bytes>) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for input in n.input.iter().filter(|s| !s.is_empty()) {
                let users = consumers.entry(input.as_str()).or_default();
                if users.last() != Some(&i) {
                    users.push(i); // once per node, even when it takes the value twice
                }
            }
        }
        let initializers = g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        Matcher { g, path, external, producer, consumers, initializers }
    }

    fn describe(&self, n: &NodeProto) -> String {
        format!("node {:?} ({})", crate::gguf::clip(&n.name), n.op_type)
    }

    fn at(&self, n: &NodeProto, expected: impl std::fmt::Display) -> FrontendError {
        err(self.path, format!("{}: expected {expected}", self.describe(n)))
    }

    fn producer(&self, value: &str) -> Option<&'g NodeProto> {
        self.producer.get(value).map(|&i| &self.g.node[i])
    }

    /// The consumers of `value` other than shape arithmetic (`Shape`).
    fn consumers(&self, value: &str) -> Vec<&'g NodeProto> {
        self.consumers
            .get(value)
            .map(|v| v.iter().map(|&i| &self.g.node[i]).filter(|n| n.op_type != "Shape").collect())
            .unwrap_or_default()
    }

    /// The one consumer of `value` of type `op` for which `also` holds, else an error naming the
    /// node that made `value` and what uses it.
    fn next(&self, value: &str, op: &str, also: impl Fn(&NodeProto) -> bool) -> Found<&'g NodeProto> {
        let users = self.consumers(value);
        let found: Vec<&NodeProto> = users.iter().copied().filter(|n| n.op_type == op && also(n)).collect();
        if let [n] = found[..] {
            return Ok(n);
        }
        let names: Vec<String> = users.iter().map(|n| self.describe(n)).collect();
        let what = format!(
            "one {op} node of the Llama pattern to use its output ({} found; users: {})",
            found.len(),
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        );
        Err(match self.producer(value) {
            Some(p) => self.at(p, what),
            None => err(self.path, format!("value {:?}: expected {what}", crate::gguf::clip(value))),
        })
    }

    fn out(&self, n: &'g NodeProto) -> Found<&'g str> {
        n.output.first().map(String::as_str).ok_or_else(|| self.at(n, "an output"))
    }

    /// The input of two-input `n` other than `value`.
    fn other(&self, n: &'g NodeProto, value: &str) -> Found<&'g str> {
        match &n.input[..] {
            [a, b] if a == value => Ok(b.as_str()),
            [a, b] if b == value => Ok(a.as_str()),
            _ => Err(self.at(n, format!("two inputs, one of them {:?}", crate::gguf::clip(value)))),
        }
    }

    /// The initializer `value` is, directly or through one `Cast` (half-precision exports).
    fn weight(&self, value: &str) -> Option<&'g TensorProto> {
        if let Some(t) = self.initializers.get(value) {
            return Some(t);
        }
        let p = self.producer(value)?;
        if p.op_type == "Cast" && p.input.len() == 1 {
            return self.initializers.get(p.input[0].as_str()).copied();
        }
        None
    }

    /// The values of a constant (initializer or `Constant` node, possibly through a `Cast`).
    fn constant(&self, value: &str) -> Option<Vec<f64>> {
        if let Some(t) = self.initializers.get(value) {
            return onnx_proto::values(t, self.external);
        }
        let p = self.producer(value)?;
        match p.op_type.as_str() {
            "Constant" => onnx_proto::values(&onnx_proto::constant_value(p)?, self.external),
            "Cast" => self.constant(p.input.first()?),
            _ => None,
        }
    }

    fn scalar(&self, value: &str) -> Option<f64> {
        match self.constant(value)?[..] {
            [x] => Some(x),
            _ => None,
        }
    }

    /// An integer-list attribute of `n`, or (in opsets where it became one) its input `index`.
    fn ints(&self, n: &NodeProto, attr: &str, index: usize) -> Option<Vec<i64>> {
        if let Some(a) = n.attribute.iter().find(|a| a.name == attr) {
            return Some(a.ints.clone());
        }
        let v = self.constant(n.input.get(index)?)?;
        Some(v.iter().map(|&x| x as i64).collect())
    }

    fn int_attr(&self, n: &NodeProto, attr: &str) -> Option<i64> {
        n.attribute.iter().find(|a| a.name == attr).map(|a| a.i)
    }

    /// An RMSNorm from `x`: its output, weight initializer and epsilon.
    fn rms_norm(&self, x: &str) -> Found<(&'g str, &'g str, f64)> {
        let pow = self.next(x, "Pow", |_| true)?;
        if self.scalar(pow.input.get(1).map_or("", |s| s)) != Some(2.0) {
            return Err(self.at(pow, "x to the power 2 (RMSNorm)"));
        }
        let mean = self.next(self.out(pow)?, "ReduceMean", |_| true)?;
        let axes = self.ints(mean, "axes", 1);
        if !matches!(axes.as_deref(), Some([-1]) | Some([2])) || self.int_attr(mean, "keepdims").unwrap_or(1) != 1 {
            return Err(self.at(mean, "the mean over the last axis, dims kept (RMSNorm)"));
        }
        let m = self.out(mean)?;
        let add = self.next(m, "Add", |_| true)?;
        let eps = self
            .scalar(self.other(add, m)?)
            .filter(|e| (0.0..1.0).contains(e))
            .ok_or_else(|| self.at(add, "the addition of epsilon, a constant in [0, 1) (RMSNorm)"))?;
        let sqrt = self.next(self.out(add)?, "Sqrt", |_| true)?;
        let s = self.out(sqrt)?;
        let inv = match self.consumers(s).as_slice() {
            [n] if n.op_type == "Reciprocal" => *n,
            [n] if n.op_type == "Div"
                && n.input.len() == 2
                && n.input[1] == s
                && self.scalar(&n.input[0]) == Some(1.0) =>
            {
                *n
            }
            _ => return Err(self.at(sqrt, "1 / sqrt(...) by Div(1, .) or Reciprocal (RMSNorm)")),
        };
        let r = self.out(inv)?;
        let scaled = self.next(r, "Mul", |n| n.input.iter().any(|i| i == x))?;
        let s = self.out(scaled)?;
        let weighted = self.next(s, "Mul", |n| self.other(n, s).ok().and_then(|w| self.weight(w)).is_some())?;
        let weight = self.weight(self.other(weighted, s)?).expect("checked above");
        Ok((self.out(weighted)?, weight.name.as_str(), eps))
    }

    /// A `MatMul` of `x` by a weight initializer `[in, out]`: the node, the weight, `out`.
    fn linear(&self, n: &'g NodeProto, x: &str) -> Found<(&'g TensorProto, u64)> {
        let w = match &n.input[..] {
            [a, b] if a == x => self.weight(b),
            _ => None,
        };
        match w {
            Some(t) if t.dims.len() == 2 && t.dims.iter().all(|&d| d > 0 && d <= u32::MAX as i64) => {
                Ok((t, t.dims[1] as u64))
            }
            _ => Err(self.at(n, "x times a 2-D weight initializer [in, out] (a Linear layer)")),
        }
    }

    /// From a projection's output: `Reshape` to heads, `Transpose` to `[B, heads, S, D]`; the
    /// transposed value and the (heads, head dim) of the reshape.
    fn split_heads(&self, v: &str) -> Found<(&'g str, (u64, u64))> {
        let reshape = self.next(v, "Reshape", |_| true)?;
        let shape = reshape.input.get(1).map(String::as_str).unwrap_or("");
        // The target shape: a constant, or a Concat whose last two parts are constants.
        let tail = self.constant(shape).or_else(|| {
            let c = self.producer(shape).filter(|c| c.op_type == "Concat")?;
            let parts: Option<Vec<f64>> =
                c.input.iter().rev().take(2).map(|p| self.scalar(p)).collect::<Option<Vec<_>>>().map(|mut v| {
                    v.reverse();
                    v
                });
            parts
        });
        // Whole and below 2^32 each, so that their product fits in u64.
        let count = |x: f64| (1.0..=f64::from(u32::MAX)).contains(&x) && x.fract() == 0.0;
        let (heads, dim) = match tail.as_deref() {
            Some([.., h, d]) if count(*h) && count(*d) => (*h as u64, *d as u64),
            _ => {
                return Err(
                    self.at(reshape, "a reshape to [batch, seq, heads, head_dim] with constant heads and head_dim")
                )
            }
        };
        let t = self.next(self.out(reshape)?, "Transpose", |_| true)?;
        if self.ints(t, "perm", usize::MAX).as_deref() != Some(&[0, 2, 1, 3]) {
            return Err(self.at(t, "a transpose to [batch, heads, seq, head_dim] (perm 0,2,1,3)"));
        }
        Ok((self.out(t)?, (heads, dim)))
    }

    /// `x * cos + rotate_half(x) * sin` from `x` (`[B, H, S, D]`): the output and (cos, sin).
    fn rotary(&self, x: &str, dim: u64) -> Found<(&'g str, (&'g str, &'g str))> {
        let half = (dim / 2) as f64;
        let slice = |lo: f64| {
            self.next(x, "Slice", |n| {
                let (st, ax) =
                    (n.input.get(1).and_then(|v| self.scalar(v)), n.input.get(3).and_then(|v| self.scalar(v)));
                st == Some(lo) && matches!(ax, Some(a) if a == 3.0 || a == -1.0)
            })
        };
        let (first, second) = (slice(0.0)?, slice(half)?);
        let ends_ok = |n: &NodeProto, lo: f64, hi: f64| {
            n.input.get(2).and_then(|v| self.scalar(v)).is_some_and(|e| e >= hi && (hi != half || e == half) && lo < e)
        };
        if !ends_ok(first, 0.0, half) {
            return Err(self.at(first, format!("the first half of the head ({half} values) for rotate_half")));
        }
        if !ends_ok(second, half, dim as f64) {
            return Err(self.at(second, "the second half of the head for rotate_half"));
        }
        let neg = self.next(self.out(second)?, "Neg", |_| true)?;
        let (n_out, f_out) = (self.out(neg)?, self.out(first)?);
        let cat = self.next(n_out, "Concat", |c| c.input.len() == 2 && c.input[0] == n_out && c.input[1] == f_out)?;
        if !matches!(self.int_attr(cat, "axis"), Some(-1) | Some(3)) {
            return Err(self.at(cat, "a concatenation on the last axis (rotate_half)"));
        }
        let c_out = self.out(cat)?;
        let sin_mul = self.next(c_out, "Mul", |_| true)?;
        let sin = self.other(sin_mul, c_out)?;
        let cos_mul = self.next(x, "Mul", |_| true)?;
        let cos = self.other(cos_mul, x)?;
        let (a, b) = (self.out(cos_mul)?, self.out(sin_mul)?);
        let add = self.next(a, "Add", |n| n.input.iter().any(|i| i == b))?;
        Ok((self.out(add)?, (cos, sin)))
    }

    /// Grouped-query heads repeated: `Unsqueeze` at axis 2, `Expand`, `Reshape` (each KV head
    /// `n_rep` times in a row), or nothing when `n_rep` is 1.
    fn repeat_kv(&self, x: &'g str, n_rep: u64) -> Found<&'g str> {
        if n_rep == 1 {
            return Ok(x);
        }
        let u = self.next(x, "Unsqueeze", |_| true)?;
        if self.ints(u, "axes", 1).as_deref() != Some(&[2]) {
            return Err(self.at(u, "the key/value heads unsqueezed at axis 2 (repeat_kv)"));
        }
        let e = self.next(self.out(u)?, "Expand", |_| true)?;
        let r = self.next(self.out(e)?, "Reshape", |_| true)?;
        self.out(r)
    }

    /// The attention mask added to the scores must be causal: an upper triangle (above the
    /// diagonal) of a large negative constant, made with `Trilu`.
    fn causal_mask(&self, mask: &str, at: &NodeProto) -> Found<()> {
        let mut v = mask;
        for _ in 0..8 {
            let Some(p) = self.producer(v) else { break };
            match p.op_type.as_str() {
                "Trilu" => {
                    let k = p.input.get(1).and_then(|k| self.scalar(k)).unwrap_or(0.0);
                    let fill = p.input.first().and_then(|x| self.producer(x)).and_then(|f| match f.op_type.as_str() {
                        "ConstantOfShape" => f
                            .attribute
                            .iter()
                            .find(|a| a.name == "value")
                            .and_then(|a| a.t.as_ref())
                            .and_then(|t| onnx_proto::values(t, self.external))
                            .and_then(|v| v.first().copied()),
                        "Expand" => f.input.first().and_then(|c| self.scalar(c)),
                        _ => None,
                    });
                    if self.int_attr(p, "upper") == Some(1) && k == 1.0 && fill.is_some_and(|f| f <= -1e30) {
                        return Ok(());
                    }
                    break;
                }
                "Unsqueeze" | "Cast" | "Slice" | "Expand" => v = p.input.first().map(String::as_str).unwrap_or(""),
                _ => break,
            }
        }
        Err(self.at(at, "scores plus the causal mask (Trilu(upper, k=1) of a large negative fill)"))
    }
}

/// What the walk recovers of one model.
struct Recovered {
    hyper: Hyperparameters,
    tensors: HashMap<String, Take>,
}

/// `theta` such that `inv_freq[i] = theta^(-2i/D)`, from the constant feeding the cos/sin
/// computation of `cos` (through `Unsqueeze`, `Mul` by 1, `Cos`, `Concat`, `Transpose`,
/// `MatMul`, `Unsqueeze`), checked entry by entry.
fn rope_theta(m: &Matcher<'_>, cos: &str, dim: u64) -> Option<f64> {
    let mut frontier = vec![cos.to_string()];
    let mut seen = 0;
    while let Some(v) = frontier.pop() {
        seen += 1;
        if seen > 64 {
            return None;
        }
        if let Some(values) = m.constant(&v) {
            if values.len() as u64 == dim / 2 && dim >= 4 {
                // inv_freq is float32: snap to the integer base it was made from when it is one.
                let theta = values[1].powf(-(dim as f64) / 2.0);
                let theta = if (theta - theta.round()).abs() <= 1e-4 * theta { theta.round() } else { theta };
                let ok = values.iter().enumerate().all(|(i, &f)| {
                    let want = theta.powf(-2.0 * i as f64 / dim as f64);
                    (f - want).abs() <= 1e-5 * want.abs()
                });
                return ok.then_some(theta);
            }
            continue;
        }
        let p = m.producer(&v)?;
        if matches!(
            p.op_type.as_str(),
            "Unsqueeze" | "Cos" | "Concat" | "Transpose" | "MatMul" | "Mul" | "Cast" | "Expand"
        ) {
            frontier.extend(p.input.iter().take(2).cloned());
        }
    }
    None
}

fn walk(m: &Matcher<'_>, graph: &GraphProto) -> Found<Recovered> {
    let ids = match &graph.input.iter().filter(|i| !m.initializers.contains_key(i.name.as_str())).collect::<Vec<_>>()[..]
    {
        [one] => one.name.as_str(),
        other => {
            return Err(err(
                m.path,
                format!(
                    "expected one graph input (the token ids), found {}: kiln reads decoders without KV-cache inputs",
                    other.len()
                ),
            ))
        }
    };
    let gather = m.next(ids, "Gather", |n| n.input.len() == 2 && n.input[1] == ids)?;
    let embd = m
        .weight(&gather.input[0])
        .filter(|t| t.dims.len() == 2 && t.dims.iter().all(|&d| d > 0 && d <= u32::MAX as i64))
        .ok_or_else(|| m.at(gather, "the embedding: a 2-D initializer [vocab, d_model] gathered by the token ids"))?;
    let (vocab, d_model) = (embd.dims[0] as u64, embd.dims[1] as u64);
    let mut tensors = HashMap::new();
    let take = |name: String, t: &TensorProto, transpose: bool, rotary_heads: Option<u32>| {
        (name, Take { initializer: t.name.clone(), transpose, rotary_heads })
    };
    tensors.extend([take("token_embd.weight".into(), embd, false, None)]);
    let mut x = m.out(gather)?;
    let (mut eps_all, mut heads_all, mut d_ff_all): (Option<f64>, Option<(u64, u64, u64)>, Option<u64>) =
        (None, None, None);
    let mut rotary: Option<(String, String)> = None;
    let mut theta = None;
    let same = |slot: &mut Option<f64>, v: f64, n: &NodeProto, what: &str| -> Found<()> {
        match slot {
            Some(s) if *s != v => Err(m.at(n, format!("the same {what} as the other layers ({s}, not {v})"))),
            _ => {
                *slot = Some(v);
                Ok(())
            }
        }
    };
    let mut layer = 0u32;
    loop {
        let (h, norm_w, eps) = m.rms_norm(x)?;
        let norm_node = m.producer(h).expect("made by the norm");
        same(&mut eps_all, eps, norm_node, "RMSNorm epsilon")?;
        let mms: Vec<&NodeProto> = m.consumers(h).into_iter().filter(|n| n.op_type == "MatMul").collect();
        if mms.len() == 1 {
            // The output norm and the LM head.
            let (w, out) = m.linear(mms[0], h)?;
            if out != vocab || w.dims[0] as u64 != d_model {
                return Err(m.at(mms[0], format!("the LM head [{d_model}, {vocab}]")));
            }
            let logits = m.out(mms[0])?;
            if !graph.output.iter().any(|o| o.name == logits) {
                return Err(m.at(mms[0], "the logits to be the graph's output"));
            }
            tensors.insert(
                "output_norm.weight".into(),
                Take { initializer: norm_w.to_string(), transpose: false, rotary_heads: None },
            );
            tensors.extend([take("output.weight".into(), w, true, None)]);
            break;
        }
        if mms.len() != 3 {
            return Err(m.at(
                norm_node,
                format!(
                    "three projections (q, k, v) of the normalized state, or one LM head; found {} MatMul",
                    mms.len()
                ),
            ));
        }
        let t = |s: &str| format!("blk.{layer}.{s}.weight");
        tensors.insert(t("attn_norm"), Take { initializer: norm_w.to_string(), transpose: false, rotary_heads: None });
        // Split each projection into heads; q and k are rotated, v is not.
        let mut projections = vec![];
        for mm in &mms {
            let (w, out) = m.linear(mm, h)?;
            let (heads_v, shape) = m.split_heads(m.out(mm)?)?;
            if shape.0 * shape.1 != out {
                return Err(m.at(mm, format!("{out} outputs to split into {} heads of {}", shape.0, shape.1)));
            }
            let rotated = m.consumers(heads_v).iter().any(|n| n.op_type == "Slice");
            projections.push((mm, w, heads_v, shape, rotated));
        }
        let (rot, plain): (Vec<_>, Vec<_>) = projections.into_iter().partition(|p| p.4);
        let [v_proj] = plain[..] else {
            return Err(m.at(norm_node, "exactly one projection (v) without rotary embedding"));
        };
        let [a, b] = rot[..] else { return Err(m.at(norm_node, "two rotated projections (q and k)")) };
        let dim = a.3 .1;
        let (a_rot, a_cs) = m.rotary(a.2, dim)?;
        let (b_rot, b_cs) = m.rotary(b.2, dim)?;
        for cs in [a_cs, b_cs] {
            match &rotary {
                None => rotary = Some((cs.0.to_string(), cs.1.to_string())),
                Some(r) if (r.0.as_str(), r.1.as_str()) == cs => {}
                Some(_) => return Err(m.at(norm_node, "the same rotary cos/sin in every projection and layer")),
            }
        }
        // q feeds the scores' MatMul directly; k goes through repeat_kv and a transpose.
        let scores_of = |rot_out: &str| {
            m.consumers(rot_out)
                .into_iter()
                .find(|n| n.op_type == "MatMul" && n.input.first().map(String::as_str) == Some(rot_out))
        };
        let (q, q_rot, k, k_rot) = match (scores_of(a_rot), scores_of(b_rot)) {
            (Some(_), None) => (a, a_rot, b, b_rot),
            (None, Some(_)) => (b, b_rot, a, a_rot),
            _ => return Err(m.at(norm_node, "one rotated projection (q) multiplied by the keys")),
        };
        let (n_heads, head_dim) = q.3;
        let n_kv = k.3 .0;
        if k.3 .1 != head_dim || v_proj.3 != k.3 || n_heads % n_kv != 0 || n_heads * head_dim != d_model {
            return Err(
                m.at(q.0, format!("q, k, v heads of one head dimension with d_model {d_model} = heads x head_dim"))
            );
        }
        match heads_all {
            Some(hs) if hs != (n_heads, n_kv, head_dim) => return Err(m.at(q.0, "the same heads in every layer")),
            _ => heads_all = Some((n_heads, n_kv, head_dim)),
        }
        let k_rep = m.repeat_kv(k_rot, n_heads / n_kv)?;
        let kt = m.next(k_rep, "Transpose", |_| true)?;
        if m.ints(kt, "perm", usize::MAX).as_deref() != Some(&[0, 1, 3, 2]) {
            return Err(m.at(kt, "the keys transposed to [batch, heads, head_dim, seq]"));
        }
        let kt_out = m.out(kt)?;
        let scores = m.next(kt_out, "MatMul", |n| n.input.len() == 2 && n.input[0] == q_rot && n.input[1] == kt_out)?;
        let s = m.out(scores)?;
        let scale_node = m
            .consumers(s)
            .into_iter()
            .find(|n| matches!(n.op_type.as_str(), "Mul" | "Div"))
            .ok_or_else(|| m.at(scores, "the scores scaled by 1/sqrt(head_dim)"))?;
        let c = m.other(scale_node, s)?;
        let factor = m.scalar(c).map(|f| if scale_node.op_type == "Div" { 1.0 / f } else { f });
        let want = 1.0 / (head_dim as f64).sqrt();
        if !factor.is_some_and(|f| (f - want).abs() <= 1e-6 * want) {
            return Err(m.at(scale_node, format!("the scores scaled by 1/sqrt({head_dim}) = {want}")));
        }
        let scaled = m.out(scale_node)?;
        let masked = m.next(scaled, "Add", |_| true)?;
        m.causal_mask(m.other(masked, scaled)?, masked)?;
        let softmax = m.next(m.out(masked)?, "Softmax", |n| matches!(m.int_attr(n, "axis"), Some(-1) | Some(3)))?;
        let v_rep = m.repeat_kv(v_proj.2, n_heads / n_kv)?;
        let probs = m.out(softmax)?;
        let pv = m.next(probs, "MatMul", |n| n.input.len() == 2 && n.input[0] == probs && n.input[1] == v_rep)?;
        let tr =
            m.next(m.out(pv)?, "Transpose", |n| m.ints(n, "perm", usize::MAX).as_deref() == Some(&[0, 2, 1, 3]))?;
        let merged = m.next(m.out(tr)?, "Reshape", |_| true)?;
        let merged_out = m.out(merged)?;
        let o = m.next(merged_out, "MatMul", |_| true)?;
        let (wo, o_out) = m.linear(o, merged_out)?;
        if o_out != d_model {
            return Err(m.at(o, format!("the output projection to {d_model}")));
        }
        let o_val = m.out(o)?;
        let res1 = m.next(o_val, "Add", |n| n.input.iter().any(|i| i == x))?;
        let x1 = m.out(res1)?;
        tensors.extend([
            take(t("attn_q"), q.1, true, Some(n_heads as u32)),
            take(t("attn_k"), k.1, true, Some(n_kv as u32)),
            take(t("attn_v"), v_proj.1, true, None),
            take(t("attn_output"), wo, true, None),
        ]);

        // SwiGLU MLP.
        let (h2, norm2_w, eps2) = m.rms_norm(x1)?;
        same(&mut eps_all, eps2, m.producer(h2).expect("made by the norm"), "RMSNorm epsilon")?;
        let mms: Vec<&NodeProto> = m.consumers(h2).into_iter().filter(|n| n.op_type == "MatMul").collect();
        let [p1, p2] = mms[..] else {
            return Err(m.at(m.producer(h2).expect("norm"), "two projections (gate, up) of the normalized state"));
        };
        let gates =
            |n: &NodeProto| m.out(n).ok().is_some_and(|o| m.consumers(o).iter().any(|c| c.op_type == "Sigmoid"));
        let (gate, up) = match (gates(p1), gates(p2)) {
            (true, false) => (p1, p2),
            (false, true) => (p2, p1),
            _ => return Err(m.at(p1, "one projection (gate) through SiLU = x * Sigmoid(x)")),
        };
        let (wg, ff) = m.linear(gate, h2)?;
        let (wu, ff_up) = m.linear(up, h2)?;
        let g = m.out(gate)?;
        let sig = m.next(g, "Sigmoid", |_| true)?;
        let sig_out = m.out(sig)?;
        let silu = m.next(sig_out, "Mul", |n| n.input.iter().any(|i| i == g))?;
        let (silu_out, u) = (m.out(silu)?, m.out(up)?);
        let prod = m.next(silu_out, "Mul", |n| n.input.iter().any(|i| i == u))?;
        let prod_out = m.out(prod)?;
        let down = m.next(prod_out, "MatMul", |_| true)?;
        let (wd, d_out) = m.linear(down, prod_out)?;
        if ff_up != ff || d_out != d_model || wd.dims[0] as u64 != ff {
            return Err(m.at(down, format!("gate and up to the same width and down back to {d_model}")));
        }
        match d_ff_all {
            Some(f) if f != ff => return Err(m.at(gate, "the same MLP width in every layer")),
            _ => d_ff_all = Some(ff),
        }
        let down_out = m.out(down)?;
        let res2 = m.next(down_out, "Add", |n| n.input.iter().any(|i| i == x1))?;
        tensors.insert(t("ffn_norm"), Take { initializer: norm2_w.to_string(), transpose: false, rotary_heads: None });
        tensors.extend([
            take(t("ffn_gate"), wg, true, None),
            take(t("ffn_up"), wu, true, None),
            take(t("ffn_down"), wd, true, None),
        ]);
        if theta.is_none() {
            let (cos, _) = rotary.as_ref().expect("set above");
            theta = Some(rope_theta(m, cos, head_dim).ok_or_else(|| {
                m.at(q.0, "rotary cos/sin computed from inv_freq = theta^(-2i/head_dim) (no rope scaling)")
            })?);
        }
        x = m.out(res2)?;
        layer += 1;
        if layer > 1024 {
            return Err(err(m.path, "more than 1024 layers"));
        }
    }
    let (n_heads, n_kv_heads, head_dim) = heads_all.ok_or_else(|| err(m.path, "no transformer layer found"))?;
    let hyper = Hyperparameters {
        architecture: "llama".into(),
        n_layers: layer,
        d_model: d_model as u32,
        d_ff: d_ff_all.unwrap_or(0) as u32,
        n_heads: n_heads as u32,
        n_kv_heads: n_kv_heads as u32,
        head_dim: head_dim as u32,
        vocab: vocab as u32,
        rope_theta: theta.unwrap_or(0.0) as f32,
        rope_scaling: ir::RopeScaling::None,
        rms_eps: eps_all.unwrap_or(0.0) as f32,
        train_context: 0,
        tied_embedding: false,
    };
    Ok(Recovered { hyper, tensors })
}

impl OnnxModel {
    /// Reads and recognizes the ONNX model at `path` (see the module doc); nothing is written.
    pub fn open(path: &Path) -> Result<Self, FrontendError> {
        // The file the user named, wherever it is; mapped, and decoded without copying its tensors.
        let mut maps = vec![Arc::new(map_named_file(path)?)];
        let file = Bytes::from_owner(SharedMapped(maps[0].clone()));
        let model = onnx_proto::decode(file.clone()).map_err(|e| err(path, e))?;
        let graph = model.graph.as_ref().expect("decode checks");
        let opset = model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version);
        if !matches!(opset, Some(13..=23)) {
            return Err(err(path, format!("opset {opset:?}: kiln reads the ONNX opsets 13 to 23")));
        }
        if let Some(n) = graph.node.iter().find(|n| !(n.domain.is_empty() || n.domain == "ai.onnx")) {
            return Err(err(
                path,
                format!(
                    "node {:?} is of domain {:?}; kiln reads standard ONNX operators",
                    crate::gguf::clip(&n.name),
                    crate::gguf::clip(&n.domain)
                ),
            ));
        }
        // External data, mapped once per file.
        let dir = ModelDir::new(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
        let mut external = BTreeMap::new();
        for t in &graph.initializer {
            if let Some((loc, _, _)) = onnx_proto::external_location(t).map_err(|e| err(path, e))? {
                if let std::collections::btree_map::Entry::Vacant(slot) = external.entry(loc) {
                    let data = dir.map(slot.key())?.ok_or_else(|| {
                        err(
                            &dir.path(slot.key()),
                            format!("missing: external data of tensor {:?}", crate::gguf::clip(&t.name)),
                        )
                    })?;
                    let data = Arc::new(data);
                    maps.push(data.clone());
                    slot.insert(Bytes::from_owner(SharedMapped(data)));
                }
            }
        }
        let rec = Self::recognize(graph, path, &external)?;
        let mut files = BTreeMap::new();
        read_tokenizer_files(&dir, &mut files)?;
        let config = crate::source::hf::read_json_file(&dir, "config.json")?.unwrap_or(Value::Null);
        let mut hyper = rec.hyper;
        if let Some(c) = config.get("max_position_embeddings").and_then(Value::as_u64) {
            hyper.train_context = c.min(u32::MAX as u64) as u32;
        }
        hyper.check(|k| format!("the ONNX graph's {k}"))?;
        // Every byte of the weight files is hashed: no more than the model can need.
        let limit = max_weight_bytes(&hyper);
        let total = external.values().fold(file.len() as u64, |n, b| n.saturating_add(b.len() as u64));
        if total > limit {
            let (name, len) = external
                .iter()
                .map(|(n, b)| (dir.path(n), b.len()))
                .chain([(path.to_path_buf(), file.len())])
                .max_by_key(|(_, len)| *len)
                .expect("the model file");
            return Err(err(
                &name,
                format!(
                    "{len} bytes; the model's files hold {total}, more than the model the graph describes can need \
                     ({limit}: its weights in F32, an eighth more and 64 MiB)"
                ),
            ));
        }
        let path = path.to_path_buf();
        Ok(OnnxModel { path, model, hyper, tensors: rec.tensors, external, file, files, config, maps })
    }

    /// Walks the graph ([`walk`]) and checks the weights it found: readable, in a float format,
    /// and a tied head stored once.
    fn recognize(
        graph: &GraphProto,
        path: &Path,
        external: &BTreeMap<String, Bytes>,
    ) -> Result<Recovered, FrontendError> {
        let m = Matcher::new(graph, path, external);
        let mut rec = walk(&m, graph)?;
        // Every weight must be readable now, in a float format kiln takes.
        for (name, take) in &rec.tensors {
            let t = m.initializers[take.initializer.as_str()];
            if !matches!(t.data_type, dtype::FLOAT | dtype::FLOAT16 | dtype::BFLOAT16) {
                return Err(err(
                    path,
                    format!(
                        "initializer {:?} ({name}) has data type {}; kiln reads FLOAT, FLOAT16 and BFLOAT16",
                        crate::gguf::clip(&t.name),
                        t.data_type
                    ),
                ));
            }
            onnx_proto::tensor_bytes(t, external).map_err(|e| err(path, e))?;
        }
        // A tied head: the transposed LM head holds the embedding's bytes.
        let head = &rec.tensors["output.weight"];
        let (e, h) = (
            m.initializers[rec.tensors["token_embd.weight"].initializer.as_str()],
            m.initializers[head.initializer.as_str()],
        );
        if e.data_type == h.data_type {
            let eb = onnx_proto::tensor_bytes(e, external).map_err(|x| err(path, x))?;
            let hb = onnx_proto::tensor_bytes(h, external).map_err(|x| err(path, x))?;
            let size = if e.data_type == dtype::FLOAT { 4 } else { 2 };
            if transpose(&hb, h.dims[0] as usize, h.dims[1] as usize, size) == eb {
                rec.tensors.remove("output.weight");
                rec.hyper.tied_embedding = true;
            }
        }
        Ok(rec)
    }

    /// `bytes` (a slice of the model file or of an external data file) borrowed from the
    /// buffer that holds it, so that the weight is not copied.
    fn lend(&self, bytes: &Bytes) -> std::borrow::Cow<'_, [u8]> {
        let at = bytes.as_ptr() as usize;
        for buffer in std::iter::once(&self.file).chain(self.external.values()) {
            let start = at.checked_sub(buffer.as_ptr() as usize);
            if let Some(range) = start.and_then(|s| Some(s..s.checked_add(bytes.len())?)) {
                if let Some(slice) = buffer.get(range) {
                    return slice.into();
                }
            }
        }
        bytes.to_vec().into()
    }

    fn graph(&self) -> &GraphProto {
        self.model.graph.as_ref().expect("decode checks")
    }
}

/// A row-major `[rows, cols]` matrix of `size`-byte elements, transposed.
fn transpose(data: &[u8], rows: usize, cols: usize, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
            out[to..to + size].copy_from_slice(&data[from..from + size]);
        }
    }
    out
}

impl ModelSource for OnnxModel {
    fn kind(&self) -> &'static str {
        "onnx"
    }

    fn hyperparameters(&self) -> Result<Hyperparameters, FrontendError> {
        Ok(self.hyper.clone())
    }

    fn declared_name(&self) -> Result<Option<String>, FrontendError> {
        Ok(None)
    }

    fn tensor(&self, name: &str, dims: &[u64]) -> Result<SourceTensor<'_>, FrontendError> {
        let take = self
            .tensors
            .get(name)
            .ok_or_else(|| err(&self.path, format!("kiln found no tensor {name} in the graph")))?;
        let t = self.graph().initializer.iter().find(|t| t.name == take.initializer).expect("found by the walk");
        let (format, size) = match t.data_type {
            dtype::FLOAT => (QuantFormat::F32, 4),
            dtype::FLOAT16 => (QuantFormat::F16, 2),
            _ => (QuantFormat::BF16, 2),
        };
        let stored: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
        // kiln's dims are innermost first: [in, out] for a matrix, which an ONNX MatMul
        // weight stores as [in, out] (transposed), an embedding as [vocab, d].
        let logical: Vec<u64> = if take.transpose { stored.clone() } else { stored.iter().rev().copied().collect() };
        if logical != dims {
            return Err(err(
                &self.path,
                format!(
                    "initializer {:?} ({name}) has dims {stored:?}, which do not fit {dims:?}",
                    crate::gguf::clip(&t.name)
                ),
            ));
        }
        let bytes = onnx_proto::tensor_bytes(t, &self.external).map_err(|e| err(&self.path, e))?;
        if !take.transpose {
            return Ok(SourceTensor { format, bytes: self.lend(&bytes) });
        }
        let (rows, cols) = (stored[0] as usize, stored[1] as usize);
        let mut data = transpose(&bytes, rows, cols, size);
        if let Some(heads) = take.rotary_heads {
            data = crate::lora::permute_rotary_rows(&data, cols, rows * size, heads as usize)
                .map_err(|e| err(&self.path, format!("{name}: {e}")))?;
        }
        Ok(SourceTensor { format, bytes: data.into() })
    }

    fn tokenizer(&self) -> Result<TokenizerSpec, FrontendError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        tokenizer_spec(dir, &self.files, &self.config)
    }

    fn context_key(&self) -> String {
        "max_position_embeddings (of a config.json beside the ONNX model)".into()
    }

    fn sha256(&self) -> String {
        let mut h = Sha256::new();
        let named = std::iter::once(("model.onnx", &self.file[..]))
            .chain(self.external.iter().map(|(n, b)| (n.as_str(), &b[..])))
            .chain(self.files.iter().map(|(n, b)| (n.as_str(), &b[..])));
        for (name, bytes) in named {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            for chunk in bytes.chunks(crate::source::HASH_CHUNK) {
                h.update(chunk);
                self.release(chunk);
            }
        }
        format!("{:x}", h.finalize())
    }

    fn release(&self, bytes: &[u8]) {
        self.maps.iter().for_each(|m| m.release(bytes));
    }
}
