//! Weight packing: chooses each weight's memory layout for its kernels and writes the weights
//! blob, plus the constant tables the kernels read (rotary embedding cosines and sines).
//!
//! Matrices are stored in groups of [`ROWS`] rows interleaved block by block (the layout that
//! let Cranelift's 128-bit GEMV beat ggml's AVX2 kernel: one pass over the activation block
//! serves four output rows, and the weight stream is read once, in order). Scales stay float16
//! when every scale of the matrix is exactly a float16 (q4_0, q4_1, q8_0 as GGUF stores them),
//! so the library holds and decode reads no more bytes than the file; the kernels widen them
//! with integer operations (Cranelift has no f16 conversion). Scales that are not are stored
//! as float32. A Q4 matrix whose every offset is `-8 d` (q4_0) stores no offsets: the kernel
//! derives them. The K-quants keep their super-block f16 scales and their 4-, 6- or 8-bit
//! sub-block scales (rearranged, never widened), kiln's 64-value formats their f16 scales and
//! offsets, f16 and bf16 their 16 bits: every format packs into at most its own bytes.
//! Which layout a weight gets follows its format's kernel form (`ir::quant::KernelForm`): the
//! format's own file turns its blocks into the blocks of a form packed here, so this file
//! names no format.

use std::collections::BTreeMap;
use std::ops::Range;

use ir::quant::{
    dequantize, dequantize_row, k16_blocks, k32_blocks, low_blocks, q4_blocks, q8_blocks, K16Block, K32Block, KKind,
    KernelForm, LowBlock, Q4Block, Q8Block, BLOCK_SIZE,
};
use ir::{ActDType, Op, QuantFormat, WeightId};
use rayon::prelude::*;

use crate::model::Model;

/// Rows per interleaved group.
pub const ROWS: usize = 4;
/// Bytes of the 4 scales (or offsets) of one group block: f16 or f32 each.
pub const fn scales_bytes(half: bool) -> usize {
    if half {
        8
    } else {
        16
    }
}
/// Bytes of one block of a Q4 group: `d[4]`, `m[4]` only when `mins`, then `qs[4][16]`, then
/// with `high` (kernel form Q5) `qh[4]` (u32 each, bit `j` the fifth bit of value `j`).
pub const fn q4_group_block(half: bool, mins: bool, high: bool) -> usize {
    scales_bytes(half) * if mins { 2 } else { 1 } + 4 * 16 + if high { 16 } else { 0 }
}
/// Rows per group of the layouts the target's micro-kernels read ([`Layout::Q4Rows8`],
/// [`Layout::Q8Rows8`]).
pub const MICRO_ROWS: usize = 8;
/// Bytes of one block of a [`Layout::Q4Rows8`] group: `d[8]`, `m[8]` only when `mins`, then
/// eight 16-byte chunks of nibbles, then with `high` two 16-byte chunks of fifth bits
/// ([`push_high_bits`]).
pub const fn q4x8_group_block(half: bool, mins: bool, high: bool) -> usize {
    2 * scales_bytes(half) * if mins { 2 } else { 1 } + 8 * 16 + if high { 32 } else { 0 }
}
/// Bytes of one block of a [`Layout::Q8Rows8`] group: `d[8]`, then sixteen 16-byte chunks.
pub const fn q8x8_group_block(half: bool) -> usize {
    2 * scales_bytes(half) + 8 * 32
}
/// Bytes of one block of a Q8 group: `d[4]`, then `qs[4][32] i8`.
pub const fn q8_group_block(half: bool) -> usize {
    scales_bytes(half) + 4 * 32
}
/// Bytes of one 16-value sub-block's values in a [`Layout::LowRows8`] group: the 8 rows'
/// crumbs (and third bits) as [`push_k16_planes`] lays out Q3 and Q2.
pub const fn low8_sub_bytes(high: bool) -> usize {
    if high {
        48
    } else {
        32
    }
}
/// Bytes of one 64-value block of a [`Layout::LowRows8`] group: `d[8]`, `m[8]` (f16 or f32),
/// then the four sub-blocks' planes: eight rows of the format's own bytes (160, 224) with f16.
pub const fn low8_group_block(half: bool, high: bool) -> usize {
    4 * scales_bytes(half) + 4 * low8_sub_bytes(high)
}
/// Bytes of one 64-value block of a [`Layout::LowRows4`] group: `d[4]`, `m[4]` (f16 or f32),
/// `qs[4][16]` crumbs, then with `high` the rows' third bits (`[4][8]`, [`third_bits`]).
pub const fn low_group_block(half: bool, high: bool) -> usize {
    2 * scales_bytes(half) + 4 * 16 + if high { 32 } else { 0 }
}
/// Bytes of one 32-value block's values in a [`Layout::K32Rows4`] super-block: the rows'
/// nibbles (`[4][16]`, as Q4 blocks) then with `high` their fifth bits (`[4]` u32).
pub const fn k32_block_values(high: bool) -> usize {
    4 * 16 + if high { 16 } else { 0 }
}
/// Bytes of one 256-value super-block of a [`Layout::K32Rows4`] group: `d[4]`, `dmin[4]` f16,
/// the 6-bit scales and minimums of the 4 rows (`[12][4]`, byte-major; per row the 16 values
/// `sc[0..8]`, `m[0..8]` as [`six_bits`] packs them), then the 8 blocks' values: four rows of
/// the format's own bytes (576, 704).
pub const fn k32_group_block(high: bool) -> usize {
    K32_VALUES_AT + 8 * k32_block_values(high)
}
/// Where the values of a [`Layout::K32Rows4`] super-block start.
pub const K32_VALUES_AT: usize = 16 + 48;
/// Bytes of one 32-value block's values in a [`Layout::K32Rows8`] super-block: the nibble
/// chunks of the 8 rows as [`Layout::Q4Rows8`] has them, then with `high` their fifth bits.
pub const fn k32x8_block_values(high: bool) -> usize {
    8 * 16 + if high { 32 } else { 0 }
}
/// Bytes of one 256-value super-block of a [`Layout::K32Rows8`] group: the header
/// (`targets::K32_HEADER`: `d[8]`, `dmin[8]` f16, the rows' [`six_bits`] byte-major), then the
/// 8 blocks' values: eight rows of the format's own bytes (1152, 1408).
pub const fn k32x8_group_block(high: bool) -> usize {
    targets::K32_HEADER as usize + 8 * k32x8_block_values(high)
}
/// Where the sub-block scales of a [`Layout::K16Rows8`] super-block start: after `d[8]` f16
/// (and `dmin[8]` f16 for Q2).
pub const fn k16x8_scales_at(kind: KKind) -> usize {
    match kind {
        KKind::Q2 => 32,
        _ => 16,
    }
}
/// Where the values of a [`Layout::K16Rows8`] super-block start: after the scales, one byte
/// per sub-block and row (Q3: the 12 bytes of [`six_bits`] per row).
pub const fn k16x8_values_at(kind: KKind) -> usize {
    k16x8_scales_at(kind)
        + match kind {
            KKind::Q3 => 96,
            _ => 128,
        }
}
/// Bytes of one 16-value sub-block's values in a [`Layout::K16Rows8`] super-block: the 8
/// rows' value planes (`targets::MicroKernel::k16`).
pub const fn k16x8_sub_bytes(kind: KKind) -> usize {
    match kind {
        KKind::Q6 => 96,
        KKind::Q3 => 48,
        KKind::Q2 => 32,
    }
}
/// Bytes of one 256-value super-block of a [`Layout::K16Rows8`] group: eight rows of the
/// format's own bytes (672, 880, 1680).
pub const fn k16x8_group_block(kind: KKind) -> usize {
    k16x8_values_at(kind) + 16 * k16x8_sub_bytes(kind)
}
/// Where the sub-block scales of a [`Layout::K16Rows4`] super-block start: after `d[4]` f16
/// (and `dmin[4]` f16 for Q2).
pub const fn k16_scales_at(kind: KKind) -> usize {
    match kind {
        KKind::Q2 => 16,
        _ => 8,
    }
}
/// Bytes of the sub-block scales of a [`Layout::K16Rows4`] super-block, byte-major across the
/// 4 rows (`[byte][row]`): Q6 `sc[16]` i8; Q2 `sc | m << 4` per sub-block; Q3 twelve bytes of
/// `sc + 32` (six bits) per row: bytes 0..8 low nibbles (byte `j`: sub-blocks `j` low, `j + 8`
/// high), bytes 8..12 high bit pairs (byte `j`, bits `2k`: sub-block `j + 4k`).
pub const fn k16_scale_bytes(kind: KKind) -> usize {
    match kind {
        KKind::Q3 => 48,
        _ => 64,
    }
}
/// Bytes of one 64-value unit of a [`Layout::K16Rows4`] super-block: Q6 the rows' nibbles
/// (`[4][32]`, the unit's two 32-value blocks as Q4 blocks store them) then high bit pairs
/// (`[4][16]` crumbs as [`Layout::LowRows4`] stores them); Q3 the rows' crumbs (`[4][16]`) then
/// third bits (`[4][8]`, [`third_bits`]); Q2 the rows' crumbs.
pub const fn k16_unit_bytes(kind: KKind) -> usize {
    match kind {
        KKind::Q6 => 4 * 32 + 4 * 16,
        KKind::Q3 => 4 * 16 + 4 * 8,
        KKind::Q2 => 4 * 16,
    }
}
/// Bytes of one 256-value super-block of a [`Layout::K16Rows4`] group: four rows of the
/// format's own bytes (840, 440, 336).
pub const fn k16_group_block(kind: KKind) -> usize {
    k16_scales_at(kind) + k16_scale_bytes(kind) + 4 * k16_unit_bytes(kind)
}
/// Bytes of one 4-column chunk of an f32 group: `x[4 rows][4 cols] f32`.
pub const F32_GROUP_CHUNK: usize = 4 * 16;
/// Bytes of one 8-column chunk of a 16-bit float group: `x[4 rows][8 cols]` f16 or bf16.
pub const F16_GROUP_CHUNK: usize = 4 * 16;

