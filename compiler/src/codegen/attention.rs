//! Attention kernels over the KV cache.
//!
//! The cache holds, per layer, `context` rows of keys then `context` rows of values, each row
//! `kv_width` f32 (all KV heads side by side). [`emit_kv_store`] writes the batch's keys and
//! values at positions `pos..pos + n_tokens`; [`emit_attend`] then computes, for each token
//! row and up to three query heads of one KV head, the scores against positions
//! `0..=pos + t` tile by tile (at most [`KEY_TILE`] keys in a stack buffer), an online
//! softmax with the vectorized `exp`, and the weighted sum of values: the scores and the
//! values on the target's 256-bit kernels where it has them, with the same arithmetic.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{FuncRef, InstBuilder, StackSlotData, StackSlotKind, Value};
use ir::KvDType;
use targets::{AttentionKernel, AttentionStep};

use super::abi;
use super::builder::Kb;
use crate::passes::plan_memory::Location;

/// Geometry of one attention op.
pub struct AttentionSpec {
    pub q: Location,
    pub k: Location,
    pub v: Location,
    pub y: Location,
    pub layer: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub context: u32,
    pub kv_dtype: KvDType,
    pub skip_rows: bool,
    /// The target's kernels for the scores and the weighted values, when it has them.
    pub kernels: Option<AttentionKernels>,
}

impl AttentionSpec {
    fn kv_width(&self) -> i64 {
        (self.n_kv_heads * self.head_dim) as i64
    }

    /// Bytes of one cache row (one position's keys, or values).
    fn kv_row_bytes(&self) -> i64 {
        self.kv_width() * self.kv_dtype.bytes() as i64
    }

    /// Byte offset of this layer's keys in the cache; values follow `context` rows later.
    fn layer_offset(&self) -> i64 {
        self.layer as i64 * 2 * self.context as i64 * self.kv_row_bytes()
    }
}

/// Copies the batch's key and value rows into the cache.
pub fn emit_kv_store(kb: &mut Kb, spec: &AttentionSpec) {
    let kvw = spec.kv_width();
    let (k, v) = (kb.location(spec.k), kb.location(spec.v));
    let cache = kb.ctx_field(abi::ctx::KV_CACHE);
    let keys = kb.b.ins().iadd_imm_s(cache, spec.layer_offset());
    let row_bytes = spec.kv_row_bytes();
    let values = kb.b.ins().iadd_imm_s(keys, spec.context as i64 * row_bytes);
    let pos = kb.ctx_field(abi::ctx::POS);
    let n_tokens = kb.ctx_field(abi::ctx::N_TOKENS);
    let zero = kb.iconst(0);
    let (t0, t1) = kb.partition(zero, n_tokens);
    kb.for_range(t0, t1, 1, &[], |kb, t, _| {
        let p = kb.b.ins().iadd(pos, t);
        for (src, dst) in [(k, keys), (v, values)] {
            let s = kb.addr(src, t, 4 * kvw, 0);
            let d = kb.addr(dst, p, row_bytes, 0);
            if spec.kv_dtype == KvDType::F16 {
                assert!(kvw % 4 == 0, "head_dim is a multiple of 4");
                for c in 0..kvw / 4 {
                    let x = kb.load(F32X4, s, 16 * c);
                    let h = kb.f32_to_f16_bits(x);
                    kb.store(h, d, 8 * c);
                }
                continue;
            }
            for c in 0..kvw / 4 {
                let x = kb.load(F32X4, s, 16 * c);
                kb.store(x, d, 16 * c);
            }
            if kvw % 4 != 0 {
                let x = kb.load_partial(s, 16 * (kvw / 4), (kvw % 4) as usize);
                kb.store_partial(x, d, 16 * (kvw / 4), (kvw % 4) as usize);
            }
        }
        vec![]
    });
}

/// Keys per tile of [`emit_attend`]: the scores of one tile are all the stack it needs.
pub const KEY_TILE: u32 = 256;

/// Query heads one unit of [`emit_attend`] takes together (they share each key and value
/// row they read), at most.
pub const HEADS_PER_UNIT: u32 = 3;

/// The target's attention kernels for one model shape, for 1..=3 heads (index `heads - 1`).
#[derive(Clone, Copy)]
pub struct AttentionKernels {
    pub scores: [FuncRef; HEADS_PER_UNIT as usize],
    pub values: [FuncRef; HEADS_PER_UNIT as usize],
}

