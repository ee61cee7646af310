//! The compiler and the runtime agree on the C ABI of model libraries: the runtime's structs
//! have the compiler's field offsets, both compute the same weights checksum, and the
//! runtime's C header carries the same ABI text as every generated model header.
//!
//! And the runtime does not trust what it need not: a library is refused with a bundle of
//! another build (fingerprints), a descriptor that is inconsistent or whose weights do not
//! match their checksum is refused before its code runs, and positions that would overflow
//! are refused instead of wrapping.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use compiler::bundle::{build_model, BuildOptions};
use compiler::codegen::abi;
use ir::QuantFormat;
use runtime::program::{Input, KilnCtx, ModelDesc, Program, ProgramError};
use runtime::session::Session;
use tests::harness::{scratch_dir, tiny_llama_gguf_with_tokenizer, Rng, TinyLlama};

#[test]
fn runtime_structs_have_the_compiler_layout() {
    assert_eq!(runtime::program::ABI_VERSION, abi::ABI_VERSION);
    assert_eq!(runtime::program::MAX_IO, abi::MAX_IO);
    assert_eq!(runtime::program::FINGERPRINT_BYTES, abi::FINGERPRINT_BYTES);
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
    let want: BTreeMap<&str, usize> = [
        ("abi_version", abi::desc::ABI_VERSION),
        ("n_inputs", abi::desc::N_INPUTS),
        ("n_outputs", abi::desc::N_OUTPUTS),
        ("batch", abi::desc::BATCH),
        ("context", abi::desc::CONTEXT),
        ("kv_layers", abi::desc::KV_LAYERS),
        ("kv_width", abi::desc::KV_WIDTH),
        ("kv_element_bytes", abi::desc::KV_ELEMENT_BYTES),
        ("arena_bytes", abi::desc::ARENA_BYTES),
        ("kv_bytes", abi::desc::KV_BYTES),
        ("weights_bytes", abi::desc::WEIGHTS_BYTES),
        ("weights_checksum", abi::desc::WEIGHTS_CHECKSUM),
        ("weights", abi::desc::WEIGHTS),
        ("run", abi::desc::RUN),
        ("io_dtype", abi::desc::IO_DTYPE),
        ("io_width", abi::desc::IO_WIDTH),
        ("fingerprint", abi::desc::FINGERPRINT),
        ("cpu_features", abi::desc::CPU_FEATURES),
    ]
    .into_iter()
    .collect();
    let (fields, size) = ModelDesc::layout();
    let got: BTreeMap<&str, usize> = fields.into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(size, abi::desc::SIZE);
}

/// The compiler's feature bits, the runtime's and the C header's `KILN_CPU_*` agree, and a
/// compiled library records its target's features (x86-64-v3: AVX2, FMA, F16C...).
#[test]
fn cpu_feature_bits_agree_and_libraries_record_their_targets_features() {
    let runtime_bits: Vec<u32> = runtime::program::CPU_FEATURES.iter().map(|(bit, _)| *bit).collect();
    let compiler_bits: Vec<u32> = abi::CPU_FEATURES.iter().map(|(_, bit)| *bit).collect();
    assert_eq!(runtime_bits, compiler_bits);
    for (name, bit) in abi::CPU_FEATURES {
        let line = format!("#define KILN_CPU_{} (1u << {bit})", name.to_uppercase());
        assert!(abi::C_ABI.contains(&line), "{line}");
    }
    let x86 = targets::lookup("x86_64-unknown-linux-gnu").unwrap().summary().isa_features;
    let bits = abi::cpu_feature_bits(&x86);
    for f in ["avx2", "fma", "f16c", "bmi2"] {
        let bit = abi::CPU_FEATURES.iter().find(|(n, _)| *n == f).unwrap().1;
        assert!(bits & 1 << bit != 0, "x86-64-v3 code needs {f}");
    }
    let pi = targets::lookup_device("aarch64-linux-android", Some("raspberry-pi-5")).unwrap().summary().isa_features;
    assert_eq!(abi::cpu_feature_bits(&pi) & 0xffff, 0, "no x86 bits on aarch64");
}

