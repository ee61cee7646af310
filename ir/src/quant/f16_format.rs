//! F16: IEEE float16, round to nearest even.

use half::f16;

use super::{FormatSpec, KernelForm};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "f16",
    ggml_type: 1,
    block_values: 1,
    block_bytes: 2,
    dequantize_block: |b, out| out[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
    quantize_block: |v, out| out.extend_from_slice(&f16::from_f32(v[0]).to_le_bytes()),
    kernel: KernelForm::F16,
    // Half an ulp: 2^-11 relative for normal f16 values, half the smallest subnormal (2^-25)
    // below 2^-14.
    error_bound: Some(|x, _| (x.abs() as f64 * 2f64.powi(-11)).max(2f64.powi(-25))),
};