/// Byte offsets of the arrays of [`emit_attend`]'s per-head state: running maxima, running
/// sums, and the current tile's rescaling factors (what the values kernel reads).
const M_AT: i64 = 0;
const L_AT: i64 = 4 * HEADS_PER_UNIT as i64;
const ALPHA_AT: i64 = 8 * HEADS_PER_UNIT as i64;

/// Bytes between the score rows of consecutive heads in [`emit_attend`]'s stack buffer: a
/// tile of scores plus 3 floats of `-inf` padding, rounded to 16 bytes.
pub fn score_row_bytes(context: u32) -> u32 {
    (context.min(KEY_TILE) + 4) * 4
}

/// The attention kernel contract for this model shape (see `targets::AttentionKernel`).
pub fn attention_kernel(step: AttentionStep, heads: u32, head_dim: u32, context: u32, kv: KvDType) -> AttentionKernel {
    AttentionKernel {
        step,
        heads,
        head_dim,
        kv_half: kv == KvDType::F16,
        row_stride: score_row_bytes(context),
        scale_bits: (1.0 / (head_dim as f32).sqrt()).to_bits(),
    }
}

/// Causal grouped-query attention for this thread's share of the units.
///
/// A unit is one token row, one KV head and up to [`HEADS_PER_UNIT`] of its query heads (one
/// head per unit when there are too few units to keep the threads busy, as in generation).
/// Keys are taken in tiles of [`KEY_TILE`] with an online softmax: each tile's scores go to a
/// stack buffer (a row of `KEY_TILE + 4` floats per head), and a running maximum `m` and sum
/// `l` per head rescale what earlier tiles left in the output row (`y = y * exp(m_old - m_new)
/// + sum p v`, then `y /= l` at the end). The stack use is bounded whatever the context, so a
/// host thread with a small stack can run any context.
///
/// The scores and the weighted sum of values are the target's kernels where it has them
/// (x86-64: 256-bit, see `targets::AttentionKernel`), else the Cranelift loops below, which do
/// the same arithmetic: both targets give the same bits.
pub fn emit_attend(kb: &mut Kb, spec: &AttentionSpec) {
    let hd = spec.head_dim as i64;
    assert!(hd % 4 == 0, "head_dim is checked by the codegen driver");
    let qw = spec.n_heads as i64 * hd;
    let group = (spec.n_heads / spec.n_kv_heads) as i64;
    let tile = spec.context.min(KEY_TILE) as i64;
    let row_bytes = score_row_bytes(spec.context) as i64;
    let per_unit = group.min(HEADS_PER_UNIT as i64);
    let scores_slot =
        kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (row_bytes * per_unit) as u32, 4));
    // Per head of the unit: m, l and the tile's rescaling factor alpha (three f32 arrays).
    let state_slot =
        kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 3 * 4 * HEADS_PER_UNIT, 4));
    let (q, y) = (kb.location(spec.q), kb.location(spec.y));
    let cache = kb.ctx_field(abi::ctx::KV_CACHE);
    let kv_row = spec.kv_row_bytes();
    let kv_el = spec.kv_dtype.bytes() as i64;
    let half = spec.kv_dtype == KvDType::F16;
    let keys = kb.b.ins().iadd_imm_s(cache, spec.layer_offset());
    let values = kb.b.ins().iadd_imm_s(keys, spec.context as i64 * kv_row);
    let pos = kb.ctx_field(abi::ctx::POS);
    let n_tokens = kb.ctx_field(abi::ctx::N_TOKENS);
    let first = if spec.skip_rows { kb.ctx_field(abi::ctx::OUT_START) } else { kb.iconst(0) };
    // Units are (KV head, row, chunk of query heads), KV head first: the units of one KV head
    // read the same keys and values, which then stay in the core's L2. Causal rows cost more
    // the later they come, so threads take units round-robin (ith, ith + nth, ...).
    let rows = kb.b.ins().isub(n_tokens, first);
    let big_chunks = (group + per_unit - 1) / per_unit;
    let big_units = kb.b.ins().imul_imm_s(rows, big_chunks * spec.n_kv_heads as i64);
    let min_units = kb.b.ins().imul_imm_s(kb.nth, 4);
    let few = kb.b.ins().icmp(IntCC::UnsignedLessThan, big_units, min_units);
    let (one, big_c, g_c, big_n) = (kb.iconst(1), kb.iconst(per_unit), kb.iconst(group), kb.iconst(big_chunks));
    let chunk_heads = kb.b.ins().select(few, one, big_c);
    let n_chunks = kb.b.ins().select(few, g_c, big_n);
    let per_kv_head = kb.b.ins().imul(rows, n_chunks);
    let units_end = kb.b.ins().imul_imm_s(per_kv_head, spec.n_kv_heads as i64);
    let first_unit = kb.ith;
    let remaining = kb.b.ins().isub(units_end, first_unit);
    let remaining = kb.b.ins().iadd(remaining, kb.nth);
    let remaining = kb.b.ins().iadd_imm_s(remaining, -1);
    let my_count = kb.b.ins().sdiv(remaining, kb.nth);
    let n_vec = hd / 4;
    let zero = kb.iconst(0);
    kb.for_range(zero, my_count, 1, &[], |kb, k, _| {
        let u = kb.b.ins().imul(k, kb.nth);
        let u = kb.b.ins().iadd(u, first_unit);
        let kv_head = kb.b.ins().udiv(u, per_kv_head);
        let in_head = kb.b.ins().urem(u, per_kv_head);
        let t = kb.b.ins().udiv(in_head, n_chunks);
        let t = kb.b.ins().iadd(t, first);
        let chunk = kb.b.ins().urem(in_head, n_chunks);
        let g0 = kb.b.ins().imul(chunk, chunk_heads);
        let left = kb.b.ins().isub(g_c, g0);
        let nh = kb.b.ins().smin(left, chunk_heads);
        let h0 = kb.b.ins().imul_imm_s(kv_head, group);
        let h0 = kb.b.ins().iadd(h0, g0);
        let n_keys = kb.b.ins().iadd(pos, t);
        let n_keys = kb.b.ins().iadd_imm_s(n_keys, 1);
        let q_row = kb.addr(q, t, 4 * qw, 0);
        let q_head = kb.addr(q_row, h0, 4 * hd, 0);
        let k_head = kb.addr(keys, kv_head, kv_el * hd, 0);
        let v_head = kb.addr(values, kv_head, kv_el * hd, 0);
        let y_row = kb.addr(y, t, 4 * qw, 0);
        let y_head = kb.addr(y_row, h0, 4 * hd, 0);
        let scores = kb.b.ins().stack_addr(I64, scores_slot, 0);
        let state = kb.b.ins().stack_addr(I64, state_slot, 0);
        let zero = kb.iconst(0);
        // The output rows accumulate across tiles: start them at zero; m = -inf, l = 0.
        let zero_v = kb.splat(0.0);
        kb.for_range(zero, nh, 1, &[], |kb, g, _| {
            let y_g = kb.addr(y_head, g, 4 * hd, 0);
            for c in 0..n_vec {
                kb.store(zero_v, y_g, 16 * c);
            }
            let at = kb.addr(state, g, 4, 0);
            let neg_inf = kb.fconst(f32::NEG_INFINITY);
            let zero_f = kb.fconst(0.0);
            kb.store(neg_inf, at, M_AT);
            kb.store(zero_f, at, L_AT);
            vec![]
        });
        let n_tiles = kb.b.ins().iadd_imm_s(n_keys, tile - 1);
        let n_tiles = kb.b.ins().udiv_imm_s(n_tiles, tile);
        kb.for_range(zero, n_tiles, 1, &[], |kb, ti, _| {
            let j0 = kb.b.ins().imul_imm_s(ti, tile);
            let rest = kb.b.ins().isub(n_keys, j0);
            let tile_v = kb.iconst(tile);
            let full = kb.b.ins().icmp(IntCC::SignedGreaterThan, rest, tile_v);
            let count = kb.b.ins().select(full, tile_v, rest);
            let k_tile = kb.addr(k_head, j0, kv_row, 0);
            let v_tile = kb.addr(v_head, j0, kv_row, 0);
            let zero = kb.iconst(0);
            let k_stride = kb.iconst(kv_row);

            // Scores of every head of the unit against the tile's keys.
            match spec.kernels {
                Some(kernels) => call_by_heads(kb, nh, &kernels.scores, &[q_head, k_tile, k_stride, scores, count]),
                None => kb.for_range(zero, nh, 1, &[], |kb, g, _| {
                    let q_g = kb.addr(q_head, g, 4 * hd, 0);
                    let row = kb.addr(scores, g, row_bytes, 0);
                    emit_scores(kb, q_g, k_tile, kv_row, half, row, count, n_vec);
                    vec![]
                }),
            };

            // Per head: the tile's maximum, the new running maximum and sum, and the scores
            // turned into exp(score - m_new).
            kb.for_range(zero, nh, 1, &[], |kb, g, _| {
                let row = kb.addr(scores, g, row_bytes, 0);
                let at = kb.addr(state, g, 4, 0);
                // Pad the scores to a multiple of four with -inf, which exp turns into 0.
                let pad = kb.fconst(f32::NEG_INFINITY);
                let end = kb.addr(row, count, 4, 0);
                for i in 0..3 {
                    kb.store(pad, end, 4 * i);
                }
                let n4 = kb.b.ins().iadd_imm_s(count, 3);
                let n4 = kb.b.ins().ushr_imm_s(n4, 2);
                let neg_inf = kb.splat(f32::NEG_INFINITY);
                let maxv = kb.for_range(zero, n4, 1, &[neg_inf], |kb, j4, m| {
                    let p = kb.addr(row, j4, 16, 0);
                    let x = kb.load(F32X4, p, 0);
                    vec![kb.b.ins().fmax(m[0], x)]
                })[0];
                let tile_max = kb.hmax(maxv);
                let m_old = kb.load(F32, at, M_AT);
                let m_new = kb.b.ins().fmax(m_old, tile_max);
                // exp(m_old - m_new) rescales earlier tiles: 0 before the first (m_old = -inf).
                let shift = kb.b.ins().fsub(m_old, m_new);
                let shift = kb.b.ins().splat(F32X4, shift);
                let alpha = kb.vexp(shift);
                let m_new_v = kb.b.ins().splat(F32X4, m_new);
                let sum0 = kb.splat(0.0);
                let sumv = kb.for_range(zero, n4, 1, &[sum0], |kb, j4, s| {
                    let p = kb.addr(row, j4, 16, 0);
                    let x = kb.load(F32X4, p, 0);
                    let x = kb.b.ins().fsub(x, m_new_v);
                    let e = kb.vexp(x);
                    kb.store(e, p, 0);
                    vec![kb.b.ins().fadd(s[0], e)]
                })[0];
                let total = kb.hsum(sumv);
                let alpha = kb.b.ins().extractlane(alpha, 0);
                let l_old = kb.load(F32, at, L_AT);
                let l_new = kb.b.ins().fma(l_old, alpha, total);
                kb.store(m_new, at, M_AT);
                kb.store(l_new, at, L_AT);
                kb.store(alpha, at, ALPHA_AT);
                vec![]
            });

            // y = y * alpha + sum_j p_j v_j for every head of the unit.
            match spec.kernels {
                Some(kernels) => {
                    let alphas = kb.b.ins().iadd_imm_s(state, ALPHA_AT);
                    call_by_heads(kb, nh, &kernels.values, &[scores, v_tile, k_stride, count, y_head, alphas])
                }
                None => kb.for_range(zero, nh, 1, &[], |kb, g, _| {
                    let row = kb.addr(scores, g, row_bytes, 0);
                    let at = kb.addr(state, g, 4, 0);
                    let alpha = kb.load(F32, at, ALPHA_AT);
                    let alpha = kb.b.ins().splat(F32X4, alpha);
                    let y_g = kb.addr(y_head, g, 4 * hd, 0);
                    emit_values(kb, row, v_tile, kv_row, half, count, y_g, alpha, n_vec);
                    vec![]
                }),
            };
            vec![]
        });
        kb.for_range(zero, nh, 1, &[], |kb, g, _| {
            let at = kb.addr(state, g, 4, 0);
            let l = kb.load(F32, at, L_AT);
            let one = kb.fconst(1.0);
            let inv = kb.b.ins().fdiv(one, l);
            let inv = kb.b.ins().splat(F32X4, inv);
            let y_g = kb.addr(y_head, g, 4 * hd, 0);
            for c in 0..n_vec {
                let a = kb.load(F32X4, y_g, 16 * c);
                let out = kb.b.ins().fmul(a, inv);
                kb.store(out, y_g, 16 * c);
            }
            vec![]
        });
        vec![]
    });
}

