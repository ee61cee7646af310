//! Helpers shared by the integration tests: random weights, compiling a graph into a shared
//! object the runtime can load, and comparing outputs with a stated tolerance.

use std::path::{Path, PathBuf};
use std::process::Command;

use compiler::{compile, CompileOptions, Compiled};
use ir::quant::quantize_row;
use ir::{Graph, QuantFormat};

/// The tests' deterministic random source (`uniform` is in [-1, 1)).
pub use ir::rng::SplitMix64 as Rng;

/// Random bytes for every weight of `graph`, quantized to its format from values in
/// `[-scale, scale)` (norm weights around 1).
pub fn random_weights(graph: &Graph, rng: &mut Rng, scale: f32) -> Vec<Vec<u8>> {
    graph
        .weights
        .iter()
        .map(|w| {
            let cols = *w.shape.last().unwrap() as usize;
            let rows = (w.n_values() as usize) / cols;
            let mut bytes = vec![];
            for _ in 0..rows {
                let values: Vec<f32> = if w.shape.len() == 1 {
                    (0..cols).map(|_| 1.0 + 0.5 * rng.uniform()).collect()
                } else {
                    rng.vec(cols, scale)
                };
                bytes.extend(quantize_row(w.format, &values));
            }
            bytes
        })
        .collect()
}

/// Records that a test could not run for want of optional data. `cargo xtask test` sets
/// `KILN_NOT_RUN` to a file, collects these records and prints them in its summary; without
/// it (a plain `cargo test`) a test that cannot run fails instead of passing silently.
pub fn not_run(test: &str, reason: &str) {
    match std::env::var_os("KILN_NOT_RUN") {
        Some(path) => {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("cannot record a test not run in {}: {e}", Path::new(&path).display()));
            writeln!(f, "{test}\t{}", reason.replace(['\n', '\t'], " ")).expect("write KILN_NOT_RUN record");
            eprintln!("NOT RUN: {test}: {reason}");
        }
        None => panic!("{test} could not run: {reason} (`cargo xtask test` counts such tests as not run)"),
    }
}

/// A fresh scratch directory under `target/kiln-tests`, unique per test name. It is removed
/// when the returned guard drops, unless the test is failing (a panic is unwinding) or
/// `KILN_KEEP_SCRATCH` is set: a passing suite leaves behind only the fixtures kept with
/// [`Scratch::keep`], so its disk use stays at its peak rather than at its sum.
pub fn scratch_dir(name: &str) -> Scratch {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kiln-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(Some(dir))
}

/// A scratch directory, removed on drop unless a test is failing (see [`scratch_dir`]).
#[derive(Debug)]
pub struct Scratch(Option<PathBuf>);

impl Scratch {
    /// Keeps the directory past the guard: for fixtures that several tests share.
    pub fn keep(mut self) -> PathBuf {
        self.0.take().expect("a scratch directory")
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.as_deref().expect("a scratch directory")
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        let path: &Path = self;
        path.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if !std::thread::panicking() && std::env::var_os("KILN_KEEP_SCRATCH").is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

/// Links an object file into a shared object with the system C compiler.
pub fn link_shared(object: &Path, out: &Path) {
    let status = Command::new("cc").arg("-shared").arg("-o").arg(out).arg(object).status().expect("run cc");
    assert!(status.success(), "cc -shared failed for {}", object.display());
}

/// Compiles `graph` for the host target and links it into `dir/model.so`.
pub fn compile_to_shared(graph: &Graph, weights: &[Vec<u8>], opts: &CompileOptions, dir: &Path) -> (Compiled, PathBuf) {
    let target = targets::lookup(targets::host_triple().expect("a supported host")).unwrap();
    let compiled =
        compile(graph.clone(), weights, target.as_ref(), opts).unwrap_or_else(|e| panic!("compile failed: {e}"));
    let obj = dir.join("model.o");
    std::fs::write(&obj, &compiled.object).unwrap();
    let so = dir.join("model.so");
    link_shared(&obj, &so);
    if !opts.embed_weights {
        std::fs::write(dir.join("weights.bin"), &compiled.weights).unwrap();
    }
    (compiled, so)
}

/// The peak resident memory of this process in bytes (`VmHWM`).
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Runs the ignored test `test` (its full path, e.g. `large::large_build_child`) alone in a
/// fresh process of this test binary, with `env` set, for a measurement that must see that
/// process only (its peak memory); fails unless the child ran and passed, and returns its
/// standard output.
pub fn run_child_test(test: &str, env: &[(&str, &std::ffi::OsStr)]) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--ignored", "--exact", test, "--nocapture", "--test-threads=1"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let run = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "the child failed ({}):\n{stdout}\n{stderr}", run.status);
    assert!(stdout.contains("1 passed"), "the child did not run the test:\n{stdout}");
    stdout.into_owned()
}

/// Largest absolute difference, and the largest magnitude of the reference.
pub fn max_diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, |m, d| {
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    });
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (diff, scale)
}

