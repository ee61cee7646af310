//! Row-wise kernels: embedding lookup, RMSNorm (optionally quantizing its output), q16
//! quantization, rotary embedding, SiLU, mul and add. Each thread takes a share of the token
//! rows; rows are processed four floats at a time with a partial vector for the tail.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I16, I16X8, I32, I32X4, I64, I8, I8X16};
use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind, Value};

use super::abi;
use super::builder::{rw, Kb};
use crate::pack::{Layout, PackedWeight, F32_GROUP_CHUNK};
use crate::passes::plan_memory::{q16_block_bytes, Location};
use ir::ActDType;

/// This thread's token rows: `[start, end)` of `first..n_tokens`.
fn my_rows(kb: &mut Kb, skip_rows: bool) -> (Value, Value) {
    let n_tokens = kb.ctx_field(abi::ctx::N_TOKENS);
    let first = if skip_rows { kb.ctx_field(abi::ctx::OUT_START) } else { kb.iconst(0) };
    kb.partition(first, n_tokens)
}

/// Calls `f(kb, byte_offset, lanes)` for each 4-float chunk of an `n`-float row.
fn for_chunks(kb: &mut Kb, n: i64, mut f: impl FnMut(&mut Kb, Value, usize)) {
    let zero = kb.iconst(0);
    let end = kb.iconst(n / 4 * 16);
    kb.for_range(zero, end, 16, &[], |kb, off, _| {
        f(kb, off, 4);
        vec![]
    });
    if n % 4 != 0 {
        let off = kb.iconst(n / 4 * 16);
        f(kb, off, (n % 4) as usize);
    }
}

fn load_n(kb: &mut Kb, ptr: Value, off: Value, lanes: usize) -> Value {
    let p = kb.b.ins().iadd(ptr, off);
    if lanes == 4 {
        kb.load(F32X4, p, 0)
    } else {
        kb.load_partial(p, 0, lanes)
    }
}

fn store_n(kb: &mut Kb, v: Value, ptr: Value, off: Value, lanes: usize) {
    let p = kb.b.ins().iadd(ptr, off);
    if lanes == 4 {
        kb.store(v, p, 0)
    } else {
        kb.store_partial(v, p, 0, lanes)
    }
}

/// Elementwise kinds of [`emit_elementwise`].
#[derive(Clone, Copy, Debug)]
pub enum Elementwise {
    Silu,
    Mul,
    Add,
    /// `y = a` (an output copied out of the arena).
    Copy,
}

/// `y = silu(a)`, `a * b`, `a + b` or `a` over `[seq, n]` rows.
pub fn emit_elementwise(
    kb: &mut Kb,
    kind: Elementwise,
    a: Location,
    b: Option<Location>,
    y: Location,
    n: u32,
    skip_rows: bool,
) {
    let n = n as i64;
    let (a, b, y) = (kb.location(a), b.map(|b| kb.location(b)), kb.location(y));
    let (t0, t1) = my_rows(kb, skip_rows);
    kb.for_range(t0, t1, 1, &[], |kb, t, _| {
        let row = kb.b.ins().imul_imm_s(t, 4 * n);
        let (ar, yr) = (kb.b.ins().iadd(a, row), kb.b.ins().iadd(y, row));
        let br = b.map(|b| kb.b.ins().iadd(b, row));
        for_chunks(kb, n, |kb, off, lanes| {
            let x = load_n(kb, ar, off, lanes);
            let out = match kind {
                Elementwise::Silu => kb.vsilu(x),
                Elementwise::Copy => x,
                Elementwise::Mul | Elementwise::Add => {
                    let other = load_n(kb, br.unwrap(), off, lanes);
                    match kind {
                        Elementwise::Mul => kb.b.ins().fmul(x, other),
                        _ => kb.b.ins().fadd(x, other),
                    }
                }
            };
            store_n(kb, out, yr, off, lanes);
        });
        vec![]
    });
}

