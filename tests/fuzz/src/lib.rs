//! Fuzz targets for kiln's untrusted inputs, and their seed corpora.
//!
//! Each target is a function from arbitrary bytes that must never panic, hang or exhaust
//! memory; libFuzzer (through `cargo fuzz`, on the stable toolchain with `--sanitizer none`)
//! reports any of those as a crash. The binaries in `fuzz_targets/` wrap them:
//!
//! - [`gguf_build`]: the GGUF reader, the frontend lowering (and the IR verifier on its result)
//!   and the `tokenizer.json` builder, whose output must load in the runtime tokenizer.
//! - [`chat_template`]: compiling and rendering an arbitrary chat template on arbitrary
//!   messages (the render is bounded; see `runtime::chat_template`).
//! - [`tokenizer`]: the runtime tokenizer's encode, decode and stream decoder on arbitrary
//!   text and token ids, with round-trip checks.
//! - [`hf_checkpoint`]: a Hugging Face checkpoint directory (`config.json`, safetensors,
//!   shard index, tokenizer files, chat template) opened by `compiler::source::open`, lowered
//!   (verified) and its tokenizer loaded by the runtime tokenizer.
//! - [`onnx_model`]: an ONNX model (protobuf bytes mutated directly), external data and the
//!   files beside it, opened, recognized, lowered and its tokenizer loaded, likewise.
//!
//! The last two take a model directory packed in one input ([`FILE_MARK`], [`unpack`]), which
//! they write to a scratch directory on a tmpfs and open with the real reader.
//!
//! Seeds are in `seeds/<target>/`, written by `cargo run -p kiln-fuzz --bin gen_seeds` from
//! [`seeds`] (small generated models and checkpoints, ONNX models written once by the Python
//! peer and committed in `fixtures/` ([`ONNX_FIXTURES`]), real chat templates, text); the tests of this crate
//! check the committed files are exactly what the generator writes and replay them, with
//! `crashes/<target>/` (inputs that once crashed a target, kept as regression seeds).
//! `cargo xtask fuzz` and `cargo xtask test` run each target for a bounded time.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use compiler::frontend::FrontendError;
use compiler::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};
use compiler::source::ModelSource;
use runtime::chat_template::{ChatTemplate, Message};
use runtime::tokenizer::Tokenizer;

/// A fuzz target: a function of the input bytes.
pub type Target = fn(&[u8]);

/// The targets, by name.
pub const TARGETS: [(&str, Target); 5] = [
    ("gguf_build", gguf_build),
    ("chat_template", chat_template),
    ("tokenizer", tokenizer),
    ("hf_checkpoint", hf_checkpoint),
    ("onnx_model", onnx_model),
];

/// This crate's directory (seeds, crashes, the small tokenizer).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// GGUF bytes → reader → hyperparameters → lowering to IR (verified) and `tokenizer.json`
/// (loaded by the runtime tokenizer). Errors are fine; panics are not.
pub fn gguf_build(data: &[u8]) {
    let Ok(gguf) = GgufFile::parse(data.to_vec()) else { return };
    lower_checked(&gguf, gguf.get_str("general.name").unwrap_or("model"));
    if let Ok(json) = compiler::tokenizer_json::tokenizer_json(&gguf) {
        if let Err(e) = Tokenizer::from_json_str(&json) {
            panic!("tokenizer_json built a tokenizer.json the runtime cannot load: {e}");
        }
    }
}

/// The source's hyperparameters, then its lowering to IR (which reads every tensor through
/// the source), for a small context and for the source's own training context: a lowered
/// graph must pass the verifier and hold one byte buffer per weight.
fn lower_checked(source: &dyn ModelSource, name: &str) {
    let Ok(hp) = compiler::frontend::hyperparameters(source) else { return };
    // A small context keeps the KV geometry small; the file's own value is checked too.
    for context in [hp.train_context.clamp(1, 64), hp.train_context] {
        if let Ok(lowered) = compiler::frontend::lower(source, name, context) {
            if let Err(e) = ir::verify::verify_unlowered(&lowered.graph) {
                panic!("the frontend lowered a graph the verifier refuses: {e:?}");
            }
            assert_eq!(lowered.weights.len(), lowered.graph.weights.len(), "one byte buffer per weight");
        }
    }
}

