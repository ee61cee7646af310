//! Helpers for writing kernels with Cranelift's `FunctionBuilder`: access to the `kiln_ctx`
//! fields, counted loops with loop-carried values, work partitioning across threads, partial
//! vector loads and stores for row tails, horizontal reductions, and a vectorized `exp`.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::immediates::Ieee32;
use cranelift_codegen::ir::types::{F32, F32X4, I16X8, I32, I32X4, I64, I64X2, I8X16};
use cranelift_codegen::ir::{BlockArg, ConstantData, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::{FunctionBuilder, Switch};
use targets::Target;

use super::abi;
use crate::passes::plan_memory::Location;

/// Flags for loads of weights and activations: they never trap, are read-only during the
/// kernel, and may move; never `aligned` (see the Cranelift facts: blocks are 20 or 72 bytes).
pub fn ro() -> MemFlagsData {
    MemFlagsData::new().with_notrap().with_readonly().with_can_move()
}

/// Flags for stores and for loads of memory the kernel itself writes.
pub fn rw() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Little-endian flag for lane-count-changing bitcasts.
pub fn le() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

/// A kernel under construction: `fn(ctx, ith, nth)`.
pub struct Kb<'a> {
    pub b: FunctionBuilder<'a>,
    pub ctx: Value,
    pub ith: Value,
    pub nth: Value,
    pub target: &'a dyn Target,
}

impl<'a> Kb<'a> {
    pub fn iconst(&mut self, v: i64) -> Value {
        self.b.ins().iconst(I64, v)
    }

    pub fn fconst(&mut self, v: f32) -> Value {
        self.b.ins().f32const(Ieee32::with_float(v))
    }

    pub fn splat(&mut self, v: f32) -> Value {
        let s = self.fconst(v);
        self.b.ins().splat(F32X4, s)
    }

    /// Loads the 8-byte field at `offset` of the context. Not `can_move`: the load stays at
    /// the kernel's entry, so that addresses derived from it are hoisted out of loops.
    pub fn ctx_field(&mut self, offset: i32) -> Value {
        self.b.ins().load(I64, MemFlagsData::new().with_notrap().with_readonly(), self.ctx, offset)
    }

    /// Address of a value's storage.
    pub fn location(&mut self, loc: Location) -> Value {
        match loc {
            Location::Arena { offset } => {
                let arena = self.ctx_field(abi::ctx::ARENA);
                self.b.ins().iadd_imm_s(arena, offset as i64)
            }
            Location::Io { slot } => {
                let io = self.ctx_field(abi::ctx::IO);
                self.b.ins().load(I64, ro(), io, 8 * slot as i32)
            }
            // The caller's buffer starts at row out_start: address rows from a base that many
            // rows earlier (never dereferenced below out_start, see `Location::Output`).
            Location::Output { slot, row_bytes } => {
                let io = self.ctx_field(abi::ctx::IO);
                let buf = self.b.ins().load(I64, ro(), io, 8 * slot as i32);
                let out_start = self.ctx_field(abi::ctx::OUT_START);
                let skipped = self.b.ins().imul_imm_s(out_start, row_bytes as i64);
                self.b.ins().isub(buf, skipped)
            }
        }
    }

    /// Address `weights + offset`.
    pub fn weights(&mut self, offset: u64) -> Value {
        let w = self.ctx_field(abi::ctx::WEIGHTS);
        self.b.ins().iadd_imm_s(w, offset as i64)
    }

    /// `base + index * stride + offset`.
    pub fn addr(&mut self, base: Value, index: Value, stride: i64, offset: i64) -> Value {
        let scaled = self.b.ins().imul_imm_s(index, stride);
        let a = self.b.ins().iadd(base, scaled);
        if offset == 0 {
            a
        } else {
            self.b.ins().iadd_imm_s(a, offset)
        }
    }

    /// `ptr` and an offset a load or store can carry: Cranelift's memory operations take a
    /// 32-bit offset, so a larger one (a weight or cache past 2 GiB) is added to the address
    /// first, never truncated.
    pub fn near(&mut self, ptr: Value, offset: i64) -> (Value, i32) {
        match i32::try_from(offset) {
            Ok(o) => (ptr, o),
            Err(_) => (self.b.ins().iadd_imm_s(ptr, offset), 0),
        }
    }

    pub fn load(&mut self, ty: Type, ptr: Value, offset: i64) -> Value {
        let (ptr, offset) = self.near(ptr, offset);
        self.b.ins().load(ty, ro(), ptr, offset)
    }

