//! Llama 3.x rotary scaling (`rope_type: "llama3"` and `linear`), from a Hugging Face
//! checkpoint's `config.json` and from GGUF (llama.cpp's `rope_freqs.weight` tensor of
//! per-pair divisors; `rope.scaling.type = linear` with `rope.scaling.factor`).
//!
//! A small random Llama with head_dim 16 is compiled from each source, and its logits, in
//! prefill and in decode, are compared with an independent float64 forward pass written
//! here (weights read straight from the GGUF file) that applies the scaling as transformers'
//! and llama.cpp's converters describe it. The same pass without scaling must disagree by a
//! clear margin (`original_max_position_embeddings` is 64, so over 56 positions the scaled
//! pairs turn visibly slower), so the comparison can tell a build that ignored the scaling.
//! llama.cpp (llama-cpp-python) loads the same GGUF files and must agree with the float64
//! pass too: kiln reads `rope_freqs.weight` and linear scaling as llama.cpp does.
//! Bad `rope_scaling` values are refused naming the key, with nothing written.

use std::path::Path;
use std::process::Command;

use compiler::bundle::{build_model, BuildOptions};
use compiler::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};
use ir::QuantFormat;
use runtime::session::Session;
use serde_json::{json, Value};
use tests::harness::{
    max_diff, peer_script, python, scratch_dir, tiny_llama_float_writer, to_checkpoint, Rng, TinyLlama,
};

const CONTEXT: u32 = 64;

fn cfg() -> TinyLlama {
    TinyLlama {
        n_layers: 2,
        d_model: 64,
        d_ff: 72,
        n_heads: 4,
        n_kv_heads: 2,
        vocab: 40,
        context: CONTEXT,
        format: QuantFormat::F32,
        tied: false,
    }
}

const HEAD_DIM: usize = 16;
const THETA: f64 = 10000.0;
/// The Llama 3.1 parameters, with a small original context so that over a 64-position test
/// the scaled pairs matter: factor, low_freq_factor, high_freq_factor, original context.
const LLAMA3: (f64, f64, f64, f64) = (8.0, 1.0, 4.0, 64.0);