/// RMSNorm of `[seq, n]` rows with an f32 weight vector; q16 output on the grid `quantize`
/// when given.
pub fn emit_rms_norm(
    kb: &mut Kb,
    x: Location,
    weight: PackedWeight,
    y: Location,
    n: u32,
    eps: f32,
    quantize: Option<ActDType>,
    skip_rows: bool,
) {
    let n = n as i64;
    let (x, y, w) = (kb.location(x), kb.location(y), kb.weights(weight.offset));
    let (t0, t1) = my_rows(kb, skip_rows);
    kb.for_range(t0, t1, 1, &[], |kb, t, _| {
        let xr = kb.addr(x, t, 4 * n, 0);
        let acc0 = kb.splat(0.0);
        let zero = kb.iconst(0);
        let end = kb.iconst(n / 4 * 16);
        let acc = kb.for_range(zero, end, 16, &[acc0], |kb, off, acc| {
            let v = load_n(kb, xr, off, 4);
            vec![kb.b.ins().fma(v, v, acc[0])]
        })[0];
        let acc = if n % 4 != 0 {
            let off = kb.iconst(n / 4 * 16);
            let v = load_n(kb, xr, off, (n % 4) as usize);
            kb.b.ins().fma(v, v, acc)
        } else {
            acc
        };
        let sumsq = kb.hsum(acc);
        let inv_n = kb.fconst(1.0 / n as f32);
        let mean = kb.b.ins().fmul(sumsq, inv_n);
        let eps = kb.fconst(eps);
        let mean = kb.b.ins().fadd(mean, eps);
        let root = kb.b.ins().sqrt(mean);
        let one = kb.fconst(1.0);
        let scale = kb.b.ins().fdiv(one, root);
        let scale = kb.b.ins().splat(F32X4, scale);
        if let Some(act) = quantize {
            let block = q16_block_bytes(act) as i64;
            let yr = kb.addr(y, t, n / 32 * block, 0);
            let nb = kb.iconst(n / 32);
            kb.for_range(zero, nb, 1, &[], |kb, b, _| {
                let xb = kb.addr(xr, b, 128, 0);
                let wb = kb.addr(w, b, 128, 0);
                let vals = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| {
                    let xv = kb.load(F32X4, xb, 16 * i);
                    let wv = kb.load(F32X4, wb, 16 * i);
                    let s = kb.b.ins().fmul(xv, scale);
                    kb.b.ins().fmul(s, wv)
                });
                let out = kb.addr(yr, b, block, 0);
                kb.quantize_block(&vals, out, act);
                vec![]
            });
        } else {
            let yr = kb.addr(y, t, 4 * n, 0);
            for_chunks(kb, n, |kb, off, lanes| {
                let xv = load_n(kb, xr, off, lanes);
                let wv = load_n(kb, w, off, lanes);
                let s = kb.b.ins().fmul(xv, scale);
                let out = kb.b.ins().fmul(s, wv);
                store_n(kb, out, yr, off, lanes);
            });
        }
        vec![]
    });
}

/// Quantizes `[seq, n]` f32 rows to q16 blocks on the grid `act`.
pub fn emit_quantize(kb: &mut Kb, x: Location, y: Location, n: u32, act: ActDType, skip_rows: bool) {
    let n = n as i64;
    let block = q16_block_bytes(act) as i64;
    let (x, y) = (kb.location(x), kb.location(y));
    let (t0, t1) = my_rows(kb, skip_rows);
    kb.for_range(t0, t1, 1, &[], |kb, t, _| {
        let xr = kb.addr(x, t, 4 * n, 0);
        let yr = kb.addr(y, t, n / 32 * block, 0);
        let zero = kb.iconst(0);
        let nb = kb.iconst(n / 32);
        kb.for_range(zero, nb, 1, &[], |kb, b, _| {
            let xb = kb.addr(xr, b, 128, 0);
            let vals = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| kb.load(F32X4, xb, 16 * i));
            let out = kb.addr(yr, b, block, 0);
            kb.quantize_block(&vals, out, act);
            vec![]
        });
        vec![]
    });
}

/// Rotary embedding on adjacent pairs, reading the table at `table_offset` of the weights:
/// per position, `head_dim` cosines (each twice) then `head_dim` signed sines.
pub fn emit_rope(kb: &mut Kb, x: Location, y: Location, n: u32, head_dim: u32, table_offset: u64, skip_rows: bool) {
    let (n, hd) = (n as i64, head_dim as i64);
    assert!(hd % 4 == 0, "head_dim is checked by the codegen driver");
    let (x, y, table) = (kb.location(x), kb.location(y), kb.weights(table_offset));
    let pos = kb.ctx_field(abi::ctx::POS);
    let (t0, t1) = my_rows(kb, skip_rows);
    kb.for_range(t0, t1, 1, &[], |kb, t, _| {
        let p = kb.b.ins().iadd(pos, t);
        let tab = kb.addr(table, p, 8 * hd, 0);
        let (xr, yr) = (kb.addr(x, t, 4 * n, 0), kb.addr(y, t, 4 * n, 0));
        let zero = kb.iconst(0);
        let heads = kb.iconst(n / hd);
        kb.for_range(zero, heads, 1, &[], |kb, h, _| {
            let xh = kb.addr(xr, h, 4 * hd, 0);
            let yh = kb.addr(yr, h, 4 * hd, 0);
            for c in 0..hd / 4 {
                let v = kb.load(F32X4, xh, 16 * c);
                // [a0, b0, a1, b1] -> [b0, a0, b1, a1], against sines [-s0, s0, -s1, s1].
                let swapped = kb.shuffle_f32(v, v, [1, 0, 3, 2]);
                let cos = kb.load(F32X4, tab, 16 * c);
                let sin = kb.load(F32X4, tab, 4 * hd + 16 * c);
                let rot = kb.b.ins().fmul(swapped, sin);
                let out = kb.b.ins().fma(v, cos, rot);
                kb.store(out, yh, 16 * c);
            }
            vec![]
        });
        vec![]
    });
}

