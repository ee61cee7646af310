//! BF16: bfloat16, the upper 16 bits of an IEEE float32 (8-bit exponent, 7-bit mantissa). The
//! quantizer rounds to nearest even and keeps NaNs NaN (quiet), as ggml's
//! `ggml_compute_fp32_to_bf16` and gguf-py's `BF16.quantize_blocks` do.

use super::{FormatSpec, KernelForm};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "bf16",
    ggml_type: 30,
    block_values: 1,
    block_bytes: 2,
    dequantize_block: |b, out| out[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
    quantize_block,
    kernel: KernelForm::BF16,
    // Half an ulp: 2^-8 relative (7 stored mantissa bits), half the smallest subnormal
    // (2^-134) below 2^-126.
    error_bound: Some(|x, _| (x.abs() as f64 * 2f64.powi(-8)).max(2f64.powi(-134))),
};

fn quantize_block(v: &[f32], out: &mut Vec<u8>) {
    let bits = v[0].to_bits();
    let half = if bits & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: truncate and force the quiet bit.
        (bits >> 16) | 0x40
    } else {
        ((bits as u64 + 0x7fff + ((bits >> 16) & 1) as u64) >> 16) as u32
    };
    out.extend_from_slice(&(half as u16).to_le_bytes());
}
