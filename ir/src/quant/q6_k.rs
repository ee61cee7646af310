//! Q6_K: 210-byte super-blocks of 256 values (ggml `block_q6_K`): 128 bytes of low nibbles
//! `ql`, 64 bytes of high 2-bit pairs `qh`, sixteen signed 8-bit scales, f16 `d`;
//! `x = (d * sc) * (q - 32)` per 16-value sub-block. In each half of 128 values (`r` in
//! 0..128), value `r` takes its low nibble from `ql[r % 64]` (low for `r < 64`, high
//! otherwise) and its high bits from `qh[r % 32]`, bit pair `r / 32`. The kernels read it as
//! it is (kernel form K16: the super-block scale, the sixteen 8-bit scales and the 6-bit
//! values), at its own 6.5625 bits per weight.

use half::f16;

use super::k_common::{make_qx_quants, nearest_int, GROUP_MAX_EPS, QK_K};
use super::{f16_at, FormatSpec, K16Block, KKind, KernelForm};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q6_k",
    ggml_type: 14,
    block_values: QK_K,
    block_bytes: 210,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::K16(KKind::Q6, |b, out| {
        let (_, q) = parts(b);
        out.push(K16Block {
            d: f16_at(b, 208),
            dmin: 0.0,
            sc: std::array::from_fn(|s| b[192 + s] as i8),
            m: [0; 16],
            q: q.map(|q| (q + 32) as u8),
        });
    }),
    error_bound: None,
};

/// Per 16-value sub-block the scale `d * sc` (an f32 product, as ggml computes it), and the
/// 256 values `q - 32` in -32..32.
fn parts(block: &[u8]) -> ([f32; 16], [i8; QK_K]) {
    let d = f16_at(block, 208);
    let dl = std::array::from_fn(|s| d * block[192 + s] as i8 as f32);
    let q = std::array::from_fn(|i| {
        let (half, r) = (i / 128, i % 128);
        let low = (block[half * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
        let high = (block[128 + half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        (low | high << 4) as i8 - 32
    });
    (dl, q)
}

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (dl, q) = parts(block);
    for (i, o) in o.iter_mut().enumerate() {
        *o = dl[i / 16] * q[i] as f32;
    }
}

/// ggml's `quantize_row_q6_K_ref`: per sub-block a signed scale from `make_qx_quants`, the
/// scales quantized to 8 bits against the one of largest magnitude (which maps to -128),
/// then every value re-rounded against its quantized scale.
fn quantize_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for s in 0..16 {
        scales[s] = make_qx_quants(&x[16 * s..16 * s + 16], 32, &mut l[16 * s..16 * s + 16]);
        if scales[s].abs() > max_abs_scale {
            max_abs_scale = scales[s].abs();
            max_scale = scales[s];
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend_from_slice(&[0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let sc: [i8; 16] = scales.map(|s| nearest_int(iscale * s).min(127) as i8);
    for s in 0..16 {
        let dl = d.to_f32() * sc[s] as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 16 * s..16 * s + 16 {
            l[i] = (nearest_int(x[i] / dl).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            let v = |k: usize| l[j + i + 32 * k];
            ql[j / 2 + i] = (v(0) & 0x0f) | (v(2) & 0x0f) << 4;
            ql[j / 2 + i + 32] = (v(1) & 0x0f) | (v(3) & 0x0f) << 4;
            qh[j / 4 + i] = (v(0) >> 4) | (v(1) >> 4) << 2 | (v(2) >> 4) << 4 | (v(3) >> 4) << 6;
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.map(|s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}