/// Row `lane`'s `row_bytes` values (16 or 32) in the group block at `blk` (values at
/// `qs_at`), as `i8x16` vectors: in place for the 4-row layouts, gathered into `row_buf` from
/// the 8-row layouts' two-byte chunks.
fn row_values(kb: &mut Kb, row_buf: Option<Value>, blk: Value, lane: Value, qs_at: i64, row_bytes: i64) -> Vec<Value> {
    row_values_by(kb, row_buf, blk, lane, qs_at, row_bytes, 2)
}

/// [`row_values`] from an 8-row layout interleaving `by` bytes of each row at a time (2, or 4
/// for `Layout::Q4Rows8 { dwords }` and `Layout::K32Rows8 { dwords }`). The gathered bytes
/// are read back as written memory (`rw`), not as weights: a read-only load of the buffer
/// could be merged with another one of the same address.
fn row_values_by(
    kb: &mut Kb,
    row_buf: Option<Value>,
    blk: Value,
    lane: Value,
    qs_at: i64,
    row_bytes: i64,
    by: i64,
) -> Vec<Value> {
    match row_buf {
        None => {
            let p = kb.addr(blk, lane, row_bytes, qs_at);
            (0..row_bytes / 16).map(|i| kb.load(I8X16, p, 16 * i)).collect()
        }
        Some(buf) => {
            let src = kb.addr(blk, lane, by, qs_at);
            let ty = if by == 4 { I32 } else { I16 };
            for u in 0..row_bytes / by {
                let v = kb.load(ty, src, 8 * by * u);
                kb.store(v, buf, by * u);
            }
            (0..row_bytes / 16).map(|i| kb.b.ins().load(I8X16, rw(), buf, (16 * i) as i32)).collect()
        }
    }
}

/// A row's `qh` (bit `j`: the fifth bit of value `j`) from its two 16-bit words of the 8-row
/// layout's fifth-bit chunks (`pack::push_high_bits`): bit `2j` of byte `k` of word `c` is value
/// `2u + k`'s, bit `2j + 1` value `16 + 2u + k`'s, for `u = 4c + j`.
fn fifth_bits_of_8_row_chunks(kb: &mut Kb, words: [Value; 2]) -> Value {
    let words = words.map(|w| kb.b.ins().uextend(I32, w));
    let mut qh = kb.b.ins().iconst(I32, 0);
    for u in 0..8i64 {
        let (c, j) = ((u / 4) as usize, u % 4);
        for k in 0..2i64 {
            for (high, value) in [(0, 2 * u + k), (1, 16 + 2 * u + k)] {
                let bit = kb.b.ins().ushr_imm_s(words[c], 8 * k + 2 * j + high);
                let bit = kb.b.ins().band_imm_s(bit, 1);
                let bit = kb.b.ins().ishl_imm_s(bit, value);
                qh = kb.b.ins().bor(qh, bit);
            }
        }
    }
    qh
}

/// A row's `qh` from its 32-bit word of the 4-byte-chunk layout's fifth bits
/// (`pack::push_high_bits` with `interleave` 4): bit `2j` of byte `k` is value `4j + k`'s, bit
/// `2j + 1` value `16 + 4j + k`'s.
fn fifth_bits_of_dword_chunk(kb: &mut Kb, word: Value) -> Value {
    let mut qh = kb.b.ins().iconst(I32, 0);
    for j in 0..4i64 {
        for k in 0..4i64 {
            for (high, value) in [(0, 4 * j + k), (1, 16 + 4 * j + k)] {
                let bit = kb.b.ins().ushr_imm_s(word, 8 * k + 2 * j + high);
                let bit = kb.b.ins().band_imm_s(bit, 1);
                let bit = kb.b.ins().ishl_imm_s(bit, value);
                qh = kb.b.ins().bor(qh, bit);
            }
        }
    }
    qh
}

/// Row `lane`'s scale (or offset) among a group's, f16 (`half`) or f32 each, at byte `at` of
/// the group block `blk`, widened and splatted.
fn lane_scale(kb: &mut Kb, blk: Value, lane: Value, at: i64, half: bool) -> Value {
    if half {
        let p = kb.addr(blk, lane, 2, at);
        let h = kb.load(I16, p, 0);
        let h = kb.b.ins().sextend(I32, h);
        let h = kb.b.ins().splat(I32X4, h);
        kb.f16_bits_to_f32(h)
    } else {
        let p = kb.addr(blk, lane, 4, at);
        let v = kb.load(F32, p, 0);
        kb.b.ins().splat(F32X4, v)
    }
}

