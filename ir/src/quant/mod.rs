//! Weight storage formats: one file per format says everything about it (block geometry, ggml
//! type id, scalar dequantization, quantization, the kernel form its blocks take in the
//! compiled library, and the round-trip error bound of its quantizer); this module is the one
//! table ([`QuantFormat::spec`]) and the generic row functions built on it.
//!
//! The block layouts follow ggml (`ggml-common.h`); the scalar routines are the reference that
//! every generated kernel is tested against, and they are checked bit for bit against gguf-py's
//! (`tests/it/dequant.rs`). They favour clarity over speed.
//!
//! Adding a format: a file here with its `SPEC`, a variant and a line in `spec`; if its blocks
//! fit an existing [`KernelForm`] no kernel changes, otherwise a new form and its kernels in
//! `compiler/src/codegen`.

use half::f16;

mod bf16;
mod f16_format;
mod f32_format;
mod g64_common;
mod k_common;
mod q2_g64;
pub use q2_g64::KILN_Q2_G64;
pub use q3_g64::KILN_Q3_G64;
mod q2_k;
mod q3_g64;
mod q3_k;
mod q4_0;
mod q4_1;
mod q4_k;
mod q5_0;
mod q5_1;
mod q5_k;
mod q6_k;
mod q8_0;

/// Values in one block of the kernels' blocked forms ([`Q4Block`], [`Q8Block`]) and of the
/// q16 activations they multiply; formats with larger blocks split them into these.
pub const BLOCK_SIZE: usize = 32;

/// How a weight tensor is stored. Variants carry ggml's type names (`Q4_K`).
#[allow(non_camel_case_types)]
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
    /// bfloat16 (the upper half of an f32), 2 bytes per value.
    BF16,
    /// 22-byte blocks: f16 scale `d`, 5-bit values; `x = d * (q - 16)`.
    Q5_0,
    /// 24-byte blocks: f16 scale `d`, f16 minimum `m`, 5-bit values; `x = d * q + m`.
    Q5_1,
    /// 84-byte super-blocks of 256: 2-bit values, a 4-bit scale and minimum per 16 values.
    Q2_K,
    /// 110-byte super-blocks of 256: 3-bit values, a 6-bit signed scale per 16 values.
    Q3_K,
    /// 144-byte super-blocks of 256: 4-bit values, a 6-bit scale and minimum per 32 values.
    Q4_K,
    /// 176-byte super-blocks of 256: 5-bit values, a 6-bit scale and minimum per 32 values.
    Q5_K,
    /// 210-byte super-blocks of 256: 6-bit values, an 8-bit signed scale per 16 values.
    Q6_K,
    /// kiln's own: 20-byte groups of 64: f16 scale and offset, 2-bit values (2.5 bits).
    Q2_G64,
    /// kiln's own: 28-byte groups of 64: f16 scale and offset, 3-bit values (3.5 bits).
    Q3_G64,
}

/// One 32-value block as the Q4 kernels read it: `x[j] = d * q[j] + m`, `q` in `0..16`, byte
/// `j` of `qs` holding `q[j]` in its low nibble and `q[j + 16]` in its high nibble; for the
/// five-bit formats (kernel form Q5) `q[j]` in `0..32` has its fifth bit in bit `j` of `qh`
/// (zero for the four-bit formats).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Q4Block {
    pub d: f32,
    pub m: f32,
    pub qs: [u8; 16],
    pub qh: u32,
}

impl Q4Block {
    /// The block of 32 values `q` (each in `0..32`).
    pub fn from_quants(d: f32, m: f32, q: &[u8; 32]) -> Self {
        let qh = q.iter().enumerate().fold(0u32, |h, (j, &q)| h | (((q >> 4) & 1) as u32) << j);
        Q4Block { d, m, qs: std::array::from_fn(|j| (q[j] & 15) | (q[j + 16] & 15) << 4), qh }
    }

    /// Value `j`'s integer `q`.
    pub fn quant(&self, j: usize) -> u8 {
        let low = if j < 16 { self.qs[j] & 15 } else { self.qs[j - 16] >> 4 };
        low | (((self.qh >> j) & 1) as u8) << 4
    }
}

