//! `optimize` (pruning, requantization, the GGUF writer) end to end: on small random models
//! the pruned GGUF it writes is compiled and compared with the reference executor run on the
//! same file; requantized tensors are checked byte for byte; on the real model, llama.cpp
//! loads the file kiln wrote and its logits are compared with kiln's.

use std::path::{Path, PathBuf};

use compiler::bundle::{build_model, BuildOptions};
use compiler::gguf::GgufFile;
use compiler::optimize::{optimize, OptimizeOptions};
use compiler::passes::requantize::{QuantOptions, TensorRule};
use ir::quant::{dequantize, quantize_row};
use ir::QuantFormat;
use runtime::session::Session;
use tests::harness::{
    argmax, max_diff, peer_script, python, scratch_dir, tiny_llama_gguf_with_tokenizer, Rng, TinyLlama,
};
use tests::reference::ReferenceModel;

/// Five blocks, three query heads sharing one KV head, an untied output head, FFN width 160.
fn tiny_cfg() -> TinyLlama {
    TinyLlama {
        n_layers: 5,
        d_model: 96,
        d_ff: 160,
        n_heads: 3,
        n_kv_heads: 1,
        vocab: 40,
        context: 64,
        format: QuantFormat::Q4_1,
        tied: false,
    }
}

fn write_tiny(dir: &Path, seed: u64) -> PathBuf {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, tiny_llama_gguf_with_tokenizer(&tiny_cfg(), &mut Rng::new(seed))).unwrap();
    path
}

fn opts(model: &Path, out: &Path, prune: Option<&str>, quant: Option<&str>, tensors: &str) -> OptimizeOptions {
    OptimizeOptions {
        model: model.to_path_buf(),
        out: out.to_path_buf(),
        force: false,
        prune: prune.map(|p| p.parse().unwrap()),
        quant: QuantOptions {
            default: quant.map(str::to_owned),
            tensors: if tensors.is_empty() { vec![] } else { TensorRule::parse_list(tensors).unwrap() },
        },
        lora: vec![],
    }
}

fn build(model: &Path, out: &Path, prune: Option<&str>, context: u32) -> (PathBuf, Session) {
    let opts = BuildOptions {
        context: Some(context),
        batch: 16,
        shared_linker: Some("cc".into()),
        prune: prune.map(|p| p.parse().unwrap()),
        ..BuildOptions::new(
            model.to_path_buf(),
            targets::host_triple().expect("a supported host").to_string(),
            out.to_path_buf(),
        )
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
    let so = out.join("lib/libkiln_model.so");
    let session = Session::open_shared(&so, out, 2).unwrap_or_else(|e| panic!("{e}"));
    (out.to_path_buf(), session)
}

fn manifest_layers(bundle: &Path) -> u64 {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap()).unwrap();
    m["model"]["hyperparameters"]["n_layers"].as_u64().expect("n_layers in the manifest")
}

