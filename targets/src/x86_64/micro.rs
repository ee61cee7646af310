//! The x86-64 micro-kernels kiln encodes itself (with iced-x86), for the 256-bit AVX2 vectors
//! that Cranelift 0.135 cannot express.
//!
//! A kernel multiplies a group of 8 weight rows by up to 4 q16 activation rows with one
//! 256-bit register holding one int32 lane per weight row: each 16-byte chunk of values
//! widens to 16 int16 values, rows in lane pairs (Q8: `vpmovsxbw`; Q4: `vpmovzxbw`, then low
//! nibbles by `vpand` and high nibbles by `vpsrlw 4`), which meet a broadcast pair of
//! activation values in `vpmaddwd`, so no horizontal reduction is needed: per block and token, the 8 rows' integer sums convert to
//! f32 and fold into 8 f32 accumulators with the block's scales (`vcvtph2ps` widens f16
//! scales, exactly). Register use, for `T` tokens: ymm0..T integer sums, ymm8..8+T f32
//! accumulators, ymm12/13 the unpacked nibbles (then `d` and `m`), ymm14 a broadcast
//! temporary, ymm15 the nibble mask, ymm7 `-8.0` (q4_0's `m = -8 d`; `-16.0` for q5_0); with
//! fifth bits, ymm6 holds four chunks' bits, ymm5 is a temporary and ymm4 holds 16s.
//!
//! For 8-bit activations (`NibbleDwords`, the q8 grid) a 32-byte chunk holds four bytes of
//! each row, so after `vpand`/`vpsrlw` one register holds 4 nibbles per row and int32 lane;
//! `vpmaddubsw` with 4 broadcast int8 activations leaves two int16 pair sums per row, summed
//! in int16 over the block (bounded: 8 * 2 * 15 * 127 < 2^15) and widened once per block by
//! `vpmaddwd` with ones (ymm6): half the multiplies of the int16 path and no widening loads.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use ir::quant::KKind;

use crate::{MicroKernel, MicroValues, K32_HEADER};

/// Byte `disp` of token `t`'s activations (of 0..4): token t is at rsi + t * rdx, token 3 at
/// r9 + 2 * rdx with r9 = rsi + rdx (the kernels' argument registers, System V).
fn x_token(t: usize, disp: i32) -> AsmMemoryOperand {
    match t {
        0 => rsi + disp,
        1 => rsi + rdx + disp,
        2 => rsi + rdx * 2 + disp,
        _ => r9 + rdx * 2 + disp,
    }
}

/// Bytes of a q16 activation block before its values: scale f32, sum f32.
const X_VALUES_AT: i32 = 8;

/// Bytes of the stack frame of the 5-bit kernels on the 8-bit path: int16 ones, then 4 tokens'
/// f32 accumulators.
const FRAME: i32 = 32 + 4 * 32;

/// Assembles the kernel (see [`MicroKernel`] for its contract).
/// Moves bit `from` of each fifth-bit byte in ymm6 to bit 4 (word shifts; the 16s in ymm4 keep
/// only bits that stayed in their byte) and ORs it into `values`; ymm5 is the temporary.
fn merge_fifth_bit(a: &mut CodeAssembler, values: AsmRegisterYmm, from: i32) -> Result<(), IcedError> {
    match from.cmp(&4) {
        std::cmp::Ordering::Less => a.vpsllw(ymm5, ymm6, (4 - from) as u32)?,
        std::cmp::Ordering::Greater => a.vpsrlw(ymm5, ymm6, (from - 4) as u32)?,
        std::cmp::Ordering::Equal => a.vmovdqa(ymm5, ymm6)?,
    }
    a.vpand(ymm5, ymm5, ymm4)?;
    a.vpor(values, values, ymm5)
}

/// Block `s`'s scales of a K32 super-block at `rdi` for the 8 rows: ymm12 = `d * sc_s`, ymm13
/// = `-(dmin * m_s)` (f32). Uses ymm5 and ymm14; ymm7 holds the sign bit.
fn k32_scales(a: &mut CodeAssembler, s: i32) -> Result<(), IcedError> {
    let (sc, m, t, bits) = (ymm12, ymm13, ymm14, ymm5);
    let byte = |i: i32| qword_ptr(rdi + (32 + 8 * i));
    // Byte s: scale s's low nibble and minimum s's high nibble, zero-extended per row.
    a.vpmovzxbd(sc, byte(s))?;
    a.vpsrld(m, sc, 4)?;
    a.vpslld(sc, sc, 28)?;
    a.vpsrld(sc, sc, 28)?;
    // Byte 8 + s % 4: the high bit pairs of values s (bits 2(s/4)) and 8 + s (2(s/4) + 4).
    a.vpmovzxbd(t, byte(8 + s % 4))?;
    for (v, pair) in [(sc, 2 * (s / 4)), (m, 2 * (s / 4) + 4)] {
        a.vpslld(bits, t, (30 - pair) as u32)?;
        a.vpsrld(bits, bits, 30)?;
        a.vpslld(bits, bits, 4)?;
        a.vpor(v, v, bits)?;
    }
    a.vcvtdq2ps(sc, sc)?;
    a.vcvtdq2ps(m, m)?;
    a.vcvtph2ps(bits, xmmword_ptr(rdi))?;
    a.vmulps(sc, sc, bits)?;
    a.vcvtph2ps(bits, xmmword_ptr(rdi + 16))?;
    a.vmulps(m, m, bits)?;
    a.vxorps(m, m, ymm7)
}

