//! Q5_1: 24-byte blocks of 32 values: f16 scale `d`, f16 minimum `m`, 32 high bits `qh`, 16
//! bytes of low nibbles (as Q5_0); `x = d * q + m`. The kernels read it as a Q4 block with its fifth bits (kernel form Q5).

use half::f16;

use super::q5_0::{push_quants, quants_at};
use super::{f16_at, FormatSpec, KernelForm, Q4Block, BLOCK_SIZE};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q5_1",
    ggml_type: 7,
    block_values: BLOCK_SIZE,
    block_bytes: 24,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::Q5(|b, out| out.push(Q4Block::from_quants(f16_at(b, 0), f16_at(b, 2), &quants_at(b, 4)))),
    error_bound: Some(error_bound),
};

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    for (o, q) in o.iter_mut().zip(quants_at(block, 4)) {
        let product = q as f32 * d;
        // `d * q + m` as ggml computes it. When both terms are NaN, x86 (ggml, numpy) returns
        // the first one's payload; the add is commutative to LLVM, so say it.
        *o = if product.is_nan() { product } else { product + m };
    }
}

fn quantize_block(b: &[f32], out: &mut Vec<u8>) {
    let min = b.iter().copied().fold(f32::INFINITY, f32::min);
    let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
    let q: [u8; 32] = std::array::from_fn(|j| (((b[j] - min) * id + 0.5) as i32).clamp(0, 31) as u8);
    push_quants(&q, out);
}

/// d = (max - min) / 31, m = min, q = round((x - min) / d) in 0..=31: half a step, plus the
/// f16 roundings of d (times q <= 31) and of m, plus 4 * 2^-24 * amax for the f32 rounding of
/// x * (1 / d).
fn error_bound(_x: f32, block: &[f32]) -> f64 {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    let min = block.iter().copied().fold(f32::INFINITY, f32::min);
    let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 31.0;
    let (dh, mh) = (f16::from_f32(d).to_f32() as f64, f16::from_f32(min).to_f32() as f64);
    d as f64 / 2.0 + 31.0 * (d as f64 - dh).abs() + (min as f64 - mh).abs() + 2.0 * f32::EPSILON as f64 * amax
}