/// Llama 3.1's per-pair frequency divisors, as llama.cpp's converter computes the
/// `rope_freqs.weight` it writes (and transformers divides `inv_freq` by): pairs whose
/// wavelength is beyond `original / low` are divided by `factor`, those below
/// `original / high` kept, those between blended smoothly.
fn llama3_divisors() -> Vec<f64> {
    let (factor, low, high, original) = LLAMA3;
    (0..HEAD_DIM / 2)
        .map(|i| {
            let freq = 1.0 / THETA.powf((2 * i) as f64 / HEAD_DIM as f64);
            let wavelength = 2.0 * std::f64::consts::PI / freq;
            if wavelength < original / high {
                1.0
            } else if wavelength > original / low {
                factor
            } else {
                let smooth = (original / wavelength - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

fn options(model: &Path, out: &Path) -> BuildOptions {
    BuildOptions {
        context: Some(CONTEXT),
        batch: 16,
        shared_linker: Some("cc".into()),
        ..BuildOptions::new(
            model.to_path_buf(),
            targets::host_triple().expect("a supported host").to_string(),
            out.to_path_buf(),
        )
    }
}

fn build(model: &Path, out: &Path) {
    build_model(&options(model, out), &mut |_| {}).unwrap_or_else(|e| panic!("building {}: {e}", model.display()));
}

/// The float64 forward pass: logits `[ids.len(), vocab]`, pair `i` of every head turned by
/// `pos * theta^(-2i / head_dim) / divisors[i]` (GGUF's adjacent-pair layout).
fn forward_f64(gguf: &Path, ids: &[u32], divisors: &[f64]) -> Vec<f32> {
    let file = GgufFile::open(gguf).unwrap();
    let c = cfg();
    let t = |name: &str| -> Vec<f64> {
        let info = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.ggml_type, GgmlType::F32, "{name}");
        file.tensor_data(info).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
    };
    let (d, ff, nh, nkv, vocab) =
        (c.d_model as usize, c.d_ff as usize, c.n_heads as usize, c.n_kv_heads as usize, c.vocab as usize);
    let (hd, n) = (HEAD_DIM, ids.len());
    let kvw = nkv * hd;
    let matvec = |w: &[f64], x: &[f64], rows: usize| -> Vec<f64> {
        let cols = x.len();
        (0..rows).map(|r| w[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| a * b).sum()).collect()
    };
    let rms = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + 1e-5).sqrt();
        x.iter().zip(w).map(|(v, g)| v * r * g).collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let angle = pos as f64 * THETA.powf(-2.0 * i as f64 / hd as f64) / divisors[i];
                let (s, co) = angle.sin_cos();
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * co - b * s;
                head[2 * i + 1] = b * co + a * s;
            }
        }
    };
    let embd = t("token_embd.weight");
    let mut h: Vec<Vec<f64>> = ids.iter().map(|&id| embd[id as usize * d..(id as usize + 1) * d].to_vec()).collect();
    for l in 0..c.n_layers {
        let w = |n: &str| t(&format!("blk.{l}.{n}.weight"));
        let (wq, wk, wv, wo) = (w("attn_q"), w("attn_k"), w("attn_v"), w("attn_output"));
        let (an, fnorm, gate, up, down) = (w("attn_norm"), w("ffn_norm"), w("ffn_gate"), w("ffn_up"), w("ffn_down"));
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in h.iter().enumerate() {
            let m = rms(x, &an);
            let (mut q, mut k) = (matvec(&wq, &m, d), matvec(&wk, &m, kvw));
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &m, kvw));
        }
        for pos in 0..n {
            let mut attn = vec![0.0; d];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        q.iter().zip(&ks[j][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for (o, v) in attn[head * hd..(head + 1) * hd].iter_mut().zip(&vs[j][kvh * hd..(kvh + 1) * hd]) {
                        *o += p / sum * v;
                    }
                }
            }
            let o = matvec(&wo, &attn, d);
            h[pos].iter_mut().zip(o).for_each(|(x, y)| *x += y);
            let m = rms(&h[pos], &fnorm);
            let (g, u) = (matvec(&gate, &m, ff), matvec(&up, &m, ff));
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let y = matvec(&down, &act, d);
            h[pos].iter_mut().zip(y).for_each(|(x, y)| *x += y);
        }
    }
    let (norm, out) = (t("output_norm.weight"), t("output.weight"));
    h.iter().flat_map(|x| matvec(&out, &rms(x, &norm), vocab)).map(|v| v as f32).collect()
}

/// Logits of `ids` from a bundle: the first 40 in one prefill call, then one token per call
/// (decode), all `[ids.len(), vocab]`.
fn bundle_logits(bundle: &Path, ids: &[u32]) -> Vec<f32> {
    let mut s = Session::open_shared(&bundle.join("lib/libkiln_model.so"), bundle, 2).unwrap_or_else(|e| panic!("{e}"));
    let mut logits = s.eval(&ids[..40], true).unwrap();
    for &id in &ids[40..] {
        logits.extend(s.eval(&[id], false).unwrap());
    }
    logits
}

/// The tiny model's GGUF with `extra` metadata and tensors added; the same weights for a seed.
fn gguf_with(path: &Path, seed: u64, extra: impl FnOnce(&mut GgufWriter)) {
    let mut w = tiny_llama_float_writer(&cfg(), &mut Rng::new(seed));
    // A pre-tokenizer llama.cpp knows too (it refuses "gpt2"), so that it can load the file.
    w.set_meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()));
    extra(&mut w);
    std::fs::write(path, w.finish()).unwrap();
}

fn f32_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

fn manifest(bundle: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap()
}

fn llama3_config() -> Value {
    let (factor, low, high, original) = LLAMA3;
    json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original as u32,
    })
}

