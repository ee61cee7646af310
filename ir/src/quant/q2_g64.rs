//! q2_g64, kiln's own 2-bit format: 20-byte groups of 64 values: f16 scale `d`, f16 offset
//! `m`, 16 bytes of crumbs; `x = d * q + m`, `q` in `0..4`; 2.5 bits per weight (see
//! `g64_common` for the layout and why). Not a ggml type: GGUF files holding it are kiln's
//! (ggml id [`KILN_Q2_G64`]).

use super::g64_common::{crumb, crumbs, error_bound, quantize_group, scale_offset, search, GROUP, HEADER};
use super::{FormatSpec, KernelForm, LowBlock};

/// The ggml type id kiln writes for q2_g64: far above ggml's own ids.
pub const KILN_Q2_G64: u32 = 0x4b00 + 2;

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q2_g64",
    ggml_type: KILN_Q2_G64,
    block_values: GROUP,
    block_bytes: HEADER + 16,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::Q2(|b, out| {
        let (d, m) = scale_offset(b);
        out.push(LowBlock { d, m, qs: b[4..20].try_into().unwrap(), qh: 0 })
    }),
    error_bound: Some(|_, group| error_bound(group, 3)),
};

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (d, m) = scale_offset(block);
    for (i, o) in o.iter_mut().enumerate() {
        *o = d * crumb(&block[4..20], i) as f32 + m;
    }
}

fn quantize_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = quantize_group(x, 3, &search(2));
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&m.to_le_bytes());
    out.extend_from_slice(&crumbs(&q));
}
