//! Q8_0: 34-byte blocks of 32 values: f16 scale `d`, 32 signed bytes; `x = d * q`.

use half::f16;

use super::{f16_at, FormatSpec, KernelForm, Q8Block, BLOCK_SIZE};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q8_0",
    ggml_type: 8,
    block_values: BLOCK_SIZE,
    block_bytes: 34,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::Q8(|b, out| out.push(Q8Block { d: f16_at(b, 0), qs: std::array::from_fn(|j| b[2 + j] as i8) })),
    error_bound: Some(error_bound),
};

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let d = f16_at(block, 0);
    for j in 0..BLOCK_SIZE {
        o[j] = block[2 + j] as i8 as f32 * d;
    }
}

fn quantize_block(b: &[f32], out: &mut Vec<u8>) {
    let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    for v in b {
        out.push((v * id).round().clamp(-127.0, 127.0) as i8 as u8);
    }
}

/// d = amax / 127, q = round(x / d) in -127..=127: half a step, plus the f16 rounding of d
/// times |q| <= 127, plus 4 * 2^-24 * amax for the f32 rounding of x * (1 / d).
fn error_bound(_x: f32, block: &[f32]) -> f64 {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let dh = f16::from_f32(d).to_f32() as f64;
    d as f64 / 2.0 + 127.0 * (d as f64 - dh).abs() + 2.0 * f32::EPSILON as f64 * amax as f64
}