#[test]
fn llama3_rope_scaling_compiles_from_safetensors_and_gguf_and_matches_a_float64_pass() {
    let dir = scratch_dir("llama3/scaling");
    let seed = 31;
    let divisors = llama3_divisors();
    // The scaling changes some pairs and keeps others: pair 0 is kept, the last is divided.
    assert_eq!(divisors[0], 1.0);
    assert_eq!(divisors[HEAD_DIM / 2 - 1], LLAMA3.0);
    assert!(divisors.iter().any(|&d| d > 1.0 && d < LLAMA3.0), "a blended pair: {divisors:?}");

    let plain = dir.join("plain.gguf");
    gguf_with(&plain, seed, |_| {});
    let plain_bundle = dir.join("bundle-plain");
    build(&plain, &plain_bundle);

    // llama.cpp's converter's form: rope_freqs.weight, no rope.scaling.type.
    let freqs = dir.join("llama3.gguf");
    gguf_with(&freqs, seed, |w| {
        w.add_tensor("rope_freqs.weight", &[HEAD_DIM as u64 / 2], GgmlType::F32, &f32_bytes(&divisors));
    });
    let freqs_bundle = dir.join("bundle-gguf-llama3");
    build(&freqs, &freqs_bundle);

    // Linear scaling in GGUF metadata.
    let linear = dir.join("linear.gguf");
    gguf_with(&linear, seed, |w| {
        w.add_meta("llama.rope.scaling.type", MetaValue::String("linear".into()));
        w.add_meta("llama.rope.scaling.factor", MetaValue::F32(4.0));
    });
    let linear_bundle = dir.join("bundle-gguf-linear");
    build(&linear, &linear_bundle);

    // The same weights as a checkpoint whose config.json has Llama 3.1's rope_scaling (and an
    // explicit, consistent head_dim), and one with linear scaling under the legacy "type" key.
    let hf = dir.join("hf");
    to_checkpoint(&plain, &plain_bundle, &hf, &[]);
    edit_config(&hf, |c| {
        c.insert("rope_scaling".into(), llama3_config());
        c.insert("head_dim".into(), json!(HEAD_DIM));
    });
    let hf_bundle = dir.join("bundle-hf-llama3");
    build(&hf, &hf_bundle);
    let hf_linear = dir.join("hf-linear");
    to_checkpoint(&plain, &plain_bundle, &hf_linear, &[]);
    edit_config(&hf_linear, |c| {
        c.insert("rope_scaling".into(), json!({ "type": "linear", "factor": 4.0 }));
    });
    let hf_linear_bundle = dir.join("bundle-hf-linear");
    build(&hf_linear, &hf_linear_bundle);

    let hyper = |b: &Path| manifest(b)["model"]["hyperparameters"].clone();
    assert!(hyper(&plain_bundle).get("rope_scaling").is_none(), "no scaling, no manifest entry");
    assert_eq!(hyper(&hf_bundle)["rope_scaling"]["type"], "llama3");
    assert_eq!(hyper(&hf_bundle)["rope_scaling"]["original_max_position_embeddings"], 64);
    assert_eq!(hyper(&freqs_bundle)["rope_scaling"]["type"], "divisors");
    assert_eq!(hyper(&linear_bundle)["rope_scaling"], json!({ "type": "linear", "factor": 4.0 }));
    let kir = |b: &Path| std::fs::read_to_string(b.join("model.kir")).unwrap();
    assert!(!kir(&plain_bundle).contains("scaling="));
    assert!(
        kir(&hf_bundle).contains(" scaling=llama3 factor=8 low_freq_factor=1 high_freq_factor=4 original_context=64")
    );
    assert!(kir(&freqs_bundle).contains(" scaling=divisors ["));

    let mut rng = Rng::new(5);
    let ids: Vec<u32> = (0..56).map(|_| rng.below(cfg().vocab as u64) as u32).collect();
    let want_plain = forward_f64(&plain, &ids, &[1.0; HEAD_DIM / 2]);
    let want_llama3 = forward_f64(&plain, &ids, &divisors);
    let want_linear = forward_f64(&plain, &ids, &[4.0; HEAD_DIM / 2]);
    // The passes with and without scaling disagree clearly: the test can tell.
    let (apart, scale) = max_diff(&want_llama3, &want_plain);
    assert!(apart > 0.05 * scale, "llama3 scaling changes the logits by only {apart} (scale {scale})");
    let (apart, scale) = max_diff(&want_linear, &want_plain);
    assert!(apart > 0.05 * scale, "linear scaling changes the logits by only {apart} (scale {scale})");

    for (bundle, want, name) in [
        (&plain_bundle, &want_plain, "no scaling"),
        (&freqs_bundle, &want_llama3, "GGUF rope_freqs.weight"),
        (&hf_bundle, &want_llama3, "config.json llama3"),
        (&linear_bundle, &want_linear, "GGUF linear"),
        (&hf_linear_bundle, &want_linear, "config.json linear"),
    ] {
        let got = bundle_logits(bundle, &ids);
        let (diff, scale) = max_diff(&got, want);
        assert!(diff <= 1e-4 * scale.max(1.0), "{name}: logits differ from the float64 pass by {diff} (scale {scale})");
        if name != "no scaling" {
            let (diff, scale) = max_diff(&got, &want_plain);
            assert!(diff > 0.05 * scale, "{name}: the logits are those without scaling ({diff}, scale {scale})");
        }
    }

    // llama.cpp itself reads the GGUF files the same way: its logits agree with the float64
    // pass with the scaling (and so with kiln's), not with the one without.
    for (gguf, want, name) in [
        (&plain, &want_plain, "no scaling"),
        (&freqs, &want_llama3, "rope_freqs.weight"),
        (&linear, &want_linear, "linear"),
    ] {
        let got = llama_cpp_logits(gguf, &ids, &dir);
        let (diff, scale) = max_diff(&got, want);
        assert!(diff <= 1e-3 * scale.max(1.0), "llama.cpp, {name}: {diff} from the float64 pass (scale {scale})");
        if name != "no scaling" {
            let (diff, scale) = max_diff(&got, &want_plain);
            assert!(diff > 0.05 * scale, "llama.cpp, {name}: the logits are those without scaling ({diff})");
        }
    }
}