/// Drives an opened source as `kiln build` does: name, digest, hyperparameters and lowering
/// ([`lower_checked`]), and the tokenizer, whose `tokenizer.json` must load in the runtime
/// tokenizer (and encode), whose special tokens must be what the vocabulary says, and whose
/// chat template, if any, is compiled.
fn drive(source: &dyn ModelSource) {
    let _ = (source.kind(), source.context_key());
    assert_eq!(source.sha256().len(), 64, "a SHA-256 in hex");
    let name = compiler::frontend::model_name(source, "fuzz").unwrap_or_else(|_| "fuzz".into());
    lower_checked(source, &name);
    let Ok(spec) = source.tokenizer() else { return };
    let tok = Tokenizer::from_json_str(&spec.json)
        .unwrap_or_else(|e| panic!("the source handed out a tokenizer.json the runtime cannot load: {e}"));
    for (which, (id, text)) in [("bos", &spec.bos), ("eos", &spec.eos)] {
        assert_eq!(tok.inner().id_to_token(*id).as_deref(), Some(text.as_str()), "{which} token {id} is not {text:?}");
    }
    assert!(spec.stop_ids.windows(2).all(|w| w[0] < w[1]), "stop ids not sorted and unique: {:?}", spec.stop_ids);
    assert!(spec.stop_ids.contains(&spec.eos.0), "the stop ids {:?} lack eos {}", spec.stop_ids, spec.eos.0);
    let _ = tok.encode("hello world<|im_end|>", true);
    if let Some(template) = &spec.chat_template {
        let _ = ChatTemplate::new(template, &spec.bos.1, &spec.eos.1);
    }
}

/// Marks the start of a named file in the inputs of [`hf_checkpoint`] and [`onnx_model`]:
/// an input is the first file's bytes, then any number of `FILE_MARK name \n bytes`. The
/// mark starts with 0xff, which UTF-8 never holds, and is unlikely in binary files.
pub const FILE_MARK: &[u8] = b"\xffFILE ";

/// A named file of a packed input: its name and bytes.
pub type NamedFile<'a> = (&'a [u8], &'a [u8]);

/// Splits a packed input: the first file's bytes, then the named ones.
pub fn unpack(data: &[u8]) -> (&[u8], Vec<NamedFile<'_>>) {
    let mut starts = vec![];
    let mut i = 0;
    while let Some(at) = data[i..].windows(FILE_MARK.len()).position(|w| w == FILE_MARK) {
        starts.push(i + at);
        i += at + FILE_MARK.len();
    }
    let first = &data[..starts.first().copied().unwrap_or(data.len())];
    let files = starts
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let part = &data[s + FILE_MARK.len()..starts.get(k + 1).copied().unwrap_or(data.len())];
            match part.iter().position(|&b| b == b'\n') {
                Some(nl) => (&part[..nl], &part[nl + 1..]),
                None => (part, &part[part.len()..]),
            }
        })
        .collect();
    (first, files)
}

/// Packs `first` and the named `files` into one input (the inverse of [`unpack`]); none may
/// hold [`FILE_MARK`] (nor a name a newline).
pub fn pack(first: &[u8], files: &[(&str, &[u8])]) -> Vec<u8> {
    let holds_mark = |b: &[u8]| b.windows(FILE_MARK.len()).any(|w| w == FILE_MARK);
    assert!(!holds_mark(first), "the first file cannot be packed");
    let mut out = first.to_vec();
    for (name, bytes) in files {
        assert!(!holds_mark(bytes) && !name.contains('\n'), "{name} cannot be packed");
        out.extend_from_slice(FILE_MARK);
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(bytes);
    }
    out
}

