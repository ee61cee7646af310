//! The C ABI between a compiled model library and the runtime: the `kiln_ctx` argument of
//! every entry point and the `kiln_model_desc` descriptor a library exports as `kiln_model`.
//!
//! The runtime mirrors these layouts with `#[repr(C)]` structs; an integration test checks
//! that both sides agree. Bump [`ABI_VERSION`] on any change.

/// Version stored in `kiln_model_desc.abi_version`.
pub const ABI_VERSION: u32 = 4;
/// Most inputs plus outputs a library may have.
pub const MAX_IO: usize = 8;
/// Bytes of the build fingerprint in the descriptor.
pub const FINGERPRINT_BYTES: usize = 32;
/// The exported descriptor symbol.
pub const MODEL_SYMBOL: &str = "kiln_model";

/// Byte offsets of the fields of `struct kiln_ctx` (all 8 bytes wide).
pub mod ctx {
    pub const ARENA: i32 = 0;
    pub const WEIGHTS: i32 = 8;
    pub const KV_CACHE: i32 = 16;
    pub const IO: i32 = 24;
    pub const N_TOKENS: i32 = 32;
    pub const POS: i32 = 40;
    pub const OUT_START: i32 = 48;
    pub const PARALLEL_FOR: i32 = 56;
    pub const POOL: i32 = 64;
    pub const SIZE: usize = 72;
}

/// Byte offsets of the fields of `struct kiln_model_desc`.
pub mod desc {
    pub const ABI_VERSION: usize = 0;
    pub const N_INPUTS: usize = 4;
    pub const N_OUTPUTS: usize = 8;
    pub const BATCH: usize = 12;
    pub const CONTEXT: usize = 16;
    pub const KV_LAYERS: usize = 20;
    pub const KV_WIDTH: usize = 24;
    pub const KV_ELEMENT_BYTES: usize = 28;
    pub const ARENA_BYTES: usize = 32;
    pub const KV_BYTES: usize = 40;
    pub const WEIGHTS_BYTES: usize = 48;
    pub const WEIGHTS_CHECKSUM: usize = 56;
    pub const WEIGHTS: usize = 64;
    pub const RUN: usize = 72;
    pub const IO_DTYPE: usize = 80;
    pub const IO_WIDTH: usize = 112;
    pub const FINGERPRINT: usize = 144;
    pub const CPU_FEATURES: usize = 176;
    pub const SIZE: usize = 184;
}

/// The CPU features a library may need, by bit of `kiln_model_desc.cpu_features`, named as
/// the targets name them (`TargetSummary::isa_features`); the runtime refuses a library that
/// needs one its CPU lacks (the C text below lists the same bits).
pub const CPU_FEATURES: &[(&str, u32)] = &[
    ("sse3", 0),
    ("ssse3", 1),
    ("sse41", 2),
    ("sse42", 3),
    ("popcnt", 4),
    ("avx", 5),
    ("avx2", 6),
    ("fma", 7),
    ("bmi1", 8),
    ("bmi2", 9),
    ("lzcnt", 10),
    ("f16c", 11),
    ("dotprod", 16),
    ("fp16", 17),
    ("i8mm", 18),
];

/// The `cpu_features` bits of a target's features (names without a bit, such as aarch64's
/// baseline `neon`, need none).
pub fn cpu_feature_bits(features: &[String]) -> u32 {
    features
        .iter()
        .filter_map(|f| CPU_FEATURES.iter().find(|(name, _)| name == f))
        .fold(0, |bits, (_, bit)| bits | 1 << bit)
}

/// `io_dtype` codes.
pub const DTYPE_I32: u32 = 0;
pub const DTYPE_F32: u32 = 1;

/// The ABI part of the C header, shared by every model header and the runtime's header.
pub const C_ABI: &str = r#"#ifndef KILN_ABI_H
#define KILN_ABI_H
#include <stdint.h>

#define KILN_ABI_VERSION 4
#define KILN_MAX_IO 8
#define KILN_FINGERPRINT_BYTES 32
#define KILN_DTYPE_I32 0
#define KILN_DTYPE_F32 1

struct kiln_ctx;
/* A kernel task: runs its share `ith` of `nth` of one kernel. */
typedef void (*kiln_task_fn)(const struct kiln_ctx *ctx, int64_t ith, int64_t nth);
/* Runs task(ctx, ith, nth) for every ith in 0..nth on a thread pool and waits. */
typedef void (*kiln_parallel_for_fn)(void *pool, kiln_task_fn task, const struct kiln_ctx *ctx);