/// llama.cpp's logits of `ids` on `gguf` (`tests/peer/llama_logits.py`, llama-cpp-python).
fn llama_cpp_logits(gguf: &Path, ids: &[u32], dir: &Path) -> Vec<f32> {
    let out = dir.join("llama-cpp.f32");
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    let (python, script) = (python(), peer_script("llama_logits.py"));
    let result = Command::new(&python)
        .arg(&script)
        .arg(gguf)
        .arg(list.join(","))
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("running {python} {}: {e}", script.display()));
    assert!(
        result.status.success(),
        "llama_logits.py failed ({}); is {} installed (`cargo xtask test` installs it)? stderr:\n{}",
        result.status,
        peers::LLAMA_CPP_PYTHON,
        String::from_utf8_lossy(&result.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len(), ids.len() * cfg().vocab as usize * 4, "llama.cpp's logits");
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn bad_rope_scaling_is_refused_naming_the_key() {
    let dir = scratch_dir("llama3/bad");
    let plain = dir.join("plain.gguf");
    gguf_with(&plain, 3, |_| {});
    let plain_bundle = dir.join("bundle-plain");
    build(&plain, &plain_bundle);
    let hf = dir.join("hf");
    to_checkpoint(&plain, &plain_bundle, &hf, &[]);
    let original = std::fs::read(hf.join("config.json")).unwrap();

    let refused = |model: &Path, what: &str, needle: &str| {
        let out = dir.join("out");
        let err = build_model(&options(model, &out), &mut |_| {}).err().unwrap_or_else(|| panic!("{what}: built"));
        let msg = err.to_string();
        assert!(msg.contains(needle), "{what}: {msg:?} does not name {needle:?}");
        assert!(!out.exists(), "{what}: something was written");
    };
    let llama3_without = |field: &str| {
        let mut v = llama3_config();
        v.as_object_mut().unwrap().remove(field);
        v
    };
    let mut inverted = llama3_config();
    inverted["low_freq_factor"] = json!(4.0);
    inverted["high_freq_factor"] = json!(1.0);
    let mut negative = llama3_config();
    negative["factor"] = json!(-8.0);
    for (scaling, needle) in [
        (json!({ "rope_type": "yarn", "factor": 4.0 }), "rope_scaling.rope_type"),
        (json!({ "type": "dynamic", "factor": 4.0 }), "rope_scaling.type"),
        (json!({ "factor": 4.0 }), "rope_scaling"),
        (json!("llama3"), "rope_scaling"),
        (llama3_without("low_freq_factor"), "rope_scaling.low_freq_factor"),
        (llama3_without("original_max_position_embeddings"), "rope_scaling.original_max_position_embeddings"),
        (inverted, "rope_scaling.low_freq_factor"),
        (negative, "rope_scaling.factor"),
        (json!({ "rope_type": "linear" }), "rope_scaling.factor"),
    ] {
        std::fs::write(hf.join("config.json"), &original).unwrap();
        edit_config(&hf, |c| {
            c.insert("rope_scaling".into(), scaling.clone());
        });
        refused(&hf, &format!("config.json rope_scaling {scaling}"), needle);
    }
    std::fs::write(hf.join("config.json"), &original).unwrap();
    edit_config(&hf, |c| {
        c.insert("head_dim".into(), json!(32));
    });
    refused(&hf, "an inconsistent head_dim", "config.json head_dim");

    let bad = dir.join("bad.gguf");
    gguf_with(&bad, 3, |w| {
        w.add_meta("llama.rope.scaling.type", MetaValue::String("yarn".into()));
        w.add_meta("llama.rope.scaling.factor", MetaValue::F32(4.0));
    });
    refused(&bad, "GGUF yarn", "YaRN");
    gguf_with(&bad, 3, |w| {
        w.add_meta("llama.rope.scaling.type", MetaValue::String("none".into()));
        w.add_meta("llama.rope.scaling.factor", MetaValue::F32(4.0));
    });
    refused(&bad, "GGUF factor with type none", "llama.rope.scaling.factor");
    gguf_with(&bad, 3, |w| {
        w.add_tensor("rope_freqs.weight", &[4], GgmlType::F32, &f32_bytes(&[1.0; 4]));
    });
    refused(&bad, "GGUF rope_freqs of the wrong length", "rope_freqs.weight");
    gguf_with(&bad, 3, |w| {
        w.add_tensor("rope_freqs.weight", &[8], GgmlType::F32, &f32_bytes(&[1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]));
    });
    refused(&bad, "GGUF rope_freqs with a zero", "rope_freqs.weight");
}

/// A Llama-3-shaped checkpoint in `dir` with the real Llama 3.1 tokenizer files (fetched into
/// kiln's cache by `cargo xtask test`, [`peers::ensure_llama3_tokenizer`]), Llama 3.1's
/// `rope_scaling` and `generation_config.json`, and random weights planted so that greedy
/// decoding always picks `planted`: every embedding row has 1 in dimension 0 (the residual
/// stays dominated by it) and only the head's row `planted` reads that dimension strongly.
fn llama3_tokenizer_checkpoint(dir: &Path, planted: u32) {
    let files = peers::llama3_tokenizer_dir();
    assert!(
        files.join("tokenizer.json").is_file(),
        "the Llama 3.1 tokenizer files are not in {}: `cargo xtask test` fetches them ({})",
        files.display(),
        peers::LLAMA3_TOKENIZER_PACKAGE
    );
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(files.join(f), dir.join(f)).unwrap();
    }
    let (vocab, d, ff, heads, kv) = (128_256usize, 32usize, 32usize, 2usize, 1usize);
    let hd = d / heads;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": 1,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": { "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192 },
        "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let generation = json!({ "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009] });
    std::fs::write(dir.join("generation_config.json"), serde_json::to_vec(&generation).unwrap()).unwrap();

    let mut rng = Rng::new(planted as u64);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
    let mut embed = rng.vec(vocab * d, 0.02);
    embed.chunks_mut(d).for_each(|row| row[0] = 1.0);
    tensors.push(("model.embed_tokens.weight".into(), vec![vocab, d], embed));
    let mut head = rng.vec(vocab * d, 0.02);
    head[planted as usize * d] = 5.0;
    tensors.push(("lm_head.weight".into(), vec![vocab, d], head));
    tensors.push(("model.norm.weight".into(), vec![d], vec![1.0; d]));
    let l = "model.layers.0";
    for (name, rows, cols) in [
        ("self_attn.q_proj", d, d),
        ("self_attn.k_proj", kv * hd, d),
        ("self_attn.v_proj", kv * hd, d),
        ("self_attn.o_proj", d, d),
        ("mlp.gate_proj", ff, d),
        ("mlp.up_proj", ff, d),
        ("mlp.down_proj", d, ff),
    ] {
        tensors.push((format!("{l}.{name}.weight"), vec![rows, cols], rng.vec(rows * cols, 0.02)));
    }
    for name in ["input_layernorm", "post_attention_layernorm"] {
        tensors.push((format!("{l}.{name}.weight"), vec![d], vec![1.0; d]));
    }
    // safetensors: an 8-byte header length, the JSON header, the data.
    let (mut header, mut offset) = (serde_json::Map::new(), 0usize);
    for (name, shape, values) in &tensors {
        let end = offset + values.len() * 4;
        header.insert(name.clone(), json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).unwrap();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text);
    tensors.iter().for_each(|(_, _, values)| values.iter().for_each(|v| bytes.extend(v.to_le_bytes())));
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

