//! Attention's two inner loops on 256-bit AVX2 registers (see [`AttentionKernel`] for the
//! contract and the exact arithmetic).
//!
//! `Scores` takes keys four at a time: 4 keys x up to 3 heads make 12 accumulators
//! (ymm0..12), each 8-float chunk of a key (ymm12) meets the heads' chunks (ymm13..16) in 3
//! FMAs, and a ymm accumulator's low half is the contract's even-chunk lanes `lo`, its high
//! half the odd-chunk lanes `hi`. The four keys' `lo + hi` are then summed across lanes with
//! the same shuffle tree as the Cranelift code (`[(x0+x2)+(x1+x3)]` for four keys at once).
//! `Values` takes slices of up to 32 floats of the head: 4 chunks x up to 3 heads
//! accumulators, a key's chunk in ymm12 and the heads' probabilities broadcast in ymm13..16.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use crate::{AttentionKernel, AttentionStep};

/// Whether [`kernel`] handles this shape: whole 8-float chunks, 1..=3 heads, and a head small
/// enough to unroll (at most 256 floats).
pub fn supports(k: &AttentionKernel) -> bool {
    (1..=3).contains(&k.heads) && k.head_dim % 8 == 0 && (8..=256).contains(&k.head_dim)
}

/// Assembles the kernel; the shape must be one [`supports`] accepts.
pub fn kernel(k: &AttentionKernel) -> Result<Vec<u8>, IcedError> {
    assert!(supports(k), "unsupported attention kernel {k:?}");
    match k.step {
        AttentionStep::Scores => scores(k),
        AttentionStep::Values => values(k),
    }
}

const YMM: [AsmRegisterYmm; 16] =
    [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14, ymm15];
const XMM: [AsmRegisterXmm; 16] =
    [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15];

/// `shufps` immediates: `[a0, a1, b0, b1]`, `[a2, a3, b2, b3]`, `[a0, a2, b0, b2]`,
/// `[a1, a3, b1, b3]`.
const LOW_PAIRS: u32 = 0x44;
const HIGH_PAIRS: u32 = 0xEE;
const EVEN: u32 = 0x88;
const ODD: u32 = 0xDD;

/// Bytes of 8 keys or values.
fn chunk_bytes(k: &AttentionKernel) -> i32 {
    if k.kv_half {
        16
    } else {
        32
    }
}

/// ymm12 = 8 keys or values at `at`, widened from f16 (exactly) when the cache holds f16.
fn load_kv(a: &mut CodeAssembler, half: bool, at: AsmMemoryOperand) -> Result<(), IcedError> {
    if half {
        a.vcvtph2ps(ymm12, xmmword_ptr(at))
    } else {
        a.vmovups(ymm12, ymmword_ptr(at))
    }
}

fn scores(k: &AttentionKernel) -> Result<Vec<u8>, IcedError> {
    let kv_bytes = chunk_bytes(k);
    let heads = k.heads as usize;
    let chunks = k.head_dim as i32 / 8;
    let head_bytes = 4 * k.head_dim as i32;
    let row = k.row_stride as i32;
    // Arguments (System V): rdi = q, rsi = k, rdx = k_stride, rcx = out, r8 = n_keys.
    // r9 counts blocks of 4 keys; r11 = 3 * k_stride; acc(g, i) = ymm[4 g + i].
    let acc = |g: usize, i: usize| 4 * g + i;
    let key = |i: usize, disp: i32| -> AsmMemoryOperand {
        match i {
            0 => rsi + disp,
            1 => rsi + rdx + disp,
            2 => rsi + rdx * 2 + disp,
            _ => rsi + r11 + disp,
        }
    };
    let mut a = CodeAssembler::new(64)?;
    let (mut blocks, mut tail, mut tail_top, mut done) =
        (a.create_label(), a.create_label(), a.create_label(), a.create_label());
    a.lea(r11, rdx + rdx * 2)?;
    a.mov(r9, r8)?;
    a.shr(r9, 2)?;
    a.jz(tail)?;
    a.set_label(&mut blocks)?;
    for g in 0..heads {
        for i in 0..4 {
            let r = YMM[acc(g, i)];
            a.vxorps(r, r, r)?;
        }
    }
    for c in 0..chunks {
        for g in 0..heads {
            a.vmovups(YMM[13 + g], ymmword_ptr(rdi + (g as i32 * head_bytes + 32 * c)))?;
        }
        for i in 0..4 {
            load_kv(&mut a, k.kv_half, key(i, kv_bytes * c))?;
            for g in 0..heads {
                a.vfmadd231ps(YMM[acc(g, i)], ymm12, YMM[13 + g])?;
            }
        }
    }
    for g in 0..heads {
        // x_i = lo + hi of key i, in the low half of acc(g, i).
        for i in 0..4 {
            let r = acc(g, i);
            a.vextractf128(xmm12, YMM[r], 1)?;
            a.vaddps(XMM[r], XMM[r], xmm12)?;
        }
        let [x0, x1, x2, x3] = [0, 1, 2, 3].map(|i| XMM[acc(g, i)]);
        a.vshufps(xmm12, x0, x1, LOW_PAIRS)?;
        a.vshufps(xmm13, x0, x1, HIGH_PAIRS)?;
        a.vaddps(xmm12, xmm12, xmm13)?;
        a.vshufps(xmm13, x2, x3, LOW_PAIRS)?;
        a.vshufps(xmm14, x2, x3, HIGH_PAIRS)?;
        a.vaddps(xmm13, xmm13, xmm14)?;
        a.vshufps(xmm14, xmm12, xmm13, EVEN)?;
        a.vshufps(xmm15, xmm12, xmm13, ODD)?;
        a.vaddps(xmm14, xmm14, xmm15)?;
        a.mov(eax, k.scale_bits)?;
        a.vmovd(xmm15, eax)?;
        a.vbroadcastss(xmm15, xmm15)?;
        a.vmulps(xmm14, xmm14, xmm15)?;
        a.vmovups(xmmword_ptr(rcx + g as i32 * row), xmm14)?;
    }
    a.add(rcx, 16)?;
    a.lea(rsi, rsi + rdx * 4)?;
    a.dec(r9)?;
    a.jnz(blocks)?;
    a.set_label(&mut tail)?;
    a.and(r8, 3)?;
    a.jz(done)?;
    a.mov(eax, k.scale_bits)?;
    a.vmovd(xmm15, eax)?;
    a.set_label(&mut tail_top)?;
    for g in 0..heads {
        a.vxorps(YMM[g], YMM[g], YMM[g])?;
    }
    for c in 0..chunks {
        load_kv(&mut a, k.kv_half, rsi + kv_bytes * c)?;
        for g in 0..heads {
            a.vfmadd231ps(YMM[g], ymm12, ymmword_ptr(rdi + (g as i32 * head_bytes + 32 * c)))?;
        }
    }
    for g in 0..heads {
        let x = XMM[g];
        a.vextractf128(xmm12, YMM[g], 1)?;
        a.vaddps(x, x, xmm12)?;
        // [x0 + x2, x1 + x3, ..], then lane 0 + lane 1.
        a.vmovhlps(xmm12, x, x)?;
        a.vaddps(xmm12, x, xmm12)?;
        a.vmovshdup(xmm13, xmm12)?;
        a.vaddss(xmm12, xmm12, xmm13)?;
        a.vmulss(xmm12, xmm12, xmm15)?;
        a.vmovss(dword_ptr(rcx + g as i32 * row), xmm12)?;
    }
    a.add(rcx, 4)?;
    a.add(rsi, rdx)?;
    a.dec(r8)?;
    a.jnz(tail_top)?;
    a.set_label(&mut done)?;
    a.vzeroupper()?;
    a.ret()?;
    a.assemble(0)
}

