//! The C ABI between a compiled model library and the runtime, written once: the `kiln_ctx`
//! argument of every entry point, the `kiln_model_desc` descriptor a library exports as
//! `kiln_model`, their constants, the weights checksum and the CPU-feature bits.
//!
//! The code generator writes descriptors and loads context fields at the offsets derived
//! here from the `#[repr(C)]` structs ([`ctx`], [`desc`]); the runtime reads descriptors and
//! fills contexts through the same structs; the C text of the ABI, `include/kiln_abi.h`
//! ([`C_ABI`], the first part of `runtime/include/kiln.h` and of every model's header), is
//! generated from this file by cbindgen (`cargo xtask header`), and a test fails when the
//! checked-in text is not what cbindgen makes of this file now.
//!
//! The layout is that of a 64-bit target (every kiln target is LP64). Bump [`ABI_VERSION`]
//! on any change of layout or meaning.
//!
//! **Architecture Invariant:** this crate depends on nothing (not even `std`): both the
//! compiler and the runtime can use it without pulling the other in.

#![no_std]
#![forbid(unsafe_code)]
// The C names, so that the Rust and C sides grep alike.
#![allow(non_camel_case_types)]

use core::ffi::c_void;
use core::mem::{offset_of, size_of};

/// The ABI version, stored in `kiln_model_desc.abi_version`.
pub const ABI_VERSION: u32 = 4;
/// Most inputs plus outputs a library may have.
pub const MAX_IO: usize = 8;
/// Bytes of the build fingerprint in the descriptor.
pub const FINGERPRINT_BYTES: usize = 32;
/// `io_dtype` code of 32-bit integer rows (token ids).
pub const DTYPE_I32: u32 = 0;
/// `io_dtype` code of f32 rows.
pub const DTYPE_F32: u32 = 1;

/// The exported descriptor symbol.
pub const MODEL_SYMBOL: &str = "kiln_model";

/// A kernel task: runs its share `ith` of `nth` of one kernel.
pub type kiln_task_fn = unsafe extern "C" fn(ctx: *const kiln_ctx, ith: i64, nth: i64);

/// Runs task(ctx, ith, nth) for every ith in 0..nth on a thread pool and waits.
pub type kiln_parallel_for_fn = unsafe extern "C" fn(pool: *mut c_void, task: kiln_task_fn, ctx: *const kiln_ctx);

/// The argument of a model's run function, filled in by the runtime.
#[repr(C)]
#[derive(Debug)]
pub struct kiln_ctx {
    /// Activation arena, desc->arena_bytes, 64-byte aligned.
    pub arena: *mut u8,
    /// Packed weights, desc->weights_bytes.
    pub weights: *const u8,
    /// desc->kv_bytes, zeroed at start.
    pub kv_cache: *mut c_void,
    /// Inputs then outputs, rows of desc->io_width values.
    pub io: *const *mut c_void,
    /// 1..=desc->batch.
    pub n_tokens: i64,
    /// Position of the first token; pos + n_tokens <= context.
    pub pos: i64,
    /// Outputs are computed for rows out_start..n_tokens only, and each output buffer holds
    /// just those n_tokens - out_start rows.
    pub out_start: i64,
    pub parallel_for: kiln_parallel_for_fn,
    pub pool: *mut c_void,
}

/// What a compiled model library exports (as `kiln_model`).
//
// The fields are private and the type has no constructor, so safe Rust cannot make one: a
// reference to a descriptor comes from `unsafe` code naming a library's `kiln_model` symbol,
// which vouches that it is one (the runtime builds its trust on this).
#[repr(C)]
#[derive(Debug)]
pub struct kiln_model_desc {
    abi_version: u32,
    n_inputs: u32,
    n_outputs: u32,
    /// Most tokens per run call.
    batch: u32,
    /// KV cache positions.
    context: u32,
    kv_layers: u32,
    /// Elements per position per layer, for keys and for values.
    kv_width: u32,
    /// 4 (f32) or 2 (f16, IEEE half).
    kv_element_bytes: u32,
    arena_bytes: u64,
    kv_bytes: u64,
    weights_bytes: u64,
    /// Of the packed weights: 8-lane FNV-1a 64 (see the runtime).
    weights_checksum: u64,
    /// Embedded weights, or NULL when they ship as weights.bin.
    weights: *const u8,
    run: Option<unsafe extern "C" fn(ctx: *const kiln_ctx)>,
    io_dtype: [u32; MAX_IO],
    io_width: [u32; MAX_IO],
    /// SHA-256 of the build's inputs and options, also in the bundle's manifest.json.
    fingerprint: [u8; FINGERPRINT_BYTES],
    /// KILN_CPU_* bits the code needs; checked before it runs.
    cpu_features: u32,
    reserved: u32,
}

