//! Untrusted model files: what fuzzing found downstream of the GGUF reader (a model name that
//! breaks the object writer or the C header, an embedding that does not match the tokenizer,
//! build time quadratic in the layer count, misleading messages) and files that are not
//! regular files. Every case builds a small synthetic model through `build_model`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use compiler::bundle::{build_model, BuildError, BuildOptions, BuildReport, Stage};
use compiler::frontend::FrontendError;
use compiler::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetaValue};
use ir::QuantFormat;
use tests::harness::{scratch_dir, tiny_llama_gguf, Rng, Scratch, TinyLlama};

fn cfg(n_layers: u32, vocab: u32, tied: bool) -> TinyLlama {
    TinyLlama {
        n_layers,
        d_model: 32,
        d_ff: 32,
        n_heads: 1,
        n_kv_heads: 1,
        vocab,
        context: 64,
        format: QuantFormat::Q4_0,
        tied,
    }
}

/// A GGUF's metadata and tensors, to edit and write again.
struct Model {
    meta: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Model {
    /// A random tiny Llama with a byte-level BPE tokenizer of `tokens` tokens.
    fn new(cfg: &TinyLlama, tokens: usize) -> Self {
        let f = GgufFile::parse(tiny_llama_gguf(cfg, &mut Rng::new(7))).unwrap();
        let mut meta: Vec<(String, MetaValue)> = f.metadata().map(|(k, v)| (k.to_owned(), v.clone())).collect();
        let strings = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::String).collect());
        meta.extend([
            ("tokenizer.ggml.model".to_owned(), MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_owned(), MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens".to_owned(), strings((0..tokens).map(|i| format!("t{i}")).collect())),
            ("tokenizer.ggml.merges".to_owned(), MetaValue::Array(vec![])),
            ("tokenizer.ggml.bos_token_id".to_owned(), MetaValue::U32(0)),
            ("tokenizer.ggml.eos_token_id".to_owned(), MetaValue::U32(1)),
        ]);
        let tensors = f
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone(), t.ggml_type, f.tensor_data(t).to_vec()))
            .collect();
        Model { meta, tensors }
    }

    fn set(mut self, key: &str, value: MetaValue) -> Self {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_owned(), value));
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut w = GgufWriter::new();
        for (k, v) in &self.meta {
            w.add_meta(k, v.clone());
        }
        for (name, dims, ty, data) in &self.tensors {
            w.add_tensor(name, dims, *ty, data);
        }
        w.finish()
    }
}

fn options(model: &Path, out: &Path, context: Option<u32>) -> BuildOptions {
    BuildOptions { context, batch: 8, ..BuildOptions::new(model, "x86_64-unknown-linux-gnu", out) }
}

/// Writes `gguf` to a scratch directory and builds it; returns the result, the stages that
/// started, and the bundle directory.
/// Builds `gguf` in a scratch directory; the guard comes last so that the bundle outlives the
/// checks made on it.
fn build(
    test: &str,
    gguf: &[u8],
    context: Option<u32>,
) -> (Result<BuildReport, BuildError>, Vec<Stage>, PathBuf, Scratch) {
    let dir = scratch_dir(&format!("untrusted/{test}"));
    let model = dir.join("model.gguf");
    std::fs::write(&model, gguf).unwrap();
    let out = dir.join("bundle");
    let mut stages = vec![];
    let result = build_model(&options(&model, &out, context), &mut |s| stages.push(s));
    (result, stages, out, dir)
}

fn build_err(test: &str, gguf: &[u8], context: Option<u32>) -> (BuildError, Vec<Stage>) {
    match build(test, gguf, context) {
        (Ok(_), _, _, _) => panic!("{test}: the build succeeded"),
        (Err(e), stages, out, _dir) => {
            assert!(!out.exists(), "{test}: a failed build left a bundle");
            (e, stages)
        }
    }
}

/// Removes C comments (the header has no string literals holding comment markers).
fn strip_c_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        let end = rest[start + 2..].find("*/").unwrap_or_else(|| panic!("unterminated comment in {text}"));
        rest = &rest[start + 2 + end + 2..];
    }
    out.push_str(rest);
    out
}