/// A directory of this thread for the files of one target's inputs: under `/dev/shm` (a
/// tmpfs) when there is one, else the temporary directory. Directories left by processes that
/// have exited are removed when it is made.
fn scratch(target: &str) -> PathBuf {
    static THREADS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let prefix = format!("kiln-fuzz-{target}-");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix(&prefix).and_then(|p| p.split('-').next()?.parse::<u32>().ok());
            if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let thread = THREADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = base.join(format!("{prefix}{}-{thread}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Writes the files of a packed input into `dir`: `first` as `slots[0]`, each named file whose
/// name is one of `slots` (others are ignored; the last of a name wins); every slot the input
/// does not hold is removed, so nothing is left from the previous input.
fn write_slots(dir: &Path, slots: &[&str], data: &[u8]) {
    let (first, files) = unpack(data);
    for (k, slot) in slots.iter().enumerate() {
        let bytes = if k == 0 { Some(first) } else { files.iter().rev().find(|f| f.0 == slot.as_bytes()).map(|f| f.1) };
        let path = dir.join(slot);
        match bytes {
            Some(b) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
                }
                std::fs::write(&path, b).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{}: {e}", path.display()),
                _ => {}
            },
        }
    }
}

/// The files of a Hugging Face checkpoint directory [`hf_checkpoint`] writes; the first is
/// the input's leading bytes, the others come by name ([`FILE_MARK`]).
pub const HF_FILES: [&str; 9] = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// The files of an ONNX model's directory [`onnx_model`] writes; the first, `model.onnx`, is
/// the input's leading bytes (protobuf, mutated directly), the others come by name: external
/// data (`model.onnx.data` is what exporters write) and the files read beside the model.
pub const ONNX_FILES: [&str; 9] = [
    "model.onnx",
    "model.onnx.data",
    "weights.bin",
    "data/weights.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "config.json",
];

/// Writes a packed checkpoint directory ([`unpack`], [`HF_FILES`]) into this thread's scratch
/// directory and opens it with `compiler::source::open`.
pub fn open_hf(data: &[u8]) -> Result<Box<dyn ModelSource>, FrontendError> {
    thread_local!(static DIR: PathBuf = scratch("hf_checkpoint"));
    DIR.with(|dir| {
        write_slots(dir, &HF_FILES, data);
        compiler::source::open(dir)
    })
}

/// Writes a packed ONNX model and the files beside it ([`unpack`], [`ONNX_FILES`]) into this
/// thread's scratch directory and opens its `model.onnx` with `compiler::source::open`.
pub fn open_onnx(data: &[u8]) -> Result<Box<dyn ModelSource>, FrontendError> {
    thread_local!(static DIR: PathBuf = scratch("onnx_model"));
    DIR.with(|dir| {
        write_slots(dir, &ONNX_FILES, data);
        compiler::source::open(&dir.join("model.onnx"))
    })
}

/// A Hugging Face checkpoint directory, packed ([`open_hf`]), opened and driven as a build
/// would ([`drive`]).
pub fn hf_checkpoint(data: &[u8]) {
    if let Ok(source) = open_hf(data) {
        assert_eq!(source.kind(), "safetensors");
        drive(&*source);
    }
}

/// An ONNX model (its protobuf bytes first, mutated directly) and the files beside it, packed
/// ([`open_onnx`]), opened and driven as a build would ([`drive`]).
pub fn onnx_model(data: &[u8]) {
    if let Ok(source) = open_onnx(data) {
        assert_eq!(source.kind(), "onnx");
        drive(&*source);
    }
}

/// The byte that separates the parts of a `chat_template` input: never valid in UTF-8, so it
/// cannot occur inside the template or a message.
pub const SEP: u8 = 0xff;

/// Template source, then `SEP`-separated role / content pairs; the length's parity is
/// `add_generation_prompt`.
pub fn chat_template(data: &[u8]) {
    let mut parts = data.split(|&b| b == SEP).map(String::from_utf8_lossy);
    let source = parts.next().unwrap_or_default();
    let rest: Vec<_> = parts.collect();
    let messages: Vec<Message> = rest.chunks(2).map(|p| Message::new(&*p[0], p.get(1).map_or("", |c| &**c))).collect();
    let Ok(template) = ChatTemplate::new(&source, "<s>", "</s>") else { return };
    let _ = template.render(&messages, data.len() % 2 == 1);
}

/// The tokenizer the `tokenizer` target uses: the real model's vocabulary when `KILN_MODEL`
/// names its GGUF, else the small committed `tokenizer.json` (built by [`tiny_vocab_gguf`]).
pub fn fuzz_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| match std::env::var_os("KILN_MODEL") {
        Some(path) => {
            let gguf = GgufFile::open(Path::new(&path)).unwrap_or_else(|e| panic!("KILN_MODEL: {e}"));
            let json = compiler::tokenizer_json::tokenizer_json(&gguf).unwrap_or_else(|e| panic!("KILN_MODEL: {e}"));
            eprintln!("tokenizer target: the vocabulary of {}", Path::new(&path).display());
            Tokenizer::from_json_str(&json).unwrap()
        }
        None => Tokenizer::from_file(crate_dir().join("tokenizer.json")).unwrap(),
    })
}

/// Text (lossy UTF-8) through encode and decode, with and without special-token parsing, must
/// round-trip; the bytes read as token ids (some out of range) through decode and the stream
/// decoder must give errors or text, and the streamed pieces must add up to the whole.
pub fn tokenizer(data: &[u8]) {
    let tok = fuzz_tokenizer();
    let text = String::from_utf8_lossy(data);
    // A byte-level vocabulary may lack some bytes (SmolLM2's has no token for 0x04, as in
    // Hugging Face's own tokenizer of the model): text holding them cannot round-trip, so the
    // round trip is required of text made of characters that round-trip alone.
    let representable = text.chars().all(|c| char_round_trips(tok, c));
    for parse_special in [false, true] {
        let ids = tok.encode(&text, parse_special).unwrap_or_else(|e| panic!("encode failed: {e}"));
        let back = tok.decode(&ids).unwrap_or_else(|e| panic!("decode of encoded ids failed: {e}"));
        if representable {
            assert_eq!(back, text, "decode(encode(text, parse_special = {parse_special})) != text; ids {ids:?}");
        }
        stream(tok, &ids, false);
    }
    let n = tok.vocab_size() as u32 + 4;
    let ids: Vec<u32> = data.chunks(2).map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))).collect();
    for ids in [ids.iter().map(|i| i % n).collect::<Vec<_>>(), ids] {
        for skip in [false, true] {
            let _ = tok.decode_with(&ids, skip);
            stream(tok, &ids, skip);
        }
    }
}