/// Strings that exercise Llama 3's pre-tokenizer: kiln's tricky set, numbers, contractions,
/// whitespace runs, scripts and emoji, special tokens written in the text, random strings.
fn tricky_strings() -> Vec<String> {
    let mut strings: Vec<String> = crate::tokenizer::TRICKY.iter().map(|s| s.to_string()).collect();
    strings.extend(
        [
            "12345678",
            "1234567890123 and 3.14159265 or 1,000,000,000",
            "I'm sure you're right, they'll say we've done what she'd've DONE, isn't it?",
            "don't DON'T Don't 'quoted' \"double\"",
            "  multiple   spaces\t\ttabs\n\n\nnewlines \n \n",
            "   \n\n   leading whitespace runs",
            "trailing runs   \n\n   ",
            "héllo wörld naïve café — “quotes” 日本語のテキスト 中文 한국어 Привет мир",
            "emoji 🎉👍🏽👨‍👩‍👧 and ZWJ, ﬁ ligature, \u{00a0}nbsp, \u{200b}zero-width",
            "<|begin_of_text|>Hello<|eot_id|>",
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
            "<|eot_id|><|eot_id|>text<|end_of_text|>",
            "fn main() { println!(\"{}\", x + 1); } // code\n\tindent",
        ]
        .map(String::from),
    );
    let mut rng = Rng::new(9);
    strings.extend((0..200).map(|_| crate::tokenizer::random_string(&mut rng)));
    strings
}