impl kiln_model_desc {
    pub fn abi_version(&self) -> u32 {
        self.abi_version
    }

    pub fn n_inputs(&self) -> u32 {
        self.n_inputs
    }

    pub fn n_outputs(&self) -> u32 {
        self.n_outputs
    }

    pub fn batch(&self) -> u32 {
        self.batch
    }

    pub fn context(&self) -> u32 {
        self.context
    }

    pub fn kv_layers(&self) -> u32 {
        self.kv_layers
    }

    pub fn kv_width(&self) -> u32 {
        self.kv_width
    }

    pub fn kv_element_bytes(&self) -> u32 {
        self.kv_element_bytes
    }

    pub fn arena_bytes(&self) -> u64 {
        self.arena_bytes
    }

    pub fn kv_bytes(&self) -> u64 {
        self.kv_bytes
    }

    pub fn weights_bytes(&self) -> u64 {
        self.weights_bytes
    }

    pub fn weights_checksum(&self) -> u64 {
        self.weights_checksum
    }

    /// The embedded weights, null when they ship as `weights.bin`.
    pub fn weights(&self) -> *const u8 {
        self.weights
    }

    /// The entry point (`None` only in a corrupt descriptor).
    pub fn run(&self) -> Option<unsafe extern "C" fn(ctx: *const kiln_ctx)> {
        self.run
    }

    pub fn io_dtype(&self) -> &[u32; MAX_IO] {
        &self.io_dtype
    }

    pub fn io_width(&self) -> &[u32; MAX_IO] {
        &self.io_width
    }

    pub fn fingerprint(&self) -> &[u8; FINGERPRINT_BYTES] {
        &self.fingerprint
    }

    pub fn cpu_features(&self) -> u32 {
        self.cpu_features
    }
}

/// Byte offsets of the fields of `struct kiln_ctx` (all 8 bytes wide), as the generated code
/// loads them.
pub mod ctx {
    use super::*;

    pub const ARENA: i32 = offset_of!(kiln_ctx, arena) as i32;
    pub const WEIGHTS: i32 = offset_of!(kiln_ctx, weights) as i32;
    pub const KV_CACHE: i32 = offset_of!(kiln_ctx, kv_cache) as i32;
    pub const IO: i32 = offset_of!(kiln_ctx, io) as i32;
    pub const N_TOKENS: i32 = offset_of!(kiln_ctx, n_tokens) as i32;
    pub const POS: i32 = offset_of!(kiln_ctx, pos) as i32;
    pub const OUT_START: i32 = offset_of!(kiln_ctx, out_start) as i32;
    pub const PARALLEL_FOR: i32 = offset_of!(kiln_ctx, parallel_for) as i32;
    pub const POOL: i32 = offset_of!(kiln_ctx, pool) as i32;
    pub const SIZE: usize = size_of::<kiln_ctx>();

    /// Every field with its offset, in order, for tests that compare the layout with what a
    /// C compiler makes of the header.
    pub const FIELDS: [(&str, i32); 9] = [
        ("arena", ARENA),
        ("weights", WEIGHTS),
        ("kv_cache", KV_CACHE),
        ("io", IO),
        ("n_tokens", N_TOKENS),
        ("pos", POS),
        ("out_start", OUT_START),
        ("parallel_for", PARALLEL_FOR),
        ("pool", POOL),
    ];
}

/// Byte offsets of the fields of `struct kiln_model_desc`, as the code generator writes them.
pub mod desc {
    use super::*;