#[test]
fn nul_in_model_name_is_refused_before_codegen() {
    let gguf = Model::new(&cfg(1, 8, true), 8).set("general.name", MetaValue::String("evil\0name".into())).bytes();
    let (e, stages) = build_err("nul_name", &gguf, None);
    assert!(matches!(e, BuildError::Frontend(FrontendError::BadModelName { .. })), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("general.name") && msg.contains("'\\0'") && msg.contains("byte 4"), "{msg}");
    assert!(!stages.contains(&Stage::Compile), "refused only after {stages:?}");

    let long = "n".repeat(100_000);
    let gguf = Model::new(&cfg(1, 8, true), 8).set("general.name", MetaValue::String(long)).bytes();
    let msg = build_err("long_name", &gguf, None).0.to_string();
    assert!(msg.contains("general.name") && msg.contains("longer than 256 bytes") && msg.len() < 300, "{msg}");
}

#[test]
fn model_name_cannot_inject_code_into_the_header() {
    let name = "x */ int evil; /*";
    let gguf = Model::new(&cfg(1, 8, true), 8).set("general.name", MetaValue::String(name.into())).bytes();
    let (result, _, out, _dir) = build("inject_name", &gguf, None);
    result.unwrap_or_else(|e| panic!("build failed: {e}"));
    let header_path = out.join("include/kiln_model.h");
    let header = std::fs::read_to_string(&header_path).unwrap();
    assert!(header.contains("int evil"), "the name is shown in the comment:\n{header}");
    let code = strip_c_comments(&header);
    assert!(!code.contains("evil"), "the name leaked out of the comment:\n{code}");
    // A C compiler agrees: the header compiles, and declaring `evil` again is no conflict.
    let probe = out.join("probe.c");
    std::fs::write(&probe, "#include \"include/kiln_model.h\"\nfloat evil;\n").unwrap();
    let output = Command::new("cc").arg("-fsyntax-only").arg("-Werror").arg(&probe).current_dir(&out).output().unwrap();
    assert!(output.status.success(), "cc: {}", String::from_utf8_lossy(&output.stderr));
    // The manifest keeps the name as it is (JSON escapes it).
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["model"]["name"], name);
}

#[test]
fn embedding_rows_must_match_the_tokenizer() {
    for tokens in [6usize, 12, 1000] {
        let gguf = Model::new(&cfg(1, 8, true), tokens).bytes();
        let (e, _) = build_err(&format!("vocab_{tokens}"), &gguf, None);
        assert!(
            matches!(&e, BuildError::Frontend(FrontendError::VocabMismatch { tensor, rows: 8, tokens: t })
                if tensor == "token_embd.weight" && *t == tokens),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("token_embd.weight") && msg.contains("8 rows") && msg.contains(&format!("{tokens} tokens"))
        );
    }
    // An untied output matrix is checked too.
    let mut model = Model::new(&cfg(1, 8, false), 8);
    let out = model.tensors.iter_mut().find(|t| t.0 == "output.weight").unwrap();
    out.1 = vec![32, 12];
    out.3 = vec![0; 12 * 18];
    let (e, _) = build_err("vocab_output", &model.bytes(), None);
    let msg = e.to_string();
    assert!(msg.contains("output.weight") && msg.contains("12 rows") && msg.contains("8 tokens"), "{msg}");
    // Matching counts build.
    let (result, _, _, _dir) = build("vocab_ok", &Model::new(&cfg(1, 8, false), 8).bytes(), None);
    result.unwrap_or_else(|e| panic!("build failed: {e}"));
}

