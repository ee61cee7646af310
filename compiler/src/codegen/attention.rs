//! Attention kernels over the KV cache.
//!
//! The cache holds, per layer, `context` rows of keys then `context` rows of values, each row
//! `kv_width` f32 (all KV heads side by side). [`emit_kv_store`] writes the batch's keys and
//! values at positions `pos..pos + n_tokens`; [`emit_attend`] then computes, for each
//! (token row, query head) pair, the scores against positions `0..=pos + t` tile by tile
//! (at most [`KEY_TILE`] keys in a stack buffer), an online softmax with the vectorized
//! `exp`, and the weighted sum of values.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::immediates::Ieee32;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind};

use super::abi;
use super::builder::{rw, Kb};
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
    pub skip_rows: bool,
}

impl AttentionSpec {
    fn kv_width(&self) -> i64 {
        (self.n_kv_heads * self.head_dim) as i64
    }

    /// Byte offset of this layer's keys in the cache; values follow `context` rows later.
    fn layer_offset(&self) -> i64 {
        self.layer as i64 * 2 * self.context as i64 * self.kv_width() * 4
    }
}

/// Copies the batch's key and value rows into the cache.
pub fn emit_kv_store(kb: &mut Kb, spec: &AttentionSpec) {
    let kvw = spec.kv_width();
    let (k, v) = (kb.location(spec.k), kb.location(spec.v));
    let cache = kb.ctx_field(abi::ctx::KV_CACHE);
    let keys = kb.b.ins().iadd_imm_s(cache, spec.layer_offset());
    let values = kb.b.ins().iadd_imm_s(keys, spec.context as i64 * kvw * 4);
    let pos = kb.ctx_field(abi::ctx::POS);
    let n_tokens = kb.ctx_field(abi::ctx::N_TOKENS);
    let zero = kb.iconst(0);
    let (t0, t1) = kb.partition(zero, n_tokens);
    kb.for_range(t0, t1, 1, &[], |kb, t, _| {
        let p = kb.b.ins().iadd(pos, t);
        for (src, dst) in [(k, keys), (v, values)] {
            let s = kb.addr(src, t, 4 * kvw, 0);
            let d = kb.addr(dst, p, 4 * kvw, 0);
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

/// Causal grouped-query attention for every (row, head) pair of this thread's share.
///
/// Keys are taken in tiles of [`KEY_TILE`] with an online softmax: each tile's scores go to
/// a stack buffer of at most `KEY_TILE + 4` floats, and a running maximum `m` and sum `l`
/// rescale what earlier tiles left in the output row (`y = y * exp(m_old - m_new) + sum p v`,
/// then `y /= l` at the end). The stack use is bounded whatever the context, so a host thread
/// with a small stack can run any context; with a single tile (up to 256 positions) the
/// arithmetic is the same as one softmax over all keys.
pub fn emit_attend(kb: &mut Kb, spec: &AttentionSpec) {
    let (hd, kvw) = (spec.head_dim as i64, spec.kv_width());
    assert!(hd % 4 == 0, "head_dim is checked by the codegen driver");
    let qw = spec.n_heads as i64 * hd;
    let group = (spec.n_heads / spec.n_kv_heads) as i64;
    let tile = spec.context.min(KEY_TILE) as i64;
    let scores_slot =
        kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (tile as u32 + 4) * 4, 4));
    let (q, y) = (kb.location(spec.q), kb.location(spec.y));
    let cache = kb.ctx_field(abi::ctx::KV_CACHE);
    let keys = kb.b.ins().iadd_imm_s(cache, spec.layer_offset());
    let values = kb.b.ins().iadd_imm_s(keys, spec.context as i64 * kvw * 4);
    let pos = kb.ctx_field(abi::ctx::POS);
    let n_tokens = kb.ctx_field(abi::ctx::N_TOKENS);
    let first = if spec.skip_rows { kb.ctx_field(abi::ctx::OUT_START) } else { kb.iconst(0) };
    // Units are (KV head, row, query head of its group), KV head first: the units of one KV
    // head read the same keys and values, which then stay in the core's L2 (a whole layer's
    // cache does not at long contexts). Causal rows cost more the later they come, so threads
    // take units round-robin (unit ith, ith + nth, ...) rather than contiguous ranges.
    let rows = kb.b.ins().isub(n_tokens, first);
    let per_kv_head = kb.b.ins().imul_imm_s(rows, group);
    let units_end = kb.b.ins().imul_imm_s(per_kv_head, spec.n_kv_heads as i64);
    let first_unit = kb.ith;
    let remaining = kb.b.ins().isub(units_end, first_unit);
    let remaining = kb.b.ins().iadd(remaining, kb.nth);
    let remaining = kb.b.ins().iadd_imm_s(remaining, -1);
    let my_count = kb.b.ins().sdiv(remaining, kb.nth);
    let scale = kb.splat(1.0 / (hd as f32).sqrt());
    let n_vec = hd / 4;
    let zero = kb.iconst(0);
    kb.for_range(zero, my_count, 1, &[], |kb, k, _| {
        let u = kb.b.ins().imul(k, kb.nth);
        let u = kb.b.ins().iadd(u, first_unit);
        let kv_head = kb.b.ins().udiv(u, per_kv_head);
        let in_head = kb.b.ins().urem(u, per_kv_head);
        let t = kb.b.ins().udiv_imm_s(in_head, group);
        let t = kb.b.ins().iadd(t, first);
        let g = kb.b.ins().urem_imm_s(in_head, group);
        let h = kb.b.ins().imul_imm_s(kv_head, group);
        let h = kb.b.ins().iadd(h, g);
        let n_keys = kb.b.ins().iadd(pos, t);
        let n_keys = kb.b.ins().iadd_imm_s(n_keys, 1);
        let q_row = kb.addr(q, t, 4 * qw, 0);
        let q_head = kb.addr(q_row, h, 4 * hd, 0);
        let k_head = kb.addr(keys, kv_head, 4 * hd, 0);
        let v_head = kb.addr(values, kv_head, 4 * hd, 0);
        let y_row = kb.addr(y, t, 4 * qw, 0);
        let y_head = kb.addr(y_row, h, 4 * hd, 0);
        let scores = kb.b.ins().stack_addr(I64, scores_slot, 0);
        let zero = kb.iconst(0);
        // The output row accumulates across tiles; start it at zero.
        let zero_v = kb.splat(0.0);
        for c in 0..n_vec {
            kb.store(zero_v, y_head, 16 * c);
        }
        let n_tiles = kb.b.ins().iadd_imm_s(n_keys, tile - 1);
        let n_tiles = kb.b.ins().udiv_imm_s(n_tiles, tile);
        let neg_inf = kb.splat(f32::NEG_INFINITY);
        let sum0 = kb.splat(0.0);
        let state = kb.for_range(zero, n_tiles, 1, &[neg_inf, sum0], |kb, ti, st| {
            let (m_old, l_old) = (st[0], st[1]);
            let j0 = kb.b.ins().imul_imm_s(ti, tile);
            let rest = kb.b.ins().isub(n_keys, j0);
            let tile_v = kb.iconst(tile);
            let full = kb.b.ins().icmp(IntCC::SignedGreaterThan, rest, tile_v);
            let count = kb.b.ins().select(full, tile_v, rest);
            let k_tile = kb.addr(k_head, j0, 4 * kvw, 0);
            let v_tile = kb.addr(v_head, j0, 4 * kvw, 0);
            let zero = kb.iconst(0);

            // Pass 1: scores[j] = q . k_j / sqrt(head_dim), and their maximum. Eight keys at
            // a time: eight independent accumulators cover the FMA latency at two FMAs per
            // cycle, and each q chunk is loaded once for the eight keys.
            let neg_inf = kb.splat(f32::NEG_INFINITY);
            let n_blocks = kb.b.ins().ushr_imm_s(count, 3);
            let maxv = kb.for_range(zero, n_blocks, 1, &[neg_inf], |kb, j8, m| {
                let k_row = kb.addr(k_tile, j8, 8 * 4 * kvw, 0);
                let mut acc = [kb.splat(0.0); 8];
                for c in 0..n_vec {
                    let qv = kb.load(F32X4, q_head, 16 * c);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let kv = kb.load(F32X4, k_row, 4 * kvw * i as i64 + 16 * c);
                        *a = kb.b.ins().fma(qv, kv, *a);
                    }
                }
                let at = kb.addr(scores, j8, 32, 0);
                let mut m = m[0];
                for half in 0..2 {
                    let s = kb.hsum4(acc[4 * half], acc[4 * half + 1], acc[4 * half + 2], acc[4 * half + 3]);
                    let s = kb.b.ins().fmul(s, scale);
                    kb.b.ins().store(rw(), s, at, 16 * half as i32);
                    m = kb.b.ins().fmax(m, s);
                }
                vec![m]
            })[0];
            let tail_start = kb.b.ins().ishl_imm_s(n_blocks, 3);
            let maxv = kb.for_range(tail_start, count, 1, &[maxv], |kb, j, m| {
                let k_row = kb.addr(k_tile, j, 4 * kvw, 0);
                let mut acc = kb.splat(0.0);
                for c in 0..n_vec {
                    let qv = kb.load(F32X4, q_head, 16 * c);
                    let kv = kb.load(F32X4, k_row, 16 * c);
                    acc = kb.b.ins().fma(qv, kv, acc);
                }
                let s = kb.hsum(acc);
                let s = kb.b.ins().splat(F32X4, s);
                let s = kb.b.ins().fmul(s, scale);
                let lane0 = kb.b.ins().extractlane(s, 0);
                let at = kb.addr(scores, j, 4, 0);
                kb.b.ins().store(rw(), lane0, at, 0);
                vec![kb.b.ins().fmax(m[0], s)]
            })[0];
            let tile_max = kb.hmax(maxv);
            let tile_max = kb.b.ins().splat(F32X4, tile_max);
            let m_new = kb.b.ins().fmax(m_old, tile_max);
            // exp(m_old - m_new) rescales earlier tiles: 0 before the first (m_old = -inf).
            let shift = kb.b.ins().fsub(m_old, m_new);
            let alpha = kb.vexp(shift);
            // Pad the scores to a multiple of four with -inf, which exp turns into 0.
            let pad = kb.b.ins().f32const(Ieee32::with_float(f32::NEG_INFINITY));
            let end = kb.addr(scores, count, 4, 0);
            for i in 0..3 {
                kb.b.ins().store(rw(), pad, end, 4 * i);
            }

            // Pass 2: scores[j] = exp(scores[j] - m_new), and their sum.
            let n4 = kb.b.ins().iadd_imm_s(count, 3);
            let n4 = kb.b.ins().ushr_imm_s(n4, 2);
            let sum0 = kb.splat(0.0);
            let sumv = kb.for_range(zero, n4, 1, &[sum0], |kb, j4, s| {
                let at = kb.addr(scores, j4, 16, 0);
                let x = kb.b.ins().load(F32X4, rw(), at, 0);
                let x = kb.b.ins().fsub(x, m_new);
                let e = kb.vexp(x);
                kb.b.ins().store(rw(), e, at, 0);
                vec![kb.b.ins().fadd(s[0], e)]
            })[0];
            let total = kb.hsum(sumv);
            let total = kb.b.ins().splat(F32X4, total);
            let l_new = kb.b.ins().fma(l_old, alpha, total);

            // Pass 3: y = y * alpha + sum_j p_j v_j, 32 floats of the head at a time (eight
            // independent accumulators cover the FMA latency).
            let mut c0 = 0;
            while c0 < n_vec {
                let width = (n_vec - c0).min(8) as usize;
                let init = vec![kb.splat(0.0); width];
                let acc = kb.for_range(zero, count, 1, &init, |kb, j, acc| {
                    let at = kb.addr(scores, j, 4, 0);
                    let p = kb.b.ins().load(F32, rw(), at, 0);
                    let p = kb.b.ins().splat(F32X4, p);
                    let v_row = kb.addr(v_tile, j, 4 * kvw, 0);
                    (0..width)
                        .map(|i| {
                            let v = kb.load(F32X4, v_row, 16 * (c0 + i as i64));
                            kb.b.ins().fma(v, p, acc[i])
                        })
                        .collect()
                });
                for (i, a) in acc.into_iter().enumerate() {
                    let off = 16 * (c0 + i as i64);
                    let prev = kb.load(F32X4, y_head, off);
                    let out = kb.b.ins().fma(prev, alpha, a);
                    kb.store(out, y_head, off);
                }
                c0 += width as i64;
            }
            vec![m_new, l_new]
        });
        let one = kb.splat(1.0);
        let inv = kb.b.ins().fdiv(one, state[1]);
        for c in 0..n_vec {
            let a = kb.load(F32X4, y_head, 16 * c);
            let out = kb.b.ins().fmul(a, inv);
            kb.store(out, y_head, 16 * c);
        }
        vec![]
    });
}
