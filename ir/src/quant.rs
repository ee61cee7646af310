//! Weight storage formats and their scalar reference dequantization.
//!
//! The block layouts follow ggml (`ggml-quants.c`, `ggml-common.h`): every quantized
//! format stores blocks of [`BLOCK_SIZE`] consecutive values of one row.
//! These scalar routines are the reference that every generated kernel is tested against;
//! they favour clarity over speed.

use half::f16;

/// Number of values in one block of a block-quantized format.
pub const BLOCK_SIZE: usize = 32;

/// How a weight tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantFormat {
    /// IEEE float32, 4 bytes per value.
    F32,
    /// IEEE float16, 2 bytes per value.
    F16,
    /// 18-byte blocks: f16 scale `d`, 16 bytes of nibbles; `x = d * (q - 8)`.
    Q4_0,
    /// 20-byte blocks: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `x = d * q + m`.
    Q4_1,
    /// 34-byte blocks: f16 scale `d`, 32 signed bytes; `x = d * q`.
    Q8_0,
}

impl QuantFormat {
    pub const ALL: [QuantFormat; 5] = [Self::F32, Self::F16, Self::Q4_0, Self::Q4_1, Self::Q8_0];

    /// Values per block (1 for the float formats).
    pub fn block_values(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => BLOCK_SIZE,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Bytes needed for a row of `n` values, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        (n % self.block_values() == 0).then(|| n / self.block_values() * self.block_bytes())
    }