/// Whether the single character `c` survives encode and decode (memoized per character).
fn char_round_trips(tok: &Tokenizer, c: char) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static SEEN: OnceLock<Mutex<HashMap<char, bool>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(&ok) = seen.lock().unwrap().get(&c) {
        return ok;
    }
    let s = c.to_string();
    let ok = tok.encode(&s, false).ok().and_then(|ids| tok.decode(&ids).ok()).is_some_and(|back| back == s);
    seen.lock().unwrap().insert(c, ok);
    ok
}

/// Streams `ids` through a stream decoder: when every step succeeds and the ids decode, the
/// pieces add up to the whole decode.
fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) {
    let mut dec = tok.stream_decoder(skip_special);
    let mut out = String::new();
    for &id in ids {
        match dec.push(id) {
            Ok(piece) => out.push_str(&piece),
            Err(_) => return,
        }
    }
    let Ok(last) = dec.finish() else { return };
    out.push_str(&last);
    if let Ok(whole) = tok.decode_with(ids, skip_special) {
        assert_eq!(out, whole, "streamed pieces differ from the whole decode of {ids:?}");
    }
}

/// Runs `target` on every file given on the command line (directories: every file in them),
/// printing how many ran; a panic aborts with the input's path.
pub fn replay_main(name: &str, target: fn(&[u8])) {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.is_empty() {
        eprintln!("usage: {name} FILE|DIR...   (replays inputs; build with `cargo fuzz` to fuzz)");
        std::process::exit(2);
    }
    let mut n = 0;
    for arg in &args {
        for file in input_files(arg).unwrap_or_else(|e| panic!("{}: {e}", arg.display())) {
            eprintln!("{name}: {}", file.display());
            target(&std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())));
            n += 1;
        }
    }
    println!("{name}: {n} inputs ran without a crash");
}

/// `path` itself, or the files in the directory `path`, sorted.
pub fn input_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .filter(|p| p.as_ref().map_or(true, |p| p.is_file()))
        .collect::<Result<_, _>>()?;
    files.sort();
    Ok(files)
}

// ---- seeds ----------------------------------------------------------------------------------

/// SplitMix64, so the seeds are the same on every machine.
use ir::rng::SplitMix64 as Rng;

fn strs(v: &[&str]) -> MetaValue {
    MetaValue::Array(v.iter().map(|s| MetaValue::String((*s).to_owned())).collect())
}

/// A small byte-level BPE vocabulary (`gpt2` model, `smollm` pre-tokenizer): three control
/// tokens, the 256 byte symbols, a few merges and one user-defined token.
pub fn add_tiny_vocab(w: &mut GgufWriter) -> usize {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![3, 3, 3];
    let mut extra = 0;
    for b in 0..256u32 {
        let printable = (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xa1..=0xac).contains(&b)
            || (0xae..=0xff).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
        tokens.push(c.to_string());
        types.push(1);
    }
    for t in ["he", "ll", "hell", "hello", "Ġw", "Ġwor", "Ġworld", "or", "ld", "Ġ1", "ĊĊ"] {
        tokens.push(t.into());
        types.push(1);
    }
    tokens.push("<tool>".into());
    types.push(4);
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ 1", "Ċ Ċ"];
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    w.add_meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()));
    w.add_meta("tokenizer.ggml.tokens", strs(&token_refs));
    w.add_meta("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()));
    w.add_meta("tokenizer.ggml.merges", strs(&merges));
    w.add_meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1));
    w.add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    tokens.len()
}

/// A GGUF holding only the small vocabulary.
pub fn tiny_vocab_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    add_tiny_vocab(&mut w);
    w.finish()
}

/// Shape of a generated Llama seed.
struct Shape {
    n_layers: u32,
    d_model: u32,
    d_ff: u32,
    n_heads: u32,
    n_kv_heads: u32,
    format: GgmlType,
    tied: bool,
    vocab: bool,
}