/// Alignment of every item in the blob.
pub const ALIGN: usize = 64;

/// How one weight is laid out in the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A plain f32 vector of `n` values (norm weights, whatever their stored format).
    F32Vector { n: u32 },
    /// Matrix of a format whose kernel form is F32 (or F16 holding infinities or NaNs) as f32,
    /// groups of 4 rows, 4-column chunks (columns padded with zeros).
    F32Rows4 { rows: u32, cols: u32 },
    /// Matrix of kernel form F16 (finite values) or BF16 (`brain`) as stored, 16 bits a value:
    /// groups of 4 rows, 8-column chunks ([`F16_GROUP_CHUNK`], columns padded with zeros).
    F16Rows4 { rows: u32, cols: u32, brain: bool },
    /// Matrix of kernel form F16 (finite values) or BF16 (`brain`) for a target's micro-kernels
    /// (`targets::MicroValues::F16`): groups of 8 rows, per column the 8 rows' 16-bit values.
    F16Rows8 { rows: u32, cols: u32, brain: bool },
    /// Matrix of a format whose kernel form is Q4, or Q5 (`high`: values have a fifth bit),
    /// groups of 4 rows interleaved per 32-value block; scales as f16 when `half`; offsets
    /// stored only when `mins` (else `m = -8 d`, or `-16 d` with `high`).
    Q4Rows4 { rows: u32, cols: u32, half: bool, mins: bool, high: bool },
    /// Matrix of a format whose kernel form is Q4 or Q5, for a target's micro-kernels
    /// (`targets::MicroKernel`): groups of 8 rows per 32-value block, `d[8]`, `m[8]` when
    /// `mins`, then chunk `u` of 16 bytes holding bytes `2u, 2u+1` of each row's nibbles,
    /// then with `high` the fifth bits in the same order ([`push_high_bits`]). With `dwords`
    /// (for 8-bit activations) the chunks are 32 bytes and chunk `j` holds bytes `4j..4j+4` of
    /// each row's nibbles, and the fifth bits one 32-byte chunk in that order.
    Q4Rows8 { rows: u32, cols: u32, half: bool, mins: bool, high: bool, dwords: bool },
    /// Matrix of a format whose kernel form is Q8, groups of 4 rows interleaved per 32-value
    /// block; scales as f16 when `half`.
    Q8Rows4 { rows: u32, cols: u32, half: bool },
    /// Matrix of a format whose kernel form is Q8, for a target's micro-kernels: groups of 8
    /// rows per 32-value block, `d[8]`, then chunk `u` of 16 bytes holding values `2u, 2u+1` of
    /// each row.
    Q8Rows8 { rows: u32, cols: u32, half: bool },
    /// Matrix of a format whose kernel form is Q2, or Q3 (`high`: a plane of third bits), groups
    /// of 4 rows interleaved per 64-value block ([`low_group_block`]); scales and offsets f16
    /// when `half`. The same layout on every target (no micro-kernel reads it).
    LowRows4 { rows: u32, cols: u32, half: bool, high: bool },
    /// Matrix of kernel form Q2 or Q3 (`high`) for a target's micro-kernels
    /// (`targets::MicroKernel::low`): groups of 8 rows per 64-value block
    /// ([`low8_group_block`]), the values in the planes of [`Layout::K16Rows8`]'s Q2 and Q3.
    LowRows8 { rows: u32, cols: u32, half: bool, high: bool },
    /// Matrix of a format whose kernel form is K16 (q2_k, q3_k, q6_k), groups of 4 rows
    /// interleaved per 256-value super-block ([`k16_group_block`]). The same layout on every
    /// target.
    K16Rows4 { rows: u32, cols: u32, kind: KKind },
    /// Matrix of a format whose kernel form is K32 (q4_k, or q5_k with `high`), groups of 4
    /// rows interleaved per 256-value super-block ([`k32_group_block`]). The same layout on
    /// every target.
    K32Rows4 { rows: u32, cols: u32, high: bool },
    /// Matrix of a format whose kernel form is K32, for a target's micro-kernels
    /// (`targets::MicroKernel::k32`): groups of 8 rows per 256-value super-block
    /// ([`k32x8_group_block`]), each 32-value block's nibbles (and fifth bits) in the chunks
    /// of [`Layout::Q4Rows8`], 4-byte ones with `dwords`.
    K32Rows8 { rows: u32, cols: u32, high: bool, dwords: bool },
    /// Matrix of a format whose kernel form is K16, for a target's micro-kernels
    /// (`targets::MicroKernel::k16`): groups of 8 rows per 256-value super-block
    /// ([`k16x8_group_block`]), each 16-value sub-block's values in planes of 16-byte chunks.
    K16Rows8 { rows: u32, cols: u32, kind: KKind },
}

impl Layout {
    /// Bytes between consecutive row groups of a matrix layout.
    pub fn group_stride(self) -> u64 {
        match self {
            Layout::F32Vector { .. } => 0,
            Layout::F32Rows4 { cols, .. } => (cols as u64).div_ceil(4) * F32_GROUP_CHUNK as u64,
            Layout::F16Rows4 { cols, .. } => (cols as u64).div_ceil(8) * F16_GROUP_CHUNK as u64,
            Layout::F16Rows8 { cols, .. } => cols as u64 * 2 * MICRO_ROWS as u64,
            Layout::Q4Rows4 { cols, half, mins, high, .. } => {
                cols as u64 / 32 * q4_group_block(half, mins, high) as u64
            }
            Layout::Q4Rows8 { cols, half, mins, high, .. } => {
                cols as u64 / 32 * q4x8_group_block(half, mins, high) as u64
            }
            Layout::Q8Rows4 { cols, half, .. } => cols as u64 / 32 * q8_group_block(half) as u64,
            Layout::Q8Rows8 { cols, half, .. } => cols as u64 / 32 * q8x8_group_block(half) as u64,
            Layout::LowRows4 { cols, half, high, .. } => cols as u64 / 64 * low_group_block(half, high) as u64,
            Layout::LowRows8 { cols, half, high, .. } => cols as u64 / 64 * low8_group_block(half, high) as u64,
            Layout::K16Rows4 { cols, kind, .. } => cols as u64 / 256 * k16_group_block(kind) as u64,
            Layout::K32Rows4 { cols, high, .. } => cols as u64 / 256 * k32_group_block(high) as u64,
            Layout::K32Rows8 { cols, high, .. } => cols as u64 / 256 * k32x8_group_block(high) as u64,
            Layout::K16Rows8 { cols, kind, .. } => cols as u64 / 256 * k16x8_group_block(kind) as u64,
        }
    }

    /// Rows per group of a matrix layout.
    pub fn group_rows(self) -> usize {
        match self {
            Layout::Q4Rows8 { .. }
            | Layout::Q8Rows8 { .. }
            | Layout::K32Rows8 { .. }
            | Layout::K16Rows8 { .. }
            | Layout::F16Rows8 { .. }
            | Layout::LowRows8 { .. } => MICRO_ROWS,
            _ => ROWS,
        }
    }