    /// The lowercase name used in the textual IR (`q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q8_0 => "q8_0",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes one row stored in `format` into `out` (whose length is the row length).
///
/// Panics if `bytes` does not hold exactly one row of `out.len()` values; callers check
/// shapes first (the GGUF reader and the verifier do).
pub fn dequantize_row(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(Some(bytes.len()), format.row_bytes(out.len()), "row size mismatch");
    match format {
        QuantFormat::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QuantFormat::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QuantFormat::Q4_0 => {
            for (block, o) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(BLOCK_SIZE)) {
                let d = f16_at(block, 0);
                // `(q - 8) * d` as ggml computes it. `q * d - 8 * d` has the same value for a
                // finite `d` (both products are exact in f32) but not the same bits: it gives
                // +0 where ggml gives -0 (q = 8, d < 0), and NaN where ggml gives +-inf.
                for (j, &q) in block[2..18].iter().enumerate() {
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        QuantFormat::Q4_1 => {
            for (block, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(BLOCK_SIZE)) {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                for (j, &q) in block[4..20].iter().enumerate() {
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        QuantFormat::Q8_0 => {
            for (block, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(BLOCK_SIZE)) {
                let d = f16_at(block, 0);
                for j in 0..BLOCK_SIZE {
                    o[j] = block[2 + j] as i8 as f32 * d;
                }
            }
        }
    }
}

/// Dequantizes a whole `[rows, cols]` matrix (row-major) into f32.
pub fn dequantize(format: QuantFormat, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let row_bytes = format.row_bytes(cols).expect("cols must be a whole number of blocks");
    assert_eq!(bytes.len(), rows * row_bytes, "matrix size mismatch");
    let mut out = vec![0.0f32; rows * cols];
    for (r, o) in out.chunks_exact_mut(cols).enumerate() {
        dequantize_row(format, &bytes[r * row_bytes..(r + 1) * row_bytes], o);
    }
    out
}

/// Quantizes one row of f32 values into `format` the way ggml's reference quantizers do.
/// Used to build test weights; `values.len()` must be a whole number of blocks.
pub fn quantize_row(format: QuantFormat, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(format.row_bytes(values.len()).expect("whole blocks"));
    match format {
        QuantFormat::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        QuantFormat::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        QuantFormat::Q4_0 => {
            for b in values.chunks_exact(BLOCK_SIZE) {
                // The value of largest magnitude maps to -8, as in ggml's quantize_row_q4_0_ref.
                let max = b.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let q0 = ((b[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                    let q1 = ((b[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        QuantFormat::Q4_1 => {
            for b in values.chunks_exact(BLOCK_SIZE) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q0 = (((b[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    let q1 = (((b[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        QuantFormat::Q8_0 => {
            for b in values.chunks_exact(BLOCK_SIZE) {
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for v in b {
                    out.push((v * id).round().clamp(-127.0, 127.0) as i8 as u8);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test rows: random blocks at several magnitudes (down to f16-subnormal scales), plus
    /// blocks that are constant, zero, one outlier, dominated by a negative value, or hold
    /// the value opposite to the largest magnitude (which Q4_0 clamps).
    fn test_rows() -> Vec<Vec<f32>> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let mut rows = vec![];
        for scale in [1.0f32, 0.1, 37.0, 1e-3, 1e-6, 3e-8, 2000.0] {
            for _ in 0..8 {
                rows.push((0..64).map(|_| uniform() * scale).collect::<Vec<f32>>());
            }
        }
        let mut special = vec![0.0f32; 32];
        special.extend([0.75f32; 32]);
        special.extend((0..32).map(|i| if i == 5 { 100.0 } else { 0.01 * i as f32 }));
        special.extend((0..32).map(|i| if i == 9 { -3.0 } else { 0.1 * (i as f32 - 16.0) }));
        special.extend((0..32).map(|i| match i {
            0 => -2.0,
            1 => 2.0,
            _ => (i as f32 - 16.0) * 0.11,
        }));
        special.extend((0..32).map(|i| i as f32 * 0.5 - 8.0));
        rows.push(special);
        rows
    }

    fn f16_round(x: f32) -> f64 {
        f16::from_f32(x).to_f32() as f64
    }

    /// The largest error `|x - dequantize(quantize(x))|` each format allows for `x`, whose
    /// block is `block`. `d` is the block's scale as the quantizer computes it in f32 and
    /// `dh` its f16 rounding, which dequantization uses. Each bound adds `4 * 2^-24 * amax`
    /// for the f32 rounding of `x * (1 / d)`.
    fn bound(format: QuantFormat, x: f32, block: &[f32]) -> f64 {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let slack = 4.0 * f32::EPSILON as f64 / 2.0 * amax;
        let x = x as f64;
        match format {
            // F32 is stored as is.
            QuantFormat::F32 => 0.0,
            // F16: round to nearest, half an ulp: 2^-11 relative for normal f16 values, half
            // the smallest subnormal (2^-25) below 2^-14.
            QuantFormat::F16 => (x.abs() * 2f64.powi(-11)).max(2f64.powi(-25)),
            // Q8_0: d = amax / 127, q = round(x / d) in -127..=127: half a step, plus the f16
            // rounding of d times |q| <= 127.
            QuantFormat::Q8_0 => {
                let d = amax as f32 / 127.0;
                let dh = f16_round(d);
                d as f64 / 2.0 + 127.0 * (d as f64 - dh).abs() + slack
            }
            // Q4_0: d = max / -8 (max: the value of largest magnitude, sign kept), q - 8 =
            // round(x / d) clamped to -8..=7: half a step, except that x / d > 7.5 (only a
            // value opposite in sign to max) clamps to 7, an error of |x - 7 d| <= |d|; plus
            // the f16 rounding of d times |q - 8| <= 8.
            QuantFormat::Q4_0 => {
                let max = block.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let dh = f16_round(d);
                let step =
                    if d != 0.0 && x / d as f64 > 7.5 { (x - 7.0 * d as f64).abs() } else { d.abs() as f64 / 2.0 };
                step + 8.0 * (d as f64 - dh).abs() + slack
            }
            // Q4_1: d = (max - min) / 15, m = min, q = round((x - min) / d) in 0..=15: half a
            // step, plus the f16 roundings of d (times q <= 15) and of m.
            QuantFormat::Q4_1 => {
                let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let (dh, mh) = (f16_round(d), f16_round(min));
                d as f64 / 2.0 + 15.0 * (d as f64 - dh).abs() + (min as f64 - mh).abs() + slack
            }
        }
    }

    #[test]
    fn quantize_then_dequantize_is_within_each_formats_bound() {
        for format in QuantFormat::ALL {
            let (mut worst, mut checked) = (0.0f64, 0);
            for values in test_rows() {
                let bytes = quantize_row(format, &values);
                assert_eq!(Some(bytes.len()), format.row_bytes(values.len()));
                let mut back = vec![0.0; values.len()];
                dequantize_row(format, &bytes, &mut back);
                for (b, (vals, outs)) in values.chunks(BLOCK_SIZE).zip(back.chunks(BLOCK_SIZE)).enumerate() {
                    for (&x, &y) in vals.iter().zip(outs) {
                        let err = (x as f64 - y as f64).abs();
                        let tol = bound(format, x, vals);
                        assert!(
                            err <= tol,
                            "{format:?} block {b}: {x} came back as {y}: error {err:e} > bound {tol:e}"
                        );
                        if tol > 0.0 {
                            worst = worst.max(err / tol);
                        }
                        checked += 1;
                    }
                }
            }
            // The bounds are not vacuous: some value comes close to its bound.
            assert!(format == QuantFormat::F32 || worst > 0.5, "{format:?}: largest error only {worst} of the bound");
            assert!(checked > 3000);
        }
    }

    #[test]
    fn nibble_order_matches_ggml() {
        // Byte j holds element j in its low nibble and element j + 16 in its high nibble.
        let mut block = vec![0u8; 20];
        block[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(0.0).to_le_bytes());
        block[4] = 0x3a;
        let mut out = [0.0f32; 32];
        dequantize_row(QuantFormat::Q4_1, &block, &mut out);
        assert_eq!(out[0], 10.0);
        assert_eq!(out[16], 3.0);
    }

    #[test]
    fn q4_0_dequantizes_as_ggml_does_at_the_edges() {
        // ggml computes (q - 8) * d: +-inf except q = 8 (0 * inf = NaN). q * d - 8 * d would be
        // NaN everywhere.
        let mut block = vec![0u8; 18];
        block[0..2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        block[2] = 0x09; // element 0: q = 9, element 16: q = 0
        block[3] = 0x88; // elements 1 and 17: q = 8
        let mut out = [0.0f32; 32];
        dequantize_row(QuantFormat::Q4_0, &block, &mut out);
        assert_eq!((out[0], out[16]), (f32::INFINITY, f32::NEG_INFINITY));
        assert!(out[1].is_nan() && out[17].is_nan());
        // With a negative scale, q = 8 is -0 (0 * d), not +0 (8 d - 8 d).
        block[0..2].copy_from_slice(&f16::from_f32(-0.5).to_le_bytes());
        dequantize_row(QuantFormat::Q4_0, &block, &mut out);
        assert_eq!((out[0], out[16]), (-0.5, 4.0));
        assert_eq!((out[1].to_bits(), out[17].to_bits()), ((-0.0f32).to_bits(), (-0.0f32).to_bits()));
    }
}