#[test]
fn compiler_and_runtime_compute_the_same_weights_checksum() {
    let mut rng = Rng::new(5);
    // Lengths around the 8-byte words and 64-byte chunks of the lanes.
    for len in [0usize, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 200, 1000, 4096 + 17] {
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let c = abi::weights_checksum(&bytes);
        assert_eq!(runtime::program::weights_checksum(&bytes), c, "length {len}");
        if len > 0 {
            // Any changed byte, in a lane or in the tail, changes the checksum.
            for at in [0, len / 2, len - 1] {
                let mut flipped = bytes.clone();
                flipped[at] ^= 0x10;
                assert_ne!(abi::weights_checksum(&flipped), c, "length {len}, byte {at}");
            }
        }
    }
    // The length counts: zeros of different lengths differ.
    assert_ne!(abi::weights_checksum(&[0; 64]), abi::weights_checksum(&[0; 128]));
    assert_ne!(abi::weights_checksum(&[]), abi::weights_checksum(&[0]));
}

#[test]
fn runtime_header_carries_the_generated_abi_text() {
    let header = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/include/kiln.h")).unwrap();
    assert!(header.contains(abi::C_ABI), "runtime/include/kiln.h must contain compiler::codegen::abi::C_ABI verbatim");
}

/// A tiny Llama shape (two layers, grouped-query attention, 40 tokens).
pub(crate) fn tiny_cfg(context: u32) -> TinyLlama {
    TinyLlama {
        n_layers: 2,
        d_model: 64,
        d_ff: 96,
        n_heads: 4,
        n_kv_heads: 2,
        vocab: 40,
        context,
        format: QuantFormat::Q8_0,
        tied: true,
    }
}