/// 1024 tiny layers took 51 s when the passes were quadratic in the graph size (about 25 s in
/// `fuse_elementwise` alone, 6 s at 512 layers). Everything but Cranelift's code generation
/// (about 14 small kernels per layer, linear in the layer count) must now take well under a
/// second; the bound leaves a wide margin for a loaded machine.
#[test]
fn build_time_is_not_quadratic_in_the_layer_count() {
    let gguf = Model::new(&cfg(1024, 8, true), 8).bytes();
    let start = Instant::now();
    let (result, _, _, _dir) = build("layers_1024", &gguf, None);
    let report = result.unwrap_or_else(|e| panic!("build failed: {e}"));
    let elapsed = start.elapsed();
    eprintln!("1024 layers ({} bytes) built in {:.2} s", gguf.len(), elapsed.as_secs_f64());
    for (name, d) in &report.stage_times {
        eprintln!("  {name:<28} {:>8.1} ms", d.as_secs_f64() * 1e3);
    }
    let stage = |name: &str| {
        report.stage_times.iter().find(|(n, _)| n.trim() == name).unwrap_or_else(|| panic!("no stage {name}")).1
    };
    let codegen = stage("codegen");
    let not_codegen = elapsed.saturating_sub(codegen);
    let limit = Duration::from_secs(if cfg!(debug_assertions) { 60 } else { 5 });
    assert!(not_codegen < limit, "the build took {not_codegen:?} besides codegen ({codegen:?})");
    for pass in ["pass quantize_activations", "pass fuse_elementwise", "plan memory", "pack weights"] {
        assert!(stage(pass) < limit / 5, "{pass} took {:?}", stage(pass));
    }
}

#[test]
fn zero_context_length_in_the_file_suggests_the_flag() {
    let gguf = Model::new(&cfg(1, 8, true), 8).set("llama.context_length", MetaValue::U32(0)).bytes();
    let (e, _) = build_err("context_0", &gguf, None);
    let msg = e.to_string();
    assert!(matches!(e, BuildError::Frontend(FrontendError::NoContextLength { .. })), "{msg}");
    assert!(msg.contains("llama.context_length is 0") && msg.contains("--context"), "{msg}");
    // With a context given, the file's 0 (unknown) is no obstacle.
    let (result, _, _, _dir) = build("context_0_given", &gguf, Some(32));
    result.unwrap_or_else(|e| panic!("build failed: {e}"));
}

#[test]
fn bad_metadata_values_are_reported_with_their_type() {
    let model = || Model::new(&cfg(1, 8, true), 8);
    let gguf = model().set("llama.rope.scaling.type", MetaValue::U32(7)).bytes();
    let msg = build_err("rope_u32", &gguf, None).0.to_string();
    assert!(msg.contains("llama.rope.scaling.type") && msg.contains("7 (u32)") && !msg.contains('?'), "{msg}");
    let gguf = model().set("llama.rope.scaling.type", MetaValue::String("yarn".into())).bytes();
    let msg = build_err("rope_yarn", &gguf, None).0.to_string();
    assert!(msg.contains("\"yarn\" (string)"), "{msg}");
    let gguf = model().set("llama.vocab_size", MetaValue::String("abc".into())).bytes();
    let msg = build_err("vocab_string", &gguf, None).0.to_string();
    assert!(msg.contains("llama.vocab_size") && msg.contains("\"abc\" (string)") && !msg.contains("-1"), "{msg}");
    let gguf = model().set("llama.block_count", MetaValue::String("many".into())).bytes();
    let msg = build_err("blocks_string", &gguf, None).0.to_string();
    assert!(msg.contains("llama.block_count") && msg.contains("\"many\" (string)"), "{msg}");
    let gguf = model().set("general.architecture", MetaValue::String("a".repeat(1 << 20))).bytes();
    let msg = build_err("arch_huge", &gguf, None).0.to_string();
    assert!(msg.contains("unsupported architecture") && msg.len() < 300, "{msg}");
}

#[test]
fn special_files_are_refused_quickly() {
    let dir = scratch_dir("untrusted/special");
    let fifo = dir.join("model.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo").success());
    for (path, kind) in [(Path::new("/dev/zero"), "character device"), (fifo.as_path(), "fifo")] {
        let start = Instant::now();
        let out = dir.join("bundle");
        let e = build_model(&options(path, &out, None), &mut |_| {}).unwrap_err();
        assert!(matches!(e, BuildError::Gguf(GgufError::NotAFile { .. })), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(kind) && msg.contains("not a regular file"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(5), "{path:?} took {:?}", start.elapsed());
        assert!(!out.exists());
    }
    // A directory is read as a Hugging Face checkpoint, which this one is not.
    let out = dir.join("bundle");
    let e = build_model(&options(&dir, &out, None), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");
    assert!(!out.exists());
}
