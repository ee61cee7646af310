//! Weight packing: chooses each weight's memory layout for its kernels and writes the weights
//! blob, plus the constant tables the kernels read (rotary embedding cosines and sines).
//!
//! Matrices are stored in groups of [`ROWS`] rows interleaved block by block (the layout that
//! let Cranelift's 128-bit GEMV beat ggml's AVX2 kernel: one pass over the activation block
//! serves four output rows, and the weight stream is read once, in order). Float16 scales are
//! widened to float32 here, at compile time, because Cranelift cannot convert f16.
//! Q4_0 is stored as Q4_1 with `m = -8 d`, so one kernel serves both.

use std::collections::BTreeMap;

use half::f16;
use ir::quant::{dequantize, dequantize_row, BLOCK_SIZE};
use ir::{Graph, Op, QuantFormat, WeightId};

/// Rows per interleaved group.
pub const ROWS: usize = 4;
/// Bytes of one block of a Q4 group: `d[4] f32, m[4] f32, qs[4][16]`.
pub const Q4_GROUP_BLOCK: usize = 16 + 16 + 4 * 16;
/// Bytes of one block of a Q8 group: `d[4] f32, qs[4][32] i8`.
pub const Q8_GROUP_BLOCK: usize = 16 + 4 * 32;
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
    /// Q4_0/Q4_1 matrix, groups of 4 rows interleaved per 32-value block.
    Q4Rows4 { rows: u32, cols: u32 },
    /// Q8_0 matrix, groups of 4 rows interleaved per 32-value block.
    Q8Rows4 { rows: u32, cols: u32 },
}

impl Layout {
    /// Bytes between consecutive 4-row groups of a matrix layout.
    pub fn group_stride(self) -> u64 {
        match self {
            Layout::F32Vector { .. } => 0,
            Layout::F32Rows4 { cols, .. } => (cols as u64).div_ceil(4) * F32_GROUP_CHUNK as u64,
            Layout::Q4Rows4 { cols, .. } => cols as u64 / 32 * Q4_GROUP_BLOCK as u64,
            Layout::Q8Rows4 { cols, .. } => cols as u64 / 32 * Q8_GROUP_BLOCK as u64,
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

fn layout_for(format: QuantFormat, shape: &[u32]) -> Layout {
    match (format, shape) {
        (_, [n]) => Layout::F32Vector { n: *n },
        (QuantFormat::F32 | QuantFormat::F16, [rows, cols]) => Layout::F32Rows4 { rows: *rows, cols: *cols },
        (QuantFormat::Q4_0 | QuantFormat::Q4_1, [rows, cols]) => Layout::Q4Rows4 { rows: *rows, cols: *cols },
        (QuantFormat::Q8_0, [rows, cols]) => Layout::Q8Rows4 { rows: *rows, cols: *cols },
        _ => unreachable!("the verifier allows 1-D and 2-D weights only"),
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn push_f32(blob: &mut Vec<u8>, v: f32) {
    blob.extend_from_slice(&v.to_le_bytes());
}

/// Packs one matrix into `blob` (rows beyond `rows` in the last group are zero).
fn pack_matrix(blob: &mut Vec<u8>, format: QuantFormat, layout: Layout, raw: &[u8]) {
    let (rows, cols) = match layout {
        Layout::F32Rows4 { rows, cols } | Layout::Q4Rows4 { rows, cols } | Layout::Q8Rows4 { rows, cols } => {
            (rows as usize, cols as usize)
        }
        Layout::F32Vector { .. } => unreachable!(),
    };
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
                let bb = format.block_bytes();
                for b in 0..n_blocks {
                    let (mut ds, mut ms, mut qs) = ([0f32; 4], [0f32; 4], [[0u8; 16]; 4]);
                    for (i, r) in group.iter().enumerate() {
                        if let Some(bytes) = r {
                            let blk = &bytes[b * bb..(b + 1) * bb];
                            ds[i] = f16_at(blk, 0);
                            if format == QuantFormat::Q4_1 {
                                ms[i] = f16_at(blk, 2);
                                qs[i].copy_from_slice(&blk[4..20]);
                            } else {
                                ms[i] = -8.0 * ds[i];
                                qs[i].copy_from_slice(&blk[2..18]);
                            }
                        }
                    }
                    ds.iter().chain(&ms).for_each(|&x| push_f32(blob, x));
                    qs.iter().for_each(|q| blob.extend_from_slice(q));
                }
            }
            Layout::Q8Rows4 { .. } => {
                for b in 0..n_blocks {
                    let (mut ds, mut qs) = ([0f32; 4], [[0u8; 32]; 4]);
                    for (i, r) in group.iter().enumerate() {
                        if let Some(bytes) = r {
                            let blk = &bytes[b * 34..(b + 1) * 34];
                            ds[i] = f16_at(blk, 0);
                            qs[i].copy_from_slice(&blk[2..34]);
                        }
                    }
                    ds.iter().for_each(|&x| push_f32(blob, x));
                    qs.iter().for_each(|q| blob.extend_from_slice(q));
                }
            }
            Layout::F32Vector { .. } => unreachable!(),
        }
    }
}

/// Packs every weight of `graph` (raw bytes in `raw`, indexed by weight id) and the constant
/// tables its ops need, in weight-id order so that the blob is deterministic.
pub fn pack<W: AsRef<[u8]>>(graph: &Graph, raw: &[W]) -> Packed {
    let mut blob = Vec::new();
    let mut weights = Vec::with_capacity(graph.weights.len());
    for (i, w) in graph.weights.iter().enumerate() {
        let layout = layout_for(w.format, &w.shape);
        let offset = blob.len() as u64;
        match layout {
            Layout::F32Vector { n } => {
                for v in dequantize(w.format, raw[i].as_ref(), 1, n as usize) {
                    push_f32(&mut blob, v);
                }
            }
            _ => pack_matrix(&mut blob, w.format, layout, raw[i].as_ref()),
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