#[test]
fn llama3_tokenizer_chat_template_and_end_of_turn() {
    use runtime::chat_template::Message;
    use runtime::sampling::SamplerConfig;
    use runtime::session::StopReason;

    let dir = scratch_dir("llama3/tokenizer");
    let (eot, eom, end_of_text, hello) = (128_009u32, 128_008u32, 128_001u32, 9906u32);
    let (hf, bundle) = (dir.join("hf-eot"), dir.join("bundle-eot"));
    llama3_tokenizer_checkpoint(&hf, eot);
    build(&hf, &bundle);
    let m = manifest(&bundle);
    let mut s =
        Session::open_shared(&bundle.join("lib/libkiln_model.so"), &bundle, 2).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.tokenizer().token_to_id("Hello"), Some(hello));
    assert_eq!(s.tokenizer().token_to_id("<|eot_id|>"), Some(eot));
    let stops = m["tokenizer"]["stop_ids"].as_array().unwrap_or_else(|| panic!("stop ids in {}", m["tokenizer"]));
    for id in [end_of_text, eom, eot] {
        assert!(stops.contains(&json!(id)), "{id} is not a stop id: {stops:?}");
    }

    // Token ids against the `tokenizers` package on the same tokenizer.json.
    let strings = tricky_strings();
    let want = crate::tokenizer::peer_tokenize("hf_tokenize.py", &hf.join("tokenizer.json"), &strings, "tokenizers");
    for (text, want) in strings.iter().zip(&want) {
        // The one deliberate difference: a text that starts with <|begin_of_text|> gets no
        // second one from kiln (transformers' post-processor adds it regardless).
        let want = if want.starts_with(&[128_000, 128_000]) { &want[1..] } else { &want[..] };
        assert_eq!(s.tokenize(text).unwrap(), want, "{text:?}");
    }

    // The real template renders a turn; the prompt has one <|begin_of_text|>.
    let chat = [Message::new("user", "What is 2+2?")];
    assert_eq!(
        s.render_chat(&chat).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let prompt = s.chat_ids(&chat).unwrap();
    assert_eq!(prompt[..2], [128_000, 128_006], "{prompt:?}");
    assert_eq!(prompt.iter().filter(|&&t| t == 128_000).count(), 1, "{prompt:?}");
    assert_eq!(prompt[prompt.len() - 4..], [128_006, 78191, 128_007, 271], "{prompt:?}");

    // A model that always answers <|eot_id|> stops at once; one that always answers "Hello"
    // runs to max_tokens (so the stop is the end-of-turn id's doing).
    let (_, stats) = s.generate(&prompt, 8, &SamplerConfig::greedy(), |_| {}).unwrap();
    assert_eq!(stats.stopped_by, StopReason::StopToken);
    let (hf, bundle) = (dir.join("hf-hello"), dir.join("bundle-hello"));
    llama3_tokenizer_checkpoint(&hf, hello);
    build(&hf, &bundle);
    let mut s =
        Session::open_shared(&bundle.join("lib/libkiln_model.so"), &bundle, 2).unwrap_or_else(|e| panic!("{e}"));
    let mut text = String::new();
    let (ids, stats) = s.generate(&prompt, 8, &SamplerConfig::greedy(), |t| text.push_str(t)).unwrap();
    assert_eq!(stats.stopped_by, StopReason::MaxTokens);
    assert_eq!(ids, vec![hello; 8]);
    assert_eq!(text, "Hello".repeat(8));
}

