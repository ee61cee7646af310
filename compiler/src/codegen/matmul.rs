//! Matmul kernels: `y[t, r] = epilogue(sum_k x[t, k] * w[r, k])` over the 4-row interleaved
//! layouts of [`crate::pack`].
//!
//! Work is split across threads by groups of four output rows; each thread streams its
//! share of the weights once per token row (the group's weights stay in L1 across tokens).
//! Quantized weights take q16 activations: per 32-value block the four rows' integer dot
//! products come from the target's int16 dot (`pmaddwd` on x86-64), are reduced to one
//! `i32x4` of four row sums by two pairwise adds, and are scaled in float.
//! Where the target has micro-kernels (x86-64: 256-bit AVX2, see `targets::MicroKernel`),
//! Q4, Q5, Q8, K32 and K16 matrices come in groups of 8 rows and the kernel here only
//! walks groups and tiles of up to 4 token rows, calls the micro-kernel for each tile (one
//! function per tile height) and applies the epilogue to the 8 × tokens results it leaves on
//! the stack.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I16X8, I32, I32X4, I64, I64X2, I8, I8X16};
use cranelift_codegen::ir::{FuncRef, InstBuilder, StackSlotData, StackSlotKind, Value};
use targets::{MicroKernel, MicroValues};

use super::builder::{le, Kb};
use crate::pack::{
    k32x8_block_values, q4_group_block, q4x8_group_block, q8_group_block, q8x8_group_block, scales_bytes, Layout,
    PackedWeight, F32_GROUP_CHUNK, MICRO_ROWS,
};
use crate::passes::plan_memory::{q16_block_bytes, Location, Q8_VALUES_AT};
use ir::quant::KKind;
use ir::ActDType;

/// The elementwise tail of a matmul, with its operand's location.
#[derive(Clone, Copy, Debug)]
pub enum EpilogueAt {
    None,
    Silu,
    Add(Location),
    Mul(Location),
}

/// Everything a matmul kernel is specialized on.
pub struct MatmulSpec {
    pub x: Location,
    pub y: Location,
    pub weight: PackedWeight,
    pub epilogue: EpilogueAt,
    /// Compute only rows `out_start..n_tokens`.
    pub skip_rows: bool,
    /// Token rows per block: a block of activation rows stays in cache while every weight
    /// group of this thread streams past it once.
    pub token_block: i64,
    /// The target's micro-kernels for 1..=4 token rows, for a weight in a micro-kernel layout.
    pub micro: Option<[FuncRef; MICRO_TOKENS]>,
    /// Bytes per q16 activation block (`plan_memory::q16_block_bytes`).
    pub x_block_bytes: i64,
}

/// Token rows per micro-kernel call, at most.
pub const MICRO_TOKENS: usize = 4;

/// The micro-kernel contract for a weight in a micro-kernel layout and a tile of `tokens` rows
/// of activations on the grid `act`.
pub fn micro_kernel(layout: Layout, tokens: usize, act: ActDType) -> Option<MicroKernel> {
    let (values, half, mins, block_bytes) = match layout {
        Layout::Q4Rows8 { half, mins, high, dwords, .. } => {
            let values = if dwords { MicroValues::NibbleDwords } else { MicroValues::Nibbles };
            (values, half, mins, q4x8_group_block(half, mins, high))
        }
        Layout::Q8Rows8 { half, .. } => (MicroValues::Bytes, half, false, q8x8_group_block(half)),
        Layout::F16Rows8 { cols, brain, .. } => {
            return Some(MicroKernel {
                tokens: tokens as u32,
                values: if brain { MicroValues::BF16 } else { MicroValues::F16 },
                half: false,
                mins_at: None,
                qs_at: 0,
                high_at: None,
                block_bytes: 64,
                x_block_bytes: 16,
                x_i8_at: None,
                k32: false,
                k16: None,
                tail: cols % 4,
                low: false,
            });
        }
        Layout::LowRows8 { half, high, .. } => {
            let scales = 2 * scales_bytes(half) as u32;
            return Some(MicroKernel {
                tokens: tokens as u32,
                values: MicroValues::Bytes,
                half,
                mins_at: Some(scales),
                qs_at: 2 * scales,
                high_at: None,
                block_bytes: crate::pack::low8_sub_bytes(high) as u32,
                x_block_bytes: q16_block_bytes(act) as u32,
                x_i8_at: None,
                k32: false,
                k16: Some(if high { KKind::Q3 } else { KKind::Q2 }),
                tail: 0,
                low: true,
            });
        }
        Layout::K16Rows8 { kind, .. } => {
            return Some(MicroKernel {
                tokens: tokens as u32,
                values: MicroValues::Bytes,
                half: false,
                mins_at: (kind == KKind::Q2).then_some(16),
                qs_at: crate::pack::k16x8_values_at(kind) as u32,
                high_at: None,
                block_bytes: crate::pack::k16x8_sub_bytes(kind) as u32,
                x_block_bytes: q16_block_bytes(act) as u32,
                x_i8_at: None,
                k32: false,
                k16: Some(kind),
                tail: 0,
                low: false,
            });
        }
        Layout::K32Rows8 { high, dwords, .. } => {
            let values = if dwords { MicroValues::NibbleDwords } else { MicroValues::Nibbles };
            return Some(MicroKernel {
                tokens: tokens as u32,
                values,
                half: false,
                mins_at: Some(0),
                qs_at: 0,
                high_at: high.then_some(128),
                block_bytes: k32x8_block_values(high) as u32,
                x_block_bytes: q16_block_bytes(act) as u32,
                x_i8_at: dwords.then(|| {
                    assert_eq!(act, ActDType::Q8, "4-byte chunks are for the q8 grid");
                    Q8_VALUES_AT as u32
                }),
                k32: true,
                k16: None,
                tail: 0,
                low: false,
            });
        }
        _ => return None,
    };
    // d (and m): 8 scales each.
    let scales = 2 * scales_bytes(half) as u32;
    let qs_at = if mins { 2 * scales } else { scales };
    let high = matches!(layout, Layout::Q4Rows8 { high: true, .. });
    Some(MicroKernel {
        tokens: tokens as u32,
        values,
        half,
        mins_at: mins.then_some(scales),
        qs_at,
        high_at: high.then_some(qs_at + 128),
        block_bytes: block_bytes as u32,
        x_block_bytes: q16_block_bytes(act) as u32,
        x_i8_at: (values == MicroValues::NibbleDwords).then(|| {
            assert_eq!(act, ActDType::Q8, "4-byte chunks are for the q8 grid");
            Q8_VALUES_AT as u32
        }),
        k32: false,
        k16: None,
        tail: 0,
        low: false,
    })
}

