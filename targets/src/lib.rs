//! Target descriptions: everything kiln knows about an instruction set and a device.
//!
//! Passes and codegen never test the host CPU or name an ISA: they ask a [`Target`] for its
//! Cranelift ISA, vector width, caches, thread count and kernel choices.
//! [`lookup`] maps a target triple to its implementation; adding a target means adding a
//! folder here and a line to [`KNOWN_TARGETS`].

#![forbid(unsafe_code)]

use std::fmt;

use cranelift_codegen::ir::Value;
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_frontend::FunctionBuilder;
use ir::quant::KKind;
use serde::Serialize;

pub mod aarch64;
pub mod devices;
pub mod x86_64;

/// Cache sizes of one core, in bytes, used for blocking decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CacheInfo {
    pub l1d: u32,
    pub l2: u32,
    pub l3: u32,
}

/// A serializable summary of a target, recorded in the bundle manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetSummary {
    pub triple: String,
    pub cpu: String,
    pub isa_features: Vec<String>,
    pub vector_bits: u32,
    pub default_threads: u32,
    pub cache: CacheInfo,
}

/// How the rows of a quantized weight matrix are laid out for the matmul kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MatmulSchedule {
    /// Rows stored interleaved block by block, so that one pass over the activations serves
    /// `row_interleave` outputs and the weight stream is read once, in order.
    pub row_interleave: u32,
    /// Rows per group of the Q4 and Q8 matrices that the target multiplies with micro-kernels
    /// of its own ([`Target::micro_kernel`]), when it has them.
    pub micro_rows: Option<u32>,
}

/// The weight values a micro-kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MicroValues {
    /// Unsigned 4-bit values (kernel form Q4), two per byte as GGUF stores them.
    Nibbles,
    /// Signed bytes (kernel form Q8).
    Bytes,
    /// Unsigned nibbles (kernel form Q4) in 32-byte chunks of four bytes per row, multiplied
    /// by 8-bit activations (the q8 grid).
    NibbleDwords,
    /// IEEE half floats (kernel form F16, finite values), against f32 activations: `w` holds per
    /// column the 8 rows' values (16 bytes), `x` f32 rows, `n_blocks` counts whole quads of
    /// columns, [`MicroKernel::tail`] the columns after them.
    F16,
    /// bfloat16 values (kernel form BF16), laid out as `F16`.
    BF16,
}