/// ymm14 = f32(sum of the 16 int16 activation values at `values`) * the f32 at `scale`, in
/// every lane (ymm6: int16 ones; xmm5 is a temporary).
fn half_sum_times_scale(
    a: &mut CodeAssembler,
    values: AsmMemoryOperand,
    scale: AsmMemoryOperand,
) -> Result<(), IcedError> {
    a.vpmaddwd(ymm14, ymm6, ymmword_ptr(values))?;
    a.vextracti128(xmm5, ymm14, 1)?;
    a.vpaddd(xmm14, xmm14, xmm5)?;
    a.vpshufd(xmm5, xmm14, 0x4e)?;
    a.vpaddd(xmm14, xmm14, xmm5)?;
    a.vpshufd(xmm5, xmm14, 0xb1)?;
    a.vpaddd(xmm14, xmm14, xmm5)?;
    a.vcvtdq2ps(xmm14, xmm14)?;
    a.vmulss(xmm14, xmm14, dword_ptr(scale))?;
    a.vbroadcastss(ymm14, xmm14)
}

/// Broadcasts `bits` into every dword of `y` (`x` its low half), through eax.
fn broadcast_dword(a: &mut CodeAssembler, y: AsmRegisterYmm, x: AsmRegisterXmm, bits: u32) -> Result<(), IcedError> {
    a.mov(eax, bits as i32)?;
    a.vmovd(x, eax)?;
    a.vpbroadcastd(y, x)
}

/// Moves the bit field at bit `from` of every byte of `src` to bit `to` in `dst` (word
/// shifts: the caller's mask keeps only the bits that stayed in their byte).
fn move_field_y(
    a: &mut CodeAssembler,
    dst: AsmRegisterYmm,
    src: AsmRegisterYmm,
    from: i32,
    to: i32,
) -> Result<(), IcedError> {
    match from.cmp(&to) {
        std::cmp::Ordering::Greater => a.vpsrlw(dst, src, (from - to) as u32),
        std::cmp::Ordering::Less => a.vpsllw(dst, src, (to - from) as u32),
        std::cmp::Ordering::Equal if dst == src => Ok(()),
        std::cmp::Ordering::Equal => a.vmovdqa(dst, src),
    }
}