/// Token rows per block for activation rows of `x_row_bytes`: a quarter of the L2 cache,
/// between 4 and 64 rows, a whole number of micro-kernel tiles (37 rows would end every block
/// in a 1-row tile).
pub fn token_block(l2_bytes: u32, x_row_bytes: i64) -> i64 {
    let rows = (l2_bytes as i64 / 4 / x_row_bytes.max(1)).clamp(4, 64);
    rows / MICRO_TOKENS as i64 * MICRO_TOKENS as i64
}

pub fn emit(kb: &mut Kb, spec: &MatmulSpec) {
    let (rows, cols) =
        spec.weight.layout.matrix().map(|(r, c)| (r as i64, c as i64)).expect("matmul weights are matrices");
    let group_rows = spec.weight.layout.group_rows();
    let groups = (rows as usize).div_ceil(group_rows) as i64;
    let x_row_bytes = match spec.weight.layout {
        Layout::F32Rows4 { .. } | Layout::F16Rows4 { .. } | Layout::F16Rows8 { .. } => 4 * cols,
        _ => cols / 32 * spec.x_block_bytes,
    };
    let stride = spec.weight.layout.group_stride() as i64;
    let x_base = kb.location(spec.x);
    let y_base = kb.location(spec.y);
    let e_base = match spec.epilogue {
        EpilogueAt::Add(loc) | EpilogueAt::Mul(loc) => Some(kb.location(loc)),
        _ => None,
    };
    let w_base = kb.weights(spec.weight.offset);
    let n_tokens = kb.ctx_field(super::abi::ctx::N_TOKENS);
    let t0 = if spec.skip_rows { kb.ctx_field(super::abi::ctx::OUT_START) } else { kb.iconst(0) };
    let zero = kb.iconst(0);
    let g_count = kb.iconst(groups);
    let (g0, g1) = kb.partition(zero, g_count);
    let mask = {
        let m = kb.b.ins().iconst(cranelift_codegen::ir::types::I8, 0x0f);
        kb.b.ins().splat(I8X16, m)
    };
    // The micro-kernels' results: 8 rows x up to 4 tokens of f32.
    let tile_out = spec.micro.map(|_| {
        let bytes = (MICRO_ROWS * MICRO_TOKENS * 4) as u32;
        let slot = kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 5));
        kb.b.ins().stack_addr(I64, slot, 0)
    });
    let out = Out { y_base, e_base, rows, groups, group_rows, epilogue: spec.epilogue };
    kb.for_range(t0, n_tokens, spec.token_block, &[], |kb, tb0, _| {
        let tb1 = kb.b.ins().iadd_imm_s(tb0, spec.token_block);
        let is_less = kb.b.ins().icmp(IntCC::SignedLessThan, tb1, n_tokens);
        let tb1 = kb.b.ins().select(is_less, tb1, n_tokens);
        kb.for_range(g0, g1, 1, &[], |kb, g, _| {
            let wg = kb.addr(w_base, g, stride, 0);
            match spec.weight.layout {
                Layout::F32Rows4 { .. } => {
                    kb.for_range(tb0, tb1, 1, &[], |kb, t, _| {
                        let x_row = kb.addr(x_base, t, x_row_bytes, 0);
                        let acc = dot_f32(kb, wg, x_row, cols);
                        out.store(kb, g, t, 0, acc);
                        vec![]
                    });
                }
                Layout::F16Rows4 { brain, .. } => {
                    kb.for_range(tb0, tb1, 1, &[], |kb, t, _| {
                        let x_row = kb.addr(x_base, t, x_row_bytes, 0);
                        let acc = dot_f16(kb, wg, x_row, cols, brain);
                        out.store(kb, g, t, 0, acc);
                        vec![]
                    });
                }
                Layout::Q4Rows8 { .. }
                | Layout::Q8Rows8 { .. }
                | Layout::K32Rows8 { .. }
                | Layout::K16Rows8 { .. }
                | Layout::F16Rows8 { .. }
                | Layout::LowRows8 { .. } => {
                    let (micro, tile_out) =
                        (spec.micro.expect("8-row layouts come with micro-kernels"), tile_out.unwrap());
                    // Blocks per row: 256-value super-blocks for K32.
                    // (whole quads of columns for 16-bit floats).
                    let block = match spec.weight.layout {
                        Layout::K32Rows8 { .. } | Layout::K16Rows8 { .. } => 256,
                        Layout::F16Rows8 { .. } => 4,
                        Layout::LowRows8 { .. } => 64,
                        _ => 32,
                    };
                    let tile = Tile { micro, out: tile_out, wg, x_base, x_row_bytes, n_blocks: cols / block };
                    // Tiles of 4 token rows, then one tile of the 1-3 rows left.
                    let len = kb.b.ins().isub(tb1, tb0);
                    let left = kb.b.ins().band_imm_s(len, MICRO_TOKENS as i64 - 1);
                    let full_end = kb.b.ins().isub(tb1, left);
                    kb.for_range(tb0, full_end, MICRO_TOKENS as i64, &[], |kb, t, _| {
                        tile.emit(kb, &out, g, t, MICRO_TOKENS);
                        vec![]
                    });
                    kb.switch_small(left, &[1, 2, 3], |kb, rows| tile.emit(kb, &out, g, full_end, rows as usize));
                }
                layout => {
                    // Two token rows per pass over the weights, so that each unpacked weight
                    // block serves both; an odd last row goes alone.
                    let len = kb.b.ins().isub(tb1, tb0);
                    let odd = kb.b.ins().band_imm_s(len, 1);
                    let pair_end = kb.b.ins().isub(tb1, odd);
                    kb.for_range(tb0, pair_end, 2, &[], |kb, t, _| {
                        let t1 = kb.b.ins().iadd_imm_s(t, 1);
                        let x0 = kb.addr(x_base, t, x_row_bytes, 0);
                        let x1 = kb.addr(x_base, t1, x_row_bytes, 0);
                        let acc = dot_quantized(kb, layout, wg, &[x0, x1], cols / 32, mask, spec.x_block_bytes);
                        out.store(kb, g, t, 0, acc[0]);
                        out.store(kb, g, t1, 0, acc[1]);
                        vec![]
                    });
                    kb.for_range(pair_end, tb1, 1, &[], |kb, t, _| {
                        let x_row = kb.addr(x_base, t, x_row_bytes, 0);
                        let acc = dot_quantized(kb, layout, wg, &[x_row], cols / 32, mask, spec.x_block_bytes);
                        out.store(kb, g, t, 0, acc[0]);
                        vec![]
                    });
                }
            }
            vec![]
        });
        vec![]
    });
}

