//! Q2_K: 84-byte super-blocks of 256 values (ggml `block_q2_K`): 16 scale bytes (per
//! 16-value sub-block: a 4-bit scale in the low nibble, a 4-bit minimum in the high one), 64
//! bytes of 2-bit values (see `k_common::pack_2bit`), f16 `d`, f16 `dmin`;
//! `x = (d * sc) * q - (dmin * m)`. The kernels read it as it is (kernel form K16), at its
//! own 2.625 bits per weight.

use half::f16;

use super::k_common::{make_qkx2_quants, nearest_int, pack_2bit, unpack_2bit, Qkx2Search, QK_K};
use super::{f16_at, FormatSpec, K16Block, KKind, KernelForm};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q2_k",
    ggml_type: 10,
    block_values: QK_K,
    block_bytes: 84,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::K16(KKind::Q2, |b, out| {
        let (_, _, q) = parts(b);
        out.push(K16Block {
            d: f16_at(b, 80),
            dmin: f16_at(b, 82),
            sc: std::array::from_fn(|s| (b[s] & 0x0f) as i8),
            m: std::array::from_fn(|s| b[s] >> 4),
            q,
        });
    }),
    error_bound: None,
};

/// Per 16-value sub-block the scale `d * sc` and the minimum `dmin * m` (f32 products, as
/// ggml computes them), and the 256 two-bit values.
fn parts(block: &[u8]) -> ([f32; 16], [f32; 16], [u8; QK_K]) {
    let (d, dmin) = (f16_at(block, 80), f16_at(block, 82));
    let dl = std::array::from_fn(|s| d * (block[s] & 0x0f) as f32);
    let ml = std::array::from_fn(|s| dmin * (block[s] >> 4) as f32);
    (dl, ml, unpack_2bit(&block[16..80]))
}

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (dl, ml, q) = parts(block);
    for (i, o) in o.iter_mut().enumerate() {
        *o = dl[i / 16] * q[i] as f32 - ml[i / 16];
    }
}

/// ggml's `quantize_row_q2_K_ref`: per sub-block a scale and minimum from `make_qkx2_quants`
/// (weights |x|, absolute error), both quantized to 4 bits against the largest of each, then
/// every value re-rounded against its quantized scale and minimum.
fn quantize_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 16], [0.0f32; 16]);
    let search = Qkx2Search { rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: true };
    for s in 0..16 {
        let xs = &x[16 * s..16 * s + 16];
        let weights: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
        (scales[s], mins[s]) = make_qkx2_quants(xs, &weights, 3, &mut l[16 * s..16 * s + 16], &search);
    }
    let max_scale = scales.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let max_min = mins.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let mut sc = [0u8; 16];
    let mut d = f16::ZERO;
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        sc.iter_mut().zip(&scales).for_each(|(b, &s)| *b = nearest_int(iscale * s) as u8);
        d = f16::from_f32(max_scale / 15.0);
    }
    let mut dmin = f16::ZERO;
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        sc.iter_mut().zip(&mins).for_each(|(b, &m)| *b |= (nearest_int(iscale * m) << 4) as u8);
        dmin = f16::from_f32(max_min / 15.0);
    }
    for s in 0..16 {
        let dl = d.to_f32() * (sc[s] & 0x0f) as f32;
        if dl == 0.0 {
            continue;
        }
        let ml = dmin.to_f32() * (sc[s] >> 4) as f32;
        for i in 16 * s..16 * s + 16 {
            l[i] = nearest_int((x[i] + ml) / dl).clamp(0, 3) as u8;
        }
    }
    out.extend_from_slice(&sc);
    out.extend_from_slice(&pack_2bit(&l));
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
}