/// The K16 kernel ([`MicroKernel::k16`]): per super-block and sub-block, each 16-byte chunk of
/// values (values `2u, 2u + 1` of the 8 rows) is put together from its planes in xmm12 (low
/// bits; xmm13 the high bits), less the offset (xmm7, bytes), widened to int16 and multiplied
/// with `vpmaddwd` as the Q8 kernels do; the sub-block's int32 sums fold into f32 with its
/// scales and, for Q2, minimums times the sub-block's activation sum. ymm15: the low bits' mask, ymm6: the high
/// bits' (Q2: int16 ones), ymm4: Q3's 32 (dwords), Q2's `-dmin`; the super-block's `d` in
/// ymm5 (Q6) or ymm7 (Q2).
fn kernel_k16(k: &MicroKernel, kind: KKind) -> Result<Vec<u8>, IcedError> {
    let tokens = k.tokens as usize;
    let iacc = [ymm0, ymm1, ymm2, ymm3];
    let facc = [ymm8, ymm9, ymm10, ymm11];
    let (vals, high, tmp) = (ymm12, ymm13, ymm14);
    let x_at = x_token;
    let mut a = CodeAssembler::new(64)?;
    let mut done = a.create_label();
    let mut top = a.create_label();
    a.lea(r9, rsi + rdx)?;
    for &f in &facc[..tokens] {
        a.vxorps(f, f, f)?;
    }
    let (low_mask, high_mask) = match kind {
        KKind::Q6 => (0x0f0f_0f0f, 0x3030_3030),
        KKind::Q3 => (0x0303_0303, 0x0404_0404),
        KKind::Q2 => (0x0303_0303, 0x0001_0001),
    };
    broadcast_dword(&mut a, ymm15, xmm15, low_mask)?;
    broadcast_dword(&mut a, ymm6, xmm6, high_mask)?;
    let low = k.low;
    if kind != KKind::Q2 && !low {
        broadcast_dword(&mut a, ymm7, xmm7, u32::from_ne_bytes([kind.offset() as u8; 4]))?;
    }
    if kind == KKind::Q3 && !low {
        broadcast_dword(&mut a, ymm4, xmm4, 32)?;
    }
    let scales_at: i32 = if kind == KKind::Q2 { 32 } else { 16 };
    let scale_byte = |i: i32| qword_ptr(rdi + (scales_at + 8 * i));
    a.test(r8, r8)?;
    a.jle(done)?;
    a.set_label(&mut top)?;
    // The super-block's d (Q6: ymm5, Q2: ymm7) and Q2's -dmin (ymm4).
    match kind {
        _ if low => {}
        KKind::Q6 => a.vcvtph2ps(ymm5, xmmword_ptr(rdi))?,
        KKind::Q2 => {
            broadcast_dword(&mut a, tmp, xmm14, 0x8000_0000)?;
            a.vcvtph2ps(ymm4, xmmword_ptr(rdi + 16))?;
            a.vxorps(ymm4, ymm4, tmp)?;
            a.vcvtph2ps(ymm7, xmmword_ptr(rdi))?;
        }
        KKind::Q3 => {}
    }
    // 16-value sub-blocks: 16 per K16 super-block, 4 per 64-value group.
    let subs = if low { 4 } else { 16 };
    for s in 0..subs {
        let h = s % 2;
        let xo = s / 2 * k.x_block_bytes as i32;
        let x = |t: usize, disp: i32| x_at(t, disp + xo);
        let at = k.qs_at as i32 + s * k.block_bytes as i32;
        let chunk = |i: i32| xmmword_ptr(rdi + (at + 16 * i));
        let chunks = |i: i32| ymmword_ptr(rdi + (at + 16 * i));
        if kind == KKind::Q3 {
            // ymm5: the third bits, bit j of a byte chunk j's in the low lane, chunk j + 4's
            // in the high lane.
            a.vbroadcasti128(ymm5, chunk(2))?;
            a.vpsrlw(high, ymm5, 4)?;
            a.vpblendd(ymm5, ymm5, high, 0xf0)?;
        }
        // Chunks u and u + 4 at once, in the two 128-bit lanes of ymm12.
        for u in 0..4i32 {
            match kind {
                KKind::Q6 => {
                    // Low nibbles of chunk u's bytes are its values, high nibbles chunk u + 4's.
                    a.vbroadcasti128(vals, chunk(u))?;
                    a.vpsrlw(high, vals, 4)?;
                    a.vpblendd(vals, vals, high, 0xf0)?;
                    a.vpand(vals, vals, ymm15)?;
                    // Bit pairs u of the two high chunks (u and u + 4), moved to bits 4-5.
                    a.vmovdqu(high, chunks(4))?;
                    move_field_y(&mut a, high, high, 2 * u, 4)?;
                }
                KKind::Q3 | KKind::Q2 => {
                    a.vmovdqu(vals, chunks(0))?;
                    move_field_y(&mut a, vals, vals, 2 * u, 0)?;
                    a.vpand(vals, vals, ymm15)?;
                    if kind == KKind::Q3 {
                        move_field_y(&mut a, high, ymm5, u, 2)?;
                    }
                }
            }
            if kind != KKind::Q2 {
                a.vpand(high, high, ymm6)?;
                a.vpor(vals, vals, high)?;
                if !low {
                    a.vpsubb(vals, vals, ymm7)?;
                }
            }
            a.vpmovsxbw(high, xmm12)?;
            a.vextracti128(xmm12, vals, 1)?;
            a.vpmovsxbw(vals, xmm12)?;
            for (values, c) in [(high, u), (vals, u + 4)] {
                for t in 0..tokens {
                    a.vpbroadcastd(tmp, dword_ptr(x(t, X_VALUES_AT + 32 * h + 4 * c)))?;
                    // The first product of a sum: per sub-block, or per activation block when
                    // both halves share its scales (`low`).
                    if c == 0 && (!low || h == 0) {
                        a.vpmaddwd(iacc[t], values, tmp)?;
                    } else {
                        a.vpmaddwd(tmp, values, tmp)?;
                        a.vpaddd(iacc[t], iacc[t], tmp)?;
                    }
                }
            }
        }
        if low {
            if h == 1 {
                // The activation block's sums, folded as the Q4 kernels fold theirs with the
                // group's d (ymm4) and m (ymm7).
                let m_at = k.mins_at.expect("64-value groups store offsets") as i32;
                if k.half {
                    a.vcvtph2ps(ymm4, xmmword_ptr(rdi))?;
                    a.vcvtph2ps(ymm7, xmmword_ptr(rdi + m_at))?;
                } else {
                    a.vmovups(ymm4, ymmword_ptr(rdi))?;
                    a.vmovups(ymm7, ymmword_ptr(rdi + m_at))?;
                }
                for t in 0..tokens {
                    a.vbroadcastss(tmp, dword_ptr(x(t, 0)))?;
                    a.vmulps(tmp, ymm4, tmp)?;
                    a.vcvtdq2ps(iacc[t], iacc[t])?;
                    a.vfmadd231ps(facc[t], iacc[t], tmp)?;
                    a.vbroadcastss(tmp, dword_ptr(x(t, 4)))?;
                    a.vfmadd231ps(facc[t], ymm7, tmp)?;
                }
            }
            continue;
        }
        // d * sc_s in ymm12 and, for Q2, -(dmin * m_s) in ymm13.
        match kind {
            KKind::Q6 => a.vpmovsxbd(vals, scale_byte(s))?,
            KKind::Q2 => {
                a.vpmovzxbd(high, scale_byte(s))?;
                a.vpslld(vals, high, 28)?;
                a.vpsrld(vals, vals, 28)?;
                a.vpsrld(high, high, 4)?;
                a.vcvtdq2ps(high, high)?;
                a.vmulps(high, high, ymm4)?;
            }
            KKind::Q3 => {
                // The sixteen 6-bit values as the K32 header has them, less 32.
                a.vpmovzxbd(vals, scale_byte(s % 8))?;
                if s < 8 {
                    a.vpslld(vals, vals, 28)?;
                    a.vpsrld(vals, vals, 28)?;
                } else {
                    a.vpsrld(vals, vals, 4)?;
                }
                a.vpmovzxbd(tmp, scale_byte(8 + s % 4))?;
                a.vpslld(tmp, tmp, (30 - 2 * (s / 4)) as u32)?;
                a.vpsrld(tmp, tmp, 30)?;
                a.vpslld(tmp, tmp, 4)?;
                a.vpor(vals, vals, tmp)?;
                a.vpsubd(vals, vals, ymm4)?;
            }
        }
        a.vcvtdq2ps(vals, vals)?;
        match kind {
            KKind::Q6 => a.vmulps(vals, vals, ymm5)?,
            KKind::Q2 => a.vmulps(vals, vals, ymm7)?,
            KKind::Q3 => {
                a.vcvtph2ps(tmp, xmmword_ptr(rdi))?;
                a.vmulps(vals, vals, tmp)?;
            }
        }
        for t in 0..tokens {
            a.vbroadcastss(tmp, dword_ptr(x(t, 0)))?;
            a.vmulps(tmp, vals, tmp)?;
            a.vcvtdq2ps(iacc[t], iacc[t])?;
            a.vfmadd231ps(facc[t], iacc[t], tmp)?;
            if kind == KKind::Q2 {
                half_sum_times_scale(&mut a, x(t, X_VALUES_AT + 32 * h), x(t, 0))?;
                a.vfmadd231ps(facc[t], high, tmp)?;
            }
        }
    }
    a.add(rdi, (k.qs_at + subs as u32 * k.block_bytes) as i32)?;
    a.add(rsi, (subs as u32 / 2 * k.x_block_bytes) as i32)?;
    a.add(r9, (subs as u32 / 2 * k.x_block_bytes) as i32)?;
    a.dec(r8)?;
    a.jnz(top)?;
    a.set_label(&mut done)?;
    for (t, &f) in facc[..tokens].iter().enumerate() {
        a.vmovups(ymmword_ptr(rcx + 32 * t as i32), f)?;
    }
    a.vzeroupper()?;
    a.ret()?;
    a.assemble(0)
}