/// One micro-kernel: machine code kiln encodes itself where Cranelift cannot express the
/// kernel (x86-64's 256-bit vectors), called from Cranelift code with the platform's C calling
/// convention as `fn(w: *const u8, x: *const u8, x_stride: i64, out: *mut f32, n_blocks: i64)`.
///
/// `w` is a group of 8 weight rows packed per 32-value block: 8 scales `d` (f16 when `half`,
/// else f32), 8 offsets `m` at `mins_at` when stored, and at `qs_at` 16-byte chunks. For
/// `Nibbles`, chunk `u` (of 8) holds bytes `2u, 2u+1` of each row's 16 GGUF nibble bytes (row
/// `r` at bytes `2r, 2r+1`: low nibbles are values `2u, 2u+1`, high nibbles `16+2u, 17+2u`)
/// and a Q4 block without stored offsets has `m = -8 d`; for `Bytes`, chunk `u` (of 16) holds
/// values `2u, 2u+1` of each row (row `r` at bytes `2r, 2r+1`) and there is no offset unless
/// stored. For `NibbleDwords`, chunk `j` (of 4, 32 bytes) holds bytes `4j..4j+4` of each row's 16 nibble
/// bytes (row `r` at bytes `4r..4r+4`: low nibbles are values `4j..4j+4`, high nibbles
/// `16+4j..20+4j`), offsets as `Nibbles`, and the activations are read as the int8 copy at
/// `x_i8_at` of each activation block (values in -127..=127, so that 8 pair sums of
/// nibble-by-int8 products stay within int16).
/// `x` is the first of `tokens` q16 activation rows `x_stride` bytes apart (per block: scale
/// f32, sum f32, 32 int16 values). For every token `t` and row `r` the kernel folds, block by
/// block from 0.0, `acc = fma(isum, d * scale, acc)` then, with an offset,
/// `acc = fma(m, sum, acc)` (isum the exact integer dot product of the block; for the
/// 16-value sub-blocks of [`MicroKernel::k16`]: `acc = fma(isum_s, d_s * scale, acc)`, then
/// with offsets `acc = fma(m_s, f32(half sum) * scale, acc)`, the half sum counted from the
/// int16 values): the same f32 operations as the 128-bit Cranelift kernels. It writes `out[8 t + r]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MicroKernel {
    /// Token rows per call, 1..=4.
    pub tokens: u32,
    pub values: MicroValues,
    pub half: bool,
    /// Byte offset of the offsets within a block, when stored.
    pub mins_at: Option<u32>,
    /// Byte offset of the value chunks within a block.
    pub qs_at: u32,
    /// `Nibbles` with fifth bits (kernel form Q5): byte offset of the two 16-byte chunks of
    /// them within a block. Byte `2r + k` of chunk `c` holds in bits `2j` and `2j + 1` the
    /// fifth bits of the values that nibble chunk `u = 4c + j` holds in byte `2r + k` (low
    /// nibble, high nibble); each adds 16 to its value, and a block without stored offsets
    /// has `m = -16 d`.
    pub high_at: Option<u32>,
    /// Bytes per block of the weight group.
    pub block_bytes: u32,
    /// Bytes per q16 activation block.
    pub x_block_bytes: u32,
    /// `NibbleDwords`: byte offset of the block's values as int8 within an activation block.
    pub x_i8_at: Option<u32>,
    /// Blocks come in 256-value super-blocks (kernel form K32: q4_k, q5_k): a
    /// [`K32_HEADER`]-byte header, `d[8]` f16, `dmin[8]` f16, then the rows' sixteen 6-bit
    /// scales and minimums byte-major (byte `i` of row `r` at `32 + 8 i + r`; of a row's 12
    /// bytes, byte `j < 8` holds scale `j`'s low nibble and minimum `j`'s in its high nibble,
    /// byte `8 + j` in bits `2k` the high bit pairs of value `j + 4k`, scales 0..8 then
    /// minimums), then 8 blocks of `block_bytes` laid out as above (no scales of their own).
    /// Block `s` has `d = d * sc_s` and `m = -(dmin * m_s)`, rounded as f32 products, and
    /// `n_blocks` counts super-blocks.
    pub k32: bool,
    /// Blocks come in 256-value super-blocks of kernel form K16 of this kind (q2_k, q3_k,
    /// q6_k): `d[8]` f16, with Q2 `dmin[8]` f16, then the rows' sub-block scales byte-major
    /// (byte `i` of row `r` at `8 i + r`: Q6 the int8 scales, Q2 `sc | m << 4`, Q3 the
    /// sixteen 6-bit `sc + 32` as [`MicroKernel::k32`]'s header has them), then at `qs_at` the
    /// 16 sub-blocks' values, `block_bytes` each, in planes of 16-byte chunks whose byte
    /// `2r + k` belongs to row `r` and holds, for the sub-block's value chunk `u` (values
    /// `2u + k`): Q6 four chunks of low nibbles (chunk `i`: `u = i` low, `u = i + 4` high) then
    /// two of high bit pairs (chunk `i`, bits `2j`: `u = 4i + j`); Q3 and Q2 two chunks of low
    /// bit pairs (as Q6's high ones), then for Q3 one chunk of third bits (bit `u`). A value
    /// is the low bits, plus the high ones above them, less [`KKind::offset`]. Sub-block `s`
    /// (the half `s % 2` of activation block `s / 2`) has `d = d * sc_s` and with Q2
    /// `m = -(dmin * m_s)`; `n_blocks` counts super-blocks.
    pub k16: Option<KKind>,
    /// `F16` and `BF16`: columns after the last whole quad (0..4).
    pub tail: u32,
    /// With [`MicroKernel::k16`] naming the value planes (Q3: crumbs and third bits, Q2:
    /// crumbs), blocks are 64-value groups of kernel form Q3 or Q2 (q3_g64, q2_g64): `d[8]` and
    /// `m[8]` at `mins_at` (f16 when `half`, else f32), then at `qs_at` four 16-value
    /// sub-blocks' planes of `block_bytes` each, values unsigned (no offset); each 32-value
    /// activation block's sums fold as a Q4 block's with stored offsets, and `n_blocks`
    /// counts groups.
    pub low: bool,
}