/// One call of a micro-kernel over a weight group and a tile of token rows.
struct Tile {
    micro: [FuncRef; MICRO_TOKENS],
    /// The stack buffer the micro-kernel writes (`[tokens][8] f32`).
    out: Value,
    wg: Value,
    x_base: Value,
    x_row_bytes: i64,
    n_blocks: i64,
}

impl Tile {
    /// Multiplies group `g` by token rows `t..t + tokens` and stores the results.
    fn emit(&self, kb: &mut Kb, out: &Out, g: Value, t: Value, tokens: usize) {
        let x = kb.addr(self.x_base, t, self.x_row_bytes, 0);
        let stride = kb.iconst(self.x_row_bytes);
        let nb = kb.iconst(self.n_blocks);
        kb.b.ins().call(self.micro[tokens - 1], &[self.wg, x, stride, self.out, nb]);
        for i in 0..tokens {
            let ti = kb.b.ins().iadd_imm_s(t, i as i64);
            for part in 0..MICRO_ROWS / 4 {
                let acc = kb.load(F32X4, self.out, (32 * i + 16 * part) as i64);
                out.store(kb, g, ti, part, acc);
            }
        }
    }
}

/// Where a matmul's four-output pieces go.
struct Out {
    y_base: Value,
    e_base: Option<Value>,
    rows: i64,
    groups: i64,
    /// Rows per weight group (4, or 8 for the micro-kernel layout).
    group_rows: usize,
    epilogue: EpilogueAt,
}

impl Out {
    /// Applies the epilogue to outputs `group_rows * g + 4 * part ..` (four, fewer in the last
    /// group) of token row `t` and stores them.
    fn store(&self, kb: &mut Kb, g: Value, t: Value, part: usize, acc: Value) {
        let row_off = kb.b.ins().imul_imm_s(t, 4 * self.rows);
        let col_off = kb.b.ins().imul_imm_s(g, 4 * self.group_rows as i64);
        let off = kb.b.ins().iadd(row_off, col_off);
        let off = kb.b.ins().iadd_imm_s(off, 16 * part as i64);
        let y = kb.b.ins().iadd(self.y_base, off);
        let e = self.e_base.map(|e| kb.b.ins().iadd(e, off));
        // Outputs of this part in the last group.
        let last_rows = self.rows - (self.groups - 1) * self.group_rows as i64;
        let lanes_last = (last_rows - 4 * part as i64).clamp(0, 4) as usize;
        let epilogue = self.epilogue;
        if lanes_last == 4 {
            store_with_epilogue(kb, acc, epilogue, e, y, 4);
        } else {
            let last = kb.b.ins().icmp_imm_s(IntCC::Equal, g, self.groups - 1);
            kb.if_else(
                last,
                |kb| {
                    if lanes_last > 0 {
                        store_with_epilogue(kb, acc, epilogue, e, y, lanes_last)
                    }
                },
                |kb| store_with_epilogue(kb, acc, epilogue, e, y, 4),
            );
        }
    }
}

/// Applies the epilogue to `lanes` outputs and stores them at `y`.
fn store_with_epilogue(kb: &mut Kb, acc: Value, epilogue: EpilogueAt, e: Option<Value>, y: Value, lanes: usize) {
    let load = |kb: &mut Kb, p: Value| {
        if lanes == 4 {
            kb.load(F32X4, p, 0)
        } else {
            kb.load_partial(p, 0, lanes)
        }
    };
    let out = match epilogue {
        EpilogueAt::None => acc,
        EpilogueAt::Silu => kb.vsilu(acc),
        EpilogueAt::Add(_) => {
            let other = load(kb, e.unwrap());
            kb.b.ins().fadd(acc, other)
        }
        EpilogueAt::Mul(_) => {
            let other = load(kb, e.unwrap());
            kb.b.ins().fmul(acc, other)
        }
    };
    if lanes == 4 {
        kb.store(out, y, 0);
    } else {
        kb.store_partial(out, y, 0, lanes);
    }
}

/// Loads the q16 block at `xb`: (scale, sum, four i16x8 of elements 0..8, 8..16, 16..24, 24..32).
fn load_q16(kb: &mut Kb, xb: Value) -> (Value, Value, [Value; 4]) {
    let scale = kb.load(F32, xb, 0);
    let sum = kb.load(F32, xb, 4);
    let a = [0, 1, 2, 3].map(|i| kb.load(I16X8, xb, 8 + 16 * i));
    (scale, sum, a)
}

/// `[row0, row1, row2, row3]` from four `i32x4` of partial sums.
fn reduce4(kb: &mut Kb, p: [Value; 4]) -> Value {
    let ab = kb.b.ins().iadd_pairwise(p[0], p[1]);
    let cd = kb.b.ins().iadd_pairwise(p[2], p[3]);
    kb.b.ins().iadd_pairwise(ab, cd)
}

