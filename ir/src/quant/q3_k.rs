//! Q3_K: 110-byte super-blocks of 256 values (ggml `block_q3_K`): 32 bytes of high bits
//! (`hmask`: bit `i / 32` of byte `i % 32` for value `i`), 64 bytes of low 2-bit values (see
//! `k_common::pack_2bit`), 12 bytes of sixteen 6-bit scales (low nibbles in bytes 0-7, value
//! `s` in the low nibble for `s < 8` and the high one for `s >= 8`; high 2 bits in bytes 8-11,
//! `s % 4` selects the byte and `s / 4` the bit pair), f16 `d`;
//! `x = (d * (sc - 32)) * q` with `q = low - (high ? 0 : 4)` in -4..=3. The kernels read it as
//! it is (kernel form K16), at its own 3.4375 bits per weight.

use half::f16;

use super::k_common::{make_q3_quants, nearest_int, pack_2bit, unpack_2bit, QK_K};
use super::{f16_at, FormatSpec, K16Block, KKind, KernelForm};

pub(super) const SPEC: FormatSpec = FormatSpec {
    name: "q3_k",
    ggml_type: 11,
    block_values: QK_K,
    block_bytes: 110,
    dequantize_block,
    quantize_block,
    kernel: KernelForm::K16(KKind::Q3, |b, out| {
        let (_, q) = parts(b);
        let sc = unpack_scales(&b[96..108]);
        out.push(K16Block {
            d: f16_at(b, 108),
            dmin: 0.0,
            sc: sc.map(|s| (s as i32 - 32) as i8),
            m: [0; 16],
            q: q.map(|q| (q + 4) as u8),
        });
    }),
    error_bound: None,
};

/// The sixteen 6-bit scales (0..64) of the 12 scale bytes.
fn unpack_scales(q: &[u8]) -> [u8; 16] {
    std::array::from_fn(|s| {
        let low = if s < 8 { q[s] & 0x0f } else { q[s - 8] >> 4 };
        low | ((q[8 + s % 4] >> (2 * (s / 4))) & 3) << 4
    })
}

/// The inverse of [`unpack_scales`].
fn pack_scales(ls: &[u8; 16]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for (s, &l) in ls.iter().enumerate() {
        if s < 8 {
            q[s] = l & 0x0f;
        } else {
            q[s - 8] |= (l & 0x0f) << 4;
        }
        q[8 + s % 4] |= (l >> 4) << (2 * (s / 4));
    }
    q
}

/// Per 16-value sub-block the scale `d * (sc - 32)` (an f32 product, as ggml computes it),
/// and the 256 values in -4..=3.
fn parts(block: &[u8]) -> ([f32; 16], [i8; QK_K]) {
    let d = f16_at(block, 108);
    let sc = unpack_scales(&block[96..108]);
    let dl = std::array::from_fn(|s| d * (sc[s] as i32 - 32) as f32);
    let low = unpack_2bit(&block[32..96]);
    let q = std::array::from_fn(|i| {
        let high = (block[i % 32] >> (i / 32)) & 1;
        low[i] as i8 - if high == 1 { 0 } else { 4 }
    });
    (dl, q)
}

fn dequantize_block(block: &[u8], o: &mut [f32]) {
    let (dl, q) = parts(block);
    for (i, o) in o.iter_mut().enumerate() {
        *o = dl[i / 16] * q[i] as f32;
    }
}

/// ggml's `quantize_row_q3_K_ref`: per sub-block a signed scale from `make_q3_quants`, the
/// scales quantized to 6 bits against the one of largest magnitude (which maps to -32), then
/// every value re-rounded against its quantized scale.
fn quantize_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    for s in 0..16 {
        scales[s] = make_q3_quants(&x[16 * s..16 * s + 16], 4, &mut l[16 * s..16 * s + 16]);
        if scales[s].abs() > amax {
            amax = scales[s].abs();
            max_scale = scales[s];
        }
    }
    let mut ls = [0u8; 16];
    let mut d = f16::ZERO;
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (b, &s) in ls.iter_mut().zip(&scales) {
            *b = ((nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
        }
        d = f16::from_f32(1.0 / iscale);
    }
    for s in 0..16 {
        let dl = d.to_f32() * (ls[s] as i32 - 32) as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 16 * s..16 * s + 16 {
            l[i] = (nearest_int(x[i] / dl).clamp(-4, 3) + 4) as i8;
        }
    }
    let mut hmask = [0u8; 32];
    let mut low = [0u8; QK_K];
    for i in 0..QK_K {
        let mut v = l[i] as u8;
        if v > 3 {
            hmask[i % 32] |= 1 << (i / 32);
            v -= 4;
        }
        low[i] = v;
    }
    out.extend_from_slice(&hmask);
    out.extend_from_slice(&pack_2bit(&low));
    out.extend_from_slice(&pack_scales(&ls));
    out.extend_from_slice(&d.to_le_bytes());
}
