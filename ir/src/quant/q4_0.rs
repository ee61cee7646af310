//! Q4_0: 18-byte blocks of 32 values: f16 scale `d`, 16 bytes of nibbles; `x = d * (q - 8)`.
//! The kernels read it as a Q4 block with `m = -8 d`.

use half::f16;

use super::{f16_at, FormatSpec, KernelForm, Q4Block, BLOCK_SIZE};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q4_0",
    ggml_type: 2,
    block_values: BLOCK_SIZE,
    block_bytes: 18,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::Q4(|b, out| {
        let d = f16_at(b, 0);
        out.push(Q4Block { d, m: -8.0 * d, qs: b[2..18].try_into().unwrap(), qh: 0 })
    }),
    error_bound: Some(error_bound),
};

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let d = f16_at(block, 0);
    // `(q - 8) * d` as ggml computes it. `q * d - 8 * d` has the same value for a finite `d`
    // (both products are exact in f32) but not the same bits: it gives +0 where ggml gives -0
    // (q = 8, d < 0), and NaN where ggml gives +-inf.
    for (j, &q) in block[2..18].iter().enumerate() {
        o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn quantize_block(b: &[f32], out: &mut Vec<u8>) {
    // The value of largest magnitude maps to -8, as in ggml's quantize_row_q4_0_ref.
    let max = b.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    for j in 0..16 {
        let q0 = ((b[j] * id + 8.5) as i32).clamp(0, 15) as u8;
        let q1 = ((b[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
        out.push(q0 | (q1 << 4));
    }
}

/// d = max / -8 (max: the value of largest magnitude, sign kept), q - 8 = round(x / d) clamped
/// to -8..=7: half a step, except that x / d > 7.5 (only a value opposite in sign to max)
/// clamps to 7, an error of |x - 7 d| <= |d|; plus the f16 rounding of d times |q - 8| <= 8,
/// plus 4 * 2^-24 * amax for the f32 rounding of x * (1 / d).
fn error_bound(x: f32, block: &[f32]) -> f64 {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    let max = block.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let dh = f16::from_f32(d).to_f32() as f64;
    let x = x as f64;
    let step = if d != 0.0 && x / d as f64 > 7.5 { (x - 7.0 * d as f64).abs() } else { d.abs() as f64 / 2.0 };
    step + 8.0 * (d as f64 - dh).abs() + 2.0 * f32::EPSILON as f64 * amax
}