/// Four row dot products of a Q4, Q5 or Q8 group with each of the q16 activation rows
/// `x_rows` (one or two), as one `f32x4` per row.
fn dot_quantized(
    kb: &mut Kb,
    layout: Layout,
    wg: Value,
    x_rows: &[Value],
    n_blocks: i64,
    mask: Value,
    x_block: i64,
) -> Vec<Value> {
    if let Layout::K32Rows4 { high, .. } = layout {
        return dot_k32(kb, high, wg, x_rows, n_blocks / 8, x_block);
    }
    if let Layout::K16Rows4 { kind, .. } = layout {
        return dot_k16(kb, kind, wg, x_rows, n_blocks / 8, x_block);
    }
    if let Layout::LowRows4 { half, high, .. } = layout {
        return dot_low(kb, half, high, wg, x_rows, n_blocks / 2, x_block);
    }
    // Scales (f16 or f32), offsets when stored, then the values.
    let (q4, half, mins, high) = match layout {
        Layout::Q4Rows4 { half, mins, high, .. } => (true, half, mins, high),
        Layout::Q8Rows4 { half, .. } => (false, half, false, false),
        _ => unreachable!("dot_quantized takes Q4 and Q8 groups"),
    };
    let group_block = if q4 { q4_group_block(half, mins, high) } else { q8_group_block(half) } as i64;
    let sb = scales_bytes(half) as i64;
    let qs_at = if mins { 2 * sb } else { sb };
    let n = x_rows.len();
    let zero = kb.iconst(0);
    let nb = kb.iconst(n_blocks);
    // Carried: one accumulator per token row, the activation block pointers, the weight pointer.
    let mut init: Vec<Value> = (0..n).map(|_| kb.splat(0.0)).collect();
    init.extend_from_slice(x_rows);
    init.push(wg);
    let out = kb.for_range(zero, nb, 1, &init, |kb, _, carried| {
        let (accs, xbs, wb) = (&carried[..n], &carried[n..2 * n], carried[2 * n]);
        let acts: Vec<(Value, Value, [Value; 4])> = xbs.iter().map(|&xb| load_q16(kb, xb)).collect();
        // p[token][row]: i32x4 partial sums.
        let mut p = vec![[accs[0]; 4]; n];
        for r in 0..4 {
            let q = if q4 {
                let w = kb.load(I8X16, wb, qs_at + 16 * r as i64);
                let [lo, hi] = nibbles(kb, w, mask);
                let (lo, hi) = if high {
                    let qh = kb.load(I32, wb, qs_at + 64 + 4 * r as i64);
                    (kb.with_high_bits(lo, qh, 0, 16), kb.with_high_bits(hi, qh, 2, 16))
                } else {
                    (lo, hi)
                };
                [
                    kb.b.ins().uwiden_low(lo),
                    kb.b.ins().uwiden_high(lo),
                    kb.b.ins().uwiden_low(hi),
                    kb.b.ins().uwiden_high(hi),
                ]
            } else {
                let w0 = kb.load(I8X16, wb, qs_at + 32 * r as i64);
                let w1 = kb.load(I8X16, wb, qs_at + 32 * r as i64 + 16);
                [
                    kb.b.ins().swiden_low(w0),
                    kb.b.ins().swiden_high(w0),
                    kb.b.ins().swiden_low(w1),
                    kb.b.ins().swiden_high(w1),
                ]
            };
            for (tok, (_, _, a)) in acts.iter().enumerate() {
                let mut s = kb.dot_i16(q[0], a[0]);
                for k in 1..4 {
                    let d = kb.dot_i16(q[k], a[k]);
                    s = kb.b.ins().iadd(s, d);
                }
                p[tok][r] = s;
            }
        }
        let d = kb.load_scales(wb, 0, half);
        let m = if mins {
            Some(kb.load_scales(wb, sb, half))
        } else if q4 {
            // q4_0: m = -8 d (q5_0: -16 d), exactly as the format's dequantization.
            let k = kb.splat(if high { -16.0 } else { -8.0 });
            Some(kb.b.ins().fmul(d, k))
        } else {
            None
        };
        let mut next = Vec::with_capacity(2 * n + 1);
        for (tok, &(scale, sum, _)) in acts.iter().enumerate() {
            let sums = reduce4(kb, p[tok]);
            let sums = kb.b.ins().fcvt_from_sint(F32X4, sums);
            let scale = kb.b.ins().splat(F32X4, scale);
            let ds = kb.b.ins().fmul(d, scale);
            let mut acc = kb.b.ins().fma(sums, ds, accs[tok]);
            if let Some(m) = m {
                let sum = kb.b.ins().splat(F32X4, sum);
                acc = kb.b.ins().fma(m, sum, acc);
            }
            next.push(acc);
        }
        for &xb in xbs {
            next.push(kb.b.ins().iadd_imm_s(xb, x_block));
        }
        next.push(kb.b.ins().iadd_imm_s(wb, group_block));
        next
    });
    out[..n].to_vec()
}

/// The four `i8x16` of 16 values each (values `0..16`, `16..32`, `32..48`, `48..64`) of one
/// row's 64-value group of a [`Layout::LowRows4`]: crumbs from the 16 bytes at `qs`, with their
/// third bits from the 64-bit word at `qh` when given.
pub(super) fn low_values(kb: &mut Kb, qs: Value, qh: Option<Value>) -> [Value; 4] {
    let w = kb.load(I8X16, qs, 0);
    let three = kb.vconst_bytes([3; 16]);
    let crumbs: [Value; 4] = std::array::from_fn(|k| {
        let v = if k == 0 {
            w
        } else {
            let v = kb.b.ins().bitcast(I16X8, le(), w);
            let v = kb.b.ins().ushr_imm_s(v, 2 * k as i64);
            kb.b.ins().bitcast(I8X16, le(), v)
        };
        kb.b.ins().band(v, three)
    });
    let Some(qh) = qh else { return crumbs };
    // The 8 bytes of third bits (`pack::third_bits`) in both halves: lane `l` of vector `k`
    // (value `16k + l`) finds its bit in byte `l % 8`, bit `2k + l / 8`.
    let bits = kb.load(I64, qh, 0);
    let bits = kb.b.ins().splat(I64X2, bits);
    let bits = kb.b.ins().bitcast(I8X16, le(), bits);
    let four = kb.vconst_bytes([4; 16]);
    std::array::from_fn(|k| {
        let mask = kb.vconst_bytes(std::array::from_fn(|l| 1u8 << (2 * k + l / 8)));
        let set = kb.b.ins().band(bits, mask);
        let set = kb.b.ins().icmp(IntCC::Equal, set, mask);
        let add = kb.b.ins().band(set, four);
        kb.b.ins().bor(crumbs[k], add)
    })
}