    /// Four scales at `ptr + offset` as f32x4: four finite f16 (widened exactly) when `half`,
    /// else four f32.
    pub fn load_scales(&mut self, ptr: Value, offset: i64, half: bool) -> Value {
        if !half {
            return self.load(F32X4, ptr, offset);
        }
        let bits = self.load(I64, ptr, offset);
        let v = self.b.ins().scalar_to_vector(I64X2, bits);
        let v = self.b.ins().bitcast(I16X8, le(), v);
        let h = self.b.ins().swiden_low(v);
        self.f16_bits_to_f32(h)
    }

    /// The f32 values of finite f16 bit patterns held sign-extended in i32x4 lanes, exact
    /// (zeros, subnormals, normals) in four operations (Cranelift has no f16 conversion): the
    /// exponent and mantissa shifted to f32's places, the sign kept, give the value times
    /// 2^-112 (an f32 subnormal for f16 subnormals), and multiplying by 2^112 is exact. Only
    /// finite scales are packed as f16 (`pack::is_f16`). Like every f32 operation, it assumes
    /// subnormals are not flushed to zero (the default on both targets; a host that sets
    /// denormals-are-zero would read f16-subnormal scales, below 6.1e-5, as zero).
    pub fn f16_bits_to_f32(&mut self, h: Value) -> Value {
        let o = self.b.ins().ishl_imm_s(h, 13);
        // The sign-extension put copies of the sign in bits 28..=30: keep bit 31 and the rest.
        let k = self.b.ins().iconst(I32, 0x8fff_ffffu32 as i64);
        let keep = self.b.ins().splat(I32X4, k);
        let o = self.b.ins().band(o, keep);
        let o = self.b.ins().bitcast(F32X4, le(), o);
        let scale = self.splat(f32::from_bits(0x7780_0000)); // 2^112
        self.b.ins().fmul(o, scale)
    }

    /// Four f32 as IEEE half bit patterns, packed in an `i64` (lane 0 in the low 16 bits):
    /// rounded to nearest even, saturating at +-65504 (NaN too), as `ir::KvDType::F16::round`.
    /// Normal results rebias the exponent and round at bit 13 with integer adds; results below
    /// f16's smallest normal come from adding 0.5 in f32, which rounds the magnitude to a
    /// multiple of 2^-24, f16's subnormal step, by the same rule.
    pub fn f32_to_f16_bits(&mut self, x: Value) -> Value {
        let splat_i = |kb: &mut Self, v: u32| {
            let c = kb.b.ins().iconst(I32, v as i64);
            kb.b.ins().splat(I32X4, c)
        };
        let xi = self.b.ins().bitcast(I32X4, le(), x);
        let sign = self.b.ins().ushr_imm_s(xi, 16);
        let sign_mask = splat_i(self, 0x8000);
        let sign = self.b.ins().band(sign, sign_mask);
        let abs_mask = splat_i(self, 0x7fff_ffff);
        let a = self.b.ins().band(xi, abs_mask);
        let max = splat_i(self, 0x477f_e000); // 65504.0
        let a = self.b.ins().umin(a, max);
        let rebias = splat_i(self, 112 << 23);
        let t = self.b.ins().isub(a, rebias);
        let lsb = self.b.ins().ushr_imm_s(t, 13);
        let one = splat_i(self, 1);
        let lsb = self.b.ins().band(lsb, one);
        let half_ulp = splat_i(self, 0xfff);
        let t = self.b.ins().iadd(t, half_ulp);
        let t = self.b.ins().iadd(t, lsb);
        let normal = self.b.ins().ushr_imm_s(t, 13);
        let f = self.b.ins().bitcast(F32X4, le(), a);
        let point_five = self.splat(0.5);
        let s = self.b.ins().fadd(f, point_five);
        let s = self.b.ins().bitcast(I32X4, le(), s);
        let point_five_bits = splat_i(self, 0x3f00_0000);
        let subnormal = self.b.ins().isub(s, point_five_bits);
        let min_normal = splat_i(self, 0x3880_0000); // 2^-14
        let is_sub = self.b.ins().icmp(IntCC::UnsignedLessThan, a, min_normal);
        let h = self.b.ins().bitselect(is_sub, subnormal, normal);
        let h = self.b.ins().bor(h, sign);
        let n = self.b.ins().unarrow(h, h);
        let n = self.b.ins().bitcast(I64X2, le(), n);
        self.b.ins().extractlane(n, 0)
    }

    pub fn store(&mut self, v: Value, ptr: Value, offset: i64) {
        let (ptr, offset) = self.near(ptr, offset);
        self.b.ins().store(rw(), v, ptr, offset);
    }

