//! The compiler and the runtime agree on the C ABI of model libraries: the runtime's structs
//! have the compiler's field offsets, and the runtime's C header carries the same ABI text
//! as every generated model header.

use std::mem::{offset_of, size_of};

use compiler::codegen::abi;
use runtime::program::{KilnCtx, ModelDesc};

#[test]
fn runtime_structs_have_the_compiler_layout() {
    assert_eq!(runtime::program::ABI_VERSION, abi::ABI_VERSION);
    assert_eq!(runtime::program::MAX_IO, abi::MAX_IO);
    let ctx = [
        (offset_of!(KilnCtx, arena), abi::ctx::ARENA),
        (offset_of!(KilnCtx, weights), abi::ctx::WEIGHTS),
        (offset_of!(KilnCtx, kv_cache), abi::ctx::KV_CACHE),
        (offset_of!(KilnCtx, io), abi::ctx::IO),
        (offset_of!(KilnCtx, n_tokens), abi::ctx::N_TOKENS),
        (offset_of!(KilnCtx, pos), abi::ctx::POS),
        (offset_of!(KilnCtx, out_start), abi::ctx::OUT_START),
        (offset_of!(KilnCtx, parallel_for), abi::ctx::PARALLEL_FOR),
        (offset_of!(KilnCtx, pool), abi::ctx::POOL),
    ];
    for (runtime, compiler) in ctx {
        assert_eq!(runtime, compiler as usize);
    }
    assert_eq!(size_of::<KilnCtx>(), abi::ctx::SIZE);
    let desc = [
        (offset_of!(ModelDesc, abi_version), abi::desc::ABI_VERSION),
        (offset_of!(ModelDesc, n_inputs), abi::desc::N_INPUTS),
        (offset_of!(ModelDesc, n_outputs), abi::desc::N_OUTPUTS),
        (offset_of!(ModelDesc, batch), abi::desc::BATCH),
        (offset_of!(ModelDesc, context), abi::desc::CONTEXT),
        (offset_of!(ModelDesc, kv_layers), abi::desc::KV_LAYERS),
        (offset_of!(ModelDesc, kv_width), abi::desc::KV_WIDTH),
        (offset_of!(ModelDesc, arena_bytes), abi::desc::ARENA_BYTES),
        (offset_of!(ModelDesc, kv_bytes), abi::desc::KV_BYTES),
        (offset_of!(ModelDesc, weights_bytes), abi::desc::WEIGHTS_BYTES),
        (offset_of!(ModelDesc, weights_checksum), abi::desc::WEIGHTS_CHECKSUM),
        (offset_of!(ModelDesc, weights), abi::desc::WEIGHTS),
        (offset_of!(ModelDesc, run), abi::desc::RUN),
        (offset_of!(ModelDesc, io_dtype), abi::desc::IO_DTYPE),
        (offset_of!(ModelDesc, io_width), abi::desc::IO_WIDTH),
    ];
    for (runtime, compiler) in desc {
        assert_eq!(runtime, compiler);
    }
    assert_eq!(size_of::<ModelDesc>(), abi::desc::SIZE);
    assert_eq!(runtime::program::fnv1a64(b"kiln"), abi::fnv1a64(b"kiln"));
}

#[test]
fn runtime_header_carries_the_generated_abi_text() {
    let header = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/include/kiln.h")).unwrap();
    assert!(header.contains(abi::C_ABI), "runtime/include/kiln.h must contain compiler::codegen::abi::C_ABI verbatim");
}