/// The four `i8x16` of one row's 64-value unit of a [`Layout::K16Rows4`] group of `kind`
/// (values `0..16`, `16..32`, `32..48`, `48..64`) as the signed `q - offset`: for Q6 the low
/// nibbles from the 32 bytes at `vals` (two Q4 blocks) and the high bit pairs from the crumbs
/// at `high`; for Q3 the crumbs at `vals` with the third bits of the u64 at `high`; for Q2 the
/// crumbs at `vals`.
pub(super) fn k16_values(kb: &mut Kb, kind: KKind, vals: Value, high: Option<Value>) -> [Value; 4] {
    match kind {
        KKind::Q2 => low_values(kb, vals, None),
        KKind::Q3 => {
            let v = low_values(kb, vals, high);
            let four = kb.vconst_bytes([4; 16]);
            v.map(|v| kb.b.ins().isub(v, four))
        }
        KKind::Q6 => {
            let mask = kb.vconst_bytes([15; 16]);
            let n = [kb.load(I8X16, vals, 0), kb.load(I8X16, vals, 16)];
            let high = low_values(kb, high.expect("q6 high pairs"), None);
            let thirty_two = kb.vconst_bytes([32; 16]);
            let n = n.map(|w| nibbles(kb, w, mask));
            std::array::from_fn(|k| {
                let nib = n[k / 2][k % 2];
                // High pairs are 0..4 per byte: shifting the 16-bit lanes by 4 keeps them in
                // their byte.
                let h = kb.b.ins().bitcast(I16X8, le(), high[k]);
                let h = kb.b.ins().ishl_imm_s(h, 4);
                let h = kb.b.ins().bitcast(I8X16, le(), h);
                let q = kb.b.ins().bor(nib, h);
                kb.b.ins().isub(q, thirty_two)
            })
        }
    }
}

/// Where row `r`'s values of unit `u` of a [`Layout::K16Rows4`] super-block at `wb` are (see
/// [`k16_values`]), `r` a constant or a lane index.
pub(super) fn k16_row_values(kb: &mut Kb, kind: KKind, wb: Value, u: i64, r: RowAt) -> (Value, Option<Value>) {
    let unit = (crate::pack::k16_scales_at(kind) + crate::pack::k16_scale_bytes(kind)) as i64
        + u * crate::pack::k16_unit_bytes(kind) as i64;
    let mut at = |stride: i64, offset: i64| match r {
        RowAt::Const(r) => kb.b.ins().iadd_imm_s(wb, unit + offset + stride * r),
        RowAt::Lane(lane) => kb.addr(wb, lane, stride, unit + offset),
    };
    match kind {
        KKind::Q6 => (at(32, 0), Some(at(16, 128))),
        KKind::Q3 => (at(16, 0), Some(at(8, 64))),
        KKind::Q2 => (at(16, 0), None),
    }
}

/// A row of a weight group: a constant, or a lane index computed at run time.
#[derive(Clone, Copy)]
pub(super) enum RowAt {
    Const(i64),
    Lane(Value),
}

/// The integer sub-block scale (and for Q2 minimum) of sub-block `s` of a
/// [`Layout::K16Rows4`] (`rows` 4) or [`Layout::K16Rows8`] (`rows` 8) super-block at `wb`: of
/// the four rows as `i32x4` (`RowAt::Const(0)` asks for all four), or of one lane as an `i32`.
pub(super) fn k16_scale(kb: &mut Kb, kind: KKind, wb: Value, s: i64, r: RowAt, rows: i64) -> (Value, Option<Value>) {
    let base = if rows == 8 { crate::pack::k16x8_scales_at(kind) } else { crate::pack::k16_scales_at(kind) } as i64;
    if kind == KKind::Q3 {
        let sc = six_bit_value(kb, wb, base, s, r, rows);
        let thirty_two = splat_i32(kb, r, 32);
        return (kb.b.ins().isub(sc, thirty_two), None);
    }
    let byte = |kb: &mut Kb, i: i64, signed: bool| scale_byte(kb, wb, base, i, r, rows, signed);
    let lanes = |kb: &mut Kb, c: i64| splat_i32(kb, r, c);
    match kind {
        KKind::Q6 => (byte(kb, s, true), None),
        KKind::Q2 => {
            let b = byte(kb, s, false);
            let fifteen = lanes(kb, 15);
            let sc = kb.b.ins().band(b, fifteen);
            let m = kb.b.ins().ushr_imm_s(b, 4);
            (sc, Some(m))
        }
        KKind::Q3 => unreachable!("above"),
    }
}

/// `c` as an `i32x4` (four rows) or an `i32` (one lane).
fn splat_i32(kb: &mut Kb, r: RowAt, c: i64) -> Value {
    let c = kb.b.ins().iconst(I32, c);
    match r {
        RowAt::Const(_) => kb.b.ins().splat(I32X4, c),
        RowAt::Lane(_) => c,
    }
}

/// Byte `i` of the byte-major scale bytes at `wb + base` of a group of `rows` rows: of the
/// four rows (`i32x4`), or of one lane (`i32`), `signed` or not.
fn scale_byte(kb: &mut Kb, wb: Value, base: i64, i: i64, r: RowAt, rows: i64, signed: bool) -> Value {
    match r {
        RowAt::Const(_) => {
            assert_eq!(rows, 4, "four rows at a time from 4-row groups");
            let v = kb.load(I32, wb, base + 4 * i);
            let v = kb.b.ins().scalar_to_vector(I32X4, v);
            let v = kb.b.ins().bitcast(I8X16, le(), v);
            if signed {
                let v = kb.b.ins().swiden_low(v);
                kb.b.ins().swiden_low(v)
            } else {
                let v = kb.b.ins().uwiden_low(v);
                kb.b.ins().uwiden_low(v)
            }
        }
        RowAt::Lane(lane) => {
            let p = kb.addr(wb, lane, 1, base + rows * i);
            let v = kb.load(I8, p, 0);
            if signed {
                kb.b.ins().sextend(I32, v)
            } else {
                kb.b.ins().uextend(I32, v)
            }
        }
    }
}