/// The 16-bit float kernel (`MicroValues::F16`, `BF16`, [`MicroKernel::tail`]): the 8 rows'
/// values of one column widen to f32 in one register (`vcvtph2ps`; bf16 by `vpmovzxwd` and a
/// shift), and each token's activation of that column, broadcast, meets them in one
/// `vfmadd231ps`. Per token, four accumulators take the columns by their residue mod 4, in
/// column order, and end as `(acc0 + acc2) + (acc1 + acc3)`: the order of the 128-bit
/// Cranelift kernel's lanes, so both give the same bits. Up to 3 tokens per pass over the
/// columns (4 accumulators each, ymm0..12); 4 tokens take two passes of 2.
fn kernel_halfs(k: &MicroKernel) -> Result<Vec<u8>, IcedError> {
    let brain = k.values == MicroValues::BF16;
    let (w, xb) = (ymm12, ymm13);
    let acc = [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11];
    let x = x_token;
    let mut a = CodeAssembler::new(64)?;
    // The weights, activations and quad count, restored before each pass.
    a.mov(r10, rdi)?;
    a.mov(r11, rsi)?;
    a.mov(rax, r8)?;
    let passes: Vec<Vec<usize>> = match k.tokens {
        4 => vec![vec![0, 1], vec![2, 3]],
        t => vec![(0..t as usize).collect()],
    };
    // Column `l` of the current quad (or tail) at `at` bytes of weights and `4 l` of x.
    let column = |a: &mut CodeAssembler, ts: &[usize], l: usize, at: i32| -> Result<(), IcedError> {
        if brain {
            a.vpmovzxwd(w, xmmword_ptr(rdi + at))?;
            a.vpslld(w, w, 16)?;
        } else {
            a.vcvtph2ps(w, xmmword_ptr(rdi + at))?;
        }
        for (i, &t) in ts.iter().enumerate() {
            a.vbroadcastss(xb, dword_ptr(x(t, 4 * l as i32)))?;
            a.vfmadd231ps(acc[4 * i + l], w, xb)?;
        }
        Ok(())
    };
    for (p, ts) in passes.iter().enumerate() {
        if p > 0 {
            a.mov(rdi, r10)?;
            a.mov(rsi, r11)?;
            a.mov(r8, rax)?;
        }
        a.lea(r9, rsi + rdx)?;
        for &r in &acc[..4 * ts.len()] {
            a.vxorps(r, r, r)?;
        }
        let mut top = a.create_label();
        let mut tail = a.create_label();
        a.test(r8, r8)?;
        a.jle(tail)?;
        a.set_label(&mut top)?;
        for l in 0..4 {
            column(&mut a, ts, l, 16 * l as i32)?;
        }
        a.add(rdi, 64)?;
        a.add(rsi, 16)?;
        a.add(r9, 16)?;
        a.dec(r8)?;
        a.jnz(top)?;
        a.set_label(&mut tail)?;
        // The columns after the last whole quad.
        for l in 0..k.tail as usize {
            column(&mut a, ts, l, 16 * l as i32)?;
        }
        for (i, &t) in ts.iter().enumerate() {
            let q = &acc[4 * i..4 * i + 4];
            a.vaddps(q[0], q[0], q[2])?;
            a.vaddps(q[1], q[1], q[3])?;
            a.vaddps(q[0], q[0], q[1])?;
            a.vmovups(ymmword_ptr(rcx + 32 * t as i32), q[0])?;
        }
    }
    a.vzeroupper()?;
    a.ret()?;
    a.assemble(0)
}