#[test]
fn a_pruned_gguf_compiles_and_matches_the_reference_on_it() {
    let dir = scratch_dir("optimize_prune_tiny");
    let source = write_tiny(&dir, 11);
    let pruned = dir.join("pruned.gguf");
    let report = optimize(&opts(&source, &pruned, Some("1,3"), None, "")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.before.layers, report.after.layers), (5, 3));

    // The file: 3 blocks named blk.0..=2, holding the source's blocks 0, 2 and 4.
    let (src, out) = (GgufFile::open(&source).unwrap(), GgufFile::open(&pruned).unwrap());
    assert_eq!(out.get_u32("llama.block_count").unwrap(), 3);
    assert_eq!(out.tensors.len(), 3 * 9 + 3, "embedding, output norm, output head and 3 blocks");
    for (new, old) in [(0, 0), (1, 2), (2, 4)] {
        for part in ["attn_q", "attn_norm", "ffn_down"] {
            let (a, b) = (format!("blk.{new}.{part}.weight"), format!("blk.{old}.{part}.weight"));
            let (ta, tb) = (out.tensor(&a).unwrap(), src.tensor(&b).unwrap());
            assert_eq!((ta.ggml_type, &ta.dims), (tb.ggml_type, &tb.dims));
            assert!(out.tensor_data(ta) == src.tensor_data(tb), "{a} holds {b}'s bytes");
        }
    }
    assert!(out.tensor("blk.3.attn_q.weight").is_err());
    // Every metadata entry but the block count is the source's, in order.
    let keys = |f: &GgufFile| f.metadata().map(|(k, v)| (k.to_owned(), v.clone())).collect::<Vec<_>>();
    let (ks, ko) = (keys(&src), keys(&out));
    assert_eq!(ks.len(), ko.len());
    for ((k1, v1), (k2, v2)) in ks.iter().zip(&ko) {
        assert_eq!(k1, k2);
        if k1 != "llama.block_count" {
            assert_eq!(v1, v2, "{k1}");
        }
    }

    // The compiled pruned file against the reference executor on the same file, and the same
    // build made by pruning while compiling.
    let reference = ReferenceModel::load(&pruned).unwrap();
    assert_eq!(reference.config().n_layers, 3);
    let (bundle, mut from_file) = build(&pruned, &dir.join("bundle-from-file"), None, 64);
    let (bundle2, mut pruned_in_build) = build(&source, &dir.join("bundle-pruned-in-build"), Some("1,3"), 64);
    for b in [&bundle, &bundle2] {
        assert_eq!(manifest_layers(b), 3);
        let header = std::fs::read_to_string(b.join("include/kiln_model.h")).unwrap();
        assert!(header.contains("#define KILN_MODEL_LAYERS 3\n"), "{header}");
    }
    let vocab = from_file.vocab();
    let mut rng = Rng::new(5);
    for len in [1usize, 7, 23] {
        let ids: Vec<u32> = (0..len).map(|_| rng.below(vocab as u64) as u32).collect();
        from_file.reset();
        pruned_in_build.reset();
        let got = from_file.eval(&ids, true).unwrap();
        let again = pruned_in_build.eval(&ids, true).unwrap();
        assert_eq!(got, again, "pruning in the build and pruning the file give the same library");
        let want = reference.forward(&ids).unwrap().logits;
        let (diff, scale) = max_diff(&got, &want);
        // As in tests/it/model.rs: q16 activations against f32 math, a few 1e-4 of the scale.
        assert!(diff <= 2e-3 * scale.max(1.0), "{len} tokens: logits differ by {diff} (scale {scale})");
        for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
            let mut sorted = w.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 2.0 * diff {
                assert_eq!(argmax(g), argmax(w));
            }
        }
    }
}

/// Tensors the frontend does not read are copied (renamed with their block, or dropped with
/// it), and the source's `general.alignment` is kept: every tensor starts at a multiple of it.
#[test]
fn other_tensors_and_the_alignment_are_kept() {
    use compiler::gguf::{GgmlType, GgufWriter, MetaValue};
    let dir = scratch_dir("optimize_extra_tensors");
    let tiny = GgufFile::parse(tiny_llama_gguf_with_tokenizer(&tiny_cfg(), &mut Rng::new(14))).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in tiny.metadata() {
        w.add_meta(k, v.clone());
    }
    w.add_meta("general.alignment", MetaValue::U32(64));
    let extra: Vec<u8> = (0..40u8).collect();
    // Llama 3.1's per-pair rope divisors (head_dim / 2 = 16 here): a tensor outside the blocks.
    let rope_freqs: Vec<u8> = (0..16).flat_map(|i| (1.0f32 + i as f32 / 4.0).to_le_bytes()).collect();
    w.add_tensor("rope_freqs.weight", &[16], GgmlType::F32, &rope_freqs);
    for t in &tiny.tensors {
        w.add_tensor(&t.name, &t.dims, t.ggml_type, tiny.tensor_data(t));
    }
    w.add_tensor("blk.4.extra.weight", &[10], GgmlType::F32, &extra);
    let pruned_extra: Vec<u8> = extra.iter().rev().copied().collect();
    w.add_tensor("blk.3.extra.weight", &[10], GgmlType::F32, &pruned_extra);
    let source = dir.join("extra.gguf");
    std::fs::write(&source, w.finish()).unwrap();
    let out = dir.join("out.gguf");
    optimize(&opts(&source, &out, Some("3"), Some("q8_0"), "")).unwrap_or_else(|e| panic!("{e}"));
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.alignment, 64);
    assert!(f.tensors.iter().all(|t| (f.data_start() + t.offset) % 64 == 0), "aligned to 64");
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names[0], "rope_freqs.weight", "the source's order");
    assert_eq!(names.last(), Some(&"blk.3.extra.weight"), "blk.4 became blk.3, blk.3 is pruned");
    assert_eq!(names.iter().filter(|n| n.contains("extra")).count(), 1);
    assert_eq!(f.tensor_data(f.tensor("rope_freqs.weight").unwrap()), &rope_freqs[..], "rope_freqs copied");
    assert_eq!(f.tensor_data(f.tensor("blk.3.extra.weight").unwrap()), &extra[..], "blk.4's extra copied");
    assert_eq!(f.tensor("blk.3.ffn_up.weight").unwrap().ggml_type, GgmlType::Q8_0);
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 4);
}