/// Writes `dir/{model}.gguf` (a random tiny model from `seed`), builds it into `dir/{out}`
/// and links its library into `dir/{out}.so`. Returns (bundle, shared object).
pub(crate) fn tiny_bundle(
    dir: &Path,
    model: &str,
    seed: u64,
    out: &str,
    embed_weights: bool,
    context: u32,
) -> (PathBuf, PathBuf) {
    let gguf = dir.join(format!("{model}.gguf"));
    std::fs::write(&gguf, tiny_llama_gguf_with_tokenizer(&tiny_cfg(context), &mut Rng::new(seed))).unwrap();
    let bundle = dir.join(out);
    let opts = BuildOptions {
        context: Some(context),
        batch: 4,
        embed_weights,
        ..BuildOptions::new(gguf, targets::host_triple().expect("a supported host").to_string(), bundle.clone())
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
    let so = dir.join(format!("{out}.so"));
    let status = Command::new("cc")
        .arg("-shared")
        .arg("-o")
        .arg(&so)
        .arg("-Wl,--whole-archive")
        .arg(bundle.join("lib/libkiln_model.a"))
        .arg("-Wl,--no-whole-archive")
        .status()
        .expect("run cc");
    assert!(status.success(), "cc -shared failed");
    (bundle, so)
}

fn manifest_fingerprint(bundle: &Path) -> String {
    let text = std::fs::read_to_string(bundle.join("manifest.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fp = json["fingerprint"].as_str().expect("manifest.json has a fingerprint").to_string();
    assert_eq!(fp.len(), 64, "a SHA-256 in hex: {fp}");
    fp
}

fn open_error(library: &Path, bundle: &Path) -> String {
    match Session::open_shared(library, bundle, 1) {
        Ok(_) => panic!("{} opened with the bundle {}", library.display(), bundle.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_library_is_refused_with_the_bundle_of_another_build() {
    let dir = scratch_dir("fingerprint");
    // Two models of identical shapes, different weights.
    let (bundle_a, so_a) = tiny_bundle(&dir, "model-a", 1, "a", true, 64);
    let (bundle_b, so_b) = tiny_bundle(&dir, "model-b", 2, "b", true, 64);
    let (fa, fb) = (manifest_fingerprint(&bundle_a), manifest_fingerprint(&bundle_b));
    assert_ne!(fa, fb);
    for (so, bundle) in [(&so_a, &bundle_a), (&so_b, &bundle_b)] {
        let mut s = Session::open_shared(so, bundle, 1).unwrap_or_else(|e| panic!("own bundle refused: {e}"));
        assert_eq!(s.eval(&[0, 2, 3], false).unwrap().len(), 40);
    }
    let e = open_error(&so_a, &bundle_b);
    assert!(e.contains(&fa) && e.contains(&fb), "the message names both fingerprints: {e}");
    assert!(e.contains("model-b"), "the message names the bundle's model: {e}");

    // The same model built with `--weights file`: a different build, refused by fingerprint,
    // not with advice about a weights.bin no flag passes.
    let (bundle_f, so_f) = tiny_bundle(&dir, "model-a", 1, "a-file", false, 64);
    let ff = manifest_fingerprint(&bundle_f);
    assert_ne!(ff, fa);
    let e = open_error(&so_f, &bundle_a);
    assert!(e.contains(&ff) && e.contains(&fa), "{e}");
    assert!(!e.contains("pass its weights.bin"), "{e}");
    let e = open_error(&so_a, &bundle_f);
    assert!(e.contains(&ff) && e.contains(&fa), "{e}");
    Session::open_shared(&so_f, &bundle_f, 1).unwrap_or_else(|e| panic!("own bundle refused: {e}"));

    // Same inputs, same fingerprint and library.
    let (bundle_a2, _) = tiny_bundle(&dir, "model-a", 1, "a2", true, 64);
    assert_eq!(manifest_fingerprint(&bundle_a2), fa);
    let lib = |b: &Path| std::fs::read(b.join("lib/libkiln_model.a")).unwrap();
    assert!(lib(&bundle_a2) == lib(&bundle_a), "two builds of the same inputs differ");
}

#[test]
fn positions_that_would_overflow_are_refused() {
    let dir = scratch_dir("position-overflow");
    let (_, so) = tiny_bundle(&dir, "model", 3, "bundle", true, 64);
    let mut p = Program::load_shared(&so, None, 1).unwrap();
    let vocab = p.desc().io_width(1).unwrap();
    let mut out = vec![0.0f32; 2 * vocab];
    // pos + n_tokens wraps to 0 in unchecked arithmetic.
    for pos in [usize::MAX - 1, usize::MAX, 63, 1 << 40] {
        let e = p.run(&[Input::I32(&[2, 3])], &mut [&mut out], 2, pos, 0).unwrap_err();
        assert!(matches!(e, ProgramError::BadArgument(_)), "{e:?}");
        assert!(e.to_string().contains("exceed the context of 64"), "{e}");
    }
    // The program is intact and runs at the last positions of its context.
    p.run(&[Input::I32(&[2, 3])], &mut [&mut out], 2, 62, 0).unwrap();
    assert!(out.iter().all(|v| v.is_finite()));
}

/// Outputs hold only the rows asked for: with `out_start = k` the library writes rows `k..n`
/// into a buffer of `n - k` rows (checked with guard rows on both sides that must stay
/// untouched), equal to those rows of a full run; a buffer of the wrong size is refused.
#[test]
fn outputs_hold_only_the_rows_asked_for() {
    let dir = scratch_dir("out-rows");
    let (_, so) = tiny_bundle(&dir, "model", 2, "bundle", true, 64);
    let mut p = Program::load_shared(&so, None, 1).unwrap();
    let vocab = p.desc().io_width(1).unwrap();
    let ids = [2, 3, 1, 4];
    let n = ids.len();
    let mut full = vec![0.0f32; n * vocab];
    p.run(&[Input::I32(&ids)], &mut [&mut full], n, 0, 0).unwrap();
    for out_start in [1, 2, n - 1, n] {
        let rows = n - out_start;
        let mut buf = vec![f32::NAN; (rows + 2) * vocab];
        p.reset();
        p.run(&[Input::I32(&ids)], &mut [&mut buf[vocab..(rows + 1) * vocab]], n, 0, out_start).unwrap();
        assert!(buf[..vocab].iter().chain(&buf[(rows + 1) * vocab..]).all(|v| v.is_nan()), "a guard row was written");
        assert_eq!(&buf[vocab..(rows + 1) * vocab], &full[out_start * vocab..], "out_start {out_start}");
        // A buffer of all n rows (the old convention) is refused, not half-filled.
        if rows < n {
            let e = p.run(&[Input::I32(&ids)], &mut [&mut full.clone()], n, 0, out_start).unwrap_err();
            assert!(e.to_string().contains(&format!("must hold {rows} x {vocab} floats")), "{e}");
        }
    }
}

/// A shared object exporting a hand-made `kiln_model` (a no-op `run`, 100 bytes of weights).
fn c_library(dir: &Path, name: &str, abi_version: u32, kv_bytes: u64, checksum: u64) -> PathBuf {
    c_library_kv(dir, name, abi_version, kv_bytes, 4, checksum, "0")
}

fn c_library_kv(
    dir: &Path,
    name: &str,
    abi_version: u32,
    kv_bytes: u64,
    elem: u32,
    checksum: u64,
    cpu: &str,
) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(
        &src,
        r#"#include "kiln.h"
static void run(const struct kiln_ctx *ctx) { (void)ctx; }
static const uint8_t weights[100] = { 1, 2, 3, 4, 5 };
const struct kiln_model_desc kiln_model = {
    ABI, 1, 1, 4, 16, 2, 8, ELEM,
    4096, KV_BYTES, sizeof weights, CHECKSUM, weights, run,
    { KILN_DTYPE_F32, KILN_DTYPE_F32 }, { 8, 8 }, { 0 }, CPU
};
"#,
    )
    .unwrap();
    let so = dir.join(format!("{name}.so"));
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-std=c11", "-Wall", "-Werror"])
        .arg("-I")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/include"))
        .arg(format!("-DABI={abi_version}"))
        .arg(format!("-DKV_BYTES={kv_bytes}ULL"))
        .arg(format!("-DELEM={elem}"))
        .arg(format!("-DCPU={cpu}"))
        .arg(format!("-DCHECKSUM={checksum}ULL"))
        .arg("-o")
        .arg(&so)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed on {}", src.display());
    so
}

#[test]
fn inconsistent_descriptors_and_corrupt_weights_are_refused_before_running() {
    let dir = scratch_dir("bad-descriptors");
    let mut weights = [0u8; 100];
    weights[..5].copy_from_slice(&[1, 2, 3, 4, 5]);
    let checksum = runtime::program::weights_checksum(&weights);
    let kv = 2 * 2 * 16 * 8 * 4; // layers x (keys, values) x context x kv_width x f32
    let good = c_library(&dir, "good", abi::ABI_VERSION, kv, checksum);
    let mut p = Program::load_shared(&good, None, 1).unwrap_or_else(|e| panic!("a consistent library: {e}"));
    let mut y = vec![0.0f32; 8];
    p.run(&[Input::F32(&[1.0; 8])], &mut [&mut y], 1, 0, 0).unwrap();

    let err = |so: &Path| match Program::load_shared(so, None, 1) {
        Ok(_) => panic!("{} was accepted", so.display()),
        Err(e) => e,
    };
    let e = err(&c_library(&dir, "bad-checksum", abi::ABI_VERSION, kv, checksum ^ 1));
    assert!(matches!(&e, ProgramError::Weights(m) if m.contains("checksum")), "{e:?}");
    let e = err(&c_library(&dir, "bad-kv", abi::ABI_VERSION, kv / 2, checksum));
    assert!(matches!(&e, ProgramError::BadDescriptor(m) if m.contains("kv_bytes")), "{e:?}");
    // f16 elements: half the bytes; an element size that is neither is refused.
    let half = c_library_kv(&dir, "half-kv", abi::ABI_VERSION, kv / 2, 2, checksum, "0");
    Program::load_shared(&half, None, 1).unwrap_or_else(|e| panic!("an f16 cache: {e}"));
    let e = err(&c_library_kv(&dir, "odd-kv", abi::ABI_VERSION, kv / 4 * 3, 3, checksum, "0"));
    assert!(matches!(&e, ProgramError::BadDescriptor(m) if m.contains("elements of 3 bytes")), "{e:?}");
    // A library needing CPU features this CPU lacks is refused before its code runs (the other
    // architecture's features stand in for them), and so are bits no feature has; the host's
    // own features pass.
    let (foreign, name, own) = if cfg!(target_arch = "x86_64") {
        ("KILN_CPU_DOTPROD", "dotprod", "KILN_CPU_SSE41")
    } else {
        ("KILN_CPU_AVX2", "avx2", "0")
    };
    let e = err(&c_library_kv(&dir, "foreign-cpu", abi::ABI_VERSION, kv, 4, checksum, foreign));
    assert!(matches!(&e, ProgramError::UnsupportedCpu(m) if m == name), "{e:?}");
    assert!(e.to_string().contains("rebuild it for this CPU"), "{e}");
    let e = err(&c_library_kv(&dir, "unknown-cpu", abi::ABI_VERSION, kv, 4, checksum, "(1u << 30)"));
    assert!(matches!(&e, ProgramError::BadDescriptor(m) if m.contains("0x40000000")), "{e:?}");
    let own = c_library_kv(&dir, "own-cpu", abi::ABI_VERSION, kv, 4, checksum, own);
    Program::load_shared(&own, None, 1).unwrap_or_else(|e| panic!("the host's own features: {e}"));
    let e = err(&c_library(&dir, "old-abi", 1, kv, checksum));
    assert!(matches!(e, ProgramError::AbiMismatch { found: 1 }), "{e:?}");
    // A weights file for a library that embeds its weights is refused, not ignored.
    std::fs::write(dir.join("weights.bin"), weights).unwrap();
    let e = match Program::load_shared(&good, Some(&dir.join("weights.bin")), 1) {
        Ok(_) => panic!("a weights file was silently ignored"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("embeds its weights"), "{e}");
}
