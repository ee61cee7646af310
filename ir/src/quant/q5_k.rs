//! Q5_K: 176-byte super-blocks of 256 values (ggml `block_q5_K`): Q4_K's header (f16 `d`,
//! f16 `dmin`, 12 bytes of 6-bit scales and minimums), 32 bytes of high bits (bit `s` of byte
//! `l` for value `l` of sub-block `s`), 128 bytes of low nibbles as Q4_K;
//! `x = (d * sc) * q - (dmin * m)` with `q` in 0..32. The kernels read it as it is (kernel
//! form K32 with fifth bits), at its own 5.5 bits per weight.

use super::k_common::{Qkx2Search, QK_K};
use super::q4_k::{k32_header, quantize_header, sub_block_scales};
use super::{FormatSpec, KernelForm, Q4Block};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q5_k",
    ggml_type: 13,
    block_values: QK_K,
    block_bytes: 176,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::K32(true, |b, out| {
        let blocks: [Q4Block; 8] =
            std::array::from_fn(|s| Q4Block::from_quants(0.0, 0.0, &std::array::from_fn(|j| quant(b, s, j))));
        out.push(k32_header(b, blocks.map(|q| q.qs), blocks.map(|q| q.qh)))
    }),
    error_bound: None,
};

/// Value `j` of sub-block `s` (0..32).
fn quant(block: &[u8], s: usize, j: usize) -> u8 {
    let low = (block[48 + s / 2 * 32 + j] >> (4 * (s % 2))) & 0x0f;
    low | ((block[16 + j] >> s) & 1) << 4
}

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (dl, ml) = sub_block_scales(block);
    for (i, o) in o.iter_mut().enumerate() {
        let s = i / 32;
        *o = dl[s] * quant(block, s, i % 32) as f32 - ml[s];
    }
}

/// ggml's `quantize_row_q5_K_ref` (Q4_K's search with 31 levels and its own grid).
fn quantize_block(x: &[f32], out: &mut Vec<u8>) {
    let search = Qkx2Search { rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: false };
    let (header, l) = quantize_header(x, 31, &search);
    out.extend_from_slice(&header);
    let qh: [u8; 32] = std::array::from_fn(|j| (0..8).fold(0u8, |h, s| h | ((l[32 * s + j] >> 4) & 1) << s));
    out.extend_from_slice(&qh);
    for j in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|i| (l[j + i] & 0x0f) | (l[j + i + 32] & 0x0f) << 4));
    }
}