/* The argument of a model's run function, filled in by the runtime. */
struct kiln_ctx {
    uint8_t *arena;            /* activation arena, desc->arena_bytes, 64-byte aligned */
    const uint8_t *weights;    /* packed weights, desc->weights_bytes */
    void *kv_cache;            /* desc->kv_bytes, zeroed at start */
    void *const *io;           /* inputs then outputs, rows of desc->io_width values */
    int64_t n_tokens;          /* 1..=desc->batch */
    int64_t pos;               /* position of the first token; pos + n_tokens <= context */
    int64_t out_start;         /* outputs are computed for rows out_start..n_tokens only, and each
                                  output buffer holds just those n_tokens - out_start rows */
    kiln_parallel_for_fn parallel_for;
    void *pool;
};

/* What a compiled model library exports (as `kiln_model`). */
struct kiln_model_desc {
    uint32_t abi_version;
    uint32_t n_inputs;
    uint32_t n_outputs;
    uint32_t batch;            /* most tokens per run call */
    uint32_t context;          /* KV cache positions */
    uint32_t kv_layers;
    uint32_t kv_width;         /* elements per position per layer, for keys and for values */
    uint32_t kv_element_bytes; /* 4 (f32) or 2 (f16, IEEE half) */
    uint64_t arena_bytes;
    uint64_t kv_bytes;
    uint64_t weights_bytes;
    uint64_t weights_checksum; /* of the packed weights: 8-lane FNV-1a 64 (see the runtime) */
    const uint8_t *weights;    /* embedded weights, or NULL when they ship as weights.bin */
    void (*run)(const struct kiln_ctx *ctx);
    uint32_t io_dtype[KILN_MAX_IO];
    uint32_t io_width[KILN_MAX_IO];
    /* SHA-256 of the build's inputs and options, also in the bundle's manifest.json */
    uint8_t fingerprint[KILN_FINGERPRINT_BYTES];
    uint32_t cpu_features;     /* KILN_CPU_* bits the code needs; checked before it runs */
    uint32_t reserved;
};

/* CPU features (kiln_model_desc.cpu_features). x86-64: */
#define KILN_CPU_SSE3 (1u << 0)
#define KILN_CPU_SSSE3 (1u << 1)
#define KILN_CPU_SSE41 (1u << 2)
#define KILN_CPU_SSE42 (1u << 3)
#define KILN_CPU_POPCNT (1u << 4)
#define KILN_CPU_AVX (1u << 5)
#define KILN_CPU_AVX2 (1u << 6)
#define KILN_CPU_FMA (1u << 7)
#define KILN_CPU_BMI1 (1u << 8)
#define KILN_CPU_BMI2 (1u << 9)
#define KILN_CPU_LZCNT (1u << 10)
#define KILN_CPU_F16C (1u << 11)
/* AArch64 (beyond the baseline's NEON): */
#define KILN_CPU_DOTPROD (1u << 16)
#define KILN_CPU_FP16 (1u << 17)
#define KILN_CPU_I8MM (1u << 18)

#endif /* KILN_ABI_H */
"#;

/// The weights checksum: FNV-1a 64 run in eight independent lanes over the little-endian
/// 64-bit words of each 64-byte chunk, then FNV-1a 64 over the eight lane states, the tail
/// bytes and the length (as a little-endian u64). The runtime's
/// `runtime::program::weights_checksum` is the same function (checked by a test); it checks
/// embedded weights at every load, which bytewise FNV-1a made cost 180 ms on a 100 MB model.
pub fn weights_checksum(bytes: &[u8]) -> u64 {
    const BASIS: u64 = 0xcbf29ce484222325;
    const PRIME: u64 = 0x100000001b3;
    let mut lanes = [BASIS; 8];
    let mut chunks = bytes.chunks_exact(64);
    for chunk in &mut chunks {
        for (lane, word) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(PRIME);
        }
    }
    let mut h = BASIS;
    let lane_bytes = lanes.iter().flat_map(|l| l.to_le_bytes());
    let tail = chunks.remainder().iter().copied();
    for b in lane_bytes.chain(tail).chain((bytes.len() as u64).to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(PRIME);
    }
    h
}