    /// This thread's share `[start, end)` of `start0..end0`, split as evenly as possible.
    pub fn partition(&mut self, start0: Value, end0: Value) -> (Value, Value) {
        let total = self.b.ins().isub(end0, start0);
        let lo = self.b.ins().imul(total, self.ith);
        let lo = self.b.ins().udiv(lo, self.nth);
        let ith1 = self.b.ins().iadd_imm_s(self.ith, 1);
        let hi = self.b.ins().imul(total, ith1);
        let hi = self.b.ins().udiv(hi, self.nth);
        (self.b.ins().iadd(start0, lo), self.b.ins().iadd(start0, hi))
    }

    /// A counted loop `for i in (start..end).step_by(step)` carrying `init` values through
    /// `body`, which returns their next values. Returns the values after the loop.
    pub fn for_range(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        init: &[Value],
        mut body: impl FnMut(&mut Self, Value, &[Value]) -> Vec<Value>,
    ) -> Vec<Value> {
        let types: Vec<Type> = init.iter().map(|&v| self.b.func.dfg.value_type(v)).collect();
        let header = self.b.create_block();
        let body_block = self.b.create_block();
        let exit = self.b.create_block();
        self.b.append_block_param(header, I64);
        for &t in &types {
            self.b.append_block_param(header, t);
            self.b.append_block_param(exit, t);
        }
        let mut args = vec![BlockArg::Value(start)];
        args.extend(init.iter().map(|&v| BlockArg::Value(v)));
        self.b.ins().jump(header, &args);

        self.b.switch_to_block(header);
        let params = self.b.block_params(header).to_vec();
        let (i, carried) = (params[0], params[1..].to_vec());
        let go_on = self.b.ins().icmp(IntCC::SignedLessThan, i, end);
        let exit_args: Vec<BlockArg> = carried.iter().map(|&v| BlockArg::Value(v)).collect();
        self.b.ins().brif(go_on, body_block, &[], exit, &exit_args);

        self.b.switch_to_block(body_block);
        self.b.seal_block(body_block);
        let next = body(self, i, &carried);
        assert_eq!(next.len(), carried.len(), "loop body must return every carried value");
        let i_next = self.b.ins().iadd_imm_s(i, step);
        let mut args = vec![BlockArg::Value(i_next)];
        args.extend(next.iter().map(|&v| BlockArg::Value(v)));
        self.b.ins().jump(header, &args);
        self.b.seal_block(header);

        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
        self.b.block_params(exit).to_vec()
    }

    /// Runs `then` when `cond` is nonzero, `otherwise` when it is zero.
    pub fn if_else(&mut self, cond: Value, then: impl FnOnce(&mut Self), otherwise: impl FnOnce(&mut Self)) {
        let (t, e, join) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.ins().brif(cond, t, &[], e, &[]);
        for (block, f) in [(t, Box::new(then) as Box<dyn FnOnce(&mut Self)>), (e, Box::new(otherwise))] {
            self.b.switch_to_block(block);
            self.b.seal_block(block);
            f(self);
            self.b.ins().jump(join, &[]);
        }
        self.b.switch_to_block(join);
        self.b.seal_block(join);
    }

    /// Emits `f(c)` for the case `c` of `cases` that `value` (an integer) equals, nothing when
    /// it equals none: a runtime count meeting code specialized on small constants.
    pub fn switch_small(&mut self, value: Value, cases: &[i64], mut f: impl FnMut(&mut Self, i64)) {
        let join = self.b.create_block();
        let mut switch = Switch::new();
        let blocks: Vec<_> = cases
            .iter()
            .map(|&c| {
                let block = self.b.create_block();
                switch.set_entry(c as u128, block);
                block
            })
            .collect();
        switch.emit(&mut self.b, value, join);
        for (&c, &block) in cases.iter().zip(&blocks) {
            self.b.switch_to_block(block);
            self.b.seal_block(block);
            f(self, c);
            self.b.ins().jump(join, &[]);
        }
        self.b.switch_to_block(join);
        self.b.seal_block(join);
    }

    /// Loads `count` (< 4) floats into the low lanes of a vector, zeros elsewhere.
    pub fn load_partial(&mut self, ptr: Value, offset: i64, count: usize) -> Value {
        let mut v = self.splat(0.0);
        for lane in 0..count {
            let x = self.load(F32, ptr, offset + 4 * lane as i64);
            v = self.b.ins().insertlane(v, x, lane as u8);
        }
        v
    }