/// The real Llama 3.1 vocabulary as GGUF metadata (as llama.cpp's converter writes it:
/// `tokenizer.ggml.pre = llama-bpe`, special added tokens CONTROL) on a small random model:
/// kiln's tokenizer built from the GGUF gives llama.cpp's ids on that GGUF and the ids of
/// the `tokenizers` package on the original `tokenizer.json`.
#[test]
fn llama3_gguf_tokenizer_matches_llama_cpp_and_tokenizers() {
    let files = peers::llama3_tokenizer_dir();
    assert!(
        files.join("tokenizer.json").is_file(),
        "the Llama 3.1 tokenizer files are not in {}: `cargo xtask test` fetches them ({})",
        files.display(),
        peers::LLAMA3_TOKENIZER_PACKAGE
    );
    let dir = scratch_dir("llama3/gguf-tokenizer");
    let t: Value = serde_json::from_slice(&std::fs::read(files.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = 128_256usize;
    let mut tokens = vec![String::new(); vocab];
    let mut types = vec![1i32; vocab];
    for (tok, id) in t["model"]["vocab"].as_object().unwrap() {
        tokens[id.as_u64().unwrap() as usize] = tok.clone();
    }
    for a in t["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = a["content"].as_str().unwrap().to_string();
        types[id] = if a["special"].as_bool().unwrap() { 3 } else { 4 };
    }
    assert!(tokens.iter().all(|t| !t.is_empty()), "every id has a token");
    let merges: Vec<MetaValue> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => MetaValue::String(s.clone()),
            Value::Array(p) => MetaValue::String(format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())),
            other => panic!("merge {other}"),
        })
        .collect();
    let cfg = TinyLlama {
        n_layers: 1,
        d_model: 32,
        d_ff: 32,
        n_heads: 2,
        n_kv_heads: 1,
        vocab: vocab as u32,
        context: CONTEXT,
        format: QuantFormat::F32,
        tied: true,
    };
    let mut w = tiny_llama_float_writer(&cfg, &mut Rng::new(1));
    w.set_meta("tokenizer.ggml.pre", MetaValue::String("llama-bpe".into()));
    w.set_meta("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()));
    w.set_meta("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()));
    w.set_meta("tokenizer.ggml.merges", MetaValue::Array(merges));
    w.set_meta("tokenizer.ggml.bos_token_id", MetaValue::U32(128_000));
    w.set_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(128_009));
    w.set_meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
    let gguf = dir.join("llama3-vocab.gguf");
    std::fs::write(&gguf, w.finish()).unwrap();
    let bundle = dir.join("bundle");
    build(&gguf, &bundle);
    let s = Session::open_shared(&bundle.join("lib/libkiln_model.so"), &bundle, 1).unwrap_or_else(|e| panic!("{e}"));

    let strings = tricky_strings();
    let llama_cpp = crate::tokenizer::peer_tokenize("llama_tokenize.py", &gguf, &strings, "llama-cpp-python");
    let hf = crate::tokenizer::peer_tokenize("hf_tokenize.py", &files.join("tokenizer.json"), &strings, "tokenizers");
    for ((text, llama_cpp), hf) in strings.iter().zip(&llama_cpp).zip(&hf) {
        assert_eq!(&s.tokenizer().encode(text, true).unwrap(), llama_cpp, "llama.cpp, {text:?}");
        let hf = if hf.starts_with(&[128_000, 128_000]) { &hf[1..] } else { &hf[..] };
        assert_eq!(s.tokenize(text).unwrap(), hf, "tokenizers, {text:?}");
    }
}

