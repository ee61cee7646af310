//! Q5_0: 22-byte blocks of 32 values: f16 scale `d`, 32 high bits `qh` (little-endian u32,
//! bit j for value j), 16 bytes of low nibbles (byte j: value j low, value j + 16 high);
//! `x = d * (q - 16)`. The kernels read it as a Q4 block with its fifth bits (kernel form Q5),
//! `m = -16 d`.

use half::f16;

use super::{f16_at, FormatSpec, KernelForm, Q4Block, BLOCK_SIZE};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q5_0",
    ggml_type: 6,
    block_values: BLOCK_SIZE,
    block_bytes: 22,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::Q5(|b, out| {
        let d = f16_at(b, 0);
        out.push(Q4Block::from_quants(d, -16.0 * d, &quants(b)))
    }),
    error_bound: Some(error_bound),
};

/// The 5-bit values `q` (0..32) of a Q5_0 or Q5_1 block whose `qh` starts at byte `at`.
pub(super) fn quants_at(block: &[u8], at: usize) -> [u8; 32] {
    let qh = u32::from_le_bytes(block[at..at + 4].try_into().unwrap());
    let qs = &block[at + 4..at + 20];
    std::array::from_fn(|j| {
        let low = if j < 16 { qs[j] & 0x0f } else { qs[j - 16] >> 4 };
        low | (((qh >> j) & 1) as u8) << 4
    })
}

fn quants(block: &[u8]) -> [u8; 32] {
    quants_at(block, 2)
}

/// Appends `qh` and the nibbles of 32 five-bit values.
pub(super) fn push_quants(q: &[u8; 32], out: &mut Vec<u8>) {
    let qh = q.iter().enumerate().fold(0u32, |h, (j, &q)| h | (((q >> 4) & 1) as u32) << j);
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0f) | (q[j + 16] << 4)));
}

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let d = f16_at(block, 0);
    // `(q - 16) * d` as ggml computes it (see Q4_0 for why not `q * d - 16 * d`).
    for (o, q) in o.iter_mut().zip(quants(block)) {
        *o = (q as i32 - 16) as f32 * d;
    }
}

fn quantize_block(b: &[f32], out: &mut Vec<u8>) {
    // The value of largest magnitude maps to -16, as in ggml's quantize_row_q5_0_ref.
    let max = b.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let q: [u8; 32] = std::array::from_fn(|j| ((b[j] * id + 16.5) as i32).clamp(0, 31) as u8);
    push_quants(&q, out);
}

/// d = max / -16 (max: the value of largest magnitude, sign kept), q - 16 = round(x / d)
/// clamped to -16..=15: half a step, except that x / d > 15.5 (only a value opposite in sign
/// to max) clamps to 15, an error of |x - 15 d| <= |d|; plus the f16 rounding of d times
/// |q - 16| <= 16, plus 4 * 2^-24 * amax for the f32 rounding of x * (1 / d).
fn error_bound(x: f32, block: &[f32]) -> f64 {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    let max = block.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = max / -16.0;
    let dh = f16::from_f32(d).to_f32() as f64;
    let x = x as f64;
    let step = if d != 0.0 && x / d as f64 > 15.5 { (x - 15.0 * d as f64).abs() } else { d.abs() as f64 / 2.0 };
    step + 16.0 * (d as f64 - dh).abs() + 2.0 * f32::EPSILON as f64 * amax
}
