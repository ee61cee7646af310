//! q3_g64, kiln's own 3-bit format: 28-byte groups of 64 values: f16 scale `d`, f16 offset
//! `m`, 16 bytes of crumbs (the low two bits), 8 bytes of third bits; `x = d * q + m`, `q` in
//! `0..8`; 3.5 bits per weight (see `g64_common` for the layout and why). Not a ggml type:
//! GGUF files holding it are kiln's (ggml id [`KILN_Q3_G64`]).

use super::g64_common::{crumb, crumbs, error_bound, quantize_group, scale_offset, search, GROUP, HEADER};
use super::{FormatSpec, KernelForm, LowBlock};

/// The ggml type id kiln writes for q3_g64: far above ggml's own ids.
pub const KILN_Q3_G64: u32 = 0x4b00 + 3;

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q3_g64",
    ggml_type: KILN_Q3_G64,
    block_values: GROUP,
    block_bytes: HEADER + 16 + 8,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::Q3(|b, out| {
        let (d, m) = scale_offset(b);
        out.push(LowBlock { d, m, qs: b[4..20].try_into().unwrap(), qh: high_bits(b) })
    }),
    error_bound: Some(|_, group| error_bound(group, 7)),
};

fn high_bits(block: &[u8]) -> u64 {
    u64::from_le_bytes(block[20..28].try_into().unwrap())
}

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (d, m) = scale_offset(block);
    let qh = high_bits(block);
    for (i, o) in o.iter_mut().enumerate() {
        let q = crumb(&block[4..20], i) | (((qh >> i) & 1) as u8) << 2;
        *o = d * q as f32 + m;
    }
}

fn quantize_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = quantize_group(x, 7, &search(3));
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&m.to_le_bytes());
    out.extend_from_slice(&crumbs(&q));
    let qh = q.iter().enumerate().fold(0u64, |h, (i, &q)| h | (((q >> 2) & 1) as u64) << i);
    out.extend_from_slice(&qh.to_le_bytes());
}