#[test]
fn requantized_tensors_are_quantize_row_of_the_dequantized_source() {
    let dir = scratch_dir("optimize_requant_tiny");
    let source = write_tiny(&dir, 12);
    let src = GgufFile::open(&source).unwrap();
    for (quant, tensors) in [("q8_0", ""), ("q4_0", "token_embd=q8_0,blk.*.attn_v.weight=q8_0")] {
        let out = dir.join(format!("{quant}.gguf"));
        let report = optimize(&opts(&source, &out, None, Some(quant), tensors)).unwrap_or_else(|e| panic!("{e}"));
        assert!(report.notes.iter().any(|n| n.contains("lossy")), "{:?}", report.notes);
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(f.tensors.len(), src.tensors.len());
        let file_type = QuantFormat::from_name(quant).unwrap();
        assert_eq!(f.get_u32("general.file_type").unwrap(), if quant == "q8_0" { 7 } else { 2 });
        for t in &src.tensors {
            let o = f.tensor(&t.name).unwrap();
            let from = t.ggml_type.quant_format().unwrap();
            if t.dims.len() == 1 {
                assert!(o.ggml_type == t.ggml_type && f.tensor_data(o) == src.tensor_data(t), "{} stays", t.name);
                continue;
            }
            let want_format =
                if !tensors.is_empty() && (t.name == "token_embd.weight" || t.name.ends_with("attn_v.weight")) {
                    QuantFormat::Q8_0
                } else {
                    file_type
                };
            assert_eq!(o.ggml_type.quant_format(), Some(want_format), "{}", t.name);
            let want = if from == want_format {
                src.tensor_data(t).to_vec()
            } else {
                let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
                let values = dequantize(from, src.tensor_data(t), rows, cols);
                values.chunks(cols).flat_map(|r| quantize_row(want_format, r)).collect()
            };
            assert!(f.tensor_data(o) == want.as_slice(), "{}: not quantize_row of the dequantized source", t.name);
        }
    }
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let dir = scratch_dir("optimize_bad_input");
    let source = write_tiny(&dir, 13);
    let out = dir.join("out.gguf");
    let cases: [(Option<&str>, Option<&str>, &str, &str); 6] = [
        (None, Some("q9_0"), "", "unknown format \"q9_0\""),
        (None, Some("iq2_xxs"), "", "iq2_xxs is a llama.cpp (ggml) format that kiln cannot produce yet"),
        (None, None, "ffn_dwn=q8_0", "pattern \"ffn_dwn\" matches no matrix"),
        (Some("last:5"), None, "", "last:5 needs at least 6 blocks"),
        (Some("0,1,2,3,4"), None, "", "pruning 5 of 5 blocks leaves no model"),
        (Some("5"), None, "", "block 5 does not exist: the model has 5 blocks (0..=4)"),
    ];
    for (prune, quant, tensors, needle) in cases {
        let e = optimize(&opts(&source, &out, prune, quant, tensors)).expect_err("an error").to_string();
        assert!(e.contains(needle), "{prune:?} {quant:?} {tensors:?}: {e}");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec!["tiny.gguf"], "nothing written");
    }
    let e = TensorRule::parse_list("blk.[0-3].attn_v=q8_0").unwrap_err();
    assert!(e.contains("not supported"), "{e}");
    // An existing --out is refused unless --force, and left as it was.
    std::fs::write(&out, b"the user's file").unwrap();
    let e = optimize(&opts(&source, &out, Some("last:1"), None, "")).expect_err("refused").to_string();
    assert!(e.contains("exists; pass --force to replace it"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the user's file");
    let mut forced = opts(&source, &out, Some("last:1"), None, "");
    forced.force = true;
    optimize(&forced).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(GgufFile::open(&out).unwrap().get_u32("llama.block_count").unwrap(), 4);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "no temporary file left: {left:?}");
}