/// Value `t` of the sixteen 6-bit values at `wb + base` (`pack::six_bits`, byte-major over
/// a group of `rows` rows): for the four rows (`i32x4`) or one lane (`i32`).
fn six_bit_value(kb: &mut Kb, wb: Value, base: i64, t: i64, r: RowAt, rows: i64) -> Value {
    let lo = scale_byte(kb, wb, base, t % 8, r, rows, false);
    let lo = kb.b.ins().ushr_imm_s(lo, 4 * (t / 8));
    let fifteen = splat_i32(kb, r, 15);
    let lo = kb.b.ins().band(lo, fifteen);
    let hi = scale_byte(kb, wb, base, 8 + t % 4, r, rows, false);
    let hi = kb.b.ins().ushr_imm_s(hi, 2 * (t / 4));
    let three = splat_i32(kb, r, 3);
    let hi = kb.b.ins().band(hi, three);
    let hi = kb.b.ins().ishl_imm_s(hi, 4);
    kb.b.ins().bor(lo, hi)
}

/// The 6-bit scale and minimum of 32-value block `s` of a [`Layout::K32Rows4`] (`rows` 4) or
/// [`Layout::K32Rows8`] (`rows` 8) super-block at `wb`, after the rows' `d` and `dmin`: of the
/// four rows (`i32x4`) or one lane (`i32`).
pub(super) fn k32_scale(kb: &mut Kb, wb: Value, s: i64, r: RowAt, rows: i64) -> (Value, Value) {
    (six_bit_value(kb, wb, 4 * rows, s, r, rows), six_bit_value(kb, wb, 4 * rows, 8 + s, r, rows))
}

/// The low and the high nibbles of the 16 bytes `w` (`mask`: 15 in every byte), as `i8x16`.
pub(super) fn nibbles(kb: &mut Kb, w: Value, mask: Value) -> [Value; 2] {
    let lo = kb.b.ins().band(w, mask);
    let hi = kb.b.ins().bitcast(I16X8, le(), w);
    let hi = kb.b.ins().ushr_imm_s(hi, 4);
    let hi = kb.b.ins().bitcast(I8X16, le(), hi);
    [lo, kb.b.ins().band(hi, mask)]
}

/// The two `i8x16` of values (`0..16`, `16..32`, each `0..32`) of one row's 32-value block in a
/// [`Layout::K32Rows4`]: nibbles at `qs`, with the fifth bits of the `u32` at `qh` when given.
pub(super) fn k32_values(kb: &mut Kb, qs: Value, qh: Option<Value>) -> [Value; 2] {
    let mask = kb.vconst_bytes([15; 16]);
    let w = kb.load(I8X16, qs, 0);
    let [lo, hi] = nibbles(kb, w, mask);
    match qh {
        None => [lo, hi],
        Some(p) => {
            let qh = kb.load(I32, p, 0);
            [kb.with_high_bits(lo, qh, 0, 16), kb.with_high_bits(hi, qh, 2, 16)]
        }
    }
}

/// [`dot_quantized`] for a [`Layout::K32Rows4`] group of `n_super` 256-value super-blocks:
/// each 32-value block's integer dot products are scaled by the rows' `d * sc` and the
/// activation block's scale, and the rows' `-(dmin * m)` by the block's activation sum, in the
/// order of the Q4 kernels.
fn dot_k32(kb: &mut Kb, high: bool, wg: Value, x_rows: &[Value], n_super: i64, x_block: i64) -> Vec<Value> {
    let n = x_rows.len();
    let zero = kb.iconst(0);
    let ns = kb.iconst(n_super);
    let stride = crate::pack::k32_block_values(high) as i64;
    let at = crate::pack::K32_VALUES_AT as i64;
    let mut init: Vec<Value> = (0..n).map(|_| kb.splat(0.0)).collect();
    init.extend_from_slice(x_rows);
    init.push(wg);
    let out = kb.for_range(zero, ns, 1, &init, |kb, _, carried| {
        let (xbs, wb) = (&carried[n..2 * n], carried[2 * n]);
        let mut accs = carried[..n].to_vec();
        let d = kb.load_scales(wb, 0, true);
        let dmin = kb.load_scales(wb, 8, true);
        for s in 0..8i64 {
            let acts: Vec<(Value, Value, [Value; 4])> = xbs
                .iter()
                .map(|&xb| {
                    let xb = kb.b.ins().iadd_imm_s(xb, s * x_block);
                    load_q16(kb, xb)
                })
                .collect();
            let mut p = vec![[accs[0]; 4]; n];
            for r in 0..4i64 {
                let qs = kb.b.ins().iadd_imm_s(wb, at + stride * s + 16 * r);
                let qh = high.then(|| kb.b.ins().iadd_imm_s(wb, at + stride * s + 64 + 4 * r));
                let [lo, hi] = k32_values(kb, qs, qh);
                let q = [
                    kb.b.ins().uwiden_low(lo),
                    kb.b.ins().uwiden_high(lo),
                    kb.b.ins().uwiden_low(hi),
                    kb.b.ins().uwiden_high(hi),
                ];
                for (tok, (_, _, a)) in acts.iter().enumerate() {
                    let mut sum = kb.dot_i16(q[0], a[0]);
                    for k in 1..4 {
                        let t = kb.dot_i16(q[k], a[k]);
                        sum = kb.b.ins().iadd(sum, t);
                    }
                    p[tok][r as usize] = sum;
                }
            }
            let (sc, m) = k32_scale(kb, wb, s, RowAt::Const(0), 4);
            let sc = kb.b.ins().fcvt_from_sint(F32X4, sc);
            let ds = kb.b.ins().fmul(d, sc);
            let m = kb.b.ins().fcvt_from_sint(F32X4, m);
            let ms = kb.b.ins().fmul(dmin, m);
            let neg_ms = kb.b.ins().fneg(ms);
            for (tok, &(scale, sum, _)) in acts.iter().enumerate() {
                let sums = reduce4(kb, p[tok]);
                let sums = kb.b.ins().fcvt_from_sint(F32X4, sums);
                let scale = kb.b.ins().splat(F32X4, scale);
                let dss = kb.b.ins().fmul(ds, scale);
                accs[tok] = kb.b.ins().fma(sums, dss, accs[tok]);
                let sum = kb.b.ins().splat(F32X4, sum);
                accs[tok] = kb.b.ins().fma(neg_ms, sum, accs[tok]);
            }
        }
        let mut next = accs;
        for &xb in xbs {
            next.push(kb.b.ins().iadd_imm_s(xb, 8 * x_block));
        }
        next.push(kb.b.ins().iadd_imm_s(wb, crate::pack::k32_group_block(high) as i64));
        next
    });
    out[..n].to_vec()
}