/// One 32-value block as the Q8 kernels read it: `x[j] = d * q[j]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Q8Block {
    pub d: f32,
    pub qs: [i8; 32],
}

/// One 64-value group as the low-bit kernels read it: `x[i] = d * q[i] + m`, the low two bits
/// of `q[i]` in bits `2 (i / 16)` of byte `i % 16` of `qs`, and (kernel form Q3) its third bit
/// in bit `i` of `qh` (zero for two bits).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowBlock {
    pub d: f32,
    pub m: f32,
    pub qs: [u8; 16],
    pub qh: u64,
}

impl LowBlock {
    /// Values per group.
    pub const VALUES: usize = 64;

    /// Value `i`'s integer `q`.
    pub fn quant(&self, i: usize) -> u8 {
        ((self.qs[i % 16] >> (2 * (i / 16))) & 3) | (((self.qh >> i) & 1) as u8) << 2
    }
}

/// The K-quants whose sub-blocks are 16 values (kernel form K16), by how their values and
/// sub-scales are stored in the library (the same bits as in the format, rearranged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KKind {
    /// Q2_K: 2-bit values, a 4-bit scale and a 4-bit minimum per sub-block.
    Q2,
    /// Q3_K: 3-bit values less 4, a 6-bit signed scale per sub-block.
    Q3,
    /// Q6_K: 6-bit values less 32, an 8-bit signed scale per sub-block.
    Q6,
}

impl KKind {
    /// What the stored values are less.
    pub fn offset(self) -> i32 {
        match self {
            KKind::Q2 => 0,
            KKind::Q3 => 4,
            KKind::Q6 => 32,
        }
    }
}

/// One 256-value super-block as the K16 kernels read it (a K-quant with 16-value sub-blocks,
/// its scales unpacked): `x[i] = (d * sc[s]) * (q[i] - offset) - dmin * m[s]` for sub-block
/// `s = i / 16`, the products in f32 as ggml computes them (no minimum term for Q3 and Q6,
/// whose `dmin` and `m` are zero); `d` and `dmin` exactly f16.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct K16Block {
    pub d: f32,
    pub dmin: f32,
    pub sc: [i8; 16],
    pub m: [u8; 16],
    pub q: [u8; 256],
}

impl K16Block {
    /// Values per super-block.
    pub const VALUES: usize = 256;

    /// Value `i` of a block of `kind`, as the format's dequantizer gives it.
    pub fn value(&self, kind: KKind, i: usize) -> f32 {
        let s = i / 16;
        let v = (self.d * self.sc[s] as f32) * (self.q[i] as i32 - kind.offset()) as f32;
        match kind {
            KKind::Q2 => v - self.dmin * self.m[s] as f32,
            _ => v,
        }
    }
}

/// One 256-value super-block as the K32 kernels read it (Q4_K, Q5_K: 32-value sub-blocks,
/// their scales and minimums unpacked): `x[i] = (d * sc[s]) * q[i] - dmin * m[s]` for
/// sub-block `s = i / 32`, the products in f32 as ggml computes them; sub-block `s`'s values
/// `q` as a [`Q4Block`] holds them (`qs[s]` nibbles, fifth bits in `qh[s]`, zero for Q4_K).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct K32Block {
    pub d: f32,
    pub dmin: f32,
    pub sc: [u8; 8],
    pub m: [u8; 8],
    pub qs: [[u8; 16]; 8],
    pub qh: [u32; 8],
}

impl K32Block {
    /// Values per super-block.
    pub const VALUES: usize = 256;

    /// Value `i`, as the format's dequantizer gives it.
    pub fn value(&self, i: usize) -> f32 {
        let (s, j) = (i / 32, i % 32);
        let low = if j < 16 { self.qs[s][j] & 15 } else { self.qs[s][j - 16] >> 4 };
        let q = low | (((self.qh[s] >> j) & 1) as u8) << 4;
        (self.d * self.sc[s] as f32) * q as f32 - self.dmin * self.m[s] as f32
    }
}

