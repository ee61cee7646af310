//! Q4_K: 144-byte super-blocks of 256 values (ggml `block_q4_K`): f16 `d`, f16 `dmin`, 12
//! bytes of eight 6-bit scales and minimums (see `k_common::scale_min_k4`), 128 bytes of
//! nibbles (in each 64 values, byte `l` holds value `l` low and `l + 32` high);
//! `x = (d * sc) * q - (dmin * m)` per 32-value sub-block. The kernels read it as it is
//! (kernel form K32), at its own 4.5 bits per weight.

use half::f16;

use super::k_common::{make_qkx2_quants, nearest_int, pack_scale_min_k4, scale_min_k4, Qkx2Search, QK_K};
use super::{f16_at, FormatSpec, K32Block, KernelForm};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q4_k",
    ggml_type: 12,
    block_values: QK_K,
    block_bytes: 144,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::K32(false, |b, out| {
        out.push(k32_header(
            b,
            std::array::from_fn(|s| std::array::from_fn(|j| nibble(b, s, j) | nibble(b, s, j + 16) << 4)),
            [0; 8],
        ))
    }),
    error_bound: None,
};

/// The [`K32Block`] of a Q4_K or Q5_K super-block (their headers are the same) with values
/// `qs` and fifth bits `qh`.
pub(super) fn k32_header(block: &[u8], qs: [[u8; 16]; 8], qh: [u32; 8]) -> K32Block {
    let sm: [(u8, u8); 8] = std::array::from_fn(|s| scale_min_k4(s, &block[4..16]));
    K32Block { d: f16_at(block, 0), dmin: f16_at(block, 2), sc: sm.map(|p| p.0), m: sm.map(|p| p.1), qs, qh }
}

/// Per 32-value sub-block the scale `d * sc` and the minimum `dmin * m`, f32 products as
/// ggml computes them. Shared with Q5_K, whose header is the same.
pub(super) fn sub_block_scales(block: &[u8]) -> ([f32; 8], [f32; 8]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let sm: [(u8, u8); 8] = std::array::from_fn(|s| scale_min_k4(s, &block[4..16]));
    (sm.map(|(sc, _)| d * sc as f32), sm.map(|(_, m)| dmin * m as f32))
}

/// Value `j` of sub-block `s`.
fn nibble(block: &[u8], s: usize, j: usize) -> u8 {
    (block[16 + s / 2 * 32 + j] >> (4 * (s % 2))) & 0x0f
}

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (dl, ml) = sub_block_scales(block);
    for (i, o) in o.iter_mut().enumerate() {
        let s = i / 32;
        *o = dl[s] * nibble(block, s, i % 32) as f32 - ml[s];
    }
}

/// The first half of ggml's `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: per 32-value
/// sub-block a scale and minimum from `make_qkx2_quants` (weights `rms + |x|`), quantized to
/// 6 bits against the largest of each. Returns the header (d, dmin, 12 scale bytes) and each
/// value re-rounded to `0..=nmax` against its quantized scale and minimum.
pub(super) fn quantize_header(x: &[f32], nmax: i32, search: &Qkx2Search) -> ([u8; 16], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    for s in 0..8 {
        let xs = &x[32 * s..32 * s + 32];
        let sum_x2 = xs.iter().fold(0.0f32, |acc, v| acc + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
        (scales[s], mins[s]) = make_qkx2_quants(xs, &weights, nmax, &mut l[32 * s..32 * s + 32], search);
    }
    let max_scale = scales.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let max_min = mins.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls = scales.map(|s| (nearest_int(inv_scale * s) as u8).min(63));
    let lm = mins.map(|m| (nearest_int(inv_min * m) as u8).min(63));
    let mut header = [0u8; 16];
    let (d, dmin) = (f16::from_f32(max_scale / 63.0), f16::from_f32(max_min / 63.0));
    header[0..2].copy_from_slice(&d.to_le_bytes());
    header[2..4].copy_from_slice(&dmin.to_le_bytes());
    header[4..16].copy_from_slice(&pack_scale_min_k4(&ls, &lm));
    for s in 0..8 {
        let (sc, m) = scale_min_k4(s, &header[4..16]);
        let dl = d.to_f32() * sc as f32;
        if dl == 0.0 {
            continue;
        }
        let ml = dmin.to_f32() * m as f32;
        for i in 32 * s..32 * s + 32 {
            l[i] = nearest_int((x[i] + ml) / dl).clamp(0, nmax) as u8;
        }
    }
    (header, l)
}

/// ggml's `quantize_row_q4_K_ref` (see [`quantize_header`]).
fn quantize_block(x: &[f32], out: &mut Vec<u8>) {
    let search = Qkx2Search { rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false };
    let (header, l) = quantize_header(x, 15, &search);
    out.extend_from_slice(&header);
    for j in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|i| l[j + i] | l[j + i + 32] << 4));
    }
}
