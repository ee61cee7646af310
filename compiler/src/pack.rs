//! Weight packing: chooses each weight's memory layout for its kernels and writes the weights
//! blob, plus the constant tables the kernels read (rotary embedding cosines and sines).
//!
//! Matrices are stored in groups of [`ROWS`] rows interleaved block by block (the layout that
//! let Cranelift's 128-bit GEMV beat ggml's AVX2 kernel: one pass over the activation block
//! serves four output rows, and the weight stream is read once, in order). Float16 scales are
//! widened to float32 here, at compile time, because Cranelift cannot convert f16.
//! Which layout a weight gets follows its format's kernel form (`ir::quant::KernelForm`): the
//! format's own file turns its blocks into the 32-value Q4 or Q8 blocks packed here, so this
//! file names no format.

use std::collections::BTreeMap;

use ir::quant::{dequantize, dequantize_row, q4_blocks, q8_blocks, q8s16_blocks, KernelForm, BLOCK_SIZE};
use ir::{Op, QuantFormat, WeightId};

use crate::model::Model;

/// Rows per interleaved group.
pub const ROWS: usize = 4;
/// Bytes of one block of a Q4 group: `d[4] f32, m[4] f32, qs[4][16]`.
pub const Q4_GROUP_BLOCK: usize = 16 + 16 + 4 * 16;
/// Bytes of one block of a Q8 group: `d[4] f32, qs[4][32] i8`.
pub const Q8_GROUP_BLOCK: usize = 16 + 4 * 32;
/// Bytes of one block of a Q8S16 group: `d[2][4] f32` (per 16-value half, per row), then
/// `m[2][4] f32` only when the matrix has offsets, then `qs[4][32] i8`.
pub const fn q8s16_group_block(mins: bool) -> usize {
    32 + if mins { 32 } else { 0 } + 4 * 32
}
/// Bytes of one 4-column chunk of an f32 group: `x[4 rows][4 cols] f32`.
pub const F32_GROUP_CHUNK: usize = 4 * 16;

/// Alignment of every item in the blob.
pub const ALIGN: usize = 64;

/// How one weight is laid out in the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A plain f32 vector of `n` values (norm weights, whatever their stored format).
    F32Vector { n: u32 },
    /// F32/F16 matrix as f32, groups of 4 rows, 4-column chunks (columns padded with zeros).
    F32Rows4 { rows: u32, cols: u32 },
    /// Matrix of a format whose kernel form is Q4, groups of 4 rows interleaved per 32-value block.
    Q4Rows4 { rows: u32, cols: u32 },
    /// Matrix of a format whose kernel form is Q8, groups of 4 rows interleaved per 32-value block.
    Q8Rows4 { rows: u32, cols: u32 },
    /// Matrix of a format whose kernel form is Q8S16, groups of 4 rows interleaved per 32-value
    /// block; `mins` when some block has a nonzero offset (else the offsets are not stored).
    Q8S16Rows4 { rows: u32, cols: u32, mins: bool },
}

impl Layout {
    /// Bytes between consecutive 4-row groups of a matrix layout.
    pub fn group_stride(self) -> u64 {
        match self {
            Layout::F32Vector { .. } => 0,
            Layout::F32Rows4 { cols, .. } => (cols as u64).div_ceil(4) * F32_GROUP_CHUNK as u64,
            Layout::Q4Rows4 { cols, .. } => cols as u64 / 32 * Q4_GROUP_BLOCK as u64,
            Layout::Q8Rows4 { cols, .. } => cols as u64 / 32 * Q8_GROUP_BLOCK as u64,
            Layout::Q8S16Rows4 { cols, mins, .. } => cols as u64 / 32 * q8s16_group_block(mins) as u64,
        }
    }

