//! What kiln's own low-bit formats (`q2_g64`, `q3_g64`) share. They exist for rows that the
//! K-quants' 256-value super-blocks do not divide (SmolLM2's width 576): groups of 64 values,
//! each with an f16 scale `d` and an f16 offset `m`, `x = d * q + m`; the low two bits of every
//! value in a 16-byte plane of crumbs (byte `j` holds values `j`, `j + 16`, `j + 32`, `j + 48`
//! in bits 0-1, 2-3, 4-5, 6-7), and for three bits a 64-bit plane of third bits (bit `i` of
//! the little-endian word is value `i`'s). Per group: 2 + 2 + 16 (+ 8) bytes, 2.5 (3.5) bits
//! per weight.
//!
//! The quantizer is ggml's `make_qkx2_quants` search (weights `rms + |x|`, as Q4_K's) for a
//! scale and a non-positive minimum, then every value re-rounded against the f16 scale and
//! offset actually stored, so that rounding the scale to f16 costs no more than it must.
//!
//! Why this design (measured by `tests` in this file on Gaussian rows, RMS error in units of
//! the rows' standard deviation): at 3 bits, 64-value groups with a fitted offset give 0.169,
//! ggml's Q3_K (16-value sub-blocks with 6-bit scales, 3.44 bits) 0.151 but needs rows of 256;
//! at 2 bits 0.333 against Q2_K's 0.298 (2.63 bits). Groups of 32 would cost a whole bit per
//! weight more in f16 scale and offset.

use half::f16;

use super::f16_at;
use super::k_common::{make_qkx2_quants, nearest_int, Qkx2Search};

/// Values per group.
pub(super) const GROUP: usize = 64;

/// Bytes of a group's f16 scale and offset.
pub(super) const HEADER: usize = 4;

/// The group's `d` and `m`.
pub(super) fn scale_offset(block: &[u8]) -> (f32, f32) {
    (f16_at(block, 0), f16_at(block, 2))
}

/// The low two bits of value `i` from the 16-byte crumb plane.
pub(super) fn crumb(plane: &[u8], i: usize) -> u8 {
    (plane[i % 16] >> (2 * (i / 16))) & 3
}

/// The crumb plane of 64 values (their low two bits).
pub(super) fn crumbs(q: &[u8; GROUP]) -> [u8; 16] {
    std::array::from_fn(|j| (0..4).fold(0u8, |acc, k| acc | (q[j + 16 * k] & 3) << (2 * k)))
}

/// Quantizes one group to `q` in `0..=nmax` with the stored `d` and `m`.
pub(super) fn quantize_group(x: &[f32], nmax: i32, search: &Qkx2Search) -> (f16, f16, [u8; GROUP]) {
    assert_eq!(x.len(), GROUP);
    let sum_x2 = x.iter().fold(0.0f32, |acc, v| acc + v * v);
    let av_x = (sum_x2 / GROUP as f32).sqrt();
    let weights: Vec<f32> = x.iter().map(|v| av_x + v.abs()).collect();
    let mut l = [0u8; GROUP];
    let (scale, min) = make_qkx2_quants(x, &weights, nmax, &mut l, search);
    let (d, m) = (f16::from_f32(scale), f16::from_f32(-min));
    let (dl, ml) = (d.to_f32(), m.to_f32());
    if dl > 0.0 {
        for (l, &v) in l.iter_mut().zip(x) {
            *l = nearest_int((v - ml) / dl).clamp(0, nmax) as u8;
        }
    } else {
        l = [0; GROUP];
    }
    (d, m, l)
}

/// The search of [`quantize_group`] for `bits` (ggml's choices: Q4_K's for three bits, Q2_K's
/// absolute-error search for two).
pub(super) fn search(bits: u32) -> Qkx2Search {
    match bits {
        2 => Qkx2Search { rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: true },
        _ => Qkx2Search { rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false },
    }
}

/// The error bound of a group quantized to `nmax`: one step of the plain min-max grid over the
/// range (which includes 0), since the fitted scale may clip the extremes by up to that, plus
/// the f16 roundings of a scale near that step (times `nmax`) and of the offset.
pub(super) fn error_bound(group: &[f32], nmax: i32) -> f64 {
    let min = group.iter().copied().fold(0.0f32, f32::min) as f64;
    let max = group.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let step = (max - min) / nmax as f64;
    let f16_err = |v: f64| (f16::from_f64(v).to_f64() - v).abs();
    step + 2.0 * nmax as f64 * f16_err(step) + 2.0 * f16_err(min) + 2.0 * 2f64.powi(-24) * nmax as f64
}

#[cfg(test)]
mod tests {
    use super::super::{dequantize_row, quantize_row, QuantFormat};

    /// RMS error over Gaussian rows of 4096 values (unit variance), for the doc's figures.
    fn rms_error(format: QuantFormat) -> f64 {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniform = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (mut sum, mut n) = (0.0, 0);
        for _ in 0..16 {
            let row: Vec<f32> = (0..4096)
                .map(|_| ((-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos()) as f32)
                .collect();
            let bytes = quantize_row(format, &row);
            let mut back = vec![0.0; row.len()];
            dequantize_row(format, &bytes, &mut back);
            sum += row.iter().zip(&back).map(|(a, b)| (a - b) as f64 * (a - b) as f64).sum::<f64>();
            n += row.len();
        }
        (sum / n as f64).sqrt()
    }

    #[test]
    fn low_bit_groups_lose_about_what_the_k_quants_lose() {
        let (q3, q3k) = (rms_error(QuantFormat::Q3_G64), rms_error(QuantFormat::Q3_K));
        let (q2, q2k) = (rms_error(QuantFormat::Q2_G64), rms_error(QuantFormat::Q2_K));
        eprintln!("RMS error: q3_g64 {q3:.3}, q3_k {q3k:.3}, q2_g64 {q2:.3}, q2_k {q2k:.3}");
        // Within 25 % of the K-quant of the same bits, and far from the next bit down.
        assert!(q3 < 1.25 * q3k && q2 < 1.25 * q2k, "q3 {q3} vs {q3k}, q2 {q2} vs {q2k}");
        assert!(q3 < 0.75 * q2, "three bits beat two: {q3} vs {q2}");
    }
}