/// Row `lane`'s 16 values (`i32`, unsigned: low bits and high bits above them) of one
/// 16-value sub-block whose planes (`pack::push_k16_planes`, Q6, Q3 or Q2) start at `at` of the
/// 8-row group block `blk`.
fn plane_values(kb: &mut Kb, kind: ir::quant::KKind, blk: Value, lane: Value, at: i64) -> Vec<Value> {
    use ir::quant::KKind;
    let sub_bytes = crate::pack::k16x8_sub_bytes(kind) as i64;
    // This row's two bytes of each 16-byte chunk of the planes.
    let row = kb.addr(blk, lane, 2, at);
    let bytes: Vec<[Value; 2]> = (0..sub_bytes / 16)
        .map(|c| {
            [0, 1].map(|k| {
                let v = kb.load(I8, row, 16 * c + k);
                kb.b.ins().uextend(I32, v)
            })
        })
        .collect();
    // Bits `shift..shift + width` of byte `k` of chunk `c`.
    let field = |kb: &mut Kb, c: usize, k: usize, shift: i64, width: i64| {
        let v = kb.b.ins().ushr_imm_s(bytes[c][k], shift);
        kb.b.ins().band_imm_s(v, (1 << width) - 1)
    };
    // Value v = 2u + k.
    (0..16usize)
        .map(|v| {
            let (u, k) = (v / 2, v % 2);
            let (low, high, at) = match kind {
                KKind::Q6 => {
                    let low = field(kb, u % 4, k, 4 * (u / 4) as i64, 4);
                    (low, Some(field(kb, 4 + u / 4, k, 2 * (u % 4) as i64, 2)), 4)
                }
                KKind::Q3 => {
                    let low = field(kb, u / 4, k, 2 * (u % 4) as i64, 2);
                    (low, Some(field(kb, 2, k, u as i64, 1)), 2)
                }
                KKind::Q2 => (field(kb, u / 4, k, 2 * (u % 4) as i64, 2), None, 0),
            };
            match high {
                Some(h) => {
                    let h = kb.b.ins().ishl_imm_s(h, at);
                    kb.b.ins().bor(low, h)
                }
                None => low,
            }
        })
        .collect()
}

/// Row `lane`'s `d * sc` (and for Q2 `dmin * m`) of sub-block `s` of a K16 super-block at
/// `blk` in a group of `rows` rows, splatted, as the dequantizer rounds them (`d`, `dmin`: the
/// row's super-block scales, splatted).
#[allow(clippy::too_many_arguments)]
fn k16_lane_scales(
    kb: &mut Kb,
    kind: ir::quant::KKind,
    blk: Value,
    s: i64,
    lane: Value,
    rows: i64,
    d: Value,
    dmin: Option<Value>,
) -> (Value, Option<Value>) {
    let (sc, m) = super::matmul::k16_scale(kb, kind, blk, s, super::matmul::RowAt::Lane(lane), rows);
    let sc = kb.b.ins().fcvt_from_sint(F32, sc);
    let sc = kb.b.ins().splat(F32X4, sc);
    let dl = kb.b.ins().fmul(d, sc);
    let ml = m.map(|m| {
        let m = kb.b.ins().fcvt_from_sint(F32, m);
        let m = kb.b.ins().splat(F32X4, m);
        kb.b.ins().fmul(dmin.expect("q2 minimums"), m)
    });
    (dl, ml)
}

/// Four `i32` values as an `i32x4`.
fn lanes4(kb: &mut Kb, v: &[Value]) -> Value {
    let mut wi = kb.b.ins().scalar_to_vector(I32X4, v[0]);
    for (l, &x) in v.iter().enumerate().skip(1) {
        wi = kb.b.ins().insertlane(wi, x, l as u8);
    }
    wi
}