    pub const ABI_VERSION: usize = offset_of!(kiln_model_desc, abi_version);
    pub const N_INPUTS: usize = offset_of!(kiln_model_desc, n_inputs);
    pub const N_OUTPUTS: usize = offset_of!(kiln_model_desc, n_outputs);
    pub const BATCH: usize = offset_of!(kiln_model_desc, batch);
    pub const CONTEXT: usize = offset_of!(kiln_model_desc, context);
    pub const KV_LAYERS: usize = offset_of!(kiln_model_desc, kv_layers);
    pub const KV_WIDTH: usize = offset_of!(kiln_model_desc, kv_width);
    pub const KV_ELEMENT_BYTES: usize = offset_of!(kiln_model_desc, kv_element_bytes);
    pub const ARENA_BYTES: usize = offset_of!(kiln_model_desc, arena_bytes);
    pub const KV_BYTES: usize = offset_of!(kiln_model_desc, kv_bytes);
    pub const WEIGHTS_BYTES: usize = offset_of!(kiln_model_desc, weights_bytes);
    pub const WEIGHTS_CHECKSUM: usize = offset_of!(kiln_model_desc, weights_checksum);
    pub const WEIGHTS: usize = offset_of!(kiln_model_desc, weights);
    pub const RUN: usize = offset_of!(kiln_model_desc, run);
    pub const IO_DTYPE: usize = offset_of!(kiln_model_desc, io_dtype);
    pub const IO_WIDTH: usize = offset_of!(kiln_model_desc, io_width);
    pub const FINGERPRINT: usize = offset_of!(kiln_model_desc, fingerprint);
    pub const CPU_FEATURES: usize = offset_of!(kiln_model_desc, cpu_features);
    pub const SIZE: usize = size_of::<kiln_model_desc>();

    /// Every field with its offset, in order (`reserved` left out), for tests that compare
    /// the layout with what a C compiler makes of the header.
    pub const FIELDS: [(&str, usize); 18] = [
        ("abi_version", ABI_VERSION),
        ("n_inputs", N_INPUTS),
        ("n_outputs", N_OUTPUTS),
        ("batch", BATCH),
        ("context", CONTEXT),
        ("kv_layers", KV_LAYERS),
        ("kv_width", KV_WIDTH),
        ("kv_element_bytes", KV_ELEMENT_BYTES),
        ("arena_bytes", ARENA_BYTES),
        ("kv_bytes", KV_BYTES),
        ("weights_bytes", WEIGHTS_BYTES),
        ("weights_checksum", WEIGHTS_CHECKSUM),
        ("weights", WEIGHTS),
        ("run", RUN),
        ("io_dtype", IO_DTYPE),
        ("io_width", IO_WIDTH),
        ("fingerprint", FINGERPRINT),
        ("cpu_features", CPU_FEATURES),
    ];
}

/// CPU features (kiln_model_desc.cpu_features). x86-64:
pub const KILN_CPU_SSE3: u32 = 1u32 << 0;
pub const KILN_CPU_SSSE3: u32 = 1u32 << 1;
pub const KILN_CPU_SSE41: u32 = 1u32 << 2;
pub const KILN_CPU_SSE42: u32 = 1u32 << 3;
pub const KILN_CPU_POPCNT: u32 = 1u32 << 4;
pub const KILN_CPU_AVX: u32 = 1u32 << 5;
pub const KILN_CPU_AVX2: u32 = 1u32 << 6;
pub const KILN_CPU_FMA: u32 = 1u32 << 7;
pub const KILN_CPU_BMI1: u32 = 1u32 << 8;
pub const KILN_CPU_BMI2: u32 = 1u32 << 9;
pub const KILN_CPU_LZCNT: u32 = 1u32 << 10;
pub const KILN_CPU_F16C: u32 = 1u32 << 11;
/// AArch64 (beyond the baseline's NEON):
pub const KILN_CPU_DOTPROD: u32 = 1u32 << 16;
pub const KILN_CPU_FP16: u32 = 1u32 << 17;
pub const KILN_CPU_I8MM: u32 = 1u32 << 18;