/// Bytes of the header of a [`MicroKernel::k32`] super-block.
pub const K32_HEADER: u32 = 128;

/// An attention micro-kernel: one step of causal attention for the `heads` query heads of one
/// KV head and one token row (the heads adjacent in memory, `head_dim` f32 each), over a tile
/// of keys, called from Cranelift code with the platform's C calling convention. The
/// arithmetic is fixed here, so that a target's kernel and the portable Cranelift code give
/// the same bits.
///
/// [`AttentionStep::Scores`]: `fn(q: *const f32, k: *const f32, k_stride: i64, out: *mut f32,
/// n_keys: i64)`. For head `g` and key `j` (the row at `k + j * k_stride` bytes) it writes
/// `out[g * row_stride / 4 + j] = dot * scale` where, for lanes `l` of 0..4, `lo_l` folds
/// `acc = fma(q[4c + l], k[4c + l], acc)` from 0.0 over the even 4-float chunks `c` in order,
/// `hi_l` the same over the odd chunks, `x_l = lo_l + hi_l`, and
/// `dot = (x_0 + x_2) + (x_1 + x_3)`.
///
/// [`AttentionStep::Values`]: `fn(p: *const f32, v: *const f32, v_stride: i64, n_keys: i64,
/// y: *mut f32, alpha: *const f32)`. For head `g` and element `d` it folds
/// `acc = fma(v_j[d], p[g * row_stride / 4 + j], acc)` from 0.0 over the keys in order and
/// stores `y[g * head_dim + d] = fma(y[g * head_dim + d], alpha[g], acc)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttentionKernel {
    pub step: AttentionStep,
    /// Query heads per call, 1..=3.
    pub heads: u32,
    pub head_dim: u32,
    /// Keys and values are IEEE half (widened exactly) rather than f32.
    pub kv_half: bool,
    /// Bytes between the score rows of consecutive heads.
    pub row_stride: u32,
    /// `Scores`' factor (`1 / sqrt(head_dim)`), as f32 bits.
    pub scale_bits: u32,
}

/// The two steps of [`AttentionKernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttentionStep {
    Scores,
    Values,
}

/// Errors in choosing or configuring a target: always the user's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    UnknownTriple { triple: String },
    UnknownDevice { device: String, triple: String, known: Vec<String> },
    Cranelift { message: String },
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetError::UnknownTriple { triple } => {
                write!(f, "unknown target '{triple}'; known targets: {}", KNOWN_TARGETS.join(", "))
            }
            TargetError::UnknownDevice { device, triple, known } => {
                write!(f, "unknown device '{device}' for {triple}; known devices: {}", known.join(", "))
            }
            TargetError::Cranelift { message } => {
                write!(f, "cranelift rejected the target settings: {message}")
            }
        }
    }
}

impl std::error::Error for TargetError {}

/// A compilation target.
pub trait Target: Send + Sync {
    /// The target triple, e.g. `x86_64-unknown-linux-gnu`.
    fn triple(&self) -> &str;
    /// A Cranelift ISA configured with exactly the features this target promises.
    fn isa(&self) -> Result<OwnedTargetIsa, TargetError>;
    fn summary(&self) -> TargetSummary;
    /// Width of the SIMD registers kernels use, in bits.
    fn vector_bits(&self) -> u32 {
        128
    }
    fn matmul_schedule(&self) -> MatmulSchedule;
    /// The machine code of a micro-kernel, on targets whose schedule has `micro_rows`.
    fn micro_kernel(&self, _kernel: &MicroKernel) -> Option<Vec<u8>> {
        None
    }
    /// The machine code of an attention micro-kernel, where the target has one for this shape;
    /// otherwise the portable Cranelift code does the same arithmetic.
    fn attention_kernel(&self, _kernel: &AttentionKernel) -> Option<Vec<u8>> {
        None
    }
    /// Emits `i32x4` lanes `a[2i] * b[2i] + a[2i+1] * b[2i+1]` for two `i16x8` values: the
    /// widening integer dot product the quantized matmuls are built on.
    fn dot_i16x8(&self, builder: &mut FunctionBuilder, a: Value, b: Value) -> Value;
}