/// Embedding lookup from a packed table; ids outside `0..rows` give a zero row.
pub fn emit_embed(kb: &mut Kb, ids: Location, table: PackedWeight, y: Location, skip_rows: bool) {
    let (rows, cols) = table.layout.matrix().map(|(r, c)| (r as i64, c as i64)).expect("tables are matrices");
    let (ids, y, w) = (kb.location(ids), kb.location(y), kb.weights(table.offset));
    let stride = table.layout.group_stride() as i64;
    let (t0, t1) = my_rows(kb, skip_rows);
    let mask = {
        let m = kb.b.ins().iconst(I8, 0x0f);
        kb.b.ins().splat(I8X16, m)
    };
    kb.for_range(t0, t1, 1, &[], |kb, t, _| {
        let id_ptr = kb.addr(ids, t, 4, 0);
        let id = kb.load(I32, id_ptr, 0);
        let id = kb.b.ins().uextend(cranelift_codegen::ir::types::I64, id);
        let yr = kb.addr(y, t, 4 * cols, 0);
        let valid = kb.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, id, rows);
        kb.if_else(
            valid,
            |kb| {
                let group_rows = table.layout.group_rows() as i64;
                let g = kb.b.ins().ushr_imm_s(id, group_rows.trailing_zeros() as i64);
                let lane = kb.b.ins().band_imm_s(id, group_rows - 1);
                let base = kb.addr(w, g, stride, 0);
                let zero = kb.iconst(0);
                // Bytes of one 32-value block of a group.
                let block = stride / (cols / 32).max(1);
                // The micro-kernel layouts interleave the rows' values two bytes at a time
                // (16-byte chunks, row `lane` at bytes `2 lane`): this row's are gathered into
                // `row_buf` first, in the 4-row layouts' order (`row_values`).
                let row_buf = (group_rows == 8).then(|| {
                    let slot = kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 32, 4));
                    kb.b.ins().stack_addr(I64, slot, 0)
                });
                match table.layout {
                    Layout::Q8Rows4 { .. }
                    | Layout::Q4Rows4 { .. }
                    | Layout::Q8Rows8 { .. }
                    | Layout::Q4Rows8 { .. } => {
                        let (q8, f16, mins, high) = match table.layout {
                            Layout::Q4Rows4 { half, mins, high, .. } | Layout::Q4Rows8 { half, mins, high, .. } => {
                                (false, half, mins, high)
                            }
                            Layout::Q8Rows4 { half, .. } | Layout::Q8Rows8 { half, .. } => (true, half, false, false),
                            _ => unreachable!(),
                        };
                        // Scales (and offsets) of all the group's rows, f16 or f32 each.
                        let sb = group_rows * if f16 { 2 } else { 4 };
                        let nb = kb.iconst(cols / 32);
                        kb.for_range(zero, nb, 1, &[], |kb, b, _| {
                            let blk = kb.addr(base, b, block, 0);
                            // This row's scale (or offset) at byte `at` of the block, splatted.
                            let lane_scale = |kb: &mut Kb, at: i64| lane_scale(kb, blk, lane, at, f16);
                            let d = lane_scale(kb, 0);
                            let out = kb.addr(yr, b, 128, 0);
                            // Sixteen-value halves as i8x16, elements 0..16 and 16..32.
                            let qs_at = if mins { 2 * sb } else { sb };
                            let (halves, m) = if q8 {
                                (row_values(kb, row_buf, blk, lane, qs_at, 32), None)
                            } else {
                                let m = if mins {
                                    lane_scale(kb, sb)
                                } else {
                                    // q4_0: m = -8 d (q5_0: -16 d), exactly as the format's
                                    // dequantization.
                                    let k = kb.splat(if high { -16.0 } else { -8.0 });
                                    kb.b.ins().fmul(d, k)
                                };
                                let by =
                                    if matches!(table.layout, Layout::Q4Rows8 { dwords: true, .. }) { 4 } else { 2 };
                                let w = row_values_by(kb, row_buf, blk, lane, qs_at, 16, by)[0];
                                let [lo, hi] = super::matmul::nibbles(kb, w, mask);
                                let (lo, hi) = if high {
                                    // This row's fifth bits after the group's nibbles.
                                    let at = qs_at + 16 * group_rows;
                                    let qh = match row_buf {
                                        None => {
                                            let p = kb.addr(blk, lane, 4, at);
                                            kb.load(I32, p, 0)
                                        }
                                        Some(_) if by == 4 => {
                                            let p = kb.addr(blk, lane, 4, at);
                                            let word = kb.load(I32, p, 0);
                                            fifth_bits_of_dword_chunk(kb, word)
                                        }
                                        Some(_) => {
                                            let p = kb.addr(blk, lane, 2, at);
                                            let chunks = [kb.load(I16, p, 0), kb.load(I16, p, 16)];
                                            fifth_bits_of_8_row_chunks(kb, chunks)
                                        }
                                    };
                                    (kb.with_high_bits(lo, qh, 0, 16), kb.with_high_bits(hi, qh, 2, 16))
                                } else {
                                    (lo, hi)
                                };
                                (vec![lo, hi], Some(m))
                            };
                            for (h, half) in halves.into_iter().enumerate() {
                                let wide = if q8 {
                                    [kb.b.ins().swiden_low(half), kb.b.ins().swiden_high(half)]
                                } else {
                                    [kb.b.ins().uwiden_low(half), kb.b.ins().uwiden_high(half)]
                                };
                                for (k, w16) in wide.into_iter().enumerate() {
                                    let w32 = [kb.b.ins().swiden_low(w16), kb.b.ins().swiden_high(w16)];
                                    for (j, wi) in w32.into_iter().enumerate() {
                                        let f = kb.b.ins().fcvt_from_sint(F32X4, wi);
                                        let v = match m {
                                            Some(m) => kb.b.ins().fma(f, d, m),
                                            None => kb.b.ins().fmul(f, d),
                                        };
                                        kb.store(v, out, 64 * h as i64 + 32 * k as i64 + 16 * j as i64);
                                    }
                                }
                            }
                            vec![]
                        });
                    }
                    Layout::K32Rows4 { high, .. } | Layout::K32Rows8 { high, .. } => {
                        use super::matmul::{k32_scale, k32_values, RowAt};
                        let ns = kb.iconst(cols / 256);
                        // The blocks' values, and with 8 rows the interleave of their chunks.
                        let (bstride, at, by) = match table.layout {
                            Layout::K32Rows8 { dwords, .. } => (
                                crate::pack::k32x8_block_values(high) as i64,
                                targets::K32_HEADER as i64,
                                if dwords { 4 } else { 2 },
                            ),
                            _ => (crate::pack::k32_block_values(high) as i64, crate::pack::K32_VALUES_AT as i64, 0),
                        };
                        kb.for_range(zero, ns, 1, &[], |kb, b, _| {
                            let blk = kb.addr(base, b, stride / (cols / 256), 0);
                            let lane_half = |kb: &mut Kb, at: i64| lane_scale(kb, blk, lane, at, true);
                            let (d, dmin) = (lane_half(kb, 0), lane_half(kb, 2 * group_rows));
                            let out = kb.addr(yr, b, 1024, 0);
                            for s in 0..8i64 {
                                let halves = if by == 0 {
                                    let qs = kb.addr(blk, lane, 16, at + bstride * s);
                                    let qh = high.then(|| kb.addr(blk, lane, 4, at + bstride * s + 64));
                                    k32_values(kb, qs, qh)
                                } else {
                                    // Gathered from the chunks, with the fifth bits after them.
                                    let w = row_values_by(kb, row_buf, blk, lane, at + bstride * s, 16, by)[0];
                                    let mask = kb.vconst_bytes([15; 16]);
                                    let [lo, hi] = super::matmul::nibbles(kb, w, mask);
                                    if high {
                                        let qh_at = at + bstride * s + 128;
                                        let qh = if by == 4 {
                                            let p = kb.addr(blk, lane, 4, qh_at);
                                            let word = kb.load(I32, p, 0);
                                            fifth_bits_of_dword_chunk(kb, word)
                                        } else {
                                            let p = kb.addr(blk, lane, 2, qh_at);
                                            let chunks = [kb.load(I16, p, 0), kb.load(I16, p, 16)];
                                            fifth_bits_of_8_row_chunks(kb, chunks)
                                        };
                                        [kb.with_high_bits(lo, qh, 0, 16), kb.with_high_bits(hi, qh, 2, 16)]
                                    } else {
                                        [lo, hi]
                                    }
                                };
                                // d * sc and dmin * m as the dequantizer rounds them.
                                let (sc, m) = k32_scale(kb, blk, s, RowAt::Lane(lane), group_rows);
                                let [sc, m] = [sc, m].map(|v| {
                                    let v = kb.b.ins().fcvt_from_sint(F32, v);
                                    kb.b.ins().splat(F32X4, v)
                                });
                                let dl = kb.b.ins().fmul(d, sc);
                                let ml = kb.b.ins().fmul(dmin, m);
                                for (h, half) in halves.into_iter().enumerate() {
                                    let wide = [kb.b.ins().uwiden_low(half), kb.b.ins().uwiden_high(half)];
                                    for (k, w16) in wide.into_iter().enumerate() {
                                        let w32 = [kb.b.ins().uwiden_low(w16), kb.b.ins().uwiden_high(w16)];
                                        for (j, wi) in w32.into_iter().enumerate() {
                                            let f = kb.b.ins().fcvt_from_sint(F32X4, wi);
                                            let v = kb.b.ins().fmul(f, dl);
                                            let v = kb.b.ins().fsub(v, ml);
                                            let at = 128 * s + 64 * h as i64 + 32 * k as i64 + 16 * j as i64;
                                            kb.store(v, out, at);
                                        }
                                    }
                                }
                            }
                            vec![]
                        });
                    }
                    Layout::K16Rows8 { kind, .. } => {
                        use ir::quant::KKind;
                        let ns = kb.iconst(cols / 256);
                        let (values_at, sub_bytes) =
                            (crate::pack::k16x8_values_at(kind) as i64, crate::pack::k16x8_sub_bytes(kind) as i64);
                        kb.for_range(zero, ns, 1, &[], |kb, b, _| {
                            let blk = kb.addr(base, b, stride / (cols / 256), 0);
                            let lane_half = |kb: &mut Kb, at: i64| lane_scale(kb, blk, lane, at, true);
                            let d = lane_half(kb, 0);
                            let dmin = (kind == KKind::Q2).then(|| lane_half(kb, 16));
                            let out = kb.addr(yr, b, 1024, 0);
                            for s in 0..16i64 {
                                let q = plane_values(kb, kind, blk, lane, values_at + sub_bytes * s);
                                let q: Vec<Value> =
                                    q.into_iter().map(|q| kb.b.ins().iadd_imm_s(q, -(kind.offset() as i64))).collect();
                                let (dl, ml) = k16_lane_scales(kb, kind, blk, s, lane, 8, d, dmin);
                                for j in 0..4 {
                                    let wi = lanes4(kb, &q[4 * j..4 * j + 4]);
                                    let f = kb.b.ins().fcvt_from_sint(F32X4, wi);
                                    let v = kb.b.ins().fmul(f, dl);
                                    let v = match ml {
                                        Some(ml) => kb.b.ins().fsub(v, ml),
                                        None => v,
                                    };
                                    kb.store(v, out, 64 * s + 16 * j as i64);
                                }
                            }
                            vec![]
                        });
                    }
                    Layout::K16Rows4 { kind, .. } => {
                        use super::matmul::{k16_row_values, k16_values, RowAt};
                        let ns = kb.iconst(cols / 256);
                        kb.for_range(zero, ns, 1, &[], |kb, b, _| {
                            let blk = kb.addr(base, b, stride / (cols / 256), 0);
                            let lane_half = |kb: &mut Kb, at: i64| lane_scale(kb, blk, lane, at, true);
                            let d = lane_half(kb, 0);
                            let dmin = (kind == ir::quant::KKind::Q2).then(|| lane_half(kb, 8));
                            let out = kb.addr(yr, b, 1024, 0);
                            for u in 0..4i64 {
                                let (vals, high) = k16_row_values(kb, kind, blk, u, RowAt::Lane(lane));
                                let values = k16_values(kb, kind, vals, high);
                                for (k, v) in values.into_iter().enumerate() {
                                    let (dl, ml) = k16_lane_scales(kb, kind, blk, 4 * u + k as i64, lane, 4, d, dmin);
                                    let wide = [kb.b.ins().swiden_low(v), kb.b.ins().swiden_high(v)];
                                    for (h, w16) in wide.into_iter().enumerate() {
                                        let w32 = [kb.b.ins().swiden_low(w16), kb.b.ins().swiden_high(w16)];
                                        for (j, wi) in w32.into_iter().enumerate() {
                                            let f = kb.b.ins().fcvt_from_sint(F32X4, wi);
                                            let v = kb.b.ins().fmul(f, dl);
                                            let v = match ml {
                                                Some(ml) => kb.b.ins().fsub(v, ml),
                                                None => v,
                                            };
                                            let at = 256 * u + 64 * k as i64 + 32 * h as i64 + 16 * j as i64;
                                            kb.store(v, out, at);
                                        }
                                    }
                                }
                            }
                            vec![]
                        });
                    }
                    Layout::LowRows8 { half, high, .. } => {
                        // d[8], m[8], then four sub-blocks' planes of the 8 rows.
                        let kind = if high { ir::quant::KKind::Q3 } else { ir::quant::KKind::Q2 };
                        let sb = 8 * if half { 2 } else { 4 };
                        let sub_bytes = crate::pack::low8_sub_bytes(high) as i64;
                        let ng = kb.iconst(cols / 64);
                        kb.for_range(zero, ng, 1, &[], |kb, b, _| {
                            let blk = kb.addr(base, b, stride / (cols / 64), 0);
                            let (d, m) = (lane_scale(kb, blk, lane, 0, half), lane_scale(kb, blk, lane, sb, half));
                            let out = kb.addr(yr, b, 256, 0);
                            for s in 0..4i64 {
                                let q = plane_values(kb, kind, blk, lane, 2 * sb + sub_bytes * s);
                                for j in 0..4 {
                                    let wi = lanes4(kb, &q[4 * j..4 * j + 4]);
                                    let f = kb.b.ins().fcvt_from_sint(F32X4, wi);
                                    let v = kb.b.ins().fma(f, d, m);
                                    kb.store(v, out, 64 * s + 16 * j as i64);
                                }
                            }
                            vec![]
                        });
                    }
                    Layout::LowRows4 { half, high, .. } => {
                        // d[4], m[4], the rows' crumbs, then their third bits.
                        let sb = 4 * if half { 2 } else { 4 };
                        let ng = kb.iconst(cols / 64);
                        kb.for_range(zero, ng, 1, &[], |kb, b, _| {
                            let blk = kb.addr(base, b, stride / (cols / 64), 0);
                            let lane_scale = |kb: &mut Kb, at: i64| lane_scale(kb, blk, lane, at, half);
                            let (d, m) = (lane_scale(kb, 0), lane_scale(kb, sb));
                            let qs = kb.addr(blk, lane, 16, 2 * sb);
                            let qh = high.then(|| kb.addr(blk, lane, 8, 2 * sb + 64));
                            let values = super::matmul::low_values(kb, qs, qh);
                            let out = kb.addr(yr, b, 256, 0);
                            for (k, v) in values.into_iter().enumerate() {
                                let wide = [kb.b.ins().uwiden_low(v), kb.b.ins().uwiden_high(v)];
                                for (h, w16) in wide.into_iter().enumerate() {
                                    let w32 = [kb.b.ins().uwiden_low(w16), kb.b.ins().uwiden_high(w16)];
                                    for (j, wi) in w32.into_iter().enumerate() {
                                        let f = kb.b.ins().fcvt_from_sint(F32X4, wi);
                                        let v = kb.b.ins().fma(f, d, m);
                                        kb.store(v, out, 64 * k as i64 + 32 * h as i64 + 16 * j as i64);
                                    }
                                }
                            }
                            vec![]
                        });
                    }
                    Layout::F16Rows8 { brain, .. } => {
                        // Column c: the 8 rows' values at 16 c; this row's at 2 lane. Four
                        // columns at a time, widened as the 4-row layout's.
                        let lane_off = kb.b.ins().ishl_imm_s(lane, 1);
                        let src = kb.b.ins().iadd(base, lane_off);
                        let quad = |kb: &mut Kb, s: Value, n: i64| -> Value {
                            let mut v = None;
                            for j in 0..n {
                                let h = kb.load(I16, s, 16 * j);
                                let h = if brain { kb.b.ins().uextend(I32, h) } else { kb.b.ins().sextend(I32, h) };
                                v = Some(match v {
                                    None => kb.b.ins().scalar_to_vector(I32X4, h),
                                    Some(v) => kb.b.ins().insertlane(v, h, j as u8),
                                });
                            }
                            let v = v.expect("a column at least");
                            if brain {
                                let v = kb.b.ins().ishl_imm_s(v, 16);
                                kb.b.ins().bitcast(F32X4, super::builder::le(), v)
                            } else {
                                kb.f16_bits_to_f32(v)
                            }
                        };
                        let quads = kb.iconst(cols / 4);
                        kb.for_range(zero, quads, 1, &[], |kb, q, _| {
                            let s = kb.addr(src, q, 64, 0);
                            let v = quad(kb, s, 4);
                            let d = kb.addr(yr, q, 16, 0);
                            kb.store(v, d, 0);
                            vec![]
                        });
                        let tail = cols % 4;
                        if tail != 0 {
                            let s = kb.b.ins().iadd_imm_s(src, 64 * (cols / 4));
                            let v = quad(kb, s, tail);
                            kb.store_partial(v, yr, 16 * (cols / 4), tail as usize);
                        }
                    }
                    Layout::F16Rows4 { brain, .. } => {
                        // Chunk c: 4 rows of 8 values; this row's at 16 lane.
                        let lane_off = kb.b.ins().imul_imm_s(lane, 16);
                        let src = kb.b.ins().iadd(base, lane_off);
                        let chunk = crate::pack::F16_GROUP_CHUNK as i64;
                        let chunks = kb.iconst(cols / 8);
                        kb.for_range(zero, chunks, 1, &[], |kb, c, _| {
                            let s = kb.addr(src, c, chunk, 0);
                            let h = kb.load(I16X8, s, 0);
                            let [lo, hi] = super::matmul::widen_halves(kb, h, brain);
                            let d = kb.addr(yr, c, 32, 0);
                            kb.store(lo, d, 0);
                            kb.store(hi, d, 16);
                            vec![]
                        });
                        let tail = cols % 8;
                        if tail != 0 {
                            let s = kb.b.ins().iadd_imm_s(src, chunk * (cols / 8));
                            let h = kb.load(I16X8, s, 0);
                            let [lo, hi] = super::matmul::widen_halves(kb, h, brain);
                            let at = 32 * (cols / 8);
                            if tail >= 4 {
                                kb.store(lo, yr, at);
                                if tail > 4 {
                                    kb.store_partial(hi, yr, at + 16, (tail - 4) as usize);
                                }
                            } else {
                                kb.store_partial(lo, yr, at, tail as usize);
                            }
                        }
                    }
                    Layout::F32Rows4 { .. } => {
                        let lane_off = kb.b.ins().imul_imm_s(lane, 16);
                        let src = kb.b.ins().iadd(base, lane_off);
                        let chunks = kb.iconst(cols / 4);
                        kb.for_range(zero, chunks, 1, &[], |kb, c, _| {
                            let s = kb.addr(src, c, F32_GROUP_CHUNK as i64, 0);
                            let v = kb.load(F32X4, s, 0);
                            let d = kb.addr(yr, c, 16, 0);
                            kb.store(v, d, 0);
                            vec![]
                        });
                        if cols % 4 != 0 {
                            let s = kb.b.ins().iadd_imm_s(src, F32_GROUP_CHUNK as i64 * (cols / 4));
                            let v = kb.load(F32X4, s, 0);
                            kb.store_partial(v, yr, 16 * (cols / 4), (cols % 4) as usize);
                        }
                    }
                    Layout::F32Vector { .. } => unreachable!(),
                }
            },
            |kb| {
                let z = kb.splat(0.0);
                for_chunks(kb, cols, |kb, off, lanes| store_n(kb, z, yr, off, lanes));
            },
        );
        vec![]
    });
}