/// Calls `kernels[nh - 1]` (nh in 1..=3, a runtime value) with `args`.
fn call_by_heads(kb: &mut Kb, nh: Value, kernels: &[FuncRef; HEADS_PER_UNIT as usize], args: &[Value]) -> Vec<Value> {
    kb.switch_small(nh, &[1, 2, 3], |kb, heads| {
        kb.b.ins().call(kernels[heads as usize - 1], args);
    });
    vec![]
}

/// Four keys or values of a cache row at `ptr + offset` elements, as f32x4 (f16 widened
/// exactly).
fn load_kv(kb: &mut Kb, ptr: Value, elem: i64, half: bool) -> Value {
    if half {
        let (ptr, offset) = kb.near(ptr, 2 * elem);
        let h = kb.b.ins().sload16x4(super::builder::ro(), ptr, offset);
        kb.f16_bits_to_f32(h)
    } else {
        kb.load(F32X4, ptr, 4 * elem)
    }
}

/// `row[j] = scale * q . k_j` for the `count` keys from `k` (rows `k_row` bytes apart), with
/// the dot product of `targets::AttentionKernel`: lanes of the even 4-float chunks in `lo`,
/// of the odd ones in `hi`, then `(x0 + x2) + (x1 + x3)` of `x = lo + hi`. Four keys at a
/// time (eight accumulators).
#[allow(clippy::too_many_arguments)]
fn emit_scores(kb: &mut Kb, q: Value, k: Value, k_row: i64, half: bool, row: Value, count: Value, n_vec: i64) {
    let scale = kb.splat(1.0 / ((4 * n_vec) as f32).sqrt());
    let zero = kb.iconst(0);
    let dot = |kb: &mut Kb, keys: &[Value]| -> Vec<Value> {
        let n = keys.len();
        let (mut lo, mut hi) = (vec![kb.splat(0.0); n], vec![kb.splat(0.0); n]);
        for c in 0..n_vec {
            let qv = kb.load(F32X4, q, 16 * c);
            for (i, &key) in keys.iter().enumerate() {
                let kv = load_kv(kb, key, 4 * c, half);
                let acc = if c % 2 == 0 { &mut lo[i] } else { &mut hi[i] };
                *acc = kb.b.ins().fma(qv, kv, *acc);
            }
        }
        (0..n).map(|i| kb.b.ins().fadd(lo[i], hi[i])).collect()
    };
    let n_blocks = kb.b.ins().ushr_imm_s(count, 2);
    kb.for_range(zero, n_blocks, 1, &[], |kb, j4, _| {
        let k0 = kb.addr(k, j4, 4 * k_row, 0);
        let keys: Vec<Value> = (0..4).map(|i| kb.b.ins().iadd_imm_s(k0, k_row * i)).collect();
        let x = dot(kb, &keys);
        let s = kb.hsum4(x[0], x[1], x[2], x[3]);
        let s = kb.b.ins().fmul(s, scale);
        let at = kb.addr(row, j4, 16, 0);
        kb.store(s, at, 0);
        vec![]
    });
    let tail = kb.b.ins().ishl_imm_s(n_blocks, 2);
    kb.for_range(tail, count, 1, &[], |kb, j, _| {
        let key = kb.addr(k, j, k_row, 0);
        let x = dot(kb, &[key])[0];
        let s = kb.hsum4(x, x, x, x);
        let s = kb.b.ins().fmul(s, scale);
        let s = kb.b.ins().extractlane(s, 0);
        let at = kb.addr(row, j, 4, 0);
        kb.store(s, at, 0);
        vec![]
    });
}