    /// `(rows, cols)` of a matrix layout.
    pub fn matrix(self) -> Option<(u32, u32)> {
        match self {
            Layout::F32Vector { .. } => None,
            Layout::F32Rows4 { rows, cols }
            | Layout::Q4Rows4 { rows, cols }
            | Layout::Q8Rows4 { rows, cols }
            | Layout::Q8S16Rows4 { rows, cols, .. } => Some((rows, cols)),
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
    pub blob: Vec<u8>,
    pub weights: Vec<PackedWeight>,
    /// Rotary tables by `(head_dim, theta bits)`: offset of `context` rows of
    /// `cos[head_dim]` (each cosine twice) then `sin[head_dim]` (`-sin, +sin` per pair).
    pub rope_tables: BTreeMap<(u32, u32), u64>,
}

fn pad_to(blob: &mut Vec<u8>, align: usize) {
    blob.resize(blob.len().div_ceil(align) * align, 0);
}

fn layout_for(format: QuantFormat, shape: &[u32], raw: &[u8]) -> Layout {
    match (format.spec().kernel, shape) {
        (_, [n]) => Layout::F32Vector { n: *n },
        (KernelForm::F32, [rows, cols]) => Layout::F32Rows4 { rows: *rows, cols: *cols },
        (KernelForm::Q4(_), [rows, cols]) => Layout::Q4Rows4 { rows: *rows, cols: *cols },
        (KernelForm::Q8(_), [rows, cols]) => Layout::Q8Rows4 { rows: *rows, cols: *cols },
        (KernelForm::Q8S16(_), [rows, cols]) => {
            let mins = q8s16_blocks(format, raw).expect("Q8S16 form").iter().any(|b| b.m != [0.0; 2]);
            Layout::Q8S16Rows4 { rows: *rows, cols: *cols, mins }
        }
        _ => unreachable!("the verifier allows 1-D and 2-D weights only"),
    }
}

fn push_f32(blob: &mut Vec<u8>, v: f32) {
    blob.extend_from_slice(&v.to_le_bytes());
}

/// Packs one matrix into `blob` (rows beyond `rows` in the last group are zero).
fn pack_matrix(blob: &mut Vec<u8>, format: QuantFormat, layout: Layout, raw: &[u8]) {
    let (rows, cols) = layout.matrix().map(|(r, c)| (r as usize, c as usize)).expect("a matrix");
    let row_bytes = format.row_bytes(cols).expect("verified");
    let row = |r: usize| (r < rows).then(|| &raw[r * row_bytes..(r + 1) * row_bytes]);
    let n_blocks = cols / BLOCK_SIZE;
    for g in 0..rows.div_ceil(ROWS) {
        let group: Vec<Option<&[u8]>> = (0..ROWS).map(|i| row(g * ROWS + i)).collect();
        match layout {
            Layout::F32Rows4 { .. } => {
                let values: Vec<Vec<f32>> = group
                    .iter()
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
            Layout::Q4Rows4 { .. } => {
                let blocks: Vec<Vec<_>> = group
                    .iter()
                    .map(|r| r.map(|r| q4_blocks(format, r).expect("Q4 form")).unwrap_or_default())
                    .collect();
                for b in 0..n_blocks {
                    let (mut ds, mut ms, mut qs) = ([0f32; 4], [0f32; 4], [[0u8; 16]; 4]);
                    for (i, r) in blocks.iter().enumerate() {
                        if let Some(blk) = r.get(b) {
                            (ds[i], ms[i], qs[i]) = (blk.d, blk.m, blk.qs);
                        }
                    }
                    ds.iter().chain(&ms).for_each(|&x| push_f32(blob, x));
                    qs.iter().for_each(|q| blob.extend_from_slice(q));
                }
            }
            Layout::Q8Rows4 { .. } => {
                let blocks: Vec<Vec<_>> = group
                    .iter()
                    .map(|r| r.map(|r| q8_blocks(format, r).expect("Q8 form")).unwrap_or_default())
                    .collect();
                for b in 0..n_blocks {
                    let (mut ds, mut qs) = ([0f32; 4], [[0i8; 32]; 4]);
                    for (i, r) in blocks.iter().enumerate() {
                        if let Some(blk) = r.get(b) {
                            (ds[i], qs[i]) = (blk.d, blk.qs);
                        }
                    }
                    ds.iter().for_each(|&x| push_f32(blob, x));
                    qs.iter().for_each(|q| blob.extend(q.iter().map(|&v| v as u8)));
                }
            }
            Layout::Q8S16Rows4 { mins, .. } => {
                let blocks: Vec<Vec<_>> = group
                    .iter()
                    .map(|r| r.map(|r| q8s16_blocks(format, r).expect("Q8S16 form")).unwrap_or_default())
                    .collect();
                for b in 0..n_blocks {
                    let (mut ds, mut ms, mut qs) = ([[0f32; 4]; 2], [[0f32; 4]; 2], [[0i8; 32]; 4]);
                    for (i, r) in blocks.iter().enumerate() {
                        if let Some(blk) = r.get(b) {
                            (ds[0][i], ds[1][i], ms[0][i], ms[1][i], qs[i]) =
                                (blk.d[0], blk.d[1], blk.m[0], blk.m[1], blk.qs);
                        }
                    }
                    ds.iter().flatten().for_each(|&x| push_f32(blob, x));
                    if mins {
                        ms.iter().flatten().for_each(|&x| push_f32(blob, x));
                    }
                    qs.iter().for_each(|q| blob.extend(q.iter().map(|&v| v as u8)));
                }
            }
            Layout::F32Vector { .. } => unreachable!(),
        }
    }
}

/// Packs every weight of `model` and the constant tables its ops need, in weight-id order so
/// that the blob is deterministic.
pub fn pack(model: &Model<'_>) -> Packed {
    let graph = &model.graph;
    let raw: Vec<&[u8]> = model.weights().collect();
    let mut blob = Vec::new();
    let mut weights = Vec::with_capacity(graph.weights.len());
    for (i, w) in graph.weights.iter().enumerate() {
        let layout = layout_for(w.format, &w.shape, raw[i]);
        let offset = blob.len() as u64;
        match layout {
            Layout::F32Vector { n } => {
                for v in dequantize(w.format, raw[i], 1, n as usize) {
                    push_f32(&mut blob, v);
                }
            }
            _ => pack_matrix(&mut blob, w.format, layout, raw[i]),
        }
        pad_to(&mut blob, ALIGN);
        weights.push(PackedWeight { offset, layout });
    }
    let mut rope_tables = BTreeMap::new();
    for node in &graph.nodes {
        if let Op::Rope { head_dim, theta, .. } = node.op {
            rope_tables.entry((head_dim, theta.to_bits())).or_insert_with(|| {
                let offset = blob.len() as u64;
                let hd = head_dim as usize;
                for p in 0..graph.context as usize {
                    let angles: Vec<(f64, f64)> = (0..hd / 2)
                        .map(|i| (p as f64 * (theta as f64).powf(-2.0 * i as f64 / hd as f64)).sin_cos())
                        .collect();
                    angles.iter().for_each(|&(_, c)| (0..2).for_each(|_| push_f32(&mut blob, c as f32)));
                    angles.iter().for_each(|&(s, _)| {
                        push_f32(&mut blob, -s as f32);
                        push_f32(&mut blob, s as f32);
                    });
                }
                pad_to(&mut blob, ALIGN);
                offset
            });
        }
    }
    pad_to(&mut blob, ALIGN);
    Packed { blob, weights, rope_tables }
}

impl Packed {
    pub fn weight(&self, w: WeightId) -> PackedWeight {
        self.weights[w.index()]
    }
}