/// Index of the largest value (first on ties).
pub fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best })
}

/// Shape of a synthetic Llama model.
#[derive(Clone, Debug)]
pub struct TinyLlama {
    pub n_layers: u32,
    pub d_model: u32,
    pub d_ff: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub vocab: u32,
    pub context: u32,
    /// Format of the matrices (norms are f32, the embedding is Q8_0 and tied when `tied`).
    pub format: QuantFormat,
    pub tied: bool,
}

fn ggml_type(f: QuantFormat) -> compiler::gguf::GgmlType {
    compiler::gguf::GgmlType::from_id(f.ggml_type()).expect("every kiln format has a GGUF type")
}

/// Row lengths that suit `format` in kernel tests: odd ones for the float formats, whole
/// 32-value blocks for the block formats, whole 256-value super-blocks for the K-quants.
pub fn kernel_test_cols(format: QuantFormat) -> &'static [u32] {
    match format.block_values() {
        1 => &[5, 36, 67],
        256 => &[256, 512],
        64 => &[64, 192],
        _ => &[32, 96, 160],
    }
}

/// A complete GGUF file of a random Llama model (no tokenizer metadata).
pub fn tiny_llama_gguf(cfg: &TinyLlama, rng: &mut Rng) -> Vec<u8> {
    tiny_llama_writer(cfg, rng, QuantFormat::Q8_0, QuantFormat::F32).finish()
}

/// A random Llama model with a small byte-level BPE tokenizer (`<s>`, `</s>`, then single
/// letters and filler tokens up to `cfg.vocab`), complete enough for `build_model` and a
/// session. Needs `cfg.vocab >= 8`.
pub fn tiny_llama_gguf_with_tokenizer(cfg: &TinyLlama, rng: &mut Rng) -> Vec<u8> {
    let mut w = tiny_llama_writer(cfg, rng, QuantFormat::Q8_0, QuantFormat::F32);
    add_tiny_tokenizer(&mut w, cfg);
    w.finish()
}

/// [`tiny_llama_gguf_with_tokenizer`] with every tensor, embedding and norms too, in `cfg.format`
/// (a float format: f32, f16 or bf16), as a Hugging Face checkpoint would hold it.
pub fn tiny_llama_float_gguf(cfg: &TinyLlama, rng: &mut Rng) -> Vec<u8> {
    assert_eq!(cfg.format.block_values(), 1, "{:?} is not a float format", cfg.format);
    let mut w = tiny_llama_writer(cfg, rng, cfg.format, cfg.format);
    add_tiny_tokenizer(&mut w, cfg);
    w.finish()
}

/// The writer of [`tiny_llama_float_gguf`], for a test to add metadata or tensors before
/// `finish()`.
pub fn tiny_llama_float_writer(cfg: &TinyLlama, rng: &mut Rng) -> compiler::gguf::GgufWriter {
    assert_eq!(cfg.format.block_values(), 1, "{:?} is not a float format", cfg.format);
    let mut w = tiny_llama_writer(cfg, rng, cfg.format, cfg.format);
    add_tiny_tokenizer(&mut w, cfg);
    w
}

fn add_tiny_tokenizer(w: &mut compiler::gguf::GgufWriter, cfg: &TinyLlama) {
    use compiler::gguf::MetaValue;
    assert!(cfg.vocab >= 8, "the tiny tokenizer needs 8 tokens");
    let mut tokens: Vec<String> = vec!["<s>".into(), "</s>".into(), "a".into(), "b".into(), "ab".into()];
    tokens.extend(('c'..='z').map(String::from).take(cfg.vocab as usize - tokens.len()));
    let filler = cfg.vocab as usize - tokens.len();
    tokens.extend((0..filler).map(|i| format!("t{i}")));
    let types: Vec<MetaValue> = (0..tokens.len()).map(|i| MetaValue::I32(if i < 2 { 3 } else { 1 })).collect();
    w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    w.add_meta("tokenizer.ggml.pre", MetaValue::String("gpt2".into()));
    w.add_meta("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()));
    w.add_meta("tokenizer.ggml.token_type", MetaValue::Array(types));
    w.add_meta("tokenizer.ggml.merges", MetaValue::Array(vec![MetaValue::String("a b".into())]));
    w.add_meta("tokenizer.ggml.bos_token_id", MetaValue::U32(0));
    w.add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(1));
}