fn values(k: &AttentionKernel) -> Result<Vec<u8>, IcedError> {
    let kv_bytes = chunk_bytes(k);
    let heads = k.heads as usize;
    let chunks = k.head_dim as i32 / 8;
    let head_bytes = 4 * k.head_dim as i32;
    let row = k.row_stride as i32;
    // Arguments (System V): rdi = p, rsi = v, rdx = v_stride, rcx = n_keys, r8 = y,
    // r9 = alpha. Per slice: r10 walks p, r11 the value rows, rax counts keys.
    let acc = |g: usize, i: i32| 4 * g + i as usize;
    let mut a = CodeAssembler::new(64)?;
    let mut c0 = 0;
    while c0 < chunks {
        let width = (chunks - c0).min(4);
        let (mut top, mut store) = (a.create_label(), a.create_label());
        for g in 0..heads {
            for i in 0..width {
                let r = YMM[acc(g, i)];
                a.vxorps(r, r, r)?;
            }
        }
        a.mov(rax, rcx)?;
        a.test(rax, rax)?;
        a.jle(store)?;
        a.mov(r10, rdi)?;
        a.mov(r11, rsi)?;
        a.set_label(&mut top)?;
        for g in 0..heads {
            a.vbroadcastss(YMM[13 + g], dword_ptr(r10 + g as i32 * row))?;
        }
        for i in 0..width {
            load_kv(&mut a, k.kv_half, r11 + kv_bytes * (c0 + i))?;
            for g in 0..heads {
                a.vfmadd231ps(YMM[acc(g, i)], ymm12, YMM[13 + g])?;
            }
        }
        a.add(r10, 4)?;
        a.add(r11, rdx)?;
        a.dec(rax)?;
        a.jnz(top)?;
        a.set_label(&mut store)?;
        for g in 0..heads {
            a.vbroadcastss(ymm12, dword_ptr(r9 + 4 * g as i32))?;
            for i in 0..width {
                let at = r8 + (g as i32 * head_bytes + 32 * (c0 + i));
                a.vmovups(ymm13, ymmword_ptr(at))?;
                a.vfmadd231ps(YMM[acc(g, i)], ymm13, ymm12)?;
                a.vmovups(ymmword_ptr(at), YMM[acc(g, i)])?;
            }
        }
        c0 += width;
    }
    a.vzeroupper()?;
    a.ret()?;
    a.assemble(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape kiln can ask for assembles, deterministically, ending with `vzeroupper;
    /// ret`. What the kernels compute is checked against the interpreter and the portable
    /// code (tests/it/attention.rs, tests/it/kernels.rs).
    #[test]
    fn every_supported_kernel_assembles_the_same_way_twice() {
        for step in [AttentionStep::Scores, AttentionStep::Values] {
            for heads in 1..=3 {
                for head_dim in [8, 16, 40, 64, 128, 256] {
                    for kv_half in [false, true] {
                        let scale_bits = 0.125f32.to_bits();
                        let k = AttentionKernel { step, heads, head_dim, kv_half, row_stride: 1040, scale_bits };
                        super::super::assert_assembles_deterministically(&k, || kernel(&k).unwrap());
                    }
                }
            }
        }
        let odd = AttentionKernel {
            step: AttentionStep::Scores,
            heads: 3,
            head_dim: 12,
            kv_half: false,
            row_stride: 64,
            scale_bits: 0,
        };
        assert!(!supports(&odd) && !supports(&AttentionKernel { heads: 4, head_dim: 64, ..odd }));
    }
}