/// [`dot_quantized`] for a [`Layout::K16Rows4`] group of `n_super` 256-value super-blocks:
/// per 16-value sub-block the integer dot products of the signed values are scaled by the
/// rows' `d * sc` and the activation block's scale, and for Q2 the rows' `-(dmin * m)` by the
/// sub-block's activation sum, as the x86-64 K16 micro-kernels do.
fn dot_k16(kb: &mut Kb, kind: KKind, wg: Value, x_rows: &[Value], n_super: i64, x_block: i64) -> Vec<Value> {
    let n = x_rows.len();
    let zero = kb.iconst(0);
    let ns = kb.iconst(n_super);
    let ones = {
        let one = kb.b.ins().iconst(cranelift_codegen::ir::types::I16, 1);
        kb.b.ins().splat(I16X8, one)
    };
    let mut init: Vec<Value> = (0..n).map(|_| kb.splat(0.0)).collect();
    init.extend_from_slice(x_rows);
    init.push(wg);
    let out = kb.for_range(zero, ns, 1, &init, |kb, _, carried| {
        let (xbs, wb) = (&carried[n..2 * n], carried[2 * n]);
        let mut accs = carried[..n].to_vec();
        let d = kb.load_scales(wb, 0, true);
        let dmin = (kind == KKind::Q2).then(|| kb.load_scales(wb, 8, true));
        for u in 0..4i64 {
            // Per token, the unit's two activation blocks.
            let acts: Vec<[(Value, Value, [Value; 4]); 2]> = xbs
                .iter()
                .map(|&xb| {
                    let first = kb.b.ins().iadd_imm_s(xb, 2 * u * x_block);
                    let second = kb.b.ins().iadd_imm_s(xb, (2 * u + 1) * x_block);
                    [load_q16(kb, first), load_q16(kb, second)]
                })
                .collect();
            // p[token][sub-block][row]: i32x4 partial sums.
            let mut p = vec![[[accs[0]; 4]; 4]; n];
            for r in 0..4i64 {
                let (vals, high) = k16_row_values(kb, kind, wb, u, RowAt::Const(r));
                let v = k16_values(kb, kind, vals, high);
                for (k, &v) in v.iter().enumerate() {
                    let w = [kb.b.ins().swiden_low(v), kb.b.ins().swiden_high(v)];
                    for (tok, blocks) in acts.iter().enumerate() {
                        let a = &blocks[k / 2].2;
                        let h = 2 * (k % 2);
                        let s0 = kb.dot_i16(w[0], a[h]);
                        let s1 = kb.dot_i16(w[1], a[h + 1]);
                        p[tok][k][r as usize] = kb.b.ins().iadd(s0, s1);
                    }
                }
            }
            for k in 0..4 {
                let (sc, m) = k16_scale(kb, kind, wb, 4 * u + k as i64, RowAt::Const(0), 4);
                let sc = kb.b.ins().fcvt_from_sint(F32X4, sc);
                let ds = kb.b.ins().fmul(d, sc);
                let neg_ms = m.map(|m| {
                    let m = kb.b.ins().fcvt_from_sint(F32X4, m);
                    let ms = kb.b.ins().fmul(dmin.expect("q2 minimums"), m);
                    kb.b.ins().fneg(ms)
                });
                for (tok, blocks) in acts.iter().enumerate() {
                    let (scale, _, a) = blocks[k / 2];
                    let sums = reduce4(kb, p[tok][k]);
                    let sums = kb.b.ins().fcvt_from_sint(F32X4, sums);
                    let scale = kb.b.ins().splat(F32X4, scale);
                    let dss = kb.b.ins().fmul(ds, scale);
                    accs[tok] = kb.b.ins().fma(sums, dss, accs[tok]);
                    if let Some(neg_ms) = neg_ms {
                        // The sub-block's activation sum in every lane: sum(a) * scale.
                        let h = 2 * (k % 2);
                        let s0 = kb.dot_i16(a[h], ones);
                        let s1 = kb.dot_i16(a[h + 1], ones);
                        let s = kb.b.ins().iadd(s0, s1);
                        let s = kb.b.ins().iadd_pairwise(s, s);
                        let s = kb.b.ins().iadd_pairwise(s, s);
                        let s = kb.b.ins().fcvt_from_sint(F32X4, s);
                        let s = kb.b.ins().fmul(s, scale);
                        accs[tok] = kb.b.ins().fma(neg_ms, s, accs[tok]);
                    }
                }
            }
        }
        let mut next = accs;
        for &xb in xbs {
            next.push(kb.b.ins().iadd_imm_s(xb, 8 * x_block));
        }
        next.push(kb.b.ins().iadd_imm_s(wb, crate::pack::k16_group_block(kind) as i64));
        next
    });
    out[..n].to_vec()
}