/// Writes to `path` a random Llama model whose matrices are Q4_0 with the scale 1/64 and
/// random nibbles (made from bytes, not quantized, so gigabytes take seconds), f32 norms of
/// 1, and the tiny tokenizer: a model of any size for tests of how builds scale. Returns the
/// file's size.
pub fn large_q4_0_llama_gguf(cfg: &TinyLlama, seed: u64, path: &Path) -> u64 {
    use compiler::gguf::{GgmlType, GgufWriter};
    let mut w = GgufWriter::new();
    llama_meta(&mut w, cfg);
    add_tiny_tokenizer(&mut w, cfg);
    let mut rng = Rng::new(seed);
    let scale = half::f16::from_f32(1.0 / 64.0).to_le_bytes();
    let mut q4_0 = |rows: u64, cols: u64| -> Vec<u8> {
        let mut bytes = vec![0u8; (rows * cols / 32 * 18) as usize];
        for block in bytes.chunks_exact_mut(18) {
            block[..2].copy_from_slice(&scale);
            block[2..10].copy_from_slice(&rng.next_u64().to_le_bytes());
            block[10..].copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        bytes
    };
    let (d, ff) = (cfg.d_model as u64, cfg.d_ff as u64);
    let kv = (cfg.n_kv_heads * (cfg.d_model / cfg.n_heads)) as u64;
    let ones: Vec<u8> = (0..d).flat_map(|_| 1f32.to_le_bytes()).collect();
    w.add_tensor("token_embd.weight", &[d, cfg.vocab as u64], GgmlType::Q4_0, &q4_0(cfg.vocab as u64, d));
    for l in 0..cfg.n_layers {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        w.add_tensor(&t("attn_norm"), &[d], GgmlType::F32, &ones);
        for (name, cols, rows) in [("attn_q", d, d), ("attn_k", d, kv), ("attn_v", d, kv), ("attn_output", d, d)] {
            w.add_tensor(&t(name), &[cols, rows], GgmlType::Q4_0, &q4_0(rows, cols));
        }
        w.add_tensor(&t("ffn_norm"), &[d], GgmlType::F32, &ones);
        for (name, cols, rows) in [("ffn_gate", d, ff), ("ffn_up", d, ff), ("ffn_down", ff, d)] {
            w.add_tensor(&t(name), &[cols, rows], GgmlType::Q4_0, &q4_0(rows, cols));
        }
    }
    w.add_tensor("output_norm.weight", &[d], GgmlType::F32, &ones);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    w.write_to(&mut out).unwrap();
    std::io::Write::flush(&mut out).unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// The `llama.*` keys of `cfg`.
fn llama_meta(w: &mut compiler::gguf::GgufWriter, cfg: &TinyLlama) {
    use compiler::gguf::MetaValue;
    w.add_meta("general.architecture", MetaValue::String("llama".into()));
    for (k, v) in [
        ("block_count", cfg.n_layers),
        ("embedding_length", cfg.d_model),
        ("feed_forward_length", cfg.d_ff),
        ("attention.head_count", cfg.n_heads),
        ("attention.head_count_kv", cfg.n_kv_heads),
        ("context_length", cfg.context),
        ("rope.dimension_count", cfg.d_model / cfg.n_heads),
    ] {
        w.add_meta(&format!("llama.{k}"), MetaValue::U32(v));
    }
    w.add_meta("llama.rope.freq_base", MetaValue::F32(10000.0));
    w.add_meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5));
}

