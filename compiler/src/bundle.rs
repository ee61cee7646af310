//! `build_model`: from a GGUF file to a bundle directory.
//!
//! ```text
//! DIR/
//!   lib/libkiln_model.a      the compiled model library (Cranelift ELF object in an archive)
//!   include/kiln_model.h     its C header (the kiln ABI and `extern const ... kiln_model`)
//!   tokenizer.json           Hugging Face tokenizer built from the GGUF vocabulary
//!   manifest.json            hyperparameters, chat template, special tokens, target, options
//!   model.kir                the IR after the pass pipeline, for reading and diffing
//!   weights.bin              packed weights, only when they are not embedded
//! ```
//! The bundle is written to a temporary directory beside `DIR` and renamed into place, so a
//! failed build leaves no half bundle; `DIR` is replaced only when it is empty or a previous
//! kiln bundle (see [`crate::outdir`]). The same inputs give byte-identical files.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::codegen::abi;
use crate::frontend::{self, FrontendError};
use crate::gguf::GgufError;
use crate::outdir::{self, OutDirError};
use crate::tokenizer_json::TokenizerError;
use crate::{CompileError, CompileOptions};

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub model: PathBuf,
    pub target: String,
    /// Device profile (see `targets::lookup_device`); `None` for the target's default.
    pub device: Option<String>,
    pub out: PathBuf,
    /// KV cache positions; default: the training context, at most 2048.
    pub context: Option<u32>,
    /// Most tokens per call of the compiled entry point (prefill chunk).
    pub batch: u32,
    /// Where the packed weights go (`--weights`).
    pub weights: WeightsPlacement,
    pub dump_after: Vec<String>,
    /// The C compiler driver that links `lib/libkiln_model.so` from the static library for
    /// runners that open bundles without relinking (`cc`, `aarch64-linux-gnu-gcc`); `None` for
    /// targets that cannot run here (Android) or when not wanted.
    pub shared_linker: Option<String>,
    /// `--prune-layers`: transformer blocks to remove.
    pub prune: Option<crate::passes::prune_layers::PruneSpec>,
    /// `--quant`, `--quant-tensor`: weight formats to requantize to.
    pub quant: crate::passes::requantize::QuantOptions,
    /// `--lora`: LoRA adapters (PEFT directories or GGUF adapters) merged into the weights.
    pub lora: Vec<PathBuf>,
    /// `--lora-mode`: keep the adapters as low-rank matmuls beside the compressed weights
    /// (`attach_lora`) or merge them before requantization; by default low-rank for adapters
    /// `heal` or `finetune` trained.
    pub lora_mode: crate::lora::LoraMode,
    /// `--kv-cache`: element type of the KV cache.
    pub kv_cache: ir::KvDType,
    /// `--activations`: the grid quantized matmuls' activations are rounded to.
    pub activations: ir::ActDType,
}

/// Where a bundle's packed weights go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsPlacement {
    /// In the library when they are at most [`MAX_EMBEDDED_WEIGHTS`] bytes, else in
    /// `weights.bin` (the build says so in its notes).
    #[default]
    Auto,
    /// In the library's read-only data; refused beyond [`MAX_EMBEDDED_WEIGHTS`].
    Embedded,
    /// In the bundle's `weights.bin`, mapped by the runtime.
    File,
}

/// The most packed weight bytes a library embeds. Code reaches its read-only data with 32-bit
/// PC-relative offsets (x86-64's small code model: ±2 GiB for the whole program, the app's own
/// code and data included; aarch64's ADRP: ±4 GiB), and a larger blob fails in the linker
/// with pages of `relocation truncated to fit`. 1 GiB leaves the other half to the program;
/// larger models (a 3B model in 4 bits and up) get `weights.bin`, which the runtime maps, at
/// the same memory and load cost.
pub const MAX_EMBEDDED_WEIGHTS: u64 = 1 << 30;

impl WeightsPlacement {
    /// Whether the weights are packed straight into `weights.bin` (not into memory) when they
    /// take at least `at_least` bytes: always for `File`, and for `Auto` when they cannot fit.
    pub fn packs_to_file(self, at_least: u64) -> bool {
        match self {
            WeightsPlacement::File => true,
            WeightsPlacement::Auto => at_least > MAX_EMBEDDED_WEIGHTS,
            WeightsPlacement::Embedded => false,
        }
    }

