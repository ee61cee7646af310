//! LoRA merge end to end (`--lora`): a random PEFT adapter on a small random model, merged by
//! the build, against the reference executor run on a GGUF whose weights the test merged
//! itself (`W + alpha / r * B A`, with the rotary rows of q/k brought to GGUF order by the
//! test's own index map); a llama.cpp GGUF adapter merged by `optimize` gives the same file
//! as the same adapter written the PEFT way.

use std::path::{Path, PathBuf};

use compiler::bundle::{build_model, BuildOptions};
use compiler::gguf::{GgmlType, GgufFile, GgufWriter};
use compiler::lora::testing::{gguf_adapter, write_peft};
use compiler::optimize::{optimize, OptimizeOptions};
use ir::quant::dequantize;
use ir::QuantFormat;
use runtime::session::Session;
use tests::harness::{max_diff, scratch_dir, tiny_llama_gguf_with_tokenizer, Rng, TinyLlama};
use tests::reference::ReferenceModel;

fn cfg(format: QuantFormat) -> TinyLlama {
    TinyLlama {
        n_layers: 2,
        d_model: 64,
        d_ff: 96,
        n_heads: 4,
        n_kv_heads: 2,
        vocab: 40,
        context: 64,
        format,
        tied: true,
    }
}

const RANK: usize = 3;
const ALPHA: f32 = 6.0;

/// `(hf module, gguf tensor, rows, cols, rotary heads)` for every projection of both layers.
fn modules(c: &TinyLlama) -> Vec<(String, String, usize, usize, Option<usize>)> {
    let (d, ff, kv) = (c.d_model as usize, c.d_ff as usize, (c.n_kv_heads * (c.d_model / c.n_heads)) as usize);
    let mut out = vec![];
    for l in 0..c.n_layers {
        for (hf, gg, rows, cols, heads) in [
            ("self_attn.q_proj", "attn_q", d, d, Some(c.n_heads as usize)),
            ("self_attn.k_proj", "attn_k", kv, d, Some(c.n_kv_heads as usize)),
            ("self_attn.v_proj", "attn_v", kv, d, None),
            ("self_attn.o_proj", "attn_output", d, d, None),
            ("mlp.gate_proj", "ffn_gate", ff, d, None),
            ("mlp.up_proj", "ffn_up", ff, d, None),
            ("mlp.down_proj", "ffn_down", d, ff, None),
        ] {
            out.push((format!("model.layers.{l}.{hf}"), format!("blk.{l}.{gg}.weight"), rows, cols, heads));
        }
    }
    out
}

/// The Hugging Face row of GGUF row `g` of a projection with `heads` rotary heads: GGUF keeps
/// the pair (x_j, y_j) of head h at rows 2j, 2j + 1; Hugging Face keeps x at j, y at j + hd/2.
fn hf_row(g: usize, rows: usize, heads: usize) -> usize {
    let hd = rows / heads;
    let (h, within) = (g / hd, g % hd);
    h * hd + (within % 2) * (hd / 2) + within / 2
}

struct Update {
    a: Vec<f32>,
    b_gguf: Vec<f32>,
    b_hf: Vec<f32>,
}

fn random_updates(c: &TinyLlama, rng: &mut Rng) -> Vec<Update> {
    modules(c)
        .iter()
        .map(|(_, _, rows, cols, heads)| {
            let a = rng.vec(RANK * cols, 0.2);
            let b_gguf = rng.vec(rows * RANK, 0.2);
            let mut b_hf = vec![0.0; b_gguf.len()];
            for g in 0..*rows {
                let h = heads.map_or(g, |n| hf_row(g, *rows, n));
                b_hf[h * RANK..(h + 1) * RANK].copy_from_slice(&b_gguf[g * RANK..(g + 1) * RANK]);
            }
            Update { a, b_gguf, b_hf }
        })
        .collect()
}

/// The source model with every projection replaced by `W + alpha / r * B A` in f64, as F32.
fn merged_gguf(source: &Path, c: &TinyLlama, updates: &[Update]) -> Vec<u8> {
    let src = GgufFile::open(source).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        w.add_meta(k, v.clone());
    }
    let mods = modules(c);
    for t in &src.tensors {
        match mods.iter().position(|m| m.1 == t.name) {
            Some(i) => {
                let (rows, cols) = (mods[i].2, mods[i].3);
                let format = t.ggml_type.quant_format().unwrap();
                let base = dequantize(format, src.tensor_data(t), rows, cols);
                let u = &updates[i];
                let mut bytes = vec![];
                for r in 0..rows {
                    for col in 0..cols {
                        let delta: f64 =
                            (0..RANK).map(|k| u.b_gguf[r * RANK + k] as f64 * u.a[k * cols + col] as f64).sum();
                        let v = base[r * cols + col] as f64 + (ALPHA / RANK as f32) as f64 * delta;
                        bytes.extend((v as f32).to_le_bytes());
                    }
                }
                w.add_tensor(&t.name, &t.dims, GgmlType::F32, &bytes);
            }
            None => {
                w.add_tensor(&t.name, &t.dims, t.ggml_type, src.tensor_data(t));
            }
        }
    }
    w.finish()
}

