//! The C ABI of model libraries is the `abi` crate's, which the compiler and the runtime both
//! compile against: a C compiler sees its layout in the generated `kiln.h`, and the runtime's
//! C header carries the same ABI text as every generated model header.
//!
//! And the runtime does not trust what it need not: a library is refused with a bundle of
//! another build (fingerprints), a descriptor that is inconsistent or whose weights do not
//! match their checksum is refused before its code runs, and positions that would overflow
//! are refused instead of wrapping.

use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use compiler::bundle::{build_model, BuildOptions, WeightsPlacement};
use ir::QuantFormat;
use runtime::program::{Input, KilnCtx, ModelDesc, Program, ProgramError};
use runtime::session::Session;
use tests::harness::{scratch_dir, tiny_llama_gguf_with_tokenizer, Rng, TinyLlama};

/// What a C compiler makes of `runtime/include/kiln.h` (generated from the `abi` crate) is
/// the `abi` crate's layout: every field offset and size of both structs, and the constants.
#[test]
fn the_c_header_has_the_abi_crates_layout() {
    let mut program = String::from("#include <stddef.h>\n#include <stdio.h>\n#include \"kiln.h\"\nint main(void) {\n");
    let mut want = Vec::new();
    for (field, offset) in abi::ctx::FIELDS {
        program += &format!("    printf(\"ctx.{field} %zu\\n\", offsetof(struct kiln_ctx, {field}));\n");
        want.push(format!("ctx.{field} {offset}"));
    }
    for (field, offset) in abi::desc::FIELDS {
        program += &format!("    printf(\"desc.{field} %zu\\n\", offsetof(struct kiln_model_desc, {field}));\n");
        want.push(format!("desc.{field} {offset}"));
    }
    program += "    printf(\"sizeof ctx %zu\\nsizeof desc %zu\\n\", sizeof(struct kiln_ctx), sizeof(struct kiln_model_desc));\n";
    want.push(format!("sizeof ctx {}", abi::ctx::SIZE));
    want.push(format!("sizeof desc {}", abi::desc::SIZE));
    let constants = [
        ("KILN_ABI_VERSION", abi::ABI_VERSION as u64),
        ("KILN_MAX_IO", abi::MAX_IO as u64),
        ("KILN_FINGERPRINT_BYTES", abi::FINGERPRINT_BYTES as u64),
        ("KILN_DTYPE_I32", abi::DTYPE_I32 as u64),
        ("KILN_DTYPE_F32", abi::DTYPE_F32 as u64),
    ];
    // Each feature's C constant is its one name in capitals.
    let features =
        abi::CPU_FEATURES.iter().map(|(bit, name)| (format!("KILN_CPU_{}", name.to_uppercase()), *bit as u64));
    for (name, value) in constants.iter().map(|(n, v)| (n.to_string(), *v)).chain(features) {
        program += &format!("    printf(\"{name} %llu\\n\", (unsigned long long)({name}));\n");
        want.push(format!("{name} {value}"));
    }
    program += "    return 0;\n}\n";
    let dir = scratch_dir("abi-layout");
    std::fs::write(dir.join("layout.c"), &program).unwrap();
    let exe = dir.join("layout");
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/include"))
        .arg(dir.join("layout.c"))
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed on {}", dir.join("layout.c").display());
    let out = Command::new(&exe).output().expect("run the layout program");
    let got: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    assert_eq!(got, want);
    // And the runtime's type is the abi crate's.
    assert_eq!((offset_of!(KilnCtx, pool), size_of::<KilnCtx>()), (abi::ctx::POOL as usize, abi::ctx::SIZE));
    assert_eq!(size_of::<ModelDesc>(), abi::desc::SIZE);
}

#[test]
fn runtime_header_carries_the_generated_abi_text() {
    let header = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/include/kiln.h")).unwrap();
    assert!(header.contains(abi::C_ABI), "runtime/include/kiln.h must contain abi::C_ABI verbatim");
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
        weights: if embed_weights { WeightsPlacement::Embedded } else { WeightsPlacement::File },
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