    /// Stores the low `count` (< 4) lanes of a vector.
    pub fn store_partial(&mut self, v: Value, ptr: Value, offset: i64, count: usize) {
        for lane in 0..count {
            let x = self.b.ins().extractlane(v, lane as u8);
            self.store(x, ptr, offset + 4 * lane as i64);
        }
    }

    /// Sum of the four lanes of an `f32x4`.
    pub fn hsum(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.b.ins().fadd(l[0], l[1]);
        let b = self.b.ins().fadd(l[2], l[3]);
        self.b.ins().fadd(a, b)
    }

    /// Largest of the four lanes of an `f32x4`.
    pub fn hmax(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.b.ins().fmax(l[0], l[1]);
        let b = self.b.ins().fmax(l[2], l[3]);
        self.b.ins().fmax(a, b)
    }

    /// Sum of the four lanes of an `i32x4`.
    pub fn hsum_i32(&mut self, v: Value) -> Value {
        let p = self.b.ins().iadd_pairwise(v, v);
        let p = self.b.ins().iadd_pairwise(p, p);
        self.b.ins().extractlane(p, 0)
    }

    /// `[sum(a), sum(b), sum(c), sum(d)]` for four `f32x4`.
    pub fn hsum4(&mut self, a: Value, b: Value, c: Value, d: Value) -> Value {
        let ab = self.pair_sums(a, b);
        let cd = self.pair_sums(c, d);
        let even = self.shuffle_f32(ab, cd, [0, 2, 4, 6]);
        let odd = self.shuffle_f32(ab, cd, [1, 3, 5, 7]);
        self.b.ins().fadd(even, odd)
    }

    /// `[x0+x2, x1+x3, y0+y2, y1+y3]`.
    fn pair_sums(&mut self, x: Value, y: Value) -> Value {
        let lo = self.shuffle_f32(x, y, [0, 1, 4, 5]);
        let hi = self.shuffle_f32(x, y, [2, 3, 6, 7]);
        self.b.ins().fadd(lo, hi)
    }

    /// A 16-byte vector constant.
    pub fn vconst_bytes(&mut self, bytes: [u8; 16]) -> Value {
        let handle = self.b.func.dfg.constants.insert(ConstantData::from(bytes.to_vec()));
        self.b.ins().vconst(I8X16, handle)
    }

    /// `values` (an `i8x16` of values below `weight`) with `weight` added to lane `j` where bit
    /// `j` of bytes `first_byte, first_byte + 1` of `qh` (an `i32`) is set: the fifth bits of
    /// the kernel form Q5 (weight 16; bytes 0-1 for a block's values 0..16, 2-3 for 16..32).
    pub fn with_high_bits(&mut self, values: Value, qh: Value, first_byte: u8, weight: u8) -> Value {
        let v = self.b.ins().splat(I32X4, qh);
        let v = self.b.ins().bitcast(I8X16, le(), v);
        let index = self.vconst_bytes(std::array::from_fn(|j| first_byte + j as u8 / 8));
        let bytes = self.b.ins().swizzle(v, index);
        let bits = self.vconst_bytes(std::array::from_fn(|j| 1u8 << (j % 8)));
        let set = self.b.ins().band(bytes, bits);
        let set = self.b.ins().icmp(IntCC::Equal, set, bits);
        let add = self.vconst_bytes([weight; 16]);
        let add = self.b.ins().band(set, add);
        self.b.ins().bor(values, add)
    }

    /// Shuffles the f32 lanes of `a` (0..4) and `b` (4..8).
    pub fn shuffle_f32(&mut self, a: Value, b: Value, lanes: [u8; 4]) -> Value {
        let bytes: Vec<u8> = lanes.iter().flat_map(|&l| (0..4).map(move |k| l * 4 + k)).collect();
        let mask = self.b.func.dfg.immediates.push(ConstantData::from(bytes));
        let a8 = self.b.ins().bitcast(I8X16, le(), a);
        let b8 = self.b.ins().bitcast(I8X16, le(), b);
        let r = self.b.ins().shuffle(a8, b8, mask);
        self.b.ins().bitcast(F32X4, le(), r)
    }

    /// `i32x4` lanes `a[2i]*b[2i] + a[2i+1]*b[2i+1]` of two `i16x8`, as the target emits it.
    pub fn dot_i16(&mut self, a: Value, b: Value) -> Value {
        self.target.dot_i16x8(&mut self.b, a, b)
    }