/// The model's tensors; the embedding in `embd`, the norms in `norm`.
fn tiny_llama_writer(
    cfg: &TinyLlama,
    rng: &mut Rng,
    embd: QuantFormat,
    norm: QuantFormat,
) -> compiler::gguf::GgufWriter {
    use compiler::gguf::GgufWriter;
    let mut w = GgufWriter::new();
    llama_meta(&mut w, cfg);
    let (d, ff) = (cfg.d_model as u64, cfg.d_ff as u64);
    let kv = (cfg.n_kv_heads * (cfg.d_model / cfg.n_heads)) as u64;
    let mut add = |w: &mut GgufWriter, name: &str, dims: &[u64], format: QuantFormat, scale: f32| {
        let (cols, rows) = (dims[0] as usize, dims.get(1).copied().unwrap_or(1) as usize);
        let mut bytes = vec![];
        for _ in 0..rows {
            let values: Vec<f32> = if dims.len() == 1 {
                (0..cols).map(|_| 1.0 + 0.3 * rng.uniform()).collect()
            } else {
                rng.vec(cols, scale)
            };
            bytes.extend(quantize_row(format, &values));
        }
        w.add_tensor(name, dims, ggml_type(format), &bytes);
    };
    add(&mut w, "token_embd.weight", &[d, cfg.vocab as u64], embd, 1.0);
    let s = 1.0 / (d as f32).sqrt() * 1.7;
    for l in 0..cfg.n_layers {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        add(&mut w, &t("attn_norm"), &[d], norm, 0.0);
        add(&mut w, &t("attn_q"), &[d, d], cfg.format, s);
        add(&mut w, &t("attn_k"), &[d, kv], cfg.format, s);
        add(&mut w, &t("attn_v"), &[d, kv], cfg.format, s);
        add(&mut w, &t("attn_output"), &[d, d], cfg.format, s);
        add(&mut w, &t("ffn_norm"), &[d], norm, 0.0);
        add(&mut w, &t("ffn_gate"), &[d, ff], cfg.format, s);
        add(&mut w, &t("ffn_up"), &[d, ff], cfg.format, s);
        add(&mut w, &t("ffn_down"), &[ff, d], cfg.format, 1.0 / (ff as f32).sqrt() * 1.7);
    }
    add(&mut w, "output_norm.weight", &[d], norm, 0.0);
    if !cfg.tied {
        add(&mut w, "output.weight", &[d, cfg.vocab as u64], cfg.format, s);
    }
    w
}

/// The Python interpreter of the peer scripts: `KILN_PYTHON`, or `python3`.
pub fn python() -> String {
    std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// A script of `tests/peer/`.
pub fn peer_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peer").join(name)
}

/// Runs `tests/peer/gguf_quants.py` with `args` and panics, with its stderr and how to install
/// what it needs, unless it succeeds: a missing interpreter or package fails the test.
pub fn run_gguf_py(args: &[&std::ffi::OsStr]) {
    let (python, script) = (python(), peer_script("gguf_quants.py"));
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {python} {}: {e} (set KILN_PYTHON to a Python 3)", script.display()));
    assert!(
        out.status.success(),
        "gguf_quants.py {args:?} failed ({}); is the gguf package installed (`{python} -m pip install {}`, \
         which `cargo xtask test` does)? stderr:\n{}",
        out.status,
        peers::GGUF_PY,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// f16 bit patterns of every kind: zeros of both signs, the smallest and largest subnormals,
/// the smallest normal, ±1, the largest finite values, an ordinary fraction.
pub const SPECIAL_F16: [u16; 12] =
    [0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x0400, 0x3c00, 0xbc00, 0x7bff, 0xfbff, 0x3555, 0x0200];

/// A `rows x cols` matrix in `format` (q8_0, q4_1 or q4_0, the formats whose scales are f16)
/// whose block scales (and q4_1's offsets) cycle through [`SPECIAL_F16`], with random values.
pub fn special_f16_scale_matrix(format: ir::QuantFormat, rows: u32, cols: u32, rng: &mut Rng) -> Vec<u8> {
    use ir::QuantFormat;
    let block_bytes = match format {
        QuantFormat::Q8_0 => 34,
        QuantFormat::Q4_1 => 20,
        QuantFormat::Q4_0 => 18,
        other => panic!("{} has no plain f16 block scale", other.name()),
    };
    let blocks = (rows * cols / 32) as usize;
    let mut table = Vec::with_capacity(blocks * block_bytes);
    for b in 0..blocks {
        table.extend_from_slice(&SPECIAL_F16[b % SPECIAL_F16.len()].to_le_bytes());
        if format == QuantFormat::Q4_1 {
            table.extend_from_slice(&SPECIAL_F16[(b * 5 + 3) % SPECIAL_F16.len()].to_le_bytes());
        }
        let rest = block_bytes - table.len() % block_bytes;
        table.extend((0..rest).map(|_| rng.below(256) as u8));
    }
    assert_eq!(table.len(), blocks * block_bytes);
    table
}

/// Writes the checkpoint of `gguf` into `out` with `tests/peer/gguf_to_hf.py`, taking the
/// tokenizer files from `bundle` (built from `gguf`).
pub fn to_checkpoint(gguf: &Path, bundle: &Path, out: &Path, extra: &[&str]) {
    let (python, script) = (python(), peer_script("gguf_to_hf.py"));
    let result = Command::new(&python)
        .arg(&script)
        .arg(gguf)
        .arg(out)
        .arg("--tokenizer-json")
        .arg(bundle.join("tokenizer.json"))
        .arg("--manifest")
        .arg(bundle.join("manifest.json"))
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("running {python} {}: {e}", script.display()));
    assert!(
        result.status.success(),
        "gguf_to_hf.py {extra:?} failed ({}); are gguf, numpy and safetensors installed (`cargo xtask test` \
         installs them)? stderr:\n{}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
}