/// llama.cpp's logits on the real model requantized to q8_0 and pruned by 2 blocks, as kiln
/// wrote it, against kiln's compiled logits on the same file.
///
/// Tolerance: the two engines compute different approximations of the same f32 math. kiln's
/// matmuls take q16 activations (int16 blocks of 32, relative rounding 1/65534), llama.cpp's
/// CPU q8_0 matmuls take q8_0 activations (int8 blocks of 32, relative rounding 1/254), so
/// llama.cpp is the farther from exact math: tests/it/model.rs measures kiln within 0.011 of
/// the f32 reference and llama.cpp about 1.4 away on a similar prompt. Measured on these ids:
/// llama.cpp is 1.38 from the reference on the unmodified source file (top-1 equal at 15/16
/// positions), 1.31 on the file requantized to q8_0 (15/16) and 1.30 on this file (13/16: the
/// pruned model has closer calls), while kiln is 0.009 from it: a mis-written tensor would
/// show as a far larger difference. So: kiln within 0.05 of
/// the reference executor on this file (the bound of tests/it/model.rs), llama.cpp within
/// `LLAMA_TOLERANCE` of kiln, and the same top-1 token wherever the reference's top two differ
/// by more than that bound (closer calls may flip under int8 rounding); the bound, 2.5, is 1.8x
/// llama.cpp's own difference on the unmodified file.
#[test]
fn llama_cpp_loads_an_optimized_real_model_and_agrees_with_kiln() {
    const LLAMA_TOLERANCE: f32 = 2.5;
    let Ok(model) = std::env::var("KILN_MODEL") else {
        tests::harness::not_run("optimize::llama_cpp_loads_an_optimized_real_model", "KILN_MODEL is not set");
        return;
    };
    let dir = scratch_dir("optimize_llama_cpp");
    let small = dir.join("smollm-q8_0-pruned.gguf");
    let report =
        optimize(&opts(Path::new(&model), &small, Some("last:2"), Some("q8_0"), "")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.before.layers, report.after.layers), (30, 28));
    let ids: Vec<u32> = vec![1, 504, 3458, 282, 4649, 314, 253, 5344, 30, 378, 3458, 282, 4649, 314, 2114, 30];
    let ids_text: Vec<String> = ids.iter().map(u32::to_string).collect();
    let logits_path = dir.join("llama.f32");
    let out = std::process::Command::new(python())
        .arg(peer_script("llama_logits.py"))
        .arg(&small)
        .arg(ids_text.join(","))
        .arg(&logits_path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "llama.cpp could not evaluate the optimized GGUF (is llama-cpp-python installed? `cargo xtask test` \
         installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if !info["n_layer"].is_null() {
        assert_eq!(info["n_layer"], 28, "llama.cpp loaded {info}");
    }
    let llama: Vec<f32> = std::fs::read(&logits_path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (_, mut session) = build(&small, &dir.join("bundle"), None, 128);
    let vocab = session.vocab();
    assert_eq!(llama.len(), ids.len() * vocab);
    let kiln = session.eval(&ids, true).unwrap();
    let reference = ReferenceModel::load(&small).unwrap().forward(&ids).unwrap().logits;
    let (kiln_ref, _) = max_diff(&kiln, &reference);
    let (llama_kiln, scale) = max_diff(&llama, &kiln);
    let (llama_ref, _) = max_diff(&llama, &reference);
    let mut agree = 0;
    for (pos, ((k, l), r)) in kiln.chunks(vocab).zip(llama.chunks(vocab)).zip(reference.chunks(vocab)).enumerate() {
        let mut sorted = r.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        assert_eq!(argmax(k), argmax(r), "kiln and the reference differ at position {pos}");
        if argmax(l) == argmax(k) {
            agree += 1;
        } else {
            assert!(margin <= LLAMA_TOLERANCE, "llama.cpp and kiln differ at {pos} where the margin is {margin}");
        }
    }
    eprintln!(
        "max |logit diff|: kiln-reference {kiln_ref:.4}, llama.cpp-kiln {llama_kiln:.4}, llama.cpp-reference \
         {llama_ref:.4} (max |logit| {scale:.1}); llama.cpp top-1 equals kiln's at {agree}/{} positions",
        ids.len()
    );
    assert!(kiln_ref <= 0.05, "kiln is {kiln_ref} from the reference on the optimized file");
    assert!(llama_kiln <= LLAMA_TOLERANCE, "llama.cpp is {llama_kiln} from kiln (bound {LLAMA_TOLERANCE})");
}