/// A complete small Llama GGUF with random weights (optionally the small vocabulary).
fn llama_gguf(s: &Shape, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", MetaValue::String("llama".into()));
    w.add_meta("general.name", MetaValue::String("fuzz-seed".into()));
    for (k, v) in [
        ("block_count", s.n_layers),
        ("embedding_length", s.d_model),
        ("feed_forward_length", s.d_ff),
        ("attention.head_count", s.n_heads),
        ("attention.head_count_kv", s.n_kv_heads),
        ("context_length", 64),
        ("rope.dimension_count", s.d_model / s.n_heads),
    ] {
        w.add_meta(&format!("llama.{k}"), MetaValue::U32(v));
    }
    w.add_meta("llama.rope.freq_base", MetaValue::F32(10000.0));
    w.add_meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5));
    let vocab = if s.vocab { add_tiny_vocab(&mut w) as u64 } else { 8 };
    if s.vocab {
        w.add_meta("tokenizer.chat_template", MetaValue::String(SMOLLM2_TEMPLATE.into()));
    }
    let (d, ff) = (u64::from(s.d_model), u64::from(s.d_ff));
    let kv = u64::from(s.n_kv_heads * (s.d_model / s.n_heads));
    let mut add = |w: &mut GgufWriter, name: &str, dims: &[u64], format: GgmlType| {
        let (cols, rows) = (dims[0] as usize, dims.get(1).copied().unwrap_or(1) as usize);
        let qf = format.quant_format().expect("a supported format");
        let mut bytes = vec![];
        for _ in 0..rows {
            bytes.extend(ir::quant::quantize_row(qf, &rng.vec(cols, 1.0)));
        }
        w.add_tensor(name, dims, format, &bytes);
    };
    // Q8_0 blocks are 32 wide: a narrower model keeps its embedding in F32.
    let embd_format = if d % 32 == 0 { GgmlType::Q8_0 } else { GgmlType::F32 };
    add(&mut w, "token_embd.weight", &[d, vocab], embd_format);
    for l in 0..s.n_layers {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        add(&mut w, &t("attn_norm"), &[d], GgmlType::F32);
        add(&mut w, &t("attn_q"), &[d, d], s.format);
        add(&mut w, &t("attn_k"), &[d, kv], s.format);
        add(&mut w, &t("attn_v"), &[d, kv], s.format);
        add(&mut w, &t("attn_output"), &[d, d], s.format);
        add(&mut w, &t("ffn_norm"), &[d], GgmlType::F32);
        add(&mut w, &t("ffn_gate"), &[d, ff], s.format);
        add(&mut w, &t("ffn_up"), &[d, ff], s.format);
        add(&mut w, &t("ffn_down"), &[ff, d], s.format);
    }
    add(&mut w, "output_norm.weight", &[d], GgmlType::F32);
    if !s.tied {
        add(&mut w, "output.weight", &[d, vocab], s.format);
    }
    w.finish()
}

/// Shape of a generated Hugging Face checkpoint seed.
struct HfShape {
    n_layers: usize,
    d_model: usize,
    d_ff: usize,
    n_heads: usize,
    n_kv_heads: usize,
    vocab: usize,
    dtype: safetensors::Dtype,
    tied: bool,
    /// One `model.safetensors`, or two shards listed by `model.safetensors.index.json`.
    sharded: bool,
}

/// A small Llama checkpoint with random weights: `config.json` and the weight files, as
/// (name, bytes) in [`HF_FILES`] order, the first being `config.json`.
fn hf_checkpoint_files(s: &HfShape, seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    use safetensors::Dtype;
    let mut rng = Rng::new(seed);
    let (d, ff, kv) = (s.d_model, s.d_ff, s.n_kv_heads * (s.d_model / s.n_heads));
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![s.vocab, d])];
    for l in 0..s.n_layers {
        for (module, shape) in [
            ("input_layernorm", vec![d]),
            ("self_attn.q_proj", vec![d, d]),
            ("self_attn.k_proj", vec![kv, d]),
            ("self_attn.v_proj", vec![kv, d]),
            ("self_attn.o_proj", vec![d, d]),
            ("post_attention_layernorm", vec![d]),
            ("mlp.gate_proj", vec![ff, d]),
            ("mlp.up_proj", vec![ff, d]),
            ("mlp.down_proj", vec![d, ff]),
        ] {
            shapes.push((format!("model.layers.{l}.{module}.weight"), shape));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![d]));
    if !s.tied {
        shapes.push(("lm_head.weight".into(), vec![s.vocab, d]));
    }
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let values = rng.vec(shape.iter().product(), 0.5);
            let bytes = match s.dtype {
                Dtype::F16 => values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
                Dtype::BF16 => values.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
                _ => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
            };
            (name, shape, bytes)
        })
        .collect();
    let serialize = |part: &[(String, Vec<usize>, Vec<u8>)]| {
        let views = part.iter().map(|(n, shape, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(s.dtype, shape.clone(), b).expect("sizes match"))
        });
        safetensors::serialize(views, None).expect("serializes")
    };
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": ff,
        "num_hidden_layers": s.n_layers,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads,
        "vocab_size": s.vocab,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": s.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": format!("{:?}", s.dtype).to_lowercase(),
    });
    let mut files = vec![("config.json", serde_json::to_vec_pretty(&config).unwrap())];
    if !s.sharded {
        files.push(("model.safetensors", serialize(&tensors)));
        return files;
    }
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let map: serde_json::Map<String, serde_json::Value> = [(a, names[0]), (b, names[1])]
        .iter()
        .flat_map(|(part, file)| part.iter().map(|t| (t.0.clone(), serde_json::Value::from(*file))))
        .collect();
    let total: usize = tensors.iter().map(|t| t.2.len()).sum();
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map });
    files.push(("model.safetensors.index.json", serde_json::to_vec_pretty(&index).unwrap()));
    files.push((names[0], serialize(a)));
    files.push((names[1], serialize(b)));
    files
}