/// `iadd_pairwise(imul(swiden_low a, swiden_low b), imul(swiden_high a, swiden_high b))`: the
/// exact tree Cranelift's backends pattern-match to their int16 dot-product instructions.
pub fn widening_dot_i16x8(builder: &mut FunctionBuilder, a: Value, b: Value) -> Value {
    use cranelift_codegen::ir::InstBuilder;
    let lo = {
        let (a, b) = (builder.ins().swiden_low(a), builder.ins().swiden_low(b));
        builder.ins().imul(a, b)
    };
    let hi = {
        let (a, b) = (builder.ins().swiden_high(a), builder.ins().swiden_high(b));
        builder.ins().imul(a, b)
    };
    builder.ins().iadd_pairwise(lo, hi)
}

/// Triples [`lookup`] knows.
pub const KNOWN_TARGETS: &[&str] = &["x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu", "aarch64-linux-android"];

/// The target for `triple` with its default device.
pub fn lookup(triple: &str) -> Result<Box<dyn Target>, TargetError> {
    lookup_device(triple, None)
}

/// The target for `triple` on `device` (a profile name; see [`aarch64::DEVICES`]).
pub fn lookup_device(triple: &str, device: Option<&str>) -> Result<Box<dyn Target>, TargetError> {
    match triple {
        "x86_64-unknown-linux-gnu" => match device {
            // Every x86-64 profile runs the x86-64-v3 (AVX2) code; the profile names the
            // machine class the deployment report describes.
            None | Some(devices::HOST) => Ok(Box::new(x86_64::X86_64::v3())),
            Some(d) if devices::costs(d, triple).is_ok() => Ok(Box::new(x86_64::X86_64::v3())),
            Some(d) => Err(TargetError::UnknownDevice {
                device: d.into(),
                triple: triple.into(),
                known: devices::PROFILES
                    .iter()
                    .filter(|p| p.triples.contains(&triple))
                    .map(|p| p.name.to_string())
                    .chain([devices::HOST.to_string()])
                    .collect(),
            }),
        },
        "aarch64-unknown-linux-gnu" => Ok(Box::new(aarch64::Aarch64::new("aarch64-unknown-linux-gnu", device)?)),
        "aarch64-linux-android" => Ok(Box::new(aarch64::Aarch64::new("aarch64-linux-android", device)?)),
        _ => Err(TargetError::UnknownTriple { triple: triple.to_string() }),
    }
}

/// The triple of the machine running the compiler, when kiln has a target for it.
pub fn host_triple() -> Option<&'static str> {
    if cfg!(target_arch = "x86_64") && cfg!(target_os = "linux") {
        Some("x86_64-unknown-linux-gnu")
    } else if cfg!(target_arch = "aarch64") && cfg!(target_os = "linux") {
        Some("aarch64-unknown-linux-gnu")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_triples_list_the_known_ones() {
        let err = lookup("riscv64gc-unknown-linux-gnu").err().unwrap().to_string();
        assert!(err.contains("riscv64gc") && err.contains("x86_64-unknown-linux-gnu"), "{err}");
    }

    #[test]
    fn known_targets_build_their_isa() {
        for triple in KNOWN_TARGETS {
            let target = lookup(triple).unwrap();
            let isa = target.isa().unwrap();
            assert_eq!(isa.triple().architecture.to_string(), triple.split('-').next().unwrap());
        }
        for device in aarch64::DEVICES {
            let target = lookup_device("aarch64-linux-android", Some(device.name)).unwrap();
            target.isa().unwrap();
            assert_eq!(target.summary().isa_features.contains(&"dotprod".to_string()), device.dotprod);
        }
    }

    #[test]
    fn unknown_devices_list_the_known_ones() {
        let err = lookup_device("aarch64-linux-android", Some("pixel-99")).err().unwrap().to_string();
        assert!(err.contains("pixel-99") && err.contains("snapdragon-865") && err.contains("raspberry-pi-5"), "{err}");
    }
}