/// The form a format's blocks take for the kernels, each form one family of packed layout and
/// kernels in the compiler. The conversion is exact: the kernel form's values are the
/// format's dequantized values bit for bit (f16 scales widen to f32 exactly).
#[derive(Clone, Copy, Debug)]
pub enum KernelForm {
    /// Dequantized to f32 at compile time; f32 activations.
    F32,
    /// IEEE half floats as stored, widened to f32 in the kernels; f32 activations.
    F16,
    /// bfloat16 as stored (the upper half of an f32), widened by a shift in the kernels; f32
    /// activations.
    BF16,
    /// Appends the [`Q4Block`]s of one format block; q16 activations.
    Q4(fn(block: &[u8], out: &mut Vec<Q4Block>)),
    /// Appends the [`Q4Block`]s, with fifth bits, of one format block: the Q4 kernels with a
    /// plane of high bits (5.5 bits per weight packed); q16 activations.
    Q5(fn(block: &[u8], out: &mut Vec<Q4Block>)),
    /// Appends the [`Q8Block`]s of one format block; q16 activations.
    Q8(fn(block: &[u8], out: &mut Vec<Q8Block>)),
    /// Appends the 2-bit [`LowBlock`]s (64 values each) of one format block; q16 activations.
    Q2(fn(block: &[u8], out: &mut Vec<LowBlock>)),
    /// Appends the 3-bit [`LowBlock`]s of one format block: the Q2 kernels with a plane of
    /// third bits; q16 activations.
    Q3(fn(block: &[u8], out: &mut Vec<LowBlock>)),
    /// Appends the [`K32Block`] of one format block (with fifth bits: `true`); q16 activations.
    K32(bool, fn(block: &[u8], out: &mut Vec<K32Block>)),
    /// Appends the [`K16Block`] of one format block; q16 activations.
    K16(KKind, fn(block: &[u8], out: &mut Vec<K16Block>)),
}

/// Everything about one weight format.
#[derive(Clone, Copy, Debug)]
pub struct FormatSpec {
    /// The lowercase name used in the textual IR and on the command line (`q4_1`).
    pub name: &'static str,
    /// The ggml type id stored in GGUF files.
    pub ggml_type: u32,
    /// Values per block (1 for the float formats).
    pub block_values: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// Dequantizes one block (`block_bytes` bytes) into `block_values` values.
    pub dequantize_block: fn(block: &[u8], out: &mut [f32]),
    /// Quantizes one block of `block_values` values, appending `block_bytes` bytes, the way
    /// ggml's reference quantizer does.
    pub quantize_block: fn(values: &[f32], out: &mut Vec<u8>),
    /// How the kernels read it.
    pub kernel: KernelForm,
    /// The largest `|x - dequantize(quantize(x))|` the quantizer allows for value `x` of block
    /// `block` (tested on every format that states one).
    pub error_bound: Option<fn(x: f32, block: &[f32]) -> f64>,
}

impl QuantFormat {
    pub const ALL: [QuantFormat; 15] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q8_0,
        Self::BF16,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q2_G64,
        Self::Q3_G64,
    ];

    /// The format's description: the one place that maps a format to its facts.
    pub fn spec(self) -> &'static FormatSpec {
        match self {
            Self::F32 => &f32_format::SPEC,
            Self::F16 => &f16_format::SPEC,
            Self::Q4_0 => &q4_0::SPEC,
            Self::Q4_1 => &q4_1::SPEC,
            Self::Q8_0 => &q8_0::SPEC,
            Self::BF16 => &bf16::SPEC,
            Self::Q5_0 => &q5_0::SPEC,
            Self::Q5_1 => &q5_1::SPEC,
            Self::Q2_K => &q2_k::SPEC,
            Self::Q3_K => &q3_k::SPEC,
            Self::Q4_K => &q4_k::SPEC,
            Self::Q5_K => &q5_k::SPEC,
            Self::Q6_K => &q6_k::SPEC,
            Self::Q2_G64 => &q2_g64::SPEC,
            Self::Q3_G64 => &q3_g64::SPEC,
        }
    }

    /// Values per block (1 for the float formats).
    pub fn block_values(self) -> usize {
        self.spec().block_values
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.spec().block_bytes
    }

    /// Bytes needed for a row of `n` values, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        (n % self.block_values() == 0).then(|| n / self.block_values() * self.block_bytes())
    }

    /// The lowercase name used in the textual IR (`q4_1`).
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The ggml type id of the format in GGUF files.
    pub fn ggml_type(self) -> u32 {
        self.spec().ggml_type
    }

    /// The format stored under ggml type id `id`, if kiln has it.
    pub fn from_ggml_type(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.ggml_type() == id)
    }

    /// Whether the kernels multiply it with q16 activations in 32-value blocks (every format
    /// but the float ones): its row length must then be a whole number of 32-value blocks
    /// (and of the format's own blocks: 256 values for the K-quants).
    pub fn is_block_quantized(self) -> bool {
        !matches!(self.spec().kernel, KernelForm::F32 | KernelForm::F16 | KernelForm::BF16)
    }

    /// Bits per weight of the stored format.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_values() as f64
    }
}

pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes one row stored in `format` into `out` (whose length is the row length).
///
/// Panics if `bytes` does not hold exactly one row of `out.len()` values; callers check
/// shapes first (the GGUF reader and the verifier do).
pub fn dequantize_row(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(Some(bytes.len()), format.row_bytes(out.len()), "row size mismatch");
    let spec = format.spec();
    for (block, o) in bytes.chunks_exact(spec.block_bytes).zip(out.chunks_exact_mut(spec.block_values)) {
        (spec.dequantize_block)(block, o);
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

/// Quantizes one row of f32 values into `format` the way ggml's reference quantizers do;
/// `values.len()` must be a whole number of blocks.
pub fn quantize_row(format: QuantFormat, values: &[f32]) -> Vec<u8> {
    let spec = format.spec();
    let mut out = Vec::with_capacity(format.row_bytes(values.len()).expect("whole blocks"));
    for block in values.chunks_exact(spec.block_values) {
        (spec.quantize_block)(block, &mut out);
    }
    out
}

/// The [`Q4Block`]s of one row of a format whose kernel form is Q4 or Q5 (`None` otherwise).
pub fn q4_blocks(format: QuantFormat, bytes: &[u8]) -> Option<Vec<Q4Block>> {
    let (KernelForm::Q4(f) | KernelForm::Q5(f)) = format.spec().kernel else { return None };
    let mut out = Vec::with_capacity(bytes.len() / format.block_bytes() * format.block_values() / BLOCK_SIZE);
    bytes.chunks_exact(format.block_bytes()).for_each(|b| f(b, &mut out));
    Some(out)
}

/// The [`LowBlock`]s of one row of a format whose kernel form is Q2 or Q3 (`None` otherwise).
pub fn low_blocks(format: QuantFormat, bytes: &[u8]) -> Option<Vec<LowBlock>> {
    let (KernelForm::Q2(f) | KernelForm::Q3(f)) = format.spec().kernel else { return None };
    let mut out = Vec::with_capacity(bytes.len() / format.block_bytes() * format.block_values() / LowBlock::VALUES);
    bytes.chunks_exact(format.block_bytes()).for_each(|b| f(b, &mut out));
    Some(out)
}

/// The [`K32Block`]s of one row of a format whose kernel form is K32 (`None` otherwise).
pub fn k32_blocks(format: QuantFormat, bytes: &[u8]) -> Option<Vec<K32Block>> {
    let KernelForm::K32(_, f) = format.spec().kernel else { return None };
    let mut out = Vec::with_capacity(bytes.len() / format.block_bytes());
    bytes.chunks_exact(format.block_bytes()).for_each(|b| f(b, &mut out));
    Some(out)
}

/// The [`K16Block`]s of one row of a format whose kernel form is K16 (`None` otherwise).
pub fn k16_blocks(format: QuantFormat, bytes: &[u8]) -> Option<Vec<K16Block>> {
    let KernelForm::K16(_, f) = format.spec().kernel else { return None };
    let mut out = Vec::with_capacity(bytes.len() / format.block_bytes());
    bytes.chunks_exact(format.block_bytes()).for_each(|b| f(b, &mut out));
    Some(out)
}

/// The [`Q8Block`]s of one row of a format whose kernel form is Q8 (`None` otherwise).
pub fn q8_blocks(format: QuantFormat, bytes: &[u8]) -> Option<Vec<Q8Block>> {
    let KernelForm::Q8(f) = format.spec().kernel else { return None };
    let mut out = Vec::with_capacity(bytes.len() / format.block_bytes() * format.block_values() / BLOCK_SIZE);
    bytes.chunks_exact(format.block_bytes()).for_each(|b| f(b, &mut out));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test rows of 256 values (one K-quant super-block): random at several magnitudes (down
    /// to f16-subnormal scales), plus blocks that are constant, zero, one outlier, dominated by
    /// a negative value, hold the value opposite to the largest magnitude (which Q4_0 clamps),
    /// alternate tiny and large negative values, or are all negative.
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
                rows.push((0..256).map(|_| uniform() * scale).collect::<Vec<f32>>());
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
        special.extend((0..32).map(|i| if i % 2 == 0 { 1e-3 } else { -40.0 }));
        special.extend((0..32).map(|i| -1.0 - 0.01 * i as f32));
        rows.push(special);
        rows
    }

    #[test]
    fn quantize_then_dequantize_is_within_each_formats_bound() {
        for format in QuantFormat::ALL.into_iter().filter(|f| f.spec().error_bound.is_some()) {
            let (mut worst, mut checked) = (0.0f64, 0);
            for values in test_rows() {
                let bytes = quantize_row(format, &values);
                assert_eq!(Some(bytes.len()), format.row_bytes(values.len()));
                let mut back = vec![0.0; values.len()];
                dequantize_row(format, &bytes, &mut back);
                let bv = format.block_values().max(BLOCK_SIZE);
                for (b, (vals, outs)) in values.chunks(bv).zip(back.chunks(bv)).enumerate() {
                    for (&x, &y) in vals.iter().zip(outs) {
                        let err = (x as f64 - y as f64).abs();
                        let tol = (format.spec().error_bound.expect("a stated bound"))(x, vals);
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
    fn kernel_forms_hold_the_dequantized_values_exactly() {
        for format in QuantFormat::ALL {
            for values in test_rows() {
                let bytes = quantize_row(format, &values);
                let mut want = vec![0.0; values.len()];
                dequantize_row(format, &bytes, &mut want);
                let got: Vec<f32> = match format.spec().kernel {
                    KernelForm::F32 | KernelForm::F16 | KernelForm::BF16 => continue,
                    KernelForm::Q4(_) | KernelForm::Q5(_) => q4_blocks(format, &bytes)
                        .unwrap()
                        .iter()
                        .flat_map(|b| (0..32).map(move |j| b.d * b.quant(j) as f32 + b.m))
                        .collect(),
                    KernelForm::Q8(_) => {
                        q8_blocks(format, &bytes).unwrap().iter().flat_map(|b| b.qs.map(|q| b.d * q as f32)).collect()
                    }
                    KernelForm::K32(..) => k32_blocks(format, &bytes)
                        .unwrap()
                        .iter()
                        .flat_map(|b| (0..256).map(move |i| b.value(i)))
                        .collect(),
                    KernelForm::K16(kind, _) => k16_blocks(format, &bytes)
                        .unwrap()
                        .iter()
                        .flat_map(|b| (0..256).map(move |i| b.value(kind, i)))
                        .collect(),
                    KernelForm::Q2(_) | KernelForm::Q3(_) => low_blocks(format, &bytes)
                        .unwrap()
                        .iter()
                        .flat_map(|b| (0..64).map(move |i| b.d * b.quant(i) as f32 + b.m))
                        .collect(),
                };
                assert_eq!(got.len(), want.len());
                // Equal values (Q4_0 as d q + m, and forms with m = 0, may turn -0
                // into +0, as the kernels do).
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(g == w, "{format:?} value {j}: kernel form {g} vs dequantized {w}");
                }
            }
        }
    }

    #[test]
    fn geometry_is_consistent() {
        for format in QuantFormat::ALL {
            let spec = format.spec();
            assert_eq!(QuantFormat::from_name(spec.name), Some(format));
            assert_eq!(QuantFormat::from_ggml_type(spec.ggml_type), Some(format));
            assert!(spec.block_values == 1 || spec.block_values % BLOCK_SIZE == 0, "{format:?}");
            let row = quantize_row(format, &[0.5; 256]);
            assert_eq!(Some(row.len()), format.row_bytes(256), "{format:?}");
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
