//! A scalar interpreter: the executable meaning of the IR.
//!
//! It evaluates any verified graph with plain loops and f64 accumulation, dequantizing weights
//! with the reference routines of [`crate::quant`]. Compiled kernels are tested against it on
//! random inputs; it is written for clarity, not speed.

use crate::quant::dequantize;
use crate::{ActDType, DType, Epilogue, Graph, Op, ValueId};

/// Largest int16 magnitude used by q16 activation blocks.
pub const Q16_MAX: f32 = 32767.0;

/// Rounds a row to q16 and back: blocks of 32 values share the scale `max|x| / 32767` and each
/// value becomes `round_ties_even(x * 32767 / max|x|)` (zero blocks stay zero).
/// Compiled kernels must compute exactly these integers.
pub fn quantize_q16(row: &[f32]) -> Vec<f32> {
    quantize_activations(row, ActDType::Q16)
}

/// Rounds a row to the grid `act` and back: blocks of 32 values share the scale
/// `max|x| / Q` and each value becomes `round_ties_even(x * Q / max|x|)`, `Q = act.max()`
/// (zero blocks stay zero). Compiled kernels must compute exactly these integers.
pub fn quantize_activations(row: &[f32], act: ActDType) -> Vec<f32> {
    let q = act.max();
    let mut out = Vec::with_capacity(row.len());
    for block in row.chunks(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = amax / q;
        let inv = if amax > 0.0 { q / amax } else { 0.0 };
        out.extend(block.iter().map(|&x| (x * inv).round_ties_even().clamp(-q, q) * scale));
    }
    out
}

/// A runtime value: `rows` rows of `row_len` elements.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    I32(Vec<i32>),
    /// f32 data; also holds q16 values, stored dequantized.
    F32(Vec<f32>),
}

impl Tensor {
    pub fn f32(&self) -> &[f32] {
        match self {
            Tensor::F32(v) => v,
            Tensor::I32(_) => panic!("expected an f32 tensor"),
        }
    }
}

/// KV cache state of the interpreter: per layer, keys and values `[context, kv_width]`.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(graph: &Graph) -> Self {
        let size = graph.context as usize * graph.kv_width() as usize;
        let layers = graph.kv_layers() as usize;
        KvCache { keys: vec![vec![0.0; size]; layers], values: vec![vec![0.0; size]; layers] }
    }
}