    /// `exp(x)` on four lanes, Cephes-style: `x = n ln2 + r`, a degree-7 polynomial for
    /// `exp(r)` on |r| <= ln2/2, and `2^n` built in the exponent bits. Relative error ~2e-7;
    /// inputs below -87.3 give 0, above 88.3 are clamped.
    pub fn vexp(&mut self, x: Value) -> Value {
        let lo = self.splat(-87.3);
        let hi = self.splat(88.3);
        let xc = self.b.ins().fmax(x, lo);
        let xc = self.b.ins().fmin(xc, hi);
        let log2e = self.splat(std::f32::consts::LOG2_E);
        let n = self.b.ins().fmul(xc, log2e);
        let n = self.b.ins().nearest(n);
        let c1 = self.splat(-0.693359375);
        let c2 = self.splat(2.12194440e-4);
        let r = self.b.ins().fma(n, c1, xc);
        let r = self.b.ins().fma(n, c2, r);
        let mut p = self.splat(1.9875691500e-4);
        for c in [1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1] {
            let c = self.splat(c);
            p = self.b.ins().fma(p, r, c);
        }
        let r2 = self.b.ins().fmul(r, r);
        let one = self.splat(1.0);
        let r1 = self.b.ins().fadd(r, one);
        let e = self.b.ins().fma(p, r2, r1);
        let ni = self.b.ins().fcvt_to_sint_sat(I32X4, n);
        let bias = self.b.ins().iconst(I32, 127);
        let bias = self.b.ins().splat(I32X4, bias);
        let ni = self.b.ins().iadd(ni, bias);
        let bits = self.b.ins().ishl_imm_s(ni, 23);
        let pow2 = self.b.ins().bitcast(F32X4, MemFlagsData::new(), bits);
        let res = self.b.ins().fmul(e, pow2);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let under = self.b.ins().bitcast(F32X4, MemFlagsData::new(), under);
        let zero = self.splat(0.0);
        self.b.ins().bitselect(under, zero, res)
    }

    /// `x * sigmoid(x)` on four lanes.
    pub fn vsilu(&mut self, x: Value) -> Value {
        let neg = self.b.ins().fneg(x);
        let e = self.vexp(neg);
        let one = self.splat(1.0);
        let den = self.b.ins().fadd(e, one);
        self.b.ins().fdiv(x, den)
    }

    /// Quantizes 32 floats (eight `f32x4`) to a q16 block on the grid `act` at `out`: f32
    /// scale, f32 sum of the dequantized values, 32 x i16, with exactly the rounding of
    /// `ir::interp::quantize_activations`; on the q8 grid then the same integers as 32 x i8
    /// (`plan_memory::Q8_VALUES_AT`).
    pub fn quantize_block(&mut self, vals: &[Value; 8], out: Value, act: ir::ActDType) {
        let mut amax = self.b.ins().fabs(vals[0]);
        for &v in &vals[1..] {
            let a = self.b.ins().fabs(v);
            amax = self.b.ins().fmax(amax, a);
        }
        let amax = self.hmax(amax);
        let qmax = self.fconst(act.max());
        let scale = self.b.ins().fdiv(amax, qmax);
        let inv = self.b.ins().fdiv(qmax, amax);
        let zero = self.fconst(0.0);
        let positive = self.b.ins().fcmp(FloatCC::GreaterThan, amax, zero);
        let inv = self.b.ins().select(positive, inv, zero);
        let inv = self.b.ins().splat(F32X4, inv);
        let mut q = [vals[0]; 8];
        for (qi, &v) in q.iter_mut().zip(vals) {
            let scaled = self.b.ins().fmul(v, inv);
            let rounded = self.b.ins().nearest(scaled);
            *qi = self.b.ins().fcvt_to_sint_sat(I32X4, rounded);
        }
        let mut total = q[0];
        for &qi in &q[1..] {
            total = self.b.ins().iadd(total, qi);
        }
        let total = self.hsum_i32(total);
        let total = self.b.ins().fcvt_from_sint(F32, total);
        let sum = self.b.ins().fmul(total, scale);
        self.store(scale, out, 0);
        self.store(sum, out, 4);
        let mut words = [q[0]; 4];
        for (k, w) in words.iter_mut().enumerate() {
            *w = self.b.ins().snarrow(q[2 * k], q[2 * k + 1]);
            debug_assert_eq!(self.b.func.dfg.value_type(*w), I16X8);
            self.store(*w, out, 8 + 16 * k as i64);
        }
        if act == ir::ActDType::Q8 {
            let at = crate::passes::plan_memory::Q8_VALUES_AT as i64;
            for k in 0..2 {
                let bytes = self.b.ins().snarrow(words[2 * k], words[2 * k + 1]);
                self.store(bytes, out, at + 16 * k as i64);
            }
        }
    }
}