/// Each `KILN_CPU_*` bit with its one name: the targets' name (`TargetSummary::isa_features`,
/// Cranelift's flag without `has_`), which is also how the manifest and the runtime's errors
/// spell it, and the `KILN_CPU_` constant's name in lowercase.
pub const CPU_FEATURES: [(u32, &str); 15] = [
    (KILN_CPU_SSE3, "sse3"),
    (KILN_CPU_SSSE3, "ssse3"),
    (KILN_CPU_SSE41, "sse41"),
    (KILN_CPU_SSE42, "sse42"),
    (KILN_CPU_POPCNT, "popcnt"),
    (KILN_CPU_AVX, "avx"),
    (KILN_CPU_AVX2, "avx2"),
    (KILN_CPU_FMA, "fma"),
    (KILN_CPU_BMI1, "bmi1"),
    (KILN_CPU_BMI2, "bmi2"),
    (KILN_CPU_LZCNT, "lzcnt"),
    (KILN_CPU_F16C, "f16c"),
    (KILN_CPU_DOTPROD, "dotprod"),
    (KILN_CPU_FP16, "fp16"),
    (KILN_CPU_I8MM, "i8mm"),
];

/// The `KILN_CPU_*` bit of a feature by name. The spellings of Rust's
/// `is_x86_feature_detected!` (`sse4.1`, `sse4.2`) are accepted too.
pub fn cpu_feature(name: &str) -> Option<u32> {
    let name = match name {
        "sse4.1" => "sse41",
        "sse4.2" => "sse42",
        other => other,
    };
    CPU_FEATURES.iter().find(|(_, n)| *n == name).map(|(bit, _)| *bit)
}

/// Every `KILN_CPU_*` bit.
pub const CPU_FEATURE_MASK: u32 = {
    let mut mask = 0;
    let mut i = 0;
    while i < CPU_FEATURES.len() {
        mask |= CPU_FEATURES[i].0;
        i += 1;
    }
    mask
};

/// The weights checksum: FNV-1a 64 run in eight independent lanes over the little-endian
/// 64-bit words of each 64-byte chunk, then FNV-1a 64 over the eight lane states, the tail
/// bytes and the length (as a little-endian u64). Eight lanes of whole words make it about
/// twenty times faster than bytewise FNV-1a (about 10 ms for 100 MB instead of 180 ms), so
/// the runtime checks embedded weights at every load.
pub fn weights_checksum(bytes: &[u8]) -> u64 {
    let mut h = WeightsChecksum::new();
    h.update(bytes);
    h.finish()
}

/// [`weights_checksum`] computed over bytes that arrive in pieces (a build writing its weights
/// tensor by tensor): `update` with each piece in order, then `finish`; the same value as
/// [`weights_checksum`] of the pieces joined.
#[derive(Clone, Debug)]
pub struct WeightsChecksum {
    lanes: [u64; 8],
    /// Bytes of a chunk not yet complete (`pending[..filled]`).
    pending: [u8; 64],
    filled: usize,
    len: u64,
}

impl Default for WeightsChecksum {
    fn default() -> Self {
        Self::new()
    }
}

impl WeightsChecksum {
    const BASIS: u64 = 0xcbf29ce484222325;
    const PRIME: u64 = 0x100000001b3;

    pub fn new() -> Self {
        WeightsChecksum { lanes: [Self::BASIS; 8], pending: [0; 64], filled: 0, len: 0 }
    }

    fn chunk(&mut self, chunk: &[u8]) {
        for (lane, word) in self.lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(Self::PRIME);
        }
    }

    /// Adds the next `bytes`.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if self.filled > 0 {
            let take = (64 - self.filled).min(bytes.len());
            self.pending[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled < 64 {
                return;
            }
            let pending = self.pending;
            self.chunk(&pending);
            self.filled = 0;
        }
        let mut chunks = bytes.chunks_exact(64);
        for chunk in &mut chunks {
            self.chunk(chunk);
        }
        let tail = chunks.remainder();
        self.pending[..tail.len()].copy_from_slice(tail);
        self.filled = tail.len();
    }

    /// Bytes given so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was given.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The checksum of every byte given.
    pub fn finish(&self) -> u64 {
        let mut h = Self::BASIS;
        let lane_bytes = self.lanes.iter().flat_map(|l| l.to_le_bytes());
        let tail = self.pending[..self.filled].iter().copied();
        for b in lane_bytes.chain(tail).chain(self.len.to_le_bytes()) {
            h = (h ^ b as u64).wrapping_mul(Self::PRIME);
        }
        h
    }
}