/// `y = fma(y, alpha, sum_j p_j v_j)` with the sum folded by `fma(v_j, p_j, acc)` from 0.0
/// over the `count` keys in order, 32 floats of the head at a time (eight accumulators).
#[allow(clippy::too_many_arguments)]
fn emit_values(
    kb: &mut Kb,
    p: Value,
    v: Value,
    v_row_bytes: i64,
    half: bool,
    count: Value,
    y: Value,
    alpha: Value,
    n_vec: i64,
) {
    let zero = kb.iconst(0);
    let mut c0 = 0;
    while c0 < n_vec {
        let width = (n_vec - c0).min(8) as usize;
        let init = vec![kb.splat(0.0); width];
        let acc = kb.for_range(zero, count, 1, &init, |kb, j, acc| {
            let at = kb.addr(p, j, 4, 0);
            let pj = kb.load(F32, at, 0);
            let pj = kb.b.ins().splat(F32X4, pj);
            let v_row = kb.addr(v, j, v_row_bytes, 0);
            (0..width)
                .map(|i| {
                    let x = load_kv(kb, v_row, 4 * (c0 + i as i64), half);
                    kb.b.ins().fma(x, pj, acc[i])
                })
                .collect()
        });
        for (i, a) in acc.into_iter().enumerate() {
            let off = 16 * (c0 + i as i64);
            let prev = kb.load(F32X4, y, off);
            let out = kb.b.ins().fma(prev, alpha, a);
            kb.store(out, y, off);
        }
        c0 += width as i64;
    }
}