/// Llama 3.1 Instruct's own chat template (llama.cpp's copy, fetched by `cargo xtask test`):
/// kiln renders a conversation (a system prompt, which the template moves into its dated
/// system header, turns, and the generation prompt) exactly as transformers' jinja2
/// environment does. (Its tool branches are not reached: kiln serves no tools, and its
/// template engine has no `tojson`.)
#[test]
fn llama31_instruct_template_renders_as_transformers_does() {
    use runtime::chat_template::{ChatTemplate, Message};
    let path = peers::llama31_template_path();
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; `cargo xtask test` fetches it (the llama-cpp-python sdist)", path.display())
    });
    assert!(source.contains("<|start_header_id|>") && source.contains("tool_calls"), "{source}");
    let (bos, eos) = ("<|begin_of_text|>", "<|eot_id|>");
    let t = ChatTemplate::new(&source, bos, eos).unwrap_or_else(|e| panic!("{e}"));
    let conversations: [(&[Message], bool); 4] = [
        (&[Message::user("What is 2+2?")], true),
        (
            &[
                Message::system("  Be terse.\n"),
                Message::user("Hi"),
                Message::assistant("Hello!"),
                Message::user("2+2?"),
            ],
            true,
        ),
        (&[Message::system("You answer in French."), Message::user("Capital of France?")], false),
        (&[Message::user("a"), Message::assistant("b"), Message::user("c"), Message::assistant("d")], false),
    ];
    let cases: Vec<Value> = conversations
        .iter()
        .map(|(m, gen)| json!({"messages": m, "add_generation_prompt": gen, "bos_token": bos, "eos_token": eos}))
        .collect();
    let dir = scratch_dir("llama3/template");
    std::fs::write(dir.join("cases.json"), serde_json::to_vec(&cases).unwrap()).unwrap();
    let out = Command::new(python())
        .arg(peer_script("render_template.py"))
        .arg(&path)
        .arg(dir.join("cases.json"))
        .output()
        .expect("run python");
    assert!(out.status.success(), "render_template.py: {}", String::from_utf8_lossy(&out.stderr));
    let want: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for ((messages, gen), want) in conversations.iter().zip(&want) {
        let want = want.as_str().unwrap_or_else(|| panic!("jinja2 failed: {want}"));
        assert_eq!(t.render(messages, *gen).unwrap(), want);
    }
    // The system header as the template writes it, the text trimmed.
    let got = t.render(conversations[1].0, true).unwrap();
    assert!(
        got.starts_with(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
             Today Date: 26 Jul 2024\n\nBe terse.<|eot_id|>"
        ),
        "{got}"
    );
    assert!(got.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"), "{got}");
}
