//! F32: IEEE float32, stored as is.

use super::{FormatSpec, KernelForm};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "f32",
    ggml_type: 0,
    block_values: 1,
    block_bytes: 4,
    dequantize_block: |b, out| out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    quantize_block: |v, out| out.extend_from_slice(&v[0].to_le_bytes()),
    kernel: KernelForm::F32,
    error_bound: Some(|_, _| 0.0),
};