/// Evaluates `graph` on `inputs` (one tensor per graph input) for a batch of `seq` tokens at
/// position `pos`, updating `cache`. `weights[i]` holds the raw bytes of weight `wi`.
/// Returns the graph outputs. Panics on inputs that contradict the graph (a test bug).
pub fn run(
    graph: &Graph,
    weights: &[&[u8]],
    inputs: &[Tensor],
    cache: &mut KvCache,
    seq: usize,
    pos: usize,
) -> Vec<Vec<f32>> {
    assert!(pos + seq <= graph.context as usize, "pos + seq exceeds the context");
    let dequant = |w: crate::WeightId| -> (Vec<f32>, usize, usize) {
        let weight = graph.weight(w);
        let (rows, cols) = match weight.shape[..] {
            [n] => (1, n as usize),
            [r, c] => (r as usize, c as usize),
            _ => unreachable!("verified"),
        };
        (dequantize(weight.format, weights[w.index()], rows, cols), rows, cols)
    };
    let mut values: Vec<Tensor> = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let f = |v: ValueId| values[v.index()].f32();
        let n = node.ty.row_len().unwrap_or(0) as usize;
        let out = match node.op {
            Op::Input { index } => inputs[index as usize].clone(),
            Op::Embed { ids, table } => {
                let Tensor::I32(ids) = &values[ids.index()] else { panic!("ids must be i32") };
                let (table, rows, cols) = dequant(table);
                let mut out = vec![0.0; seq * cols];
                for (t, &id) in ids.iter().enumerate() {
                    if (0..rows as i32).contains(&id) {
                        out[t * cols..(t + 1) * cols]
                            .copy_from_slice(&table[id as usize * cols..(id as usize + 1) * cols]);
                    }
                }
                Tensor::F32(out)
            }
            Op::RmsNorm { x, weight, eps, quantize } => {
                let (w, _, _) = dequant(weight);
                let mut out = Vec::with_capacity(seq * n);
                for row in f(x).chunks(n) {
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                    let scale = 1.0 / (ms + eps as f64).sqrt();
                    let normed: Vec<f32> =
                        row.iter().zip(&w).map(|(&v, &g)| (v as f64 * scale * g as f64) as f32).collect();
                    out.extend(if quantize { quantize_activations(&normed, graph.act_dtype) } else { normed });
                }
                Tensor::F32(out)
            }
            Op::Quantize { x } => {
                Tensor::F32(f(x).chunks(n).flat_map(|r| quantize_activations(r, graph.act_dtype)).collect())
            }
            Op::MatMul { x, weight, epilogue } => {
                let (w, rows, cols) = dequant(weight);
                let xs = f(x);
                let mut out = vec![0.0f32; seq * rows];
                for t in 0..seq {
                    let xrow = &xs[t * cols..(t + 1) * cols];
                    for r in 0..rows {
                        let dot: f64 =
                            xrow.iter().zip(&w[r * cols..(r + 1) * cols]).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let i = t * rows + r;
                        out[i] = match epilogue {
                            Epilogue::None => dot as f32,
                            Epilogue::Silu => (dot / (1.0 + (-dot).exp())) as f32,
                            Epilogue::Add(o) => (dot + f(o)[i] as f64) as f32,
                            Epilogue::Mul(o) => (dot * f(o)[i] as f64) as f32,
                        };
                    }
                }
                Tensor::F32(out)
            }
            Op::Rope { x, head_dim, theta, ref scaling } => {
                let hd = head_dim as usize;
                let mut out = f(x).to_vec();
                for t in 0..seq {
                    let angles = scaling.angles(head_dim, theta, (pos + t) as f64);
                    for head in out[t * n..(t + 1) * n].chunks_mut(hd) {
                        for (i, &angle) in angles.iter().enumerate() {
                            let (s, c) = angle.sin_cos();
                            let (a, b) = (head[2 * i] as f64, head[2 * i + 1] as f64);
                            head[2 * i] = (a * c - b * s) as f32;
                            head[2 * i + 1] = (b * c + a * s) as f32;
                        }
                    }
                }
                Tensor::F32(out)
            }
            Op::Attention { q, k, v, layer, n_heads, n_kv_heads, head_dim } => {
                let (hd, kvw) = (head_dim as usize, (n_kv_heads * head_dim) as usize);
                let (keys, vals) = (&mut cache.keys[layer as usize], &mut cache.values[layer as usize]);
                let kv = graph.kv_dtype;
                for (dst, src) in [(&mut *keys, f(k)), (&mut *vals, f(v))] {
                    for (d, &s) in dst[pos * kvw..(pos + seq) * kvw].iter_mut().zip(src) {
                        *d = kv.round(s);
                    }
                }
                let qs = f(q);
                let group = (n_heads / n_kv_heads) as usize;
                let scale = 1.0 / (hd as f64).sqrt();
                let mut out = vec![0.0f32; seq * n];
                for t in 0..seq {
                    for h in 0..n_heads as usize {
                        let qh = &qs[t * n + h * hd..t * n + (h + 1) * hd];
                        let kv_off = (h / group) * hd;
                        let scores: Vec<f64> = (0..=pos + t)
                            .map(|j| {
                                let kj = &keys[j * kvw + kv_off..j * kvw + kv_off + hd];
                                qh.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
                            })
                            .collect();
                        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let total: f64 = exps.iter().sum();
                        for d in 0..hd {
                            let acc: f64 =
                                exps.iter().enumerate().map(|(j, e)| e * vals[j * kvw + kv_off + d] as f64).sum();
                            out[t * n + h * hd + d] = (acc / total) as f32;
                        }
                    }
                }
                Tensor::F32(out)
            }
            Op::Silu { x } => {
                Tensor::F32(f(x).iter().map(|&v| (v as f64 / (1.0 + (-v as f64).exp())) as f32).collect())
            }
            Op::Mul { a, b } => Tensor::F32(f(a).iter().zip(f(b)).map(|(x, y)| x * y).collect()),
            Op::Add { a, b } => Tensor::F32(f(a).iter().zip(f(b)).map(|(x, y)| x + y).collect()),
        };
        debug_assert!(node.ty.dtype != DType::I32 || matches!(out, Tensor::I32(_)));
        values.push(out);
    }
    graph.outputs.iter().map(|v| values[v.index()].f32().to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q16_rounds_to_the_block_scale() {
        let row: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let q = quantize_q16(&row);
        for (block, qb) in row.chunks(32).zip(q.chunks(32)) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in block.iter().zip(qb) {
                assert!((a - b).abs() <= amax / Q16_MAX, "{a} vs {b}");
            }
        }
        assert_eq!(quantize_q16(&[0.0; 32]), vec![0.0; 32]);
    }

    #[test]
    fn q8_rounds_to_127_levels_per_block() {
        // The block's max is 127, so the grid step is 1 and x.5 ties go to the even integer.
        let mut row = vec![0.0f32; 32];
        row[0] = 127.0;
        row[1] = -127.0;
        row[2] = 62.5; // tie: rounds to 62
        row[3] = 63.5; // tie: rounds to 64
        row[4] = 0.4;
        row[5] = -0.6;
        let q = quantize_activations(&row, ActDType::Q8);
        assert_eq!(&q[..6], &[127.0, -127.0, 62.0, 64.0, 0.0, -1.0]);
        // Every value is an integer multiple of max|x| / 127 within half a step.
        let row: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let q = quantize_activations(&row, ActDType::Q8);
        for (block, qb) in row.chunks(32).zip(q.chunks(32)) {
            let step = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in block.iter().zip(qb) {
                assert!((a - b).abs() <= step / 2.0 * 1.0001, "{a} vs {b}");
                let k = b / step;
                assert!((k - k.round()).abs() < 1e-3 && k.abs() <= 127.0, "{b} is not on the grid");
            }
        }
    }
}
