//! Q4_1: 20-byte blocks of 32 values: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles;
//! `x = d * q + m`. The kernels' Q4 block is this format with f32 scales.

use half::f16;

use super::{f16_at, FormatSpec, KernelForm, Q4Block, BLOCK_SIZE};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q4_1",
    ggml_type: 3,
    block_values: BLOCK_SIZE,
    block_bytes: 20,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::Q4(|b, out| {
        out.push(Q4Block { d: f16_at(b, 0), m: f16_at(b, 2), qs: b[4..20].try_into().unwrap(), qh: 0 })
    }),
    error_bound: Some(error_bound),
};

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    for (j, &q) in block[4..20].iter().enumerate() {
        o[j] = (q & 0x0f) as f32 * d + m;
        o[j + 16] = (q >> 4) as f32 * d + m;
    }
}

fn quantize_block(b: &[f32], out: &mut Vec<u8>) {
    let min = b.iter().copied().fold(f32::INFINITY, f32::min);
    let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
    for j in 0..16 {
        let q0 = (((b[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        let q1 = (((b[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        out.push(q0 | (q1 << 4));
    }
}

/// d = (max - min) / 15, m = min, q = round((x - min) / d) in 0..=15: half a step, plus the
/// f16 roundings of d (times q <= 15) and of m, plus 4 * 2^-24 * amax for the f32 rounding of
/// x * (1 / d).
fn error_bound(_x: f32, block: &[f32]) -> f64 {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    let min = block.iter().copied().fold(f32::INFINITY, f32::min);
    let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let (dh, mh) = (f16::from_f32(d).to_f32() as f64, f16::from_f32(min).to_f32() as f64);
    d as f64 / 2.0 + 15.0 * (d as f64 - dh).abs() + (min as f64 - mh).abs() + 2.0 * f32::EPSILON as f64 * amax
}