    /// `(rows, cols)` of a matrix layout.
    pub fn matrix(self) -> Option<(u32, u32)> {
        match self {
            Layout::F32Vector { .. } => None,
            Layout::F32Rows4 { rows, cols }
            | Layout::F16Rows4 { rows, cols, .. }
            | Layout::F16Rows8 { rows, cols, .. }
            | Layout::Q4Rows4 { rows, cols, .. }
            | Layout::Q4Rows8 { rows, cols, .. }
            | Layout::Q8Rows4 { rows, cols, .. }
            | Layout::Q8Rows8 { rows, cols, .. }
            | Layout::LowRows4 { rows, cols, .. }
            | Layout::LowRows8 { rows, cols, .. }
            | Layout::K16Rows4 { rows, cols, .. }
            | Layout::K32Rows4 { rows, cols, .. }
            | Layout::K32Rows8 { rows, cols, .. }
            | Layout::K16Rows8 { rows, cols, .. } => Some((rows, cols)),
        }
    }
}

/// A packed weight: where it starts in the blob and how it is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedWeight {
    pub offset: u64,
    pub layout: Layout,
}

/// The weights blob and the index into it.
pub struct Packed {
    /// The packed bytes when packed into memory ([`WeightsSink::memory`]); empty when they
    /// were written to a file, or once code generation moved them into the object.
    pub blob: Vec<u8>,
    /// Bytes of the blob, wherever it is.
    pub len: u64,
    /// [`abi::weights_checksum`] of the blob.
    pub checksum: u64,
    pub weights: Vec<PackedWeight>,
    /// Rotary tables by their parameters: offset of `context` rows of
    /// `cos[head_dim]` (each cosine twice) then `sin[head_dim]` (`-sin, +sin` per pair).
    pub rope_tables: BTreeMap<RopeKey, u64>,
}

/// What a rotary table depends on: `head_dim`, theta's bits and the bits of each pair's
/// scaling divisor (so two ropes share a table exactly when they turn every pair alike).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RopeKey {
    pub head_dim: u32,
    pub theta: u32,
    pub divisors: Vec<u64>,
}

impl RopeKey {
    pub fn new(head_dim: u32, theta: f32, scaling: &ir::RopeScaling) -> Self {
        let divisors = scaling.divisors(head_dim, theta).iter().map(|d| d.to_bits()).collect();
        RopeKey { head_dim, theta: theta.to_bits(), divisors }
    }
}

/// Where [`pack`] puts the packed weights as it makes them, one tensor at a time: memory, or a
/// file (`weights.bin` in the making), so that packing a model never holds all of it.
pub struct WeightsSink<'a> {
    memory: Vec<u8>,
    file: Option<std::io::BufWriter<std::fs::File>>,
    checksum: abi::WeightsChecksum,
    /// Told `(raw bytes packed, raw bytes in all)` after each window of weights.
    progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

impl<'a> WeightsSink<'a> {
    /// Packs into memory (the weights a library embeds, or [`crate::compile`]'s).
    pub fn memory() -> Self {
        WeightsSink { memory: Vec::new(), file: None, checksum: abi::WeightsChecksum::new(), progress: None }
    }

    /// Writes the packed weights to `file` (from its start) as they are made.
    pub fn file(file: std::fs::File) -> Self {
        let file = Some(std::io::BufWriter::with_capacity(1 << 20, file));
        WeightsSink { memory: Vec::new(), file, checksum: abi::WeightsChecksum::new(), progress: None }
    }

