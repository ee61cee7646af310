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
        QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
            let bb = format.block_bytes();
            for (block, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK_SIZE)) {
                let d = f16_at(block, 0);
                let (m, qs) = if format == QuantFormat::Q4_1 {
                    (f16_at(block, 2), &block[4..20])
                } else {
                    (-8.0 * d, &block[2..18])
                };
                for j in 0..16 {
                    o[j] = (qs[j] & 0x0f) as f32 * d + m;
                    o[j + 16] = (qs[j] >> 4) as f32 * d + m;
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

    #[test]
    fn quantize_then_dequantize_is_close() {
        let values: Vec<f32> = (0..64).map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.1).collect();
        for format in QuantFormat::ALL {
            let bytes = quantize_row(format, &values);
            assert_eq!(Some(bytes.len()), format.row_bytes(values.len()));
            let mut back = vec![0.0; values.len()];
            dequantize_row(format, &bytes, &mut back);
            let tol = match format {
                QuantFormat::F32 => 0.0,
                QuantFormat::F16 => 1e-3,
                QuantFormat::Q8_0 => 0.02,
                // Q4_0 maps the largest magnitude to -8, so +max clamps to 7 steps: error up to one step.
                QuantFormat::Q4_0 | QuantFormat::Q4_1 => 0.2,
            };
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{format:?}: {a} vs {b}");
            }
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
}