pub fn kernel(k: &MicroKernel) -> Result<Vec<u8>, IcedError> {
    if matches!(k.values, MicroValues::F16 | MicroValues::BF16) {
        assert!(k.k16.is_none() && !k.k32 && k.tail < 4, "16-bit floats: quads of columns and a tail");
        return kernel_halfs(k);
    }
    if let Some(kind) = k.k16 {
        assert!(!k.k32 && (k.low || !k.half) && k.x_i8_at.is_none(), "K16 planes: int16 activations");
        return kernel_k16(k, kind);
    }
    assert!((1..=4).contains(&k.tokens), "1 to 4 tokens per call");
    let tokens = k.tokens as usize;
    let iacc = [ymm0, ymm1, ymm2, ymm3];
    let facc = [ymm8, ymm9, ymm10, ymm11];
    let (lo, hi, tmp, mask, minus8) = (ymm12, ymm13, ymm14, ymm15, ymm7);
    // Arguments (System V): rdi = w, rsi = x, rdx = x_stride, rcx = out, r8 = n_blocks.
    // Token t's block is at rsi + t * rdx: t = 3 is r9 + 2 * rdx with r9 = rsi + rdx.
    let x_at = x_token;
    let mut a = CodeAssembler::new(64)?;
    let mut done = a.create_label();
    let mut top = a.create_label();
    a.lea(r9, rsi + rdx)?;
    let dwords = k.values == MicroValues::NibbleDwords;
    // 5-bit values on the 8-bit path: int16 sums hold only 4 pair sums of up to 2 * 31 * 127,
    // so each half block widens into int32 accumulators (ymm8..), and the f32 accumulators
    // and the int16 ones live in a stack frame: ones at [rsp], token t's f32 at [rsp + 32 + 32t].
    let spill = dwords && k.high_at.is_some();
    let facc_at = |t: usize| ymmword_ptr(rsp + (32 + 32 * t as i32));
    if spill {
        a.sub(rsp, FRAME)?;
        a.vxorps(tmp, tmp, tmp)?;
        for t in 0..tokens {
            a.vmovups(facc_at(t), tmp)?;
        }
    } else {
        for &f in &facc[..tokens] {
            a.vxorps(f, f, f)?;
        }
    }
    // Nibble mask: per int16 lane after widening, or per byte for 4-byte chunks.
    broadcast_dword(&mut a, mask, xmm15, if dwords { 0x0f0f_0f0f } else { 0x000f_000f })?;
    if dwords {
        // ymm6 (or [rsp]): int16 ones, to widen the 8 rows' int16 pair sums to int32.
        broadcast_dword(&mut a, ymm6, xmm6, 0x0001_0001)?;
        if spill {
            a.vmovdqu(ymmword_ptr(rsp), ymm6)?;
        }
    }
    let minus_8d = matches!(k.values, MicroValues::Nibbles | MicroValues::NibbleDwords) && k.mins_at.is_none();
    if minus_8d {
        // m = -8 d (q4_0), or -16 d with fifth bits (q5_0).
        let implied: f32 = if k.high_at.is_some() { -16.0 } else { -8.0 };
        broadcast_dword(&mut a, minus8, xmm7, implied.to_bits())?;
    }
    if k.k32 {
        assert!(k.mins_at.is_some() && !k.half, "K32 super-blocks: scales from the header");
        // ymm7: the f32 sign bit, to negate the minimums' products exactly.
        broadcast_dword(&mut a, ymm7, xmm7, 0x8000_0000)?;
    }
    if k.high_at.is_some() {
        assert!(k.values != MicroValues::Bytes, "fifth bits come with nibbles");
        // ymm4: 16 in every int16 lane (or byte), the weight of a fifth bit.
        broadcast_dword(&mut a, ymm4, xmm4, if dwords { 0x1010_1010 } else { 0x0010_0010 })?;
    }
    a.test(r8, r8)?;
    a.jle(done)?;
    a.set_label(&mut top)?;
    // K32 super-blocks: 8 blocks after the header, each with its scales unpacked from it.
    let subs = if k.k32 { 8 } else { 1 };
    for s in 0..subs {
        let base = if k.k32 { (K32_HEADER + s * k.block_bytes) as i32 } else { 0 };
        let xo = (s * k.x_block_bytes) as i32;
        let x = |t: usize, disp: i32| x_at(t, disp + xo);
        let high_at = k.high_at.map(|at| at as i32 + base);
        let qs = k.qs_at as i32 + base;
        let chunks = match k.values {
            MicroValues::Nibbles => 8,
            MicroValues::NibbleDwords => 4,
            MicroValues::Bytes => 16,
            MicroValues::F16 | MicroValues::BF16 => unreachable!("kernel_halfs"),
        };
        {
            let mut first = true;
            for u in 0..chunks {
                if dwords {
                    // Chunk u: 4 bytes of each row; low nibbles are values 4u..4u+4, high nibbles
                    // 16+4u..20+4u, against the int8 activations broadcast 4 at a time.
                    // `vpmaddubsw` (unsigned nibbles by signed bytes) leaves per row two int16
                    // pair sums of at most 2 * 15 * 127; 8 of them per block fit int16.
                    let x_i8 = k.x_i8_at.expect("int8 activations") as i32;
                    a.vmovdqu(hi, ymmword_ptr(rdi + (qs + 32 * u)))?;
                    a.vpand(lo, hi, mask)?;
                    a.vpsrlw(hi, hi, 4)?;
                    a.vpand(hi, hi, mask)?;
                    if let Some(at) = high_at {
                        // ymm6: the block's fifth bits, bits 2u and 2u + 1 of each byte for this
                        // chunk's low and high nibbles; moved to bit 4 (word shifts: the 0x10 mask
                        // keeps only bits that stayed in their byte).
                        if u == 0 {
                            a.vmovdqu(ymm6, ymmword_ptr(rdi + at))?;
                        }
                        merge_fifth_bit(&mut a, lo, 2 * u)?;
                        merge_fifth_bit(&mut a, hi, 2 * u + 1)?;
                    }
                    for (values, value) in [(lo, 4 * u), (hi, 16 + 4 * u)] {
                        for t in 0..tokens {
                            a.vpbroadcastd(tmp, dword_ptr(x(t, x_i8 + value)))?;
                            if first {
                                a.vpmaddubsw(iacc[t], values, tmp)?;
                            } else {
                                a.vpmaddubsw(tmp, values, tmp)?;
                                a.vpaddw(iacc[t], iacc[t], tmp)?;
                            }
                        }
                        first = false;
                    }
                    if spill && u % 2 == 1 {
                        // Half a block of 5-bit products: widen into the int32 sums.
                        for t in 0..tokens {
                            if u == 1 {
                                a.vpmaddwd(facc[t], iacc[t], ymmword_ptr(rsp))?;
                            } else {
                                a.vpmaddwd(iacc[t], iacc[t], ymmword_ptr(rsp))?;
                                a.vpaddd(facc[t], facc[t], iacc[t])?;
                            }
                        }
                        first = true;
                    }
                    continue;
                }
                let pairs = match k.values {
                    MicroValues::Nibbles => {
                        a.vpmovzxbw(hi, xmmword_ptr(rdi + (qs + 16 * u)))?;
                        a.vpand(lo, hi, mask)?;
                        a.vpsrlw(hi, hi, 4)?;
                        if let Some(at) = high_at {
                            // ymm6: the fifth bits of chunks 4c..4c+4, lanes as the nibbles'.
                            if u % 4 == 0 {
                                a.vpmovzxbw(ymm6, xmmword_ptr(rdi + (at + 16 * (u / 4))))?;
                            }
                            let j = u % 4;
                            // Bit 2j (low nibble's value) and 2j + 1 (high's) to bit 4, then add.
                            merge_fifth_bit(&mut a, lo, 2 * j)?;
                            merge_fifth_bit(&mut a, hi, 2 * j + 1)?;
                        }
                        // Low nibbles are values 2u, 2u+1; high nibbles 16+2u, 17+2u.
                        vec![(lo, 2 * u), (hi, 16 + 2 * u)]
                    }
                    MicroValues::Bytes => {
                        a.vpmovsxbw(lo, xmmword_ptr(rdi + (qs + 16 * u)))?;
                        vec![(lo, 2 * u)]
                    }
                    MicroValues::NibbleDwords => unreachable!("handled above"),
                    MicroValues::F16 | MicroValues::BF16 => unreachable!("kernel_halfs"),
                };
                for (values, value) in pairs {
                    for t in 0..tokens {
                        a.vpbroadcastd(tmp, dword_ptr(x(t, X_VALUES_AT + 2 * value)))?;
                        if first {
                            a.vpmaddwd(iacc[t], values, tmp)?;
                        } else {
                            a.vpmaddwd(tmp, values, tmp)?;
                            a.vpaddd(iacc[t], iacc[t], tmp)?;
                        }
                    }
                    first = false;
                }
            }
            if dwords && !spill {
                // Each row's two int16 pair sums (adjacent lanes) to one int32.
                for &acc in &iacc[..tokens] {
                    a.vpmaddwd(acc, acc, ymm6)?;
                }
            }
            // The block's int32 sums per token.
            let isum = if spill { facc } else { iacc };
            // d (ymm12) and m (ymm13) for the 8 rows.
            if k.k32 {
                k32_scales(&mut a, s as i32)?;
            } else if k.half {
                a.vcvtph2ps(lo, xmmword_ptr(rdi))?;
            } else {
                a.vmovups(lo, ymmword_ptr(rdi))?;
            }
            let offsets = match k.mins_at {
                _ if k.k32 => true,
                Some(at) if k.half => a.vcvtph2ps(hi, xmmword_ptr(rdi + at as i32)).map(|_| true)?,
                Some(at) => a.vmovups(hi, ymmword_ptr(rdi + at as i32)).map(|_| true)?,
                None if minus_8d => a.vmulps(hi, lo, minus8).map(|_| true)?,
                None => false,
            };
            for t in 0..tokens {
                a.vbroadcastss(tmp, dword_ptr(x(t, 0)))?;
                a.vmulps(tmp, lo, tmp)?;
                a.vcvtdq2ps(isum[t], isum[t])?;
                if spill {
                    // acc = fma(isum, d * scale, acc), then fma(m, sum, acc), with acc in memory.
                    a.vfmadd213ps(isum[t], tmp, facc_at(t))?;
                    if offsets {
                        a.vbroadcastss(tmp, dword_ptr(x(t, 4)))?;
                        a.vfmadd231ps(isum[t], hi, tmp)?;
                    }
                    a.vmovups(facc_at(t), isum[t])?;
                    continue;
                }
                a.vfmadd231ps(facc[t], iacc[t], tmp)?;
                if offsets {
                    a.vbroadcastss(tmp, dword_ptr(x(t, 4)))?;
                    a.vfmadd231ps(facc[t], hi, tmp)?;
                }
            }
        }
    }
    let block_bytes = if k.k32 { K32_HEADER + 8 * k.block_bytes } else { k.block_bytes };
    a.add(rdi, block_bytes as i32)?;
    a.add(rsi, (subs * k.x_block_bytes) as i32)?;
    a.add(r9, (subs * k.x_block_bytes) as i32)?;
    a.dec(r8)?;
    a.jnz(top)?;
    a.set_label(&mut done)?;
    for (t, &f) in facc[..tokens].iter().enumerate() {
        if spill {
            a.vmovups(f, facc_at(t))?;
        }
        a.vmovups(ymmword_ptr(rcx + 32 * t as i32), f)?;
    }
    if spill {
        a.add(rsp, FRAME)?;
    }
    a.vzeroupper()?;
    a.ret()?;
    a.assemble(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel kiln can ask for assembles, is deterministic, and ends with `vzeroupper;
    /// ret` (no AVX-SSE transition penalty for the caller). What the kernels compute is
    /// checked by running them against the interpreter (tests/it/kernels.rs).
    #[test]
    fn every_kernel_assembles_the_same_way_twice() {
        for tokens in 1..=4 {
            for values in [MicroValues::Nibbles, MicroValues::Bytes] {
                for half in [false, true] {
                    for mins in [false, true] {
                        let scales = if half { 16 } else { 32 };
                        let k = MicroKernel {
                            tokens,
                            values,
                            half,
                            mins_at: mins.then_some(scales),
                            qs_at: if mins { 2 * scales } else { scales },
                            high_at: None,
                            block_bytes: 2 * scales + 256,
                            x_block_bytes: 72,
                            x_i8_at: None,
                            k32: false,
                            k16: None,
                            tail: 0,
                            low: false,
                        };
                        let high = MicroKernel { high_at: Some(k.qs_at + 128), block_bytes: k.block_bytes + 32, ..k };
                        let dwords = MicroKernel {
                            values: MicroValues::NibbleDwords,
                            x_block_bytes: 104,
                            x_i8_at: Some(72),
                            ..k
                        };
                        let dwords_high =
                            MicroKernel { high_at: Some(k.qs_at + 128), block_bytes: k.block_bytes + 32, ..dwords };
                        if !half && !mins {
                            // 16-bit floats, every tail.
                            for (values, tail) in [MicroValues::F16, MicroValues::BF16].into_iter().zip([0, 1, 2, 3]) {
                                let k = MicroKernel { values, tail, x_block_bytes: 16, ..k };
                                super::super::assert_assembles_deterministically(&k, || kernel(&k).unwrap());
                                let k = MicroKernel { tail: 3 - tail, ..k };
                                super::super::assert_assembles_deterministically(&k, || kernel(&k).unwrap());
                            }
                        }
                        for k in [k, high, dwords, dwords_high] {
                            if k.high_at.is_some() && values == MicroValues::Bytes
                                || k.values == MicroValues::NibbleDwords && values == MicroValues::Bytes
                            {
                                continue;
                            }
                            super::super::assert_assembles_deterministically(&k, || kernel(&k).unwrap());
                            if k.values == MicroValues::Bytes && !half && mins {
                                // K16 super-blocks of every kind.
                                for (kind, qs_at, block_bytes) in
                                    [(KKind::Q2, 160, 32), (KKind::Q3, 112, 48), (KKind::Q6, 144, 96)]
                                {
                                    if kind != KKind::Q6 {
                                        // The same planes in kiln's 64-value groups, scales f16 or f32.
                                        for half in [false, true] {
                                            let scales = if half { 16 } else { 32 };
                                            let k = MicroKernel {
                                                k16: Some(kind),
                                                low: true,
                                                half,
                                                mins_at: Some(scales),
                                                qs_at: 2 * scales,
                                                block_bytes: if kind == KKind::Q3 { 48 } else { 32 },
                                                ..k
                                            };
                                            super::super::assert_assembles_deterministically(&k, || {
                                                kernel(&k).unwrap()
                                            });
                                        }
                                    }
                                    let k = MicroKernel {
                                        k16: Some(kind),
                                        mins_at: (kind == KKind::Q2).then_some(16),
                                        qs_at,
                                        block_bytes,
                                        ..k
                                    };
                                    super::super::assert_assembles_deterministically(&k, || kernel(&k).unwrap());
                                }
                            }
                            if k.values != MicroValues::Bytes && !half && mins {
                                // The same blocks in K32 super-blocks, scales from the header.
                                let b = 128 + if k.high_at.is_some() { 32 } else { 0 };
                                let k = MicroKernel {
                                    k32: true,
                                    mins_at: Some(0),
                                    qs_at: 0,
                                    high_at: k.high_at.map(|_| 128),
                                    block_bytes: b,
                                    ..k
                                };
                                super::super::assert_assembles_deterministically(&k, || kernel(&k).unwrap());
                            }
                        }
                    }
                }
            }
        }
    }
}