    /// The sink, telling `progress` how many of the weights' stored bytes are packed, and of
    /// how many, after each window of weights.
    pub fn with_progress(mut self, progress: &'a (dyn Fn(u64, u64) + Sync)) -> Self {
        self.progress = Some(progress);
        self
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.checksum.update(bytes);
        match &mut self.file {
            Some(f) => std::io::Write::write_all(f, bytes),
            None => {
                self.memory.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// Bytes written so far.
    fn len(&self) -> u64 {
        self.checksum.len()
    }

    /// Zeros up to the next multiple of `align`.
    fn pad(&mut self, align: usize) -> std::io::Result<()> {
        let pad = (self.len().div_ceil(align as u64) * align as u64 - self.len()) as usize;
        self.write(&[0; ALIGN][..pad])
    }
}

/// A matrix's blocks in its kernel form, decoded once for choosing the layout and packing.
enum Blocks {
    None,
    Q4(Vec<Q4Block>),
    Q8(Vec<Q8Block>),
    Low(Vec<LowBlock>),
    K16(Vec<K16Block>),
    K32(Vec<K32Block>),
    /// An f16 matrix: whether every value is finite (the kernels' exact widening).
    F16 {
        finite: bool,
    },
}

/// A matrix's blocks in its kernel form.
fn decode(format: QuantFormat, shape: &[u32], raw: &[u8]) -> Blocks {
    let [rows, cols] = shape else { return Blocks::None };
    let row_bytes = format.row_bytes(*cols as usize).expect("verified");
    // Rows decode independently: large matrices in parts (`in_parts`), joined in order.
    let rows_of = |r: Range<usize>| &raw[r.start * row_bytes..r.end * row_bytes];
    fn join<T>(mut parts: Vec<Vec<T>>) -> Vec<T> {
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        let mut all = Vec::with_capacity(parts.iter().map(Vec::len).sum());
        parts.into_iter().for_each(|p| all.extend(p));
        all
    }
    let rows = *rows as usize;
    match format.spec().kernel {
        KernelForm::Q4(_) | KernelForm::Q5(_) => {
            Blocks::Q4(join(in_parts(rows, raw.len(), |r| q4_blocks(format, rows_of(r)).expect("Q4 form"))))
        }
        KernelForm::Q8(_) => {
            Blocks::Q8(join(in_parts(rows, raw.len(), |r| q8_blocks(format, rows_of(r)).expect("Q8 form"))))
        }
        KernelForm::F16 => {
            Blocks::F16 { finite: raw.par_chunks(PART_BYTES).all(|c| c.chunks_exact(2).all(|h| h[1] & 0x7c != 0x7c)) }
        }
        KernelForm::K32(..) => {
            Blocks::K32(join(in_parts(rows, raw.len(), |r| k32_blocks(format, rows_of(r)).expect("K32 form"))))
        }
        KernelForm::K16(..) => {
            Blocks::K16(join(in_parts(rows, raw.len(), |r| k16_blocks(format, rows_of(r)).expect("K16 form"))))
        }
        KernelForm::Q2(_) | KernelForm::Q3(_) => {
            Blocks::Low(join(in_parts(rows, raw.len(), |r| low_blocks(format, rows_of(r)).expect("low-bit form"))))
        }
        _ => Blocks::None,
    }
}

/// The most rows a layout's group has (stack buffers of one block per row).
const MAX_GROUP: usize = if ROWS > MICRO_ROWS { ROWS } else { MICRO_ROWS };

/// Raw bytes per unit of work when a matrix is decoded or packed in parts: small enough that
/// the largest matrix (the token embedding) spreads over every thread, large enough that a
/// unit's work dwarfs rayon's cost of scheduling it.
const PART_BYTES: usize = 256 << 10;

/// `f` over `0..rows` in consecutive parts of about [`PART_BYTES`] of the matrix's `bytes`
/// (one part for a small matrix), run on rayon's pool. The parts depend only on the matrix
/// and come back in row order, so the output depends on neither the threads nor the
/// schedule.
fn in_parts<T: Send>(rows: usize, bytes: usize, f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    let row_bytes = bytes.div_ceil(rows.max(1)).max(1);
    let per = (PART_BYTES / row_bytes).clamp(1, rows.max(1));
    let parts = rows.div_ceil(per).max(1);
    if parts == 1 {
        return vec![f(0..rows)];
    }
    (0..parts).into_par_iter().map(|i| f(i * per..((i + 1) * per).min(rows))).collect()
}

/// The layout of a weight; `micro`: Q4 and Q8 matrices take the micro-kernels' layouts, Q4
/// in 4-byte chunks (`dwords`) for the q8 activation grid (`act`). Whether scales stay f16
/// (`half`) and offsets are stored (`mins`) depends on the blocks.
fn layout_for(format: QuantFormat, shape: &[u32], blocks: &Blocks, micro: bool, act: ActDType) -> Layout {
    let (half, mins) = match (format.spec().kernel, blocks) {
        (kernel @ (KernelForm::Q4(_) | KernelForm::Q5(_)), Blocks::Q4(blocks)) => {
            let implied = if matches!(kernel, KernelForm::Q5(_)) { -16.0 } else { -8.0 };
            let half = blocks.iter().all(|b| is_f16(b.d) && is_f16(b.m));
            (half, blocks.iter().any(|b| b.m != implied * b.d))
        }
        (KernelForm::Q8(_), Blocks::Q8(blocks)) => (blocks.iter().all(|b| is_f16(b.d)), false),
        (KernelForm::Q2(_) | KernelForm::Q3(_), Blocks::Low(blocks)) => {
            (blocks.iter().all(|b| is_f16(b.d) && is_f16(b.m)), true)
        }
        (KernelForm::F16, &Blocks::F16 { finite }) => (finite, false),
        _ => (false, false),
    };
    layout_with(format, shape, micro, act, half, mins)
}

/// The layout of a weight whose scales are f16 or not (`half`) and that stores offsets or not
/// (`mins`), where its kernel form has these choices.
fn layout_with(format: QuantFormat, shape: &[u32], micro: bool, act: ActDType, half: bool, mins: bool) -> Layout {
    match (format.spec().kernel, shape) {
        (_, [n]) => Layout::F32Vector { n: *n },
        (KernelForm::F32, [rows, cols]) => Layout::F32Rows4 { rows: *rows, cols: *cols },
        // `half`: every value finite (else widened at compile time).
        (KernelForm::F16, [rows, cols]) if half && micro => Layout::F16Rows8 { rows: *rows, cols: *cols, brain: false },
        (KernelForm::F16, [rows, cols]) if half => Layout::F16Rows4 { rows: *rows, cols: *cols, brain: false },
        (KernelForm::F16, [rows, cols]) => Layout::F32Rows4 { rows: *rows, cols: *cols },
        (KernelForm::BF16, [rows, cols]) if micro => Layout::F16Rows8 { rows: *rows, cols: *cols, brain: true },
        (KernelForm::BF16, [rows, cols]) => Layout::F16Rows4 { rows: *rows, cols: *cols, brain: true },
        (KernelForm::K16(kind, _), [rows, cols]) if micro => Layout::K16Rows8 { rows: *rows, cols: *cols, kind },
        (KernelForm::K16(kind, _), [rows, cols]) => Layout::K16Rows4 { rows: *rows, cols: *cols, kind },
        (KernelForm::K32(high, _), [rows, cols]) if micro => {
            Layout::K32Rows8 { rows: *rows, cols: *cols, high, dwords: act == ActDType::Q8 }
        }
        (KernelForm::K32(high, _), [rows, cols]) => Layout::K32Rows4 { rows: *rows, cols: *cols, high },
        (kernel @ (KernelForm::Q4(_) | KernelForm::Q5(_)), [rows, cols]) => {
            let high = matches!(kernel, KernelForm::Q5(_));
            if micro {
                let dwords = act == ActDType::Q8;
                Layout::Q4Rows8 { rows: *rows, cols: *cols, half, mins, high, dwords }
            } else {
                Layout::Q4Rows4 { rows: *rows, cols: *cols, half, mins, high }
            }
        }
        (KernelForm::Q8(_), [rows, cols]) => {
            if micro {
                Layout::Q8Rows8 { rows: *rows, cols: *cols, half }
            } else {
                Layout::Q8Rows4 { rows: *rows, cols: *cols, half }
            }
        }
        (kernel @ (KernelForm::Q2(_) | KernelForm::Q3(_)), [rows, cols]) => {
            let high = matches!(kernel, KernelForm::Q3(_));
            if micro {
                Layout::LowRows8 { rows: *rows, cols: *cols, half, high }
            } else {
                Layout::LowRows4 { rows: *rows, cols: *cols, half, high }
            }
        }
        _ => unreachable!("the verifier allows 1-D and 2-D weights only"),
    }
}

impl Layout {
    /// Bytes of a weight in this layout (before the blob's alignment).
    pub fn bytes(self) -> u64 {
        match (self, self.matrix()) {
            (Layout::F32Vector { n }, _) => 4 * n as u64,
            (_, Some((rows, _))) => (rows as u64).div_ceil(self.group_rows() as u64) * self.group_stride(),
            (_, None) => unreachable!("every layout but a vector is a matrix"),
        }
    }
}

/// The least bytes [`pack`] can write for `graph`'s weights and tables (every scale f16 and
/// no offset stored where a layout can do without them): a build that must write more than
/// a library embeds knows before packing that the weights go to a file.
pub fn packed_bytes_at_least(graph: &ir::Graph, micro_rows: Option<u32>) -> u64 {
    let micro = micro_rows.is_some();
    let align = |n: u64| n.div_ceil(ALIGN as u64) * ALIGN as u64;
    let weights: u64 = graph
        .weights
        .iter()
        .map(|w| align(layout_with(w.format, &w.shape, micro, graph.act_dtype, true, false).bytes()))
        .sum();
    weights + rope_tables(graph).iter().map(|(key, _)| align(rope_table_bytes(key, graph.context))).sum::<u64>()
}

/// The distinct rotary tables `graph` needs, in the order they are packed, with the scaling of
/// the first rope that asks for each.
fn rope_tables(graph: &ir::Graph) -> Vec<(RopeKey, (u32, f32, &ir::RopeScaling))> {
    let mut seen = BTreeMap::new();
    let mut out = vec![];
    for node in &graph.nodes {
        if let Op::Rope { head_dim, theta, ref scaling, .. } = node.op {
            let key = RopeKey::new(head_dim, theta, scaling);
            if seen.insert(key.clone(), ()).is_none() {
                out.push((key, (head_dim, theta, scaling)));
            }
        }
    }
    out
}

/// Bytes of one rotary table: per position, `head_dim` cosines and `head_dim` sines, f32.
fn rope_table_bytes(key: &RopeKey, context: u32) -> u64 {
    context as u64 * 2 * key.head_dim as u64 * 4
}

/// The blocks of the `per_group` rows of group `g` (empty past the last row).
fn group_blocks<T>(all: &[T], g: usize, per_group: usize, rows: usize, n_blocks: usize) -> Vec<&[T]> {
    (0..per_group)
        .map(|i| g * per_group + i)
        .map(|r| if r < rows { &all[r * n_blocks..(r + 1) * n_blocks] } else { &[] })
        .collect()
}

fn push_f32(blob: &mut Vec<u8>, v: f32) {
    blob.extend_from_slice(&v.to_le_bytes());
}

/// Whether `v` is exactly a finite float16 (so storing it as one loses nothing), from its bits
/// (a conversion per scale would double the packing time).
fn is_f16(v: f32) -> bool {
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127;
    let mantissa = bits & 0x7f_ffff;
    match exp {
        -127 => mantissa == 0, // zeros; f32 subnormals are far below f16's range
        -14..=15 => mantissa & 0x1fff == 0,
        // f16 subnormals: multiples of 2^-24.
        -24..=-15 => mantissa & ((1 << (13 - 14 - exp)) - 1) == 0,
        _ => false, // too small, too large, infinite or NaN
    }
}

/// Appends scales as f16 (exact: the layout is chosen only when they are) or f32.
fn push_scales(blob: &mut Vec<u8>, v: &[f32], half: bool) {
    for &x in v {
        if half {
            blob.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
        } else {
            push_f32(blob, x);
        }
    }
}

/// Appends one block's values of a row group: each row's bytes whole (4-row layouts,
/// `interleave` 0), or, for the micro-kernels' 8-row layouts, interleaved `interleave` bytes at
/// a time (2: chunk `u` of 16 bytes holds bytes `2u, 2u+1` of every row; 4: chunk `j` of 32
/// bytes holds bytes `4j..4j+4`).
fn push_values<const N: usize>(blob: &mut Vec<u8>, rows: &[[u8; N]], interleave: usize) {
    if interleave > 0 {
        for u in 0..N / interleave {
            rows.iter().for_each(|q| blob.extend_from_slice(&q[interleave * u..interleave * (u + 1)]));
        }
    } else {
        rows.iter().for_each(|q| blob.extend_from_slice(q));
    }
}

/// Appends one block's fifth bits of a row group: each row's `qh` (4-row layouts, `interleave`
/// 0), or for the micro-kernels' 8-row layouts (`interleave` 2) two 16-byte chunks in the order of the nibble chunks: byte
/// `2r + k` of chunk `c` holds, in bits `2j` and `2j + 1`, the fifth bits of values
/// `2u + k` and `16 + 2u + k` of row `r`, for nibble chunk `u = 4c + j` (the low and the high
/// nibble of byte `2u + k`).
///
/// With `interleave` 4 (`Layout::Q4Rows8 { dwords }`) it is one 32-byte chunk: byte `4r + k`
/// holds, in bits `2j` and `2j + 1`, the fifth bits of values `4j + k` and `16 + 4j + k` of row
/// `r` (the low and the high nibble of byte `k` of nibble chunk `j`).
fn push_high_bits(blob: &mut Vec<u8>, qh: &[u32], interleave: usize) {
    let bit = |h: u32, v: u32| ((h >> v) & 1) as u8;
    if interleave == 4 {
        for &h in qh {
            for k in 0..4u32 {
                blob.push(
                    (0..4u32)
                        .fold(0u8, |acc, j| acc | bit(h, 4 * j + k) << (2 * j) | bit(h, 16 + 4 * j + k) << (2 * j + 1)),
                );
            }
        }
        return;
    }
    if interleave == 0 {
        qh.iter().for_each(|h| blob.extend_from_slice(&h.to_le_bytes()));
        return;
    }
    for c in 0..2u32 {
        for &h in qh {
            for k in 0..2u32 {
                let byte = (0..4u32).fold(0u8, |acc, j| {
                    let u = 4 * c + j;
                    acc | bit(h, 2 * u + k) << (2 * j) | bit(h, 16 + 2 * u + k) << (2 * j + 1)
                });
                blob.push(byte);
            }
        }
    }
}

/// The third bits of 64 values (bit `i` of `qh` value `i`'s) as the kernels read them: byte
/// `j` holds in bit `k` value `j + 8k`'s, so that the 8 bytes loaded twice side by side give
/// every lane of a 16-value vector its bit under a constant mask.
fn third_bits(qh: u64) -> [u8; 8] {
    std::array::from_fn(|j| (0..8).fold(0u8, |acc, k| acc | (((qh >> (j + 8 * k)) & 1) as u8) << k))
}

/// Sixteen 6-bit values in 12 bytes, as the K16 (Q3) and K32 layouts store sub-block scales:
/// bytes 0..8 the low nibbles (byte `j`: value `j` low, `j + 8` high), bytes 8..12 the high
/// bit pairs (byte `j`, bits `2k`: value `j + 4k`).
fn six_bits(v: &[u8; 16]) -> [u8; 12] {
    std::array::from_fn(|i| match i {
        0..8 => (v[i] & 15) | (v[i + 8] & 15) << 4,
        _ => (0..4).fold(0u8, |acc, k| acc | (v[i - 8 + 4 * k] >> 4) << (2 * k)),
    })
}

/// Appends the header of one K32 super-block of a row group (`blk`: each row's block):
/// `d[n]`, `dmin[n]` f16, then each row's sixteen 6-bit scales and minimums ([`six_bits`])
/// byte-major across the rows.
fn push_k32_header(blob: &mut Vec<u8>, blk: &[&K32Block]) {
    blk.iter().for_each(|b| push_scales(blob, &[b.d], true));
    blk.iter().for_each(|b| push_scales(blob, &[b.dmin], true));
    let mut scales = [[0u8; 12]; MAX_GROUP];
    for (s, b) in scales.iter_mut().zip(blk) {
        *s = six_bits(&std::array::from_fn(|t| if t < 8 { b.sc[t] } else { b.m[t - 8] }));
    }
    for i in 0..12 {
        scales[..blk.len()].iter().for_each(|s| blob.push(s[i]));
    }
}

/// Appends the header of one K16 super-block of `kind` of a row group: `d[n]` (and for Q2
/// `dmin[n]`) f16, then the rows' sub-block scale bytes byte-major (Q6 the int8 scales, Q2
/// `sc | m << 4`, Q3 the sixteen 6-bit `sc + 32` as [`six_bits`] packs them).
fn push_k16_header(blob: &mut Vec<u8>, blk: &[&K16Block], kind: KKind) {
    blk.iter().for_each(|b| push_scales(blob, &[b.d], true));
    if kind == KKind::Q2 {
        blk.iter().for_each(|b| push_scales(blob, &[b.dmin], true));
    }
    let mut bytes = [[0u8; 16]; MAX_GROUP];
    for (out, b) in bytes.iter_mut().zip(blk) {
        match kind {
            KKind::Q6 => *out = b.sc.map(|s| s as u8),
            KKind::Q2 => *out = std::array::from_fn(|s| b.sc[s] as u8 | b.m[s] << 4),
            KKind::Q3 => out[..12].copy_from_slice(&six_bits(&b.sc.map(|s| (s as i32 + 32) as u8))),
        }
    }
    let n = if kind == KKind::Q3 { 12 } else { 16 };
    for i in 0..n {
        bytes[..blk.len()].iter().for_each(|s| blob.push(s[i]));
    }
}

/// Appends the value planes of one 16-value sub-block of 8 rows (`q`: each row's values) of a
/// [`Layout::K16Rows8`] group, as `targets::MicroKernel::k16` reads them: chunk `u` of values
/// `2u + k` of row `r` at byte `2r + k`; Q6 four chunks of low nibbles (chunk `i` holds
/// `u = i` low and `u = i + 4` high) then two of bits 4-5 in pairs (chunk `i`, bits `2j`:
/// `u = 4i + j`); Q3 and Q2 two chunks of bits 0-1 in pairs, then for Q3 one of bit 2 (bit
/// `u`).
fn push_k16_planes(blob: &mut Vec<u8>, q: &[&[u8]; MICRO_ROWS], kind: KKind) {
    // Byte `2r + k` of a chunk from `f(value of row r at 2u + k, u)` over the chunk's u.
    let chunk = |blob: &mut Vec<u8>, us: &[usize], f: &dyn Fn(u8, usize) -> u8| {
        for row in q {
            for k in 0..2 {
                blob.push(us.iter().enumerate().fold(0u8, |acc, (j, &u)| acc | f(row[2 * u + k], j)));
            }
        }
    };
    let pairs = |blob: &mut Vec<u8>, shift: u32| {
        for i in 0..2 {
            chunk(blob, &[4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], &|v, j| ((v >> shift) & 3) << (2 * j));
        }
    };
    match kind {
        KKind::Q6 => {
            for i in 0..4 {
                chunk(blob, &[i, i + 4], &|v, j| (v & 15) << (4 * j));
            }
            pairs(blob, 4);
        }
        KKind::Q3 => {
            pairs(blob, 0);
            chunk(blob, &[0, 1, 2, 3, 4, 5, 6, 7], &|v, j| ((v >> 2) & 1) << j);
        }
        KKind::Q2 => pairs(blob, 0),
    }
}

/// Packs one matrix (rows beyond `rows` in the last group are zero); large ones in parts of
/// whole row groups (`in_parts`): the packed bytes are the parts in order.
fn pack_matrix(format: QuantFormat, layout: Layout, raw: &[u8], decoded: &Blocks) -> Vec<Vec<u8>> {
    let (rows, _) = layout.matrix().expect("a matrix");
    let groups = (rows as usize).div_ceil(layout.group_rows());
    in_parts(groups, raw.len(), |g| {
        let mut out = Vec::with_capacity(g.len() * layout.group_stride() as usize);
        pack_groups(&mut out, format, layout, raw, decoded, g);
        out
    })
}

/// Packs row groups `groups` of one matrix into `blob`.
fn pack_groups(
    blob: &mut Vec<u8>,
    format: QuantFormat,
    layout: Layout,
    raw: &[u8],
    decoded: &Blocks,
    groups: Range<usize>,
) {
    let (rows, cols) = layout.matrix().map(|(r, c)| (r as usize, c as usize)).expect("a matrix");
    let row_bytes = format.row_bytes(cols).expect("verified");
    let row = |r: usize| (r < rows).then(|| &raw[r * row_bytes..(r + 1) * row_bytes]);
    let n_blocks = cols / BLOCK_SIZE;
    for g in groups {
        match layout {
            Layout::F32Rows4 { .. } => {
                let values: Vec<Vec<f32>> = (0..ROWS)
                    .map(|i| row(g * ROWS + i))
                    .map(|r| {
                        let mut v = vec![0.0f32; cols.div_ceil(4) * 4];
                        if let Some(bytes) = r {
                            dequantize_row(format, bytes, &mut v[..cols]);
                        }
                        v
                    })
                    .collect();
                for chunk in 0..cols.div_ceil(4) {
                    for v in &values {
                        v[chunk * 4..chunk * 4 + 4].iter().for_each(|&x| push_f32(blob, x));
                    }
                }
            }
            Layout::Q4Rows4 { half, mins, high, .. } | Layout::Q4Rows8 { half, mins, high, .. } => {
                let interleave = match layout {
                    Layout::Q4Rows8 { dwords: true, .. } => 4,
                    Layout::Q4Rows8 { .. } => 2,
                    _ => 0,
                };
                let Blocks::Q4(all) = decoded else { unreachable!() };
                let n = layout.group_rows();
                let blocks = group_blocks(all, g, n, rows, n_blocks);
                for b in 0..n_blocks {
                    let (mut ds, mut ms, mut qs, mut qh) =
                        ([0f32; MAX_GROUP], [0f32; MAX_GROUP], [[0u8; 16]; MAX_GROUP], [0; MAX_GROUP]);
                    let (ds, ms, qs, qh) = (&mut ds[..n], &mut ms[..n], &mut qs[..n], &mut qh[..n]);
                    for (i, r) in blocks.iter().enumerate() {
                        if let Some(blk) = r.get(b) {
                            (ds[i], ms[i], qs[i], qh[i]) = (blk.d, blk.m, blk.qs, blk.qh);
                        }
                    }
                    push_scales(blob, ds, half);
                    if mins {
                        push_scales(blob, ms, half);
                    }
                    push_values(blob, qs, interleave);
                    if high {
                        push_high_bits(blob, qh, interleave);
                    }
                }
            }
            Layout::Q8Rows4 { half, .. } | Layout::Q8Rows8 { half, .. } => {
                let Blocks::Q8(all) = decoded else { unreachable!() };
                let n = layout.group_rows();
                let blocks = group_blocks(all, g, n, rows, n_blocks);
                for b in 0..n_blocks {
                    let (mut ds, mut qs) = ([0f32; MAX_GROUP], [[0u8; 32]; MAX_GROUP]);
                    let (ds, qs) = (&mut ds[..n], &mut qs[..n]);
                    for (i, r) in blocks.iter().enumerate() {
                        if let Some(blk) = r.get(b) {
                            (ds[i], qs[i]) = (blk.d, blk.qs.map(|v| v as u8));
                        }
                    }
                    push_scales(blob, ds, half);
                    push_values(blob, qs, if n == MICRO_ROWS { 2 } else { 0 });
                }
            }
            Layout::F16Rows8 { .. } => {
                let rows: [Option<&[u8]>; MICRO_ROWS] = std::array::from_fn(|i| row(g * MICRO_ROWS + i));
                for c in 0..cols {
                    for r in &rows {
                        blob.extend_from_slice(r.map_or(&[0, 0], |bytes| &bytes[2 * c..2 * c + 2]));
                    }
                }
            }
            Layout::F16Rows4 { .. } => {
                let chunks = cols.div_ceil(8);
                for c in 0..chunks {
                    for i in 0..ROWS {
                        let n = (cols - 8 * c).min(8);
                        match row(g * ROWS + i) {
                            Some(bytes) => blob.extend_from_slice(&bytes[16 * c..16 * c + 2 * n]),
                            None => blob.extend_from_slice(&[0; 16][..2 * n]),
                        }
                        blob.extend_from_slice(&[0; 16][..16 - 2 * n]);
                    }
                }
            }
            Layout::K32Rows4 { high, .. } => {
                let Blocks::K32(all) = decoded else { unreachable!() };
                let n_super = cols / K32Block::VALUES;
                let blocks = group_blocks(all, g, ROWS, rows, n_super);
                let none = K32Block { d: 0.0, dmin: 0.0, sc: [0; 8], m: [0; 8], qs: [[0; 16]; 8], qh: [0; 8] };
                for b in 0..n_super {
                    let blk: [&K32Block; ROWS] = std::array::from_fn(|i| blocks[i].get(b).unwrap_or(&none));
                    push_k32_header(blob, &blk);
                    for s in 0..8 {
                        blk.iter().for_each(|b| blob.extend_from_slice(&b.qs[s]));
                        if high {
                            blk.iter().for_each(|b| blob.extend_from_slice(&b.qh[s].to_le_bytes()));
                        }
                    }
                }
            }
            Layout::K32Rows8 { high, dwords, .. } => {
                let Blocks::K32(all) = decoded else { unreachable!() };
                let n_super = cols / K32Block::VALUES;
                let blocks = group_blocks(all, g, MICRO_ROWS, rows, n_super);
                let none = K32Block { d: 0.0, dmin: 0.0, sc: [0; 8], m: [0; 8], qs: [[0; 16]; 8], qh: [0; 8] };
                let interleave = if dwords { 4 } else { 2 };
                for b in 0..n_super {
                    let blk: [&K32Block; MICRO_ROWS] = std::array::from_fn(|i| blocks[i].get(b).unwrap_or(&none));
                    push_k32_header(blob, &blk);
                    for s in 0..8 {
                        push_values(blob, &blk.map(|b| b.qs[s]), interleave);
                        if high {
                            push_high_bits(blob, &blk.map(|b| b.qh[s]), interleave);
                        }
                    }
                }
            }
            Layout::K16Rows8 { kind, .. } => {
                let Blocks::K16(all) = decoded else { unreachable!() };
                let n_super = cols / K16Block::VALUES;
                let blocks = group_blocks(all, g, MICRO_ROWS, rows, n_super);
                let none = K16Block { d: 0.0, dmin: 0.0, sc: [0; 16], m: [0; 16], q: [0; 256] };
                for b in 0..n_super {
                    let blk: [&K16Block; MICRO_ROWS] = std::array::from_fn(|i| blocks[i].get(b).unwrap_or(&none));
                    push_k16_header(blob, &blk, kind);
                    for s in 0..16 {
                        push_k16_planes(blob, &blk.map(|b| &b.q[16 * s..16 * s + 16]), kind);
                    }
                }
            }
            Layout::K16Rows4 { kind, .. } => {
                let Blocks::K16(all) = decoded else { unreachable!() };
                let n_super = cols / K16Block::VALUES;
                let blocks = group_blocks(all, g, ROWS, rows, n_super);
                let none = K16Block { d: 0.0, dmin: 0.0, sc: [0; 16], m: [0; 16], q: [0; 256] };
                // The crumbs of a 64-value unit: byte j holds bits `shift..shift + 2` of
                // values j, j + 16, j + 32, j + 48.
                let crumbs = |q: &[u8], shift: u32| -> [u8; 16] {
                    std::array::from_fn(|j| (0..4).fold(0u8, |acc, k| acc | ((q[j + 16 * k] >> shift) & 3) << (2 * k)))
                };
                for b in 0..n_super {
                    let blk: [&K16Block; ROWS] = std::array::from_fn(|i| blocks[i].get(b).unwrap_or(&none));
                    push_k16_header(blob, &blk, kind);
                    for u in 0..4 {
                        fn unit(b: &K16Block, u: usize) -> &[u8] {
                            &b.q[64 * u..64 * u + 64]
                        }
                        match kind {
                            KKind::Q6 => {
                                for b in &blk {
                                    for half in 0..2 {
                                        let q = &unit(b, u)[32 * half..32 * half + 32];
                                        blob.extend((0..16).map(|j| (q[j] & 15) | (q[j + 16] & 15) << 4));
                                    }
                                }
                                blk.iter().for_each(|b| blob.extend(crumbs(unit(b, u), 4)));
                            }
                            KKind::Q3 => {
                                blk.iter().for_each(|b| blob.extend(crumbs(unit(b, u), 0)));
                                for b in &blk {
                                    let qh = unit(b, u)
                                        .iter()
                                        .enumerate()
                                        .fold(0u64, |h, (i, &q)| h | (((q >> 2) & 1) as u64) << i);
                                    blob.extend_from_slice(&third_bits(qh));
                                }
                            }
                            KKind::Q2 => blk.iter().for_each(|b| blob.extend(crumbs(unit(b, u), 0))),
                        }
                    }
                }
            }
            Layout::LowRows8 { half, high, .. } => {
                let Blocks::Low(all) = decoded else { unreachable!() };
                let n_groups = cols / LowBlock::VALUES;
                let blocks = group_blocks(all, g, MICRO_ROWS, rows, n_groups);
                let kind = if high { KKind::Q3 } else { KKind::Q2 };
                for b in 0..n_groups {
                    let none = LowBlock { d: 0.0, m: 0.0, qs: [0; 16], qh: 0 };
                    let blk: [LowBlock; MICRO_ROWS] =
                        std::array::from_fn(|i| blocks[i].get(b).copied().unwrap_or(none));
                    push_scales(blob, &blk.map(|b| b.d), half);
                    push_scales(blob, &blk.map(|b| b.m), half);
                    // Each row's 64 values, crumbs and third bit together.
                    let q: [[u8; 64]; MICRO_ROWS] = blk.map(|b| {
                        std::array::from_fn(|i| (b.qs[i % 16] >> (2 * (i / 16))) & 3 | (((b.qh >> i) & 1) as u8) << 2)
                    });
                    for s in 0..4 {
                        push_k16_planes(blob, &std::array::from_fn(|r| &q[r][16 * s..16 * s + 16]), kind);
                    }
                }
            }
            Layout::LowRows4 { half, high, .. } => {
                let Blocks::Low(all) = decoded else { unreachable!() };
                let n_groups = cols / LowBlock::VALUES;
                let blocks = group_blocks(all, g, ROWS, rows, n_groups);
                for b in 0..n_groups {
                    let none = LowBlock { d: 0.0, m: 0.0, qs: [0; 16], qh: 0 };
                    let blk: [LowBlock; ROWS] = std::array::from_fn(|i| blocks[i].get(b).copied().unwrap_or(none));
                    push_scales(blob, &blk.map(|b| b.d), half);
                    push_scales(blob, &blk.map(|b| b.m), half);
                    blk.iter().for_each(|b| blob.extend_from_slice(&b.qs));
                    if high {
                        blk.iter().for_each(|b| blob.extend_from_slice(&third_bits(b.qh)));
                    }
                }
            }
            Layout::F32Vector { .. } => unreachable!(),
        }
    }
}

/// Raw bytes of the weights packed at once: consecutive weights up to this many (or one
/// larger weight) are decoded and packed in parallel, written in order, then released.
const WINDOW_BYTES: usize = 64 << 20;

/// Packs every weight of `model` and the constant tables its ops need into `sink`, in
/// weight-id order so that the blob is deterministic. With `micro_rows` (the target's
/// schedule), the matrices of the Q4, Q5, Q8, K32 and K16 kernel forms take the
/// micro-kernels' 8-row layouts. Weights go through in windows of about [`WINDOW_BYTES`]: each window's
/// weights are packed on rayon's pool, written, and released to the model's source
/// ([`Model::release_weight`]), so the memory packing needs follows the largest tensor, not
/// the model. Errors are the sink's (a full disk).
pub fn pack(model: &Model<'_>, micro_rows: Option<u32>, sink: WeightsSink<'_>) -> std::io::Result<Packed> {
    pack_in_windows(model, micro_rows, sink, WINDOW_BYTES)
}

/// [`pack`] with windows of `window` raw bytes.
fn pack_in_windows(
    model: &Model<'_>,
    micro_rows: Option<u32>,
    mut sink: WeightsSink<'_>,
    window: usize,
) -> std::io::Result<Packed> {
    let graph = &model.graph;
    let lens: Vec<usize> = (0..graph.weights.len()).map(|i| model.weight_len(WeightId(i as u32))).collect();
    let micro = match micro_rows {
        None => false,
        Some(r) if r as usize == MICRO_ROWS => true,
        Some(r) => unreachable!("no micro-kernel layout has {r} rows"),
    };
    // A weight's bytes are read (converted, when it was requantized) as its window is packed.
    let pack_one = |i: usize| {
        let w = &graph.weights[i];
        let raw = model.weight_bytes(WeightId(i as u32));
        let raw = &raw[..];
        let decoded = decode(w.format, &w.shape, raw);
        let layout = layout_for(w.format, &w.shape, &decoded, micro, graph.act_dtype);
        let bytes = match layout {
            Layout::F32Vector { n } => {
                let mut bytes = Vec::with_capacity(4 * n as usize);
                dequantize(w.format, raw, 1, n as usize).into_iter().for_each(|v| push_f32(&mut bytes, v));
                vec![bytes]
            }
            _ => pack_matrix(w.format, layout, raw, &decoded),
        };
        (layout, bytes)
    };
    let mut weights = Vec::with_capacity(graph.weights.len());
    let total: u64 = lens.iter().map(|&n| n as u64).sum();
    let mut done = 0u64;
    let mut start = 0;
    while start < lens.len() {
        let mut end = start + 1;
        let mut bytes = lens[start];
        while end < lens.len() && bytes + lens[end] <= window {
            bytes += lens[end];
            end += 1;
        }
        // One flat parallel iteration on rayon's pool: a unit is a weight, and a large matrix
        // splits into units of row ranges (`in_parts`) that idle threads steal. The parts are
        // collected and written in the graph's order: the blob does not depend on the
        // threads or the schedule.
        let parts: Vec<(Layout, Vec<Vec<u8>>)> = (start..end).into_par_iter().map(pack_one).collect();
        for (layout, bytes) in parts {
            let offset = sink.len();
            for part in bytes {
                sink.write(&part)?;
            }
            sink.pad(ALIGN)?;
            weights.push(PackedWeight { offset, layout });
        }
        (start..end).for_each(|i| model.release_weight(WeightId(i as u32)));
        done += bytes as u64;
        if let Some(progress) = sink.progress {
            progress(done, total);
        }
        start = end;
    }
    let mut tables = BTreeMap::new();
    for (key, (head_dim, theta, scaling)) in rope_tables(graph) {
        let offset = sink.len();
        let mut table = Vec::with_capacity(rope_table_bytes(&key, graph.context) as usize);
        for p in 0..graph.context as usize {
            let angles: Vec<(f64, f64)> =
                scaling.angles(head_dim, theta, p as f64).into_iter().map(f64::sin_cos).collect();
            angles.iter().for_each(|&(_, c)| (0..2).for_each(|_| push_f32(&mut table, c as f32)));
            angles.iter().for_each(|&(s, _)| {
                push_f32(&mut table, -s as f32);
                push_f32(&mut table, s as f32);
            });
        }
        debug_assert_eq!(table.len() as u64, rope_table_bytes(&key, graph.context));
        sink.write(&table)?;
        sink.pad(ALIGN)?;
        tables.insert(key, offset);
    }
    sink.pad(ALIGN)?;
    let (len, checksum) = (sink.len(), sink.checksum.finish());
    if let Some(file) = sink.file.take() {
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    Ok(Packed { blob: sink.memory, len, checksum, weights, rope_tables: tables })
}

impl Packed {
    pub fn weight(&self, w: WeightId) -> PackedWeight {
        self.weights[w.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::quant::quantize_row;

    fn matrix(format: QuantFormat, rows: usize, cols: usize) -> Vec<u8> {
        (0..rows)
            .flat_map(|r| {
                let values: Vec<f32> = (0..cols).map(|c| ((r * 31 + c * 7) % 23) as f32 / 7.0 - 1.5).collect();
                quantize_row(format, &values)
            })
            .collect()
    }

    #[test]
    fn is_f16_agrees_with_a_conversion() {
        let mut values: Vec<f32> = (0..=u16::MAX).map(|h| half::f16::from_bits(h).to_f32()).collect();
        values.extend((0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        values.extend([f32::MIN_POSITIVE, 1e-30, 65520.0, 65504.0 + 32.0, 2f32.powi(-25), 3.0 * 2f32.powi(-25)]);
        for v in values {
            let exact = v.is_finite() && half::f16::from_f32(v).to_f32().to_bits() == v.to_bits();
            assert_eq!(is_f16(v), exact, "{v:e} ({:#010x})", v.to_bits());
        }
    }

    /// Formats whose scales are f16 keep them (the library holds the file's bytes: a 4-row
    /// group of 32 values is 4 GGUF blocks, an 8-row group of the micro-kernel layouts 8), q4_0
    /// stores no offsets, and the K-quants and kiln's 64-value formats keep their bytes.
    #[test]
    fn layouts_keep_the_formats_bytes() {
        let (rows, cols) = (8u32, 256u32);
        for micro in [false, true] {
            let q4 = |half, mins| match micro {
                false => Layout::Q4Rows4 { rows, cols, half, mins, high: false },
                true => Layout::Q4Rows8 { rows, cols, half, mins, high: false, dwords: false },
            };
            let q5 = |half, mins| match micro {
                false => Layout::Q4Rows4 { rows, cols, half, mins, high: true },
                true => Layout::Q4Rows8 { rows, cols, half, mins, high: true, dwords: false },
            };
            let q8 = match micro {
                false => Layout::Q8Rows4 { rows, cols, half: true },
                true => Layout::Q8Rows8 { rows, cols, half: true },
            };
            let (q4_k, q5_k) = match micro {
                false => (Layout::K32Rows4 { rows, cols, high: false }, Layout::K32Rows4 { rows, cols, high: true }),
                true => (
                    Layout::K32Rows8 { rows, cols, high: false, dwords: false },
                    Layout::K32Rows8 { rows, cols, high: true, dwords: false },
                ),
            };
            let low = |high| match micro {
                false => Layout::LowRows4 { rows, cols, half: true, high },
                true => Layout::LowRows8 { rows, cols, half: true, high },
            };
            for (format, want) in [
                (QuantFormat::Q4_0, q4(true, false)),
                (QuantFormat::Q4_1, q4(true, true)),
                (QuantFormat::Q8_0, q8),
                (QuantFormat::Q4_K, q4_k),
                (QuantFormat::Q5_0, q5(true, false)),
                (QuantFormat::Q5_1, q5(true, true)),
                (QuantFormat::Q5_K, q5_k),
                (QuantFormat::Q2_G64, low(false)),
                (QuantFormat::Q3_G64, low(true)),
            ] {
                let raw = matrix(format, rows as usize, cols as usize);
                let blocks = decode(format, &[rows, cols], &raw);
                let layout = layout_for(format, &[rows, cols], &blocks, micro, ActDType::Q16);
                assert_eq!(layout, want, "{}", format.name());
                // On the q8 grid, Q4 and Q5 micro-kernel groups take 4-byte chunks, the
                // same bytes reordered.
                let q8 = layout_for(format, &[rows, cols], &blocks, micro, ActDType::Q8);
                let dwords = micro && matches!(want, Layout::Q4Rows8 { .. } | Layout::K32Rows8 { .. });
                if matches!(want, Layout::LowRows4 { .. } | Layout::LowRows8 { .. }) {
                    assert_eq!(q8, layout, "{}: one layout on every grid", format.name());
                }
                assert_eq!(
                    matches!(q8, Layout::Q4Rows8 { dwords: true, .. } | Layout::K32Rows8 { dwords: true, .. }),
                    dwords,
                    "{}",
                    format.name()
                );
                assert_eq!(q8.group_stride(), layout.group_stride());
                assert_eq!(
                    layout.group_stride(),
                    layout.group_rows() as u64 * format.row_bytes(cols as usize).unwrap() as u64,
                    "{}",
                    format.name()
                );
            }
        }
    }

    /// Packing into a file, in small windows, writes the bytes packing into memory holds, with the checksum of those bytes; the offsets are the same.
    #[test]
    fn a_file_sink_gets_the_bytes_of_a_memory_sink() {
        // Weights only (packing reads no node but ropes), packed in windows of 4 KiB: a
        // matrix larger than one, then a vector and a matrix sharing one.
        let text = "graph \"t\" context=8\nw0 = weight q4_0[4100, 64] \"a\"\nw1 = weight f32[64] \"n\"\n\
                    w2 = weight q8_0[40, 64] \"b\"\nv0 = input 0 : f32[seq, 64]\nv1 = silu v0 : f32[seq, 64]\n\
                    output v1\n";
        let graph = ir::parse::parse_graph(text).unwrap();
        let weights: Vec<Vec<u8>> = graph
            .weights
            .iter()
            .map(|w| {
                matrix(
                    w.format,
                    w.n_values() as usize / *w.shape.last().unwrap() as usize,
                    *w.shape.last().unwrap() as usize,
                )
            })
            .collect();
        let model = Model::borrowed(graph, &weights);
        let memory = pack(&model, Some(MICRO_ROWS as u32), WeightsSink::memory()).unwrap();
        let path = std::env::temp_dir().join(format!("kiln-pack-sink-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let filed = pack_in_windows(&model, Some(MICRO_ROWS as u32), WeightsSink::file(file), 4096).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(filed.blob.is_empty() && bytes == memory.blob);
        assert_eq!((filed.len, memory.len), (bytes.len() as u64, bytes.len() as u64));
        assert_eq!((filed.checksum, memory.checksum), (abi::weights_checksum(&bytes), abi::weights_checksum(&bytes)));
        assert_eq!(filed.weights, memory.weights);
        assert!(packed_bytes_at_least(&model.graph, Some(MICRO_ROWS as u32)) <= memory.len);
    }

    /// Every format packs into at most its own bytes (for rows a whole number of every block
    /// size and of the 8-column chunks) on both activation grids, on targets without
    /// micro-kernels and with them.
    #[test]
    fn every_format_packs_into_at_most_its_own_bytes() {
        let (rows, cols) = (16u32, 512u32);
        for format in QuantFormat::ALL {
            let raw = matrix(format, rows as usize, cols as usize);
            for micro in [false, true] {
                let blocks = decode(format, &[rows, cols], &raw);
                for act in [ActDType::Q16, ActDType::Q8] {
                    let packed = layout_for(format, &[rows, cols], &blocks, micro, act).bytes();
                    let stored = raw.len() as u64;
                    assert!(
                        packed <= stored,
                        "{} packs into {packed} bytes against its {stored} (micro {micro}, {act:?})",
                        format.name()
                    );
                }
            }
        }
    }

    /// f16 and bf16 matrices keep 16 bits a value (columns padded to 8 in the 4-row layout,
    /// rows to 8 in the micro-kernels' one), except an f16 matrix holding an infinity or NaN,
    /// which the kernels' widening (integer, or `vcvtph2ps` for finite values only by the
    /// contract) does not cover.
    #[test]
    fn sixteen_bit_floats_stay_sixteen_bits() {
        let (rows, cols) = (5u32, 37u32);
        for micro in [false, true] {
            for (format, brain) in [(QuantFormat::F16, false), (QuantFormat::BF16, true)] {
                let mut raw = matrix(format, rows as usize, cols as usize);
                let blocks = decode(format, &[rows, cols], &raw);
                let layout = layout_for(format, &[rows, cols], &blocks, micro, ActDType::Q16);
                let (want, bytes) = match micro {
                    false => (Layout::F16Rows4 { rows, cols, brain }, 2 * (4 * 40 * 2)),
                    true => (Layout::F16Rows8 { rows, cols, brain }, 8 * 37 * 2),
                };
                assert_eq!(layout, want);
                assert_eq!(layout.bytes(), bytes);
                raw[7] = 0x7c; // value 3 of row 0: an f16 infinity (0x7c00), a bf16 finite value
                let blocks = decode(format, &[rows, cols], &raw);
                let want = if brain { layout } else { Layout::F32Rows4 { rows, cols } };
                assert_eq!(layout_for(format, &[rows, cols], &blocks, micro, ActDType::Q16), want);
            }
        }
    }

    /// A matrix large enough to be decoded and packed in several parts gives the bytes of one
    /// pass over all of it, whatever the size of rayon's pool.
    #[test]
    fn parts_give_the_bytes_of_one_pass_on_any_pool() {
        let (rows, cols) = (1003u32, 2048u32);
        let groups = |layout: Layout| (rows as usize).div_ceil(layout.group_rows());
        for format in [QuantFormat::Q4_0, QuantFormat::Q5_1, QuantFormat::Q8_0, QuantFormat::Q6_K] {
            let raw = matrix(format, rows as usize, cols as usize);
            assert!(raw.len() > 4 * PART_BYTES, "{}: several parts", format.name());
            for micro in [false, true] {
                let whole = match format.spec().kernel {
                    KernelForm::Q8(_) => Blocks::Q8(q8_blocks(format, &raw).unwrap()),
                    KernelForm::K16(..) => Blocks::K16(k16_blocks(format, &raw).unwrap()),
                    KernelForm::K32(..) => Blocks::K32(k32_blocks(format, &raw).unwrap()),
                    _ => Blocks::Q4(q4_blocks(format, &raw).unwrap()),
                };
                let layout = layout_for(format, &[rows, cols], &whole, micro, ActDType::Q16);
                let mut want = Vec::new();
                pack_groups(&mut want, format, layout, &raw, &whole, 0..groups(layout));
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let (got_layout, parts) = pool.install(|| {
                        let decoded = decode(format, &[rows, cols], &raw);
                        let layout = layout_for(format, &[rows, cols], &decoded, micro, ActDType::Q16);
                        (layout, pack_matrix(format, layout, &raw, &decoded))
                    });
                    assert_eq!(got_layout, layout, "{}", format.name());
                    assert!(parts.len() > 1, "{}: packed in parts", format.name());
                    assert!(parts.concat() == want, "{} on {threads} threads (micro: {micro})", format.name());
                }
            }
        }
    }
}