fn build(model: &Path, out: &Path, lora: Vec<PathBuf>) -> Session {
    let opts = BuildOptions {
        context: Some(64),
        batch: 16,
        shared_linker: Some("cc".into()),
        lora,
        ..BuildOptions::new(
            model.to_path_buf(),
            targets::host_triple().expect("a supported host").to_string(),
            out.to_path_buf(),
        )
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
    Session::open_shared(&out.join("lib/libkiln_model.so"), out, 2).unwrap_or_else(|e| panic!("{e}"))
}

fn write_adapter(dir: &Path, c: &TinyLlama, updates: &[Update]) {
    let mods = modules(c);
    let list: Vec<(&str, &[f32], &[f32], usize, usize)> =
        mods.iter().zip(updates).map(|(m, u)| (m.0.as_str(), &u.a[..], &u.b_hf[..], m.2, m.3)).collect();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    });
    write_peft(dir, &config, RANK, &list);
}

#[test]
fn a_merged_peft_adapter_matches_the_reference_on_the_explicit_sum() {
    let dir = scratch_dir("lora_peft");
    let c = cfg(QuantFormat::F32);
    let mut rng = Rng::new(31);
    let source = dir.join("base.gguf");
    std::fs::write(&source, tiny_llama_gguf_with_tokenizer(&c, &mut rng)).unwrap();
    let updates = random_updates(&c, &mut rng);
    let adapter = dir.join("adapter");
    write_adapter(&adapter, &c, &updates);
    let merged = dir.join("merged.gguf");
    std::fs::write(&merged, merged_gguf(&source, &c, &updates)).unwrap();

    let mut session = build(&source, &dir.join("bundle"), vec![adapter.clone()]);
    let mut base = build(&source, &dir.join("bundle-base"), vec![]);
    let reference = ReferenceModel::load(&merged).unwrap();
    let vocab = session.vocab();
    for len in [1usize, 9, 20] {
        let ids: Vec<u32> = (0..len).map(|_| rng.below(vocab as u64) as u32).collect();
        session.reset();
        base.reset();
        let got = session.eval(&ids, true).unwrap();
        let want = reference.forward(&ids).unwrap().logits;
        let (diff, scale) = max_diff(&got, &want);
        // As in tests/it/model.rs: q16 activations against f32 math.
        assert!(diff <= 2e-3 * scale.max(1.0), "{len} tokens: logits differ by {diff} (scale {scale})");
        // The adapter changed the model far more than that.
        let (moved, _) = max_diff(&base.eval(&ids, true).unwrap(), &want);
        assert!(moved > 50.0 * diff.max(1e-4), "{len} tokens: the adapter moved the logits by only {moved}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bundle/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["compile_options"]["lora"][0]["tensors"], 14);
}

#[test]
fn gguf_and_peft_adapters_merge_to_the_same_model_and_bad_ones_are_refused() {
    let dir = scratch_dir("lora_gguf");
    let c = cfg(QuantFormat::Q8_0);
    let mut rng = Rng::new(32);
    let source = dir.join("base.gguf");
    std::fs::write(&source, tiny_llama_gguf_with_tokenizer(&c, &mut rng)).unwrap();
    let updates = random_updates(&c, &mut rng);
    let peft = dir.join("peft");
    write_adapter(&peft, &c, &updates);
    let mods = modules(&c);
    let list: Vec<(&str, &[f32], &[f32], usize, usize, usize)> =
        mods.iter().zip(&updates).map(|(m, u)| (m.1.as_str(), &u.a[..], &u.b_gguf[..], m.2, m.3, RANK)).collect();
    let gguf = dir.join("adapter.gguf");
    std::fs::write(&gguf, gguf_adapter(ALPHA, &list)).unwrap();
    let opt = |lora: &Path, out: &str| OptimizeOptions {
        model: source.clone(),
        out: dir.join(out),
        force: false,
        prune: None,
        quant: Default::default(),
        lora: vec![lora.to_path_buf()],
    };
    optimize(&opt(&peft, "from-peft.gguf")).unwrap_or_else(|e| panic!("{e}"));
    let report = optimize(&opt(&gguf, "from-gguf.gguf")).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.notes.iter().any(|n| n.contains("14 tensors updated") && n.contains("lossy")), "{:?}", report.notes);
    let (a, b) =
        (std::fs::read(dir.join("from-peft.gguf")).unwrap(), std::fs::read(dir.join("from-gguf.gguf")).unwrap());
    assert!(a == b, "the two adapter formats merge to the same file");
    assert!(a != std::fs::read(&source).unwrap());

    // An adapter for another model: a module the model lacks, and shapes that differ.
    let other = cfg(QuantFormat::Q8_0);
    let bigger = TinyLlama { n_layers: 3, d_ff: 128, ..other };
    let wrong = dir.join("wrong");
    write_adapter(&wrong, &bigger, &random_updates(&bigger, &mut rng));
    let e = optimize(&opt(&wrong, "wrong.gguf")).expect_err("a mismatched adapter").to_string();
    assert!(
        e.contains("merge_lora") && (e.contains("does not have") || e.contains("but the adapter's update is")),
        "{e}"
    );
    assert!(!dir.join("wrong.gguf").exists(), "nothing written");
    let e = optimize(&opt(&dir.join("missing"), "missing.gguf")).expect_err("no adapter").to_string();
    assert!(e.contains("LoRA adapter") && e.contains("missing"), "{e}");
}