/// The C text of the ABI (`include/kiln_abi.h`, generated from this file by `cargo xtask
/// header`), guarded by `KILN_ABI_H`: the first part of `runtime/include/kiln.h` and of every
/// model's `kiln_model.h`, so that a program may include both.
pub const C_ABI: &str = include_str!("../include/kiln_abi.h");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_of_abi_4() {
        // Any change of these needs a new ABI_VERSION (and then new numbers here).
        assert_eq!((ABI_VERSION, ctx::SIZE, desc::SIZE), (4, 72, 184));
        assert_eq!((ctx::PARALLEL_FOR, ctx::POOL), (56, 64));
        assert_eq!((desc::RUN, desc::FINGERPRINT, desc::CPU_FEATURES), (72, 144, 176));
    }

    #[test]
    fn each_cpu_feature_has_one_bit_and_one_name() {
        for (i, (bit, name)) in CPU_FEATURES.iter().enumerate() {
            assert_eq!(bit.count_ones(), 1, "{name}");
            assert_eq!(cpu_feature(name), Some(*bit));
            for (other_bit, other_name) in &CPU_FEATURES[i + 1..] {
                assert!(bit != other_bit && name != other_name, "{name} and {other_name}");
            }
        }
        assert_eq!(cpu_feature("sse4.1"), Some(KILN_CPU_SSE41));
        assert_eq!(cpu_feature("sse4.2"), Some(KILN_CPU_SSE42));
        assert_eq!(cpu_feature("neon"), None);
        assert_eq!(CPU_FEATURE_MASK.count_ones() as usize, CPU_FEATURES.len());
    }

    #[test]
    fn the_checksum_sees_every_byte_and_the_length() {
        for len in [0usize, 1, 7, 63, 64, 65, 200] {
            let bytes: [u8; 200] = core::array::from_fn(|i| (i * 37 % 251) as u8);
            let bytes = &bytes[..len];
            let c = weights_checksum(bytes);
            for at in [0, len / 2, len.saturating_sub(1)] {
                if at < len {
                    let mut flipped = [0u8; 200];
                    flipped[..len].copy_from_slice(bytes);
                    flipped[at] ^= 1;
                    assert_ne!(weights_checksum(&flipped[..len]), c, "length {len}, byte {at}");
                }
            }
        }
        assert_ne!(weights_checksum(&[0; 64]), weights_checksum(&[0; 128]));
        assert_ne!(weights_checksum(&[]), weights_checksum(&[0]));
        // A fixed value (computed independently): libraries built before stay loadable.
        let bytes: [u8; 100] = core::array::from_fn(|i| i as u8);
        assert_eq!(weights_checksum(&bytes), 0x858d9b355176fef8);
    }

    /// Pieces of any sizes give the checksum of the bytes joined.
    #[test]
    fn the_checksum_of_pieces_is_the_checksum_of_the_whole() {
        let bytes: [u8; 1000] = core::array::from_fn(|i| ((i as u32).wrapping_mul(2654435761) >> 13) as u8);
        let cuts: [&[usize]; 5] = [&[], &[1], &[63, 64, 65], &[7, 200, 201, 999], &[128, 192, 640]];
        for cuts in cuts {
            let mut h = WeightsChecksum::new();
            let mut at = 0;
            for &c in cuts.iter().chain(core::iter::once(&bytes.len())) {
                h.update(&bytes[at..c]);
                at = c;
            }
            assert_eq!(h.finish(), weights_checksum(&bytes), "cuts {cuts:?}");
            assert_eq!(h.len(), bytes.len() as u64);
        }
    }
}