    /// Whether `weights_bytes` of packed weights are embedded, and a note when `Auto` chose the
    /// file for their size; an error when `Embedded` cannot hold them.
    pub fn resolve(self, weights_bytes: u64) -> Result<(bool, Option<String>), String> {
        let fits = weights_bytes <= MAX_EMBEDDED_WEIGHTS;
        let size = format!("{:.2} GiB", weights_bytes as f64 / (1u64 << 30) as f64);
        match self {
            WeightsPlacement::File => Ok((false, None)),
            WeightsPlacement::Auto if fits => Ok((true, None)),
            WeightsPlacement::Auto => Ok((
                false,
                Some(format!(
                    "weights: {size} packed, more than the {} GiB a library embeds: written to weights.bin \
                     beside it (the runtime maps it; pass its path to kiln_session_new)",
                    MAX_EMBEDDED_WEIGHTS >> 30
                )),
            )),
            WeightsPlacement::Embedded if fits => Ok((true, None)),
            WeightsPlacement::Embedded => Err(format!(
                "--weights embedded: {size} of packed weights is more than a library can embed ({} GiB, the \
                 reach of its code's PC-relative addressing); build with --weights file (or the default, auto)",
                MAX_EMBEDDED_WEIGHTS >> 30
            )),
        }
    }
}

impl BuildOptions {
    /// `model` compiled for `target` into `out`, every other option at `build-model`'s default:
    /// the target's default device, the model's context (at most [`DEFAULT_CONTEXT`]), batch
    /// 512, weights embedded when they fit (see [`WeightsPlacement`]), no shared library for runners, no pruning, requantization or
    /// LoRA, an f32 KV cache and q16 activations. Set the rest with struct update syntax.
    pub fn new(model: impl Into<PathBuf>, target: impl Into<String>, out: impl Into<PathBuf>) -> Self {
        BuildOptions {
            model: model.into(),
            target: target.into(),
            device: None,
            out: out.into(),
            context: None,
            batch: 512,
            weights: WeightsPlacement::Auto,
            dump_after: vec![],
            shared_linker: None,
            prune: None,
            quant: Default::default(),
            lora: vec![],
            lora_mode: Default::default(),
            kv_cache: Default::default(),
            activations: Default::default(),
        }
    }
}

/// Context length when none is given (or less, when the model was trained for less).
pub const DEFAULT_CONTEXT: u32 = 2048;

/// A build stage, reported to the progress callback when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    ReadModel,
    Lower,
    Tokenizer,
    Compile,
    Write,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::ReadModel, Stage::Lower, Stage::Tokenizer, Stage::Compile, Stage::Write];

    pub fn name(self) -> &'static str {
        match self {
            Stage::ReadModel => "read model",
            Stage::Lower => "lower to IR",
            Stage::Compile => "passes, packing, codegen",
            Stage::Tokenizer => "tokenizer",
            Stage::Write => "write bundle",
        }
    }
}

/// What a build produced and measured.
#[derive(Clone, Debug)]
pub struct BuildReport {
    pub out: PathBuf,
    pub stage_times: Vec<(String, Duration)>,
    pub library_bytes: u64,
    pub weights_bytes: u64,
    pub arena_bytes: u64,
    pub kv_bytes: u64,
    /// Logits buffer the runtime holds while generating: one row of the vocabulary.
    pub logits_bytes: u64,
    pub n_kernels: usize,
    pub context: u32,
    /// Layers of the compiled model (after pruning).
    pub layers: u32,
    /// What the model passes changed (pruning, requantization), before and after.
    pub notes: Vec<String>,
}

impl BuildReport {
    /// Memory a session needs at the compiled context: weights, KV cache, arena, logits.
    pub fn peak_memory_bytes(&self) -> u64 {
        self.weights_bytes + self.kv_bytes + self.arena_bytes + self.logits_bytes
    }
}