/// [`dot_quantized`] for a [`Layout::LowRows4`] group of `n_groups` 64-value blocks: each block
/// meets two q16 activation blocks, whose integer dot products are scaled by the block's `d`
/// and its offset `m` by each activation block's sum, in the order of the Q4 kernels.
fn dot_low(
    kb: &mut Kb,
    half: bool,
    high: bool,
    wg: Value,
    x_rows: &[Value],
    n_groups: i64,
    x_block: i64,
) -> Vec<Value> {
    let group_block = crate::pack::low_group_block(half, high) as i64;
    let sb = scales_bytes(half) as i64;
    let qs_at = 2 * sb;
    let n = x_rows.len();
    let zero = kb.iconst(0);
    let ng = kb.iconst(n_groups);
    let mut init: Vec<Value> = (0..n).map(|_| kb.splat(0.0)).collect();
    init.extend_from_slice(x_rows);
    init.push(wg);
    let out = kb.for_range(zero, ng, 1, &init, |kb, _, carried| {
        let (accs, xbs, wb) = (&carried[..n], &carried[n..2 * n], carried[2 * n]);
        // Per token, the two activation blocks of this group.
        let acts: Vec<[(Value, Value, [Value; 4]); 2]> = xbs
            .iter()
            .map(|&xb| {
                let second = kb.b.ins().iadd_imm_s(xb, x_block);
                [load_q16(kb, xb), load_q16(kb, second)]
            })
            .collect();
        // p[token][half][row]: i32x4 partial sums.
        let mut p = vec![[[accs[0]; 4]; 2]; n];
        for r in 0..4 {
            let qs = kb.b.ins().iadd_imm_s(wb, qs_at + 16 * r as i64);
            let qh = high.then(|| kb.b.ins().iadd_imm_s(wb, qs_at + 64 + 8 * r as i64));
            let v = low_values(kb, qs, qh);
            let wide: Vec<Value> =
                v.iter().flat_map(|&v| [kb.b.ins().uwiden_low(v), kb.b.ins().uwiden_high(v)]).collect();
            for (tok, blocks) in acts.iter().enumerate() {
                for (h, (_, _, a)) in blocks.iter().enumerate() {
                    let mut s = kb.dot_i16(wide[4 * h], a[0]);
                    for k in 1..4 {
                        let d = kb.dot_i16(wide[4 * h + k], a[k]);
                        s = kb.b.ins().iadd(s, d);
                    }
                    p[tok][h][r] = s;
                }
            }
        }
        let d = kb.load_scales(wb, 0, half);
        let m = kb.load_scales(wb, sb, half);
        let mut next = Vec::with_capacity(2 * n + 1);
        for (tok, blocks) in acts.iter().enumerate() {
            let mut acc = accs[tok];
            for (h, &(scale, sum, _)) in blocks.iter().enumerate() {
                let sums = reduce4(kb, p[tok][h]);
                let sums = kb.b.ins().fcvt_from_sint(F32X4, sums);
                let scale = kb.b.ins().splat(F32X4, scale);
                let ds = kb.b.ins().fmul(d, scale);
                acc = kb.b.ins().fma(sums, ds, acc);
                let sum = kb.b.ins().splat(F32X4, sum);
                acc = kb.b.ins().fma(m, sum, acc);
            }
            next.push(acc);
        }
        for &xb in xbs {
            next.push(kb.b.ins().iadd_imm_s(xb, 2 * x_block));
        }
        next.push(kb.b.ins().iadd_imm_s(wb, group_block));
        next
    });
    out[..n].to_vec()
}

/// The eight f32 values of one row's 8-column chunk of an [`Layout::F16Rows4`] group (an
/// `i16x8` of f16 or, with `brain`, bf16 bit patterns) as two `f32x4`: bf16 by a shift, f16 by
/// the exact integer widening of finite values (the layout holds only finite f16).
pub(super) fn widen_halves(kb: &mut Kb, h: Value, brain: bool) -> [Value; 2] {
    if brain {
        [kb.b.ins().uwiden_low(h), kb.b.ins().uwiden_high(h)].map(|w| {
            let w = kb.b.ins().ishl_imm_s(w, 16);
            kb.b.ins().bitcast(F32X4, le(), w)
        })
    } else {
        [kb.b.ins().swiden_low(h), kb.b.ins().swiden_high(h)].map(|w| kb.f16_bits_to_f32(w))
    }
}

/// Four row dot products of a 16-bit float group with one f32 activation row of `cols`
/// values, 8 columns at a time (a partial last chunk reads its activations partially; the
/// layout pads the weights with zeros).
fn dot_f16(kb: &mut Kb, wg: Value, x_row: Value, cols: i64, brain: bool) -> Value {
    let zero = kb.iconst(0);
    let full = kb.iconst(cols / 8);
    let init = [kb.splat(0.0); 4];
    let chunk = |kb: &mut Kb, xv: [Option<Value>; 2], wc: Value, acc: &[Value]| -> Vec<Value> {
        (0..4)
            .map(|r| {
                let h = kb.load(I16X8, wc, 16 * r as i64);
                let w = widen_halves(kb, h, brain);
                let mut a = acc[r];
                for (w, x) in w.into_iter().zip(xv) {
                    if let Some(x) = x {
                        a = kb.b.ins().fma(w, x, a);
                    }
                }
                a
            })
            .collect()
    };
    let mut acc = kb.for_range(zero, full, 1, &init, |kb, c, acc| {
        let xc = kb.addr(x_row, c, 32, 0);
        let xv = [Some(kb.load(F32X4, xc, 0)), Some(kb.load(F32X4, xc, 16))];
        let wc = kb.addr(wg, c, crate::pack::F16_GROUP_CHUNK as i64, 0);
        chunk(kb, xv, wc, acc)
    });
    let tail = (cols % 8) as usize;
    if tail != 0 {
        let at = 32 * (cols / 8);
        let xv = if tail <= 4 {
            [Some(if tail == 4 { kb.load(F32X4, x_row, at) } else { kb.load_partial(x_row, at, tail) }), None]
        } else {
            [Some(kb.load(F32X4, x_row, at)), Some(kb.load_partial(x_row, at + 16, tail - 4))]
        };
        let wc = kb.b.ins().iadd_imm_s(wg, crate::pack::F16_GROUP_CHUNK as i64 * (cols / 8));
        acc = chunk(kb, xv, wc, &acc);
    }
    kb.hsum4(acc[0], acc[1], acc[2], acc[3])
}

/// Four row dot products of an f32 group with one f32 activation row of `cols` values.
fn dot_f32(kb: &mut Kb, wg: Value, x_row: Value, cols: i64) -> Value {
    let zero = kb.iconst(0);
    let full = kb.iconst(cols / 4);
    let init = [kb.splat(0.0); 4];
    let chunk = |kb: &mut Kb, xv: Value, wc: Value, acc: &[Value]| -> Vec<Value> {
        (0..4)
            .map(|r| {
                let w = kb.load(F32X4, wc, 16 * r as i64);
                kb.b.ins().fma(w, xv, acc[r])
            })
            .collect()
    };
    let mut acc = kb.for_range(zero, full, 1, &init, |kb, c, acc| {
        let xv = kb.addr(x_row, c, 16, 0);
        let xv = kb.load(F32X4, xv, 0);
        let wc = kb.addr(wg, c, F32_GROUP_CHUNK as i64, 0);
        chunk(kb, xv, wc, acc)
    });
    let tail = (cols % 4) as usize;
    if tail != 0 {
        let xv = kb.load_partial(x_row, 16 * (cols / 4), tail);
        let wc = kb.b.ins().iadd_imm_s(wg, F32_GROUP_CHUNK as i64 * (cols / 4));
        acc = chunk(kb, xv, wc, &acc);
    }
    kb.hsum4(acc[0], acc[1], acc[2], acc[3])
}