/// A `tokenizer_config.json` of the small vocabulary, with `template` as its chat template.
fn tokenizer_config(template: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::json!({
        "add_bos_token": false,
        "bos_token": "<|im_start|>",
        "eos_token": { "content": "<|im_end|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true },
        "model_max_length": 64,
        "tokenizer_class": "GPT2Tokenizer",
    });
    if let Some(t) = template {
        v["chat_template"] = t.into();
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

/// The committed ONNX models the `onnx_model` seeds are made of (in `fixtures/`), written by
/// the Python peer `tests/peer/gguf_to_onnx.py` from the `gguf_build` seed
/// `llama-d16-f32.gguf` (1 layer, d_model 16, 2 heads, 1 KV head, d_ff 24, vocabulary 8):
/// `onnx-f16/model.onnx` with `--dtype f16`, `onnx-external/model.onnx` and its
/// `model.onnx.data` with `--external-data` (written as `model.onnx` in an empty directory).
pub const ONNX_FIXTURES: [&str; 3] =
    ["onnx-f16/model.onnx", "onnx-external/model.onnx", "onnx-external/model.onnx.data"];

fn fixture(name: &str) -> Vec<u8> {
    let path = crate_dir().join("fixtures").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `tokenizer.chat_template` of SmolLM2-135M-Instruct.
pub const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Chat templates of well-known model families (written for jinja2 as Hugging Face ships
/// them), and hostile ones the renderer must stop.
const TEMPLATES: &[(&str, &str)] = &[
    ("smollm2", SMOLLM2_TEMPLATE),
    (
        "llama3",
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    (
        "mistral",
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    ),
    (
        "gemma",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
    ),
    (
        "methods",
        "{% for m in messages %}{{ m.content.strip() }}|{{ m.content.lstrip('x ') }}|{{ m.role.upper() }}|{{ m.content.split()|length }}|{% if m.content.startswith('  x') %}T{% endif %}{{ m.content.replace('a', 'bb') }}|{{ m.get('role') }}|{% for k, v in m.items() %}{{ k }}={{ v }}{% endfor %}{% endfor %}",
    ),
    (
        "macro",
        "{% macro turn(role, text) %}<{{ role }}>{{ text|e }}</{{ role }}>{% endmacro %}{% for m in messages %}{{ turn(m.role, m.content) }}{% set ns = namespace(n=loop.index) %}{{ ns.n * 2 }}{% endfor %}{{ messages|map(attribute='role')|join(',') }}",
    ),
    ("nested-loops", "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"),
    ("doubling", "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"),
    ("exponential-macro", "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(12) }}"),
    ("deep-recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ("replace", "{{ ('y' * 100000).replace('', 'x' * 100000)|length }}"),
];

/// Texts for the tokenizer target.
const TEXTS: &[(&str, &str)] = &[
    ("hello", "hello world"),
    ("chatml", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
    ("digits", "Call 555-0123 at 10:45, or 3.14159e10 times ٣٤ ⅷ"),
    ("unicode", "naïve café — 日本語のテキスト 😀👍🏽 \u{200d}\u{feff}\t\r\n  end"),
    ("code", "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n\n\n<tool>x</tool><|endoftext|>"),
    ("bytes", "\u{0}\u{1}\u{7f}\u{80}\u{ff}\u{fffd}"),
];

/// Every seed: (target, file name, bytes). Deterministic.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = vec![];
    let q = |n_layers, d_model, d_ff, n_heads, n_kv_heads, format, tied, vocab| Shape {
        n_layers,
        d_model,
        d_ff,
        n_heads,
        n_kv_heads,
        format,
        tied,
        vocab,
    };
    for (name, shape) in [
        ("llama-q4_0-vocab.gguf", q(1, 32, 64, 4, 2, GgmlType::Q4_0, true, true)),
        ("llama-q4_1-2layers.gguf", q(2, 32, 32, 2, 1, GgmlType::Q4_1, false, false)),
        ("llama-q8_0.gguf", q(1, 32, 32, 8, 8, GgmlType::Q8_0, true, false)),
        ("llama-f16.gguf", q(1, 32, 32, 4, 4, GgmlType::F16, false, false)),
        ("llama-f32.gguf", q(1, 32, 32, 4, 2, GgmlType::F32, true, false)),
    ] {
        out.push(("gguf_build", name.to_string(), llama_gguf(&shape, name.len() as u64)));
    }
    out.push(("gguf_build", "vocab-only.gguf".to_string(), tiny_vocab_gguf()));
    out.push((
        "gguf_build",
        "llama-d16-f32.gguf".to_string(),
        llama_gguf(&q(1, 16, 24, 2, 1, GgmlType::F32, true, false), 16),
    ));
    let tokenizer = tiny_tokenizer_json();
    let llama3 = TEMPLATES[1].1;
    let h = |n_layers, d_model, d_ff, n_heads, n_kv_heads, vocab, dtype, tied, sharded| HfShape {
        n_layers,
        d_model,
        d_ff,
        n_heads,
        n_kv_heads,
        vocab,
        dtype,
        tied,
        sharded,
    };
    use safetensors::Dtype;
    for (name, shape, extra) in [
        // The small vocabulary with its special tokens and chat template in tokenizer_config.json.
        (
            "tied-bf16-vocab",
            h(1, 16, 24, 2, 1, 271, Dtype::BF16, true, false),
            vec![
                ("tokenizer_config.json", tokenizer_config(Some(SMOLLM2_TEMPLATE))),
                ("generation_config.json", br#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#.to_vec()),
            ],
        ),
        // Shards, a chat_template.jinja, special tokens by id in config.json.
        (
            "sharded-f16",
            h(2, 16, 16, 4, 2, 8, Dtype::F16, false, true),
            vec![("chat_template.jinja", llama3.as_bytes().to_vec())],
        ),
        ("f32", h(1, 8, 8, 2, 2, 8, Dtype::F32, false, false), vec![("tokenizer_config.json", tokenizer_config(None))]),
    ] {
        let mut files = hf_checkpoint_files(&shape, name.len() as u64);
        files.push(("tokenizer.json", tokenizer.clone().into_bytes()));
        files.extend(extra);
        let named: Vec<(&str, &[u8])> = files[1..].iter().map(|(n, b)| (*n, b.as_slice())).collect();
        out.push(("hf_checkpoint", format!("{name}.hf"), pack(&files[0].1, &named)));
    }
    let config = br#"{"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}"#;
    let tok_config = tokenizer_config(Some(SMOLLM2_TEMPLATE));
    let data = fixture(ONNX_FIXTURES[2]);
    for (name, model, extra) in [
        ("f16", ONNX_FIXTURES[0], vec![("tokenizer_config.json", &tok_config[..])]),
        ("external", ONNX_FIXTURES[1], vec![("model.onnx.data", &data[..])]),
    ] {
        let mut files = vec![("tokenizer.json", tokenizer.as_bytes()), ("config.json", &config[..])];
        files.extend(extra);
        out.push(("onnx_model", format!("{name}.onnx"), pack(&fixture(model), &files)));
    }
    for (name, src) in TEMPLATES {
        let mut input = src.as_bytes().to_vec();
        for (role, content) in [("system", "Be terse."), ("user", "  x Hello, a"), ("assistant", "Hi!")] {
            input.push(SEP);
            input.extend_from_slice(role.as_bytes());
            input.push(SEP);
            input.extend_from_slice(content.as_bytes());
        }
        out.push(("chat_template", format!("{name}.txt"), input));
    }
    for (name, text) in TEXTS {
        out.push(("tokenizer", format!("{name}.txt"), text.as_bytes().to_vec()));
    }
    out
}

/// The small vocabulary as `tokenizer.json` (committed beside this crate).
pub fn tiny_tokenizer_json() -> String {
    let gguf = GgufFile::parse(tiny_vocab_gguf()).expect("the generated vocabulary parses");
    compiler::tokenizer_json::tokenizer_json(&gguf).expect("the generated vocabulary builds")
}

/// Writes the seeds and the small `tokenizer.json` under `dir` (this crate's directory).
pub fn write_seeds(dir: &Path) -> std::io::Result<usize> {
    let seeds = seeds();
    for (target, name, bytes) in &seeds {
        let d = dir.join("seeds").join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)?;
    }
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json())?;
    Ok(seeds.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_seeds_are_what_the_generator_writes() {
        let dir = crate_dir();
        for (target, name, bytes) in seeds() {
            let path = dir.join("seeds").join(target).join(&name);
            let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run gen_seeds)", path.display()));
            assert!(committed == bytes, "{} differs from the generator (run gen_seeds)", path.display());
        }
        let json = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
        assert_eq!(json, tiny_tokenizer_json(), "tokenizer.json differs from the generator (run gen_seeds)");
    }

    #[test]
    fn seeds_are_small_and_valid() {
        let seeds = seeds();
        for (target, _) in TARGETS {
            let total: usize = seeds.iter().filter(|s| s.0 == target).map(|s| s.2.len()).sum();
            assert!(total > 0 && total < 100_000, "{target}: {total} bytes of seeds");
        }
        // The generated models are complete: they lower, and the vocabulary builds.
        for (_, name, bytes) in seeds.iter().filter(|s| s.0 == "gguf_build" && s.1.starts_with("llama")) {
            let gguf = GgufFile::parse(bytes.clone()).unwrap();
            compiler::frontend::lower(&gguf, "seed", 64).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let gguf = GgufFile::parse(seeds[0].2.clone()).unwrap();
        compiler::tokenizer_json::tokenizer_json(&gguf).unwrap();
        // The checkpoints and ONNX models open, lower and have a tokenizer, so the targets start
        // from inputs that reach every stage.
        let mut n = 0;
        for (target, name, bytes) in &seeds {
            let source = match *target {
                "hf_checkpoint" => open_hf(bytes),
                "onnx_model" => open_onnx(bytes),
                _ => continue,
            };
            let source = source.unwrap_or_else(|e| panic!("{target}/{name}: {e}"));
            compiler::frontend::lower(&*source, "seed", 64).unwrap_or_else(|e| panic!("{target}/{name}: {e}"));
            let spec = source.tokenizer().unwrap_or_else(|e| panic!("{target}/{name}: {e}"));
            assert_eq!((spec.bos.0, spec.eos.0), (1, 2), "{target}/{name}");
            n += 1;
        }
        assert_eq!(n, 5, "checkpoint and ONNX seeds");
    }

    #[test]
    fn packed_files_unpack() {
        let files: [(&str, &[u8]); 3] = [("a.json", b"{}"), ("b", b""), ("c.bin", b"x\ny\xff")];
        let packed = pack(b"first", &files);
        let (first, got) = unpack(&packed);
        assert_eq!(first, b"first");
        let want: Vec<NamedFile> = files.iter().map(|(n, b)| (n.as_bytes(), *b)).collect();
        assert_eq!(got, want);
        assert_eq!(unpack(b"plain"), (&b"plain"[..], vec![]));
        // A mark without a newline names a file with no bytes.
        let (first, got) = unpack(b"\xffFILE x\xffFILE ");
        assert_eq!((first, got), (&b""[..], vec![(&b"x"[..], &b""[..]), (&b""[..], &b""[..])]));
    }

    /// Files of the previous input do not stay: a checkpoint without weights does not open
    /// after one with them.
    #[test]
    fn scratch_files_do_not_leak_between_inputs() {
        let seed = seeds().into_iter().find(|s| s.0 == "hf_checkpoint").unwrap().2;
        assert!(open_hf(&seed).is_ok());
        let (config, _) = unpack(&seed);
        let e = open_hf(config).err().expect("no weights");
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        let data = seeds().into_iter().find(|s| s.1 == "external.onnx").unwrap().2;
        assert!(open_onnx(&data).is_ok());
        let (model, _) = unpack(&data);
        let e = open_onnx(model).err().expect("no external data");
        assert!(e.to_string().contains("model.onnx.data"), "{e}");
    }

    /// Every committed seed and every kept crash input, through its target.
    #[test]
    fn replay_seeds_and_crashes() {
        for (target, run) in TARGETS {
            let mut n = 0;
            for kind in ["seeds", "crashes"] {
                let dir = crate_dir().join(kind).join(target);
                if !dir.exists() {
                    continue;
                }
                for file in input_files(&dir).unwrap() {
                    let bytes = std::fs::read(&file).unwrap();
                    let res = std::panic::catch_unwind(|| run(&bytes));
                    assert!(res.is_ok(), "{target} crashed on {}", file.display());
                    n += 1;
                }
            }
            assert!(n > 0, "{target}: no inputs replayed");
        }
    }

    #[test]
    fn targets_survive_trivial_inputs() {
        for (_, run) in TARGETS {
            run(b"");
            run(b"GGUF");
            run(&[SEP, SEP, 0, 0xfe]);
        }
    }
}