/// Why a build failed.
#[derive(Debug)]
pub enum BuildError {
    Gguf(GgufError),
    Frontend(FrontendError),
    Compile(CompileError),
    Tokenizer(TokenizerError),
    Target(targets::TargetError),
    OutDir(OutDirError),
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    Lora(crate::lora::LoraError),
    /// The caller's check of the finished build refused it (e.g. a device budget not met).
    Refused(String),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Gguf(e) => write!(f, "{e}"),
            BuildError::Frontend(e) => write!(f, "{e}"),
            BuildError::Compile(e) => write!(f, "{e}"),
            BuildError::Tokenizer(e) => write!(f, "{e}"),
            BuildError::Target(e) => write!(f, "{e}"),
            BuildError::OutDir(e) => write!(f, "{e}"),
            BuildError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            BuildError::Lora(e) => write!(f, "{e}"),
            BuildError::Refused(why) => write!(f, "{why}; nothing was written"),
        }
    }
}

impl std::error::Error for BuildError {}

impl From<OutDirError> for BuildError {
    fn from(e: OutDirError) -> Self {
        BuildError::OutDir(e)
    }
}

/// Links `dir/lib/libkiln_model.a` into `dir/lib/libkiln_model.so` with the C compiler `cc`.
fn link_shared(cc: &str, dir: &Path) -> Result<(), BuildError> {
    let lib = dir.join("lib");
    let so = lib.join("libkiln_model.so");
    let output = std::process::Command::new(cc)
        .arg("-shared")
        // No build id: hashing 100 MB of weights for it was most of the link's time.
        .arg("-Wl,--build-id=none")
        .arg("-o")
        .arg(&so)
        .arg("-Wl,--whole-archive")
        .arg(lib.join("libkiln_model.a"))
        .arg("-Wl,--no-whole-archive")
        .output()
        .map_err(|error| BuildError::Io {
            path: PathBuf::from(cc),
            error: std::io::Error::new(error.kind(), format!("cannot run the linker {cc}: {error}")),
        })?;
    if !output.status.success() {
        return Err(BuildError::Io {
            path: so,
            error: std::io::Error::other(format!(
                "{cc} -shared failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
        });
    }
    Ok(())
}

/// Wraps an ELF object in a deterministic `ar` archive.
pub fn archive(object: &[u8], member: &str) -> Vec<u8> {
    use ar_archive_writer::{write_archive_to_stream, ArchiveKind, NewArchiveMember, DEFAULT_OBJECT_READER};
    let members = [NewArchiveMember::new(object, &DEFAULT_OBJECT_READER, member.to_string())];
    let mut out = Cursor::new(Vec::new());
    write_archive_to_stream(&mut out, &members, ArchiveKind::Gnu, false, None).expect("writing to memory cannot fail");
    out.into_inner()
}

/// `s` as text that is safe inside a C block comment: printable ASCII only (anything else
/// becomes `?`), and no `*/` or `/*` (a space is put between the two characters).
pub fn c_comment_text(s: &str) -> String {
    let ascii: String = s.chars().map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' }).collect();
    // The inserted spaces cannot form a new `*/` or `/*` with their neighbours.
    ascii.replace("*/", "* /").replace("/*", "/ *")
}

/// The C header of a model library. The model name (from the file) appears only in the first
/// comment, made safe by [`c_comment_text`].
pub fn header(name: &str, hp: &frontend::Hyperparameters, context: u32, batch: u32) -> String {
    let name = c_comment_text(name);
    format!(
        "/* Generated by kiln for model \"{name}\". Do not edit. */\n{abi}\n#ifndef KILN_MODEL_H\n#define KILN_MODEL_H\n\n#define KILN_MODEL_VOCAB {vocab}\n#define KILN_MODEL_CONTEXT {context}\n#define KILN_MODEL_BATCH {batch}\n#define KILN_MODEL_LAYERS {layers}\n\n#ifdef __cplusplus\nextern \"C\" {{\n#endif\n\n/* The model: pass &kiln_model to kiln_session_new (runtime/include/kiln.h). */\nextern const struct kiln_model_desc kiln_model;\n\n#ifdef __cplusplus\n}}\n#endif\n\n#endif /* KILN_MODEL_H */\n",
        abi = abi::C_ABI,
        vocab = hp.vocab,
        layers = hp.n_layers,
    )
}

/// The build fingerprint: SHA-256 of a canonical text naming everything that decides the
/// bundle (the model file's SHA-256, target, device and its resolved summary, context, batch,
/// weights mode, compiler and ABI versions). It is stored in the library's descriptor and in
/// `manifest.json`, and the runtime refuses a library whose fingerprint is not its bundle's.
pub fn fingerprint(
    model_sha256: &str,
    opts: &BuildOptions,
    embed_weights: bool,
    target: &impl serde::Serialize,
    context: u32,
    adapter_sha256: &[&str],
    lora_low_rank: bool,
) -> [u8; abi::FINGERPRINT_BYTES] {
    let mut text = format!(
        "kiln build fingerprint\ncompiler {}\nabi {}\nmodel sha256 {model_sha256}\ntarget {}\ndevice {}\n\
         target summary {}\ncontext {context}\nbatch {}\nweights {}\nprune {}\nquant {:?}\nkv cache {}\nactivations {}\n",
        env!("CARGO_PKG_VERSION"),
        abi::ABI_VERSION,
        opts.target,
        opts.device.as_deref().unwrap_or("(default)"),
        serde_json::to_string(target).expect("json"),
        opts.batch,
        if embed_weights { "embedded" } else { "file" },
        opts.prune.as_ref().map_or("none".to_string(), |p| p.to_string()),
        opts.quant,
        opts.kv_cache.name(),
        opts.activations.name(),
    );
    for digest in adapter_sha256 {
        text.push_str(&format!("lora sha256 {digest}\n"));
    }
    if lora_low_rank {
        text.push_str("lora mode low-rank\n");
    }
    Sha256::digest(text.as_bytes()).into()
}

/// Reads the LoRA adapters to merge (PEFT directories or GGUF adapters).
pub fn read_adapters(
    paths: &[PathBuf],
    hp: &frontend::Hyperparameters,
) -> Result<Vec<std::sync::Arc<crate::lora::Adapter>>, BuildError> {
    let base = crate::lora::BaseShape { n_heads: hp.n_heads as usize, n_kv_heads: hp.n_kv_heads as usize };
    paths
        .iter()
        .map(|p| crate::lora::read_adapter(p, base).map(std::sync::Arc::new).map_err(BuildError::Lora))
        .collect()
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds a bundle; `progress` is told when each stage starts.
pub fn build_model(opts: &BuildOptions, progress: &mut dyn FnMut(Stage)) -> Result<BuildReport, BuildError> {
    build_model_checked(opts, progress, &|_, _| {}, &mut |_| Ok(()))
}

/// Builds a bundle, showing `check` its manifest (hyperparameters, context, memory) before
/// the weights are packed (their least packed size, no digest yet) and again before anything
/// is written: an `Err` from it refuses the build and leaves `--out` untouched. `packed` is
/// told `(stored weight bytes packed, of all)` as packing goes (from rayon's threads).
pub fn build_model_checked(
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Stage),
    packed: &(dyn Fn(u64, u64) + Sync),
    check: &mut dyn FnMut(&serde_json::Value) -> Result<(), String>,
) -> Result<BuildReport, BuildError> {
    let target = targets::lookup_device(&opts.target, opts.device.as_deref()).map_err(BuildError::Target)?;
    // Refuse an output directory kiln may not replace before doing any work.
    outdir::check_replaceable(&opts.out).map_err(BuildError::OutDir)?;
    let mut stage_times = vec![];
    let t = Instant::now();
    progress(Stage::ReadModel);
    // Read once (a GGUF file, or a checkpoint's files); weights stay slices of these bytes
    // until packed where the source can lend them.
    let source_box = crate::source::open(&opts.model).map_err(|e| match e {
        FrontendError::Gguf(e) => BuildError::Gguf(e),
        e => BuildError::Frontend(e),
    })?;
    let source = source_box.as_ref();
    stage_times.push((Stage::ReadModel.name().to_string(), t.elapsed()));

    let t = Instant::now();
    progress(Stage::Lower);
    let stem = opts.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = frontend::model_name(source, &stem).map_err(BuildError::Frontend)?;
    let hp = frontend::hyperparameters(source).map_err(BuildError::Frontend)?;
    let context = frontend::choose_context(source, &hp, opts.context, DEFAULT_CONTEXT).map_err(BuildError::Frontend)?;
    let lowered = frontend::lower(source, &name, context).map_err(BuildError::Frontend)?;
    let adapters = read_adapters(&opts.lora, &hp)?;
    let lora_low_rank = opts.lora_mode.low_rank(&adapters);
    stage_times.push((Stage::Lower.name().to_string(), t.elapsed()));

    // The tokenizer comes before code generation so that the model file can be freed first.
    let t = Instant::now();
    progress(Stage::Tokenizer);
    let tokenizer = source.tokenizer().map_err(BuildError::Frontend)?;
    stage_times.push((Stage::Tokenizer.name().to_string(), t.elapsed()));

    let t = Instant::now();
    progress(Stage::Compile);
    let mut hp = lowered.hyper.clone();
    let adapter_digests: Vec<&str> = adapters.iter().map(|a| a.sha256.as_str()).collect();
    let mut copts = CompileOptions {
        batch: opts.batch,
        embed_weights: true, // decided below, once the packed size is known
        pipeline: crate::passes::PipelineOptions {
            dump_after: opts.dump_after.clone(),
            prune: opts.prune.clone(),
            quant: opts.quant.clone(),
            lora: adapters.clone(),
            lora_low_rank,
            ..Default::default()
        },
        fingerprint: [0; 32], // set below, once the file's digest is known
    };
    let mut graph = lowered.graph;
    graph.kv_dtype = opts.kv_cache;
    graph.act_dtype = opts.activations;
    // Each weight, borrowed from the source, is released to it once packed: a mapped file's
    // pages are given back, so the build's memory follows the tensors in flight.
    let release = |bytes: &[u8]| source.release(bytes);
    let model = crate::model::Model::new(graph, lowered.weights).with_release(&release);
    // The manifest, shown to `check` before packing (the weights at the least bytes they can
    // pack to, no digest yet: a model that misses the budget is refused before the work) and
    // again, exact, before anything is written.
    let source_kind = source.kind();
    let manifest_for = |hp: &frontend::Hyperparameters,
                        fingerprint: &str,
                        sha256: &str,
                        embed_weights: bool,
                        memory: (u64, u64, u64)| {
        json!({
            "kiln_abi_version": abi::ABI_VERSION,
            "fingerprint": fingerprint,
            "model": {
                "name": name,
                "vocab": hp.vocab,
                "context": context,
                "hyperparameters": hp,
            },
            "source": {
                "file": opts.model.file_name().map(|f| f.to_string_lossy().into_owned()),
                "format": source_kind,
                "sha256": sha256,
            },
            "target": target.summary(),
            "compile_options": {
                "context": context,
                "batch": opts.batch,
                "embed_weights": embed_weights,
                "kv_cache": opts.kv_cache.name(),
                "activations": format!("{} blocks of 32 for quantized matmuls, f32 elsewhere", opts.activations.name()),
                "prune_layers": opts.prune.as_ref().map(|p| p.to_string()),
                "quant": opts.quant.default,
                "quant_tensor": opts.quant.tensors.iter().map(|r| format!("{}={}", r.pattern, r.format)).collect::<Vec<_>>(),
                "lora": adapters.iter().map(|a| json!({
                    "adapter": a.path.file_name().map(|f| f.to_string_lossy().into_owned()),
                    "sha256": a.sha256,
                    "tensors": a.updates.len(),
                })).collect::<Vec<_>>(),
                "lora_mode": if lora_low_rank { "low-rank" } else { "merge" },
            },
            "tokenizer": {
                "bos_id": tokenizer.bos.0,
                "bos_token": tokenizer.bos.1,
                "eos_id": tokenizer.eos.0,
                "eos_token": tokenizer.eos.1,
                "add_bos": tokenizer.add_bos,
                "stop_ids": tokenizer.stop_ids,
                "chat_template": tokenizer.chat_template,
            },
            "files": {
                "library": "lib/libkiln_model.a",
                "header": "include/kiln_model.h",
                "tokenizer": "tokenizer.json",
                "ir": "model.kir",
                "weights": if embed_weights { None } else { Some("weights.bin") },
                "shared_library": opts.shared_linker.as_ref().map(|_| "lib/libkiln_model.so"),
            },
            "memory": {
                "weights_bytes": memory.0,
                "arena_bytes": memory.1,
                "kv_bytes": memory.2,
            },
        })
    };
    let planned = crate::plan(model, target.as_ref(), &copts).map_err(BuildError::Compile)?;
    let (arena_bytes, kv_bytes, layers) = planned.memory();
    let mut planned_hp = hp.clone();
    planned_hp.n_layers = layers;
    let estimate = (planned.packed_bytes_at_least(), arena_bytes, kv_bytes);
    let embed_estimate = opts.weights.resolve(estimate.0).is_ok_and(|(embed, _)| embed);
    check(&manifest_for(&planned_hp, "", "", embed_estimate, estimate)).map_err(BuildError::Refused)?;
    // Weights that cannot be embedded (or are asked for as a file) are written to weights.bin
    // as they are packed, never held whole; the rest are packed into memory.
    let at_least = planned.packed_bytes_at_least();
    if opts.weights == WeightsPlacement::Embedded {
        opts.weights.resolve(at_least).map_err(BuildError::Refused)?; // refused before packing
    }
    let mut staged = None;
    let sink = match opts.weights.packs_to_file(at_least) {
        true => {
            let (file_staged, file) = outdir::StagedFile::create(&opts.out, "weights.bin")?;
            staged = Some(file_staged);
            crate::pack::WeightsSink::file(file)
        }
        false => crate::pack::WeightsSink::memory(),
    };
    let sink = sink.with_progress(packed);
    // The file's digest (for the fingerprint and the manifest) is computed beside the
    // packing, which does not need it: one more task on rayon's pool, not a thread.
    let (sha256, prepared) = rayon::join(|| source.sha256(), || planned.pack(sink));
    let mut prepared = prepared.map_err(BuildError::Compile)?;
    let (embed_weights, placement_note) =
        opts.weights.resolve(prepared.weights_bytes()).map_err(BuildError::Refused)?;
    if !embed_weights && prepared.weights_in_memory() {
        // Packed into memory (they might have fit) but too large after all: written now.
        let (file_staged, file) = outdir::StagedFile::create(&opts.out, "weights.bin")?;
        let write = std::io::Write::write_all(&mut std::io::BufWriter::new(&file), &prepared.take_weights())
            .and_then(|()| file.sync_all());
        write.map_err(|e| BuildError::OutDir(OutDirError::Io { path: file_staged.path().to_owned(), error: e }))?;
        staged = Some(file_staged);
    }
    copts.embed_weights = embed_weights;
    let build_id =
        fingerprint(&sha256, opts, embed_weights, &target.summary(), context, &adapter_digests, lora_low_rank);
    copts.fingerprint = build_id;
    // The weights are packed: free the model file before code generation copies them again.
    drop(source_box);
    let mut compiled = crate::finish(prepared, target.as_ref(), &copts).map_err(BuildError::Compile)?;
    // Pruning changes the layer count the manifest and the header state.
    hp.n_layers = compiled.kv_layers;
    compiled.notes.extend(placement_note);
    stage_times.push((Stage::Compile.name().to_string(), t.elapsed()));
    for (n, d) in &compiled.timings {
        stage_times.push((format!("  {n}"), *d));
    }

    let t = Instant::now();
    progress(Stage::Write);
    let library = archive(&std::mem::take(&mut compiled.object), "kiln_model.o");
    let memory = (compiled.weights_bytes, compiled.arena_bytes, compiled.kv_bytes);
    let manifest = manifest_for(&hp, &hex(&build_id), &sha256, embed_weights, memory);
    check(&manifest).map_err(BuildError::Refused)?;
    let out = &opts.out;
    let mut files: Vec<(&str, &[u8])> = vec![];
    let manifest_text = serde_json::to_string_pretty(&manifest).expect("json") + "\n";
    let header_text = header(&name, &hp, context, opts.batch);
    files.push(("lib/libkiln_model.a", &library));
    files.push(("include/kiln_model.h", header_text.as_bytes()));
    files.push(("tokenizer.json", tokenizer.json.as_bytes()));
    files.push(("manifest.json", manifest_text.as_bytes()));
    files.push(("model.kir", compiled.final_ir.as_bytes()));
    outdir::write_bundle_dir(out, &files, |dir| {
        if let Some(staged) = &staged {
            let to = dir.join("weights.bin");
            std::fs::rename(staged.path(), &to).map_err(|error| OutDirError::Io { path: to, error })?;
        }
        match &opts.shared_linker {
            Some(cc) => link_shared(cc, dir),
            None => Ok(()),
        }
    })?;
    stage_times.push((Stage::Write.name().to_string(), t.elapsed()));
    Ok(BuildReport {
        out: out.clone(),
        stage_times,
        library_bytes: library.len() as u64,
        weights_bytes: compiled.weights_bytes,
        arena_bytes: compiled.arena_bytes,
        kv_bytes: compiled.kv_bytes,
        // Generation asks for the last token's logits only: one row (ABI 3).
        logits_bytes: hp.vocab as u64 * 4,
        n_kernels: compiled.n_kernels,
        context,
        layers: hp.n_layers,
        notes: std::mem::take(&mut compiled.notes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights that fit are embedded unless the file is asked for; beyond the limit the
    /// default writes weights.bin and says so, and forcing them in is a one-line error that
    /// names `--weights file` (before: a linker dump of truncated relocations).
    #[test]
    fn weights_beyond_the_code_models_reach_go_to_a_file() {
        let fits = MAX_EMBEDDED_WEIGHTS;
        let big = (41u64 << 30) / 10; // an 8B model in 4 bits
        assert_eq!(WeightsPlacement::Auto.resolve(fits), Ok((true, None)));
        assert_eq!(WeightsPlacement::Embedded.resolve(fits), Ok((true, None)));
        assert_eq!(WeightsPlacement::File.resolve(fits), Ok((false, None)));
        assert_eq!(WeightsPlacement::File.resolve(big), Ok((false, None)));
        let (embed, note) = WeightsPlacement::Auto.resolve(fits + 1).unwrap();
        assert!(!embed);
        assert!(note.is_some_and(|n| n.contains("weights.bin")));
        let (embed, note) = WeightsPlacement::Auto.resolve(big).unwrap();
        assert!(!embed && note.is_some_and(|n| n.contains("4.10 GiB")));
        let err = WeightsPlacement::Embedded.resolve(big).unwrap_err();
        assert!(err.contains("--weights file") && !err.contains('\n'), "{err}");
    }

    /// Removes C comments (the header has no string literals holding comment markers).
    fn strip_c_comments(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("/*") {
            out.push_str(&rest[..start]);
            match rest[start + 2..].find("*/") {
                Some(end) => rest = &rest[start + 2 + end + 2..],
                None => panic!("unterminated comment in {text}"),
            }
        }
        out.push_str(rest);
        out
    }

    fn hp() -> frontend::Hyperparameters {
        frontend::Hyperparameters {
            architecture: "llama".into(),
            n_layers: 1,
            d_model: 32,
            d_ff: 32,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 32,
            vocab: 8,
            rope_theta: 10000.0,
            rope_scaling: ir::RopeScaling::None,
            rms_eps: 1e-5,
            train_context: 64,
            tied_embedding: true,
        }
    }

    #[test]
    fn model_name_cannot_escape_the_header_comment() {
        for name in ["x */ int evil; /*", "*/int evil;", "a*/*/int evil;/**/", "/*/ int evil; /*/", "x\n*/ int evil;"] {
            let text = header(name, &hp(), 64, 8);
            let code = strip_c_comments(&text);
            assert!(!code.contains("evil"), "{name:?} leaked into the header code:\n{code}");
            assert!(text.lines().next().unwrap().contains("int evil"), "the name is still shown: {text}");
        }
        assert_eq!(c_comment_text("SmolLM2 135M Instruct"), "SmolLM2 135M Instruct");
        assert_eq!(c_comment_text("a*/b/*c\u{0}é"), "a* /b/ *c??");
    }
}
