//! `cargo xtask`: build a model bundle, chat with it, run it, benchmark it, evaluate it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use compiler::bundle::{BuildOptions, Stage, WeightsPlacement};

#[derive(Parser)]
#[command(name = "cargo xtask", version, about = "kiln: compile LLMs ahead of time")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// The arguments of a command this binary was built without (`heal`, `finetune`): handed to
/// the binary built with them.
#[cfg(not(feature = "train"))]
#[derive(clap::Args, Clone, Debug)]
struct Deferred {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<std::ffi::OsString>,
}

/// `--activations`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ActivationsArg {
    Q16,
    Q8,
}

/// `--lora-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LoraModeArg {
    /// Low-rank for adapters that `heal` or `finetune` trained against the compressed model
    /// (their adapter_config.json says so), merged otherwise.
    Auto,
    /// Merged into the weights before pruning and requantization (as llama.cpp's export-lora).
    Merge,
    /// Kept as two small f16 matmuls beside each compressed weight (what `heal` trains against).
    LowRank,
}

/// `--kv-cache`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KvCacheArg {
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightsMode {
    /// Embedded when the packed weights are at most 1 GiB, else weights.bin (said so).
    Auto,
    /// In the library's read-only data (at most 1 GiB).
    Embedded,
    /// In the bundle's weights.bin, mapped at session start.
    File,
}

/// The model passes' options, shared by `build-model` and `optimize`.
#[derive(clap::Args)]
struct ModelPassArgs {
    /// Requantize every matrix to FORMAT (q8_0, q4_0, ...) or a llama.cpp mixture (q4_k_m, ...).
    #[arg(long)]
    quant: Option<String>,
    /// Per-tensor formats, PATTERN=FORMAT[,PATTERN=FORMAT...]; PATTERN is a substring of
    /// tensor names or a glob (`blk.*.attn_v.weight=q8_0`); the first match wins.
    #[arg(long)]
    quant_tensor: Vec<String>,
    /// Remove transformer blocks: indices (20,21,22), last:N (the N before the final block),
    /// or auto:N (the N contiguous blocks, final block kept, that change the residual
    /// stream least on the calibration text; Gromov et al. 2024).
    #[arg(long)]
    prune_layers: Option<compiler::passes::prune_layers::PruneSpec>,
    /// Calibration text for auto:N (default: the shipped kiln:calib.txt).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Most calibration tokens auto:N uses (default: 1024).
    #[arg(long)]
    calib_tokens: Option<usize>,
    /// Merge a LoRA adapter into the weights before any other change: a PEFT directory
    /// (adapter_config.json + adapter_model.safetensors) or a llama.cpp GGUF adapter;
    /// repeat for several.
    #[arg(long)]
    lora: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compiles a model (GGUF file, Hugging Face checkpoint or ONNX export) into a bundle (default: fetch SmolLM2-135M-Instruct Q4_1, host target).
    BuildModel(BuildModelArgs),
    /// Heals a compressed model: trains a LoRA adapter (PEFT format, for build-model --lora) so
    /// that the model as compressed by these options matches the model as given (KL divergence
    /// of the next-token distributions on the calibration text), on the CPU.
    #[cfg(feature = "train")]
    Heal {
        /// The model (GGUF file, Hugging Face checkpoint or ONNX export); default: the cached
        /// SmolLM2-135M-Instruct Q4_1.
        #[arg(short = 'm', long)]
        model: Option<PathBuf>,
        /// Held-out text evaluated before and after (default: the shipped kiln:eval.txt).
        #[arg(long)]
        eval_text: Option<PathBuf>,
        /// Tokens of the held-out text evaluated.
        #[arg(long, default_value_t = 1024)]
        eval_tokens: usize,
        /// Weight of the mean squared difference of the final hidden states, added to the KL.
        #[arg(long, default_value_t = 0.0)]
        hidden_weight: f32,
        #[command(flatten)]
        model_passes: ModelPassArgs,
        #[command(flatten)]
        train: heal::TrainArgs,
    },
    /// Fine-tunes a LoRA adapter (PEFT format, for build-model --lora) on chat examples: a
    /// JSON Lines file of {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"}
    /// rows, the loss on the assistant's tokens.
    #[cfg(feature = "train")]
    Finetune {
        /// The model; default: the cached SmolLM2-135M-Instruct Q4_1.
        #[arg(short = 'm', long)]
        model: Option<PathBuf>,
        /// The examples (JSON Lines).
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        model_passes: ModelPassArgs,
        #[command(flatten)]
        train: heal::TrainArgs,
    },
    /// Heals a compressed model with a LoRA adapter trained on the CPU (its first use builds
    /// the training stack; `cargo xtask heal --help` lists its options).
    #[cfg(not(feature = "train"))]
    #[command(disable_help_flag = true)]
    Heal(Deferred),
    /// Fine-tunes a LoRA adapter on chat examples (the first use builds the training stack).
    #[cfg(not(feature = "train"))]
    #[command(disable_help_flag = true)]
    Finetune(Deferred),
    /// Writes an optimized GGUF: LoRA merged (--lora), requantized (--quant, --quant-tensor),
    /// pruned (--prune-layers).
    Optimize(OptimizeArgs),
    /// Downloads (once) and prints the path of the default model.
    FetchModel,
    /// Chats with a bundle: answers PROMPT, or starts an interactive chat.
    Chat(chat::ChatArgs),
    /// Evaluates token ids (--tokens, --tokens-file; --dump-logits) or answers one message (--prompt).
    Run(chat::RunArgs),
    /// Text to token ids, or ids back to text, with a bundle's tokenizer.
    Tokenize(chat::TokenizeArgs),
    /// Serves a bundle over HTTP: the OpenAI API (/v1/chat/completions, /v1/completions with
    /// streaming, /v1/models), /health, and a chat page at /.
    Serve(serve::ServeArgs),
    /// Prefill (128, 512) and decode (128) tokens/s with 1 and 2 threads; with `--vs llama.cpp`,
    /// next to llama.cpp's own llama-bench on the same GGUF (built once into the cache).
    Bench(BenchArgs),
    /// kiln against llama.cpp on a Llama-3.1-8B-shaped GGUF with random Q4_0 weights (written
    /// once into the cache; about 4 GB, the bundle as much again): build-model time and peak
    /// memory, prefill and decode tokens/s, run-time peak memory, decode against the roofline,
    /// each checked against its target. Takes minutes; --layers, --width, ... shrink the shape.
    BenchLarge(BenchLargeArgs),
    /// Evaluates one or several bundles (repeat --bundle): perplexity, KL divergence from a
    /// reference bundle or GGUF (--reference), question-answering accuracy per hop class,
    /// hallucination rate, footprint and energy per query; a table, --json and an HTML --report.
    Eval(workflow::evaluate::EvalCmd),
    /// Where questions are answered: the device bundle only, the server only (a URL or a
    /// bundle served on loopback), and offloading by each policy; accuracy per hop class,
    /// share offloaded, latency, network bytes, device memory, and policy curves.
    OffloadEval(workflow::offload_eval::OffloadEvalCmd),
    /// A bounded load test of `serve` on loopback: throughput, latency and the server's memory
    /// at several numbers of concurrent clients.
    ServeLoad(workflow::serve_load::ServeLoadCmd),
    /// Runs the whole test suite: fetches the model, installs the llama.cpp peer if missing,
    /// then `cargo test --release --workspace` with KILN_MODEL set.
    Test(TestArgs),
    /// Builds the fuzz targets (tests/fuzz; needs cargo-fuzz) and runs each for SECONDS.
    Fuzz {
        /// One target (gguf_build, chat_template, tokenizer, hf_checkpoint, onnx_model); default: all.
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Extra libFuzzer flags (e.g. -runs=1000000).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Builds examples/c-chat (C, against the runtime's static library) and asks it PROMPT.
    CChat {
        /// The bundle directory (its lib/libkiln_model.a is linked in).
        #[arg(long, default_value = "bundles/x86_64-unknown-linux-gnu")]
        bundle: PathBuf,
        /// The message to answer.
        prompt: String,
    },
    /// Regenerates the C headers (runtime/include/kiln.h, runtime/abi/include/kiln_abi.h) from
    /// the Rust sources with cbindgen.
    Header,
}

#[derive(clap::Args)]
struct BuildModelArgs {
    /// The model: a GGUF file, a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) or an ONNX export (model.onnx, tokenizer files beside it); default: the cached SmolLM2-135M-Instruct Q4_1 (fetched on first use).
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// Target triple (default: the host's).
    #[arg(long)]
    target: Option<String>,
    /// Device profile (aarch64: snapdragon-865, raspberry-pi-5, generic-armv8.0: kernels and
    /// report; x86-64: x86-64-v3, epyc-zen4-2vcpu, host: the deployment report only, every
    /// one runs the AVX2 code; host measures this machine's bandwidth).
    #[arg(long)]
    device: Option<String>,
    /// Limits the build must meet on the device, e.g. memory=512MiB,decode=20tok/s,prefill=100tok/s,energy=5J:
    /// when the deployment report predicts a miss, nothing is written and the command fails.
    #[arg(long)]
    budget: Option<compiler::deploy::Budget>,
    /// Output bundle directory (default: bundles/<target>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// KV cache positions (default: the model's training context, at most 2048).
    #[arg(short = 'c', long)]
    context: Option<u32>,
    /// Most tokens per call (prefill chunk).
    #[arg(long, default_value_t = 512)]
    batch: u32,
    /// Where the packed weights go.
    #[arg(long, value_enum, default_value_t = WeightsMode::Auto)]
    weights: WeightsMode,
    /// Element type of the KV cache: f32 (exact), or f16 (half the cache's memory and
    /// attention's reads; keys and values rounded to half precision, as llama.cpp's
    /// default cache).
    #[arg(long, value_enum, default_value_t = KvCacheArg::F32)]
    kv_cache: KvCacheArg,
    /// Grid of the activations that meet quantized weights: q16 (int16 per block of 32,
    /// float32-level accuracy), or q8 (int8, as llama.cpp's q8_0 activations: 4-bit weights
    /// then run on 8-bit multiplies, faster prefill at an accuracy cost `eval` measures).
    #[arg(long, value_enum, default_value_t = ActivationsArg::Q16)]
    activations: ActivationsArg,
    /// How --lora adapters are applied: merge (W + alpha/r B A, then pruned and requantized
    /// with the rest), or low-rank (kept as matmuls beside the compressed weights: what an
    /// adapter `heal` trained saw, to f16's rounding, at (in + out) * r f16 values per layer);
    /// auto: low-rank for adapters heal or finetune wrote, merge for others.
    #[arg(long, value_enum, default_value_t = LoraModeArg::Auto)]
    lora_mode: LoraModeArg,
    /// Print the IR after a pass (or `all`).
    #[arg(long)]
    dump_after: Vec<String>,
    /// C compiler that links lib/libkiln_model.so, which `chat`, `run` and `bench` open
    /// (default: `cc` for the host, `aarch64-linux-gnu-gcc` for aarch64 Linux when installed,
    /// none for Android); `none` skips it.
    #[arg(long)]
    shared_linker: Option<String>,
    #[command(flatten)]
    model_passes: ModelPassArgs,
}

#[derive(clap::Args)]
struct OptimizeArgs {
    /// The GGUF file; default: the cached SmolLM2-135M-Instruct Q4_1 (fetched on first use).
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out when it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    model_passes: ModelPassArgs,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The bundle directory.
    #[arg(long, default_value = "bundles/x86_64-unknown-linux-gnu")]
    bundle: PathBuf,
    /// Thread counts to measure, each for kiln and llama.cpp (llama-bench's -t).
    #[arg(short = 't', long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Interleaved rounds (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Prompt lengths for prefill.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    prefill: Vec<usize>,
    /// Tokens to decode one at a time.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Compare with llama.cpp (its llama-bench, built from the pinned llama-cpp-python sdist).
    #[arg(long, value_parser = ["llama.cpp"])]
    vs: Option<String>,
    /// The GGUF llama.cpp runs; default: the bundle's source model when it is the default model.
    #[arg(long, requires = "vs")]
    gguf: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct BenchLargeArgs {
    /// Transformer blocks.
    #[arg(long, default_value_t = workflow::bench_large::Shape::LLAMA_3_1_8B.layers)]
    layers: usize,
    /// Embedding width.
    #[arg(long, default_value_t = workflow::bench_large::Shape::LLAMA_3_1_8B.width)]
    width: usize,
    /// Feed-forward width.
    #[arg(long, default_value_t = workflow::bench_large::Shape::LLAMA_3_1_8B.ffn)]
    ffn: usize,
    /// Query heads.
    #[arg(long, default_value_t = workflow::bench_large::Shape::LLAMA_3_1_8B.heads)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = workflow::bench_large::Shape::LLAMA_3_1_8B.kv_heads)]
    kv_heads: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads of both engines.
    #[arg(short = 't', long, default_value_t = 2)]
    threads: usize,
    /// Interleaved rounds of prefill and decode (medians are reported).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Element type of kiln's KV cache (build-model --kv-cache).
    #[arg(long, value_enum, default_value_t = KvCacheArg::F32)]
    kv_cache: KvCacheArg,
    /// Also write the figures and targets as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct TestArgs {
    /// Directory of Hugging Face reference activations (KILN_HF_REFERENCE).
    #[arg(long)]
    hf_reference: Option<PathBuf>,
    /// Extra arguments for cargo test.
    #[arg(last = true)]
    rest: Vec<String>,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn print_lines(lines: &[String]) {
    for line in lines {
        println!("{line}");
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    #[cfg(feature = "train")]
    if let Cmd::Heal { train, .. } | Cmd::Finetune { train, .. } = &cli.command {
        if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
            // matrixmultiply (burn's CPU products) reads its thread count from the environment,
            // once, at its first product (1-4 threads).
            let threads = train.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            // Sound only here: nothing has started a thread yet (the arguments were only
            // parsed), so no other thread reads the environment while it changes (edition 2024
            // makes this call `unsafe` for that reason).
            std::env::set_var("MATMUL_NUM_THREADS", threads.clamp(1, 4).to_string());
        }
    }
    match cli.command {
        Cmd::BuildModel(a) => build_model(a)?,
        Cmd::Optimize(a) => optimize(a)?,
        #[cfg(not(feature = "train"))]
        Cmd::Heal(d) => with_training_stack("heal", &d.args)?,
        #[cfg(not(feature = "train"))]
        Cmd::Finetune(d) => with_training_stack("finetune", &d.args)?,
        #[cfg(feature = "train")]
        Cmd::Heal { model, eval_text, eval_tokens, hidden_weight, model_passes, train } => {
            let calib_text = model_passes.calib.clone().unwrap_or_else(workflow::calibrate::default_calib_text);
            let task = heal::Task::Heal {
                calib: calib_text,
                eval_text: eval_text.unwrap_or_else(|| eval::data::shipped("eval.txt")),
                eval_tokens,
                hidden_weight,
            };
            train_adapter(model, model_passes, task, train)?;
        }
        #[cfg(feature = "train")]
        Cmd::Finetune { model, data, model_passes, train } => {
            train_adapter(model, model_passes, heal::Task::Finetune { data }, train)?;
        }
        Cmd::FetchModel => println!("{}", kiln::fetch_default_model(true)?.display()),
        Cmd::Chat(ref a) => run_bundle(&a.bundle.bundle, chat::Command::Chat(a.clone()))?,
        Cmd::Serve(ref a) => {
            a.check()?; // before the bundle is read or a runner built
            run_bundle(&a.bundle.bundle, chat::Command::Serve(a.clone()))?
        }
        Cmd::Run(ref a) => {
            if let Some(p) = &a.dump_logits {
                runtime::cli::check_output_file(p, a.force)?; // before anything is built or run
            }
            run_bundle(&a.bundle.bundle, chat::Command::Run(a.clone()))?
        }
        Cmd::Tokenize(a) => chat::run(&chat::Command::Tokenize(a))?,
        Cmd::Eval(a) => drop(workflow::evaluate::eval(&a)?),
        Cmd::OffloadEval(a) => drop(workflow::offload_eval::offload_eval(&a)?),
        Cmd::ServeLoad(a) => drop(workflow::serve_load::serve_load(&a)?),
        Cmd::Bench(a) => bench(a)?,
        Cmd::BenchLarge(a) => bench_large(a)?,
        Cmd::Test(a) => test(a)?,
        Cmd::Fuzz { target, seconds, rest } => {
            let targets: Vec<&str> = match &target {
                Some(t) => vec![t.as_str()],
                None => kiln::FUZZ_TARGETS.to_vec(),
            };
            kiln::fuzz(&targets, seconds, None, &rest)?
        }
        Cmd::CChat { bundle, prompt } => {
            let app = workflow::runner::build_c_chat(&bundle, None)?;
            exit_with(Command::new(app).arg(&bundle).arg(prompt).status()?.code())
        }
        Cmd::Header => {
            let written = kiln::header::write(&workflow::root())?;
            for path in &written {
                println!("wrote {}", path.display());
            }
            if written.is_empty() {
                println!("the headers are up to date");
            }
        }
    }
    Ok(())
}

/// `build-model`.
fn build_model(a: BuildModelArgs) -> Result<()> {
    let BuildModelArgs {
        model,
        target,
        device,
        budget,
        out,
        context,
        batch,
        weights,
        kv_cache,
        activations,
        lora_mode,
        dump_after,
        shared_linker,
        model_passes: ModelPassArgs { quant, quant_tensor, prune_layers, calib, calib_tokens, lora },
    } = a;
    let kv_cache = match kv_cache {
        KvCacheArg::F32 => ir::KvDType::F32,
        KvCacheArg::F16 => ir::KvDType::F16,
    };
    let activations = match activations {
        ActivationsArg::Q16 => ir::ActDType::Q16,
        ActivationsArg::Q8 => ir::ActDType::Q8,
    };
    let quant = quant_options(quant, &quant_tensor)?;
    let target = match target {
        Some(t) => t,
        None => targets::host_triple().context("no kiln target for this host; pass --target")?.to_string(),
    };
    targets::lookup_device(&target, device.as_deref())?;
    let report_device = device.clone();
    let device = targets::devices::code_device(&target, device.as_deref());
    let model = match model {
        Some(m) => m,
        None => kiln::fetch_default_model(true)?,
    };
    let out = out.unwrap_or_else(|| PathBuf::from("bundles").join(&target));
    // Refuse an output kiln may not write before calibrating.
    compiler::outdir::check_replaceable(&out)?;
    let calib = workflow::calibrate::CalibOptions { text: calib, tokens: calib_tokens };
    let (prune_layers, prune_notes) = workflow::calibrate::resolve_prune(&model, prune_layers, &calib, &lora)?;
    print_lines(&prune_notes);
    let opts = BuildOptions {
        model,
        target: target.clone(),
        device,
        out,
        context,
        batch,
        weights: match weights {
            WeightsMode::Auto => WeightsPlacement::Auto,
            WeightsMode::Embedded => WeightsPlacement::Embedded,
            WeightsMode::File => WeightsPlacement::File,
        },
        dump_after,
        shared_linker: match shared_linker.as_deref() {
            Some("none") => None,
            Some(cc) => Some(cc.to_string()),
            None => workflow::default_shared_linker(&target),
        },
        prune: prune_layers,
        quant,
        lora,
        lora_mode: match lora_mode {
            LoraModeArg::Auto => compiler::lora::LoraMode::Auto,
            LoraModeArg::Merge => compiler::lora::LoraMode::Merge,
            LoraModeArg::LowRank => compiler::lora::LoraMode::LowRank,
        },
        kv_cache,
        activations,
    };
    let bar = runtime::cli::progress(Stage::ALL.len() as u64, "build-model");
    bar.enable_steady_tick(Duration::from_millis(200));
    let start = Instant::now();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let (report, deployment) = workflow::evaluate::build_with_budget(
        &opts,
        report_device.as_deref(),
        budget.as_ref(),
        &mut |stage| {
            bar.set_position(Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0) as u64);
            bar.set_message(stage.name());
        },
        &|done, of| bar.set_message(format!("packing weights: {:.2} of {:.2} GiB", gib(done), gib(of))),
    );
    bar.finish_and_clear();
    if report.is_err() && !deployment.is_empty() {
        print!("{deployment}");
    }
    let report = report?;
    println!("built {} for {target} in {:.2} s", report.out.display(), start.elapsed().as_secs_f64());
    for (name, d) in &report.stage_times {
        println!("  {name:<28} {:>8.1} ms", d.as_secs_f64() * 1e3);
    }
    println!("  kernels                      {:>8}", report.n_kernels);
    println!("  library (.a)                 {:>10}", mib(report.library_bytes));
    println!("  weights (packed)             {:>10}", mib(report.weights_bytes));
    println!("  KV cache at context {:<6}   {:>10}", report.context, mib(report.kv_bytes));
    println!("  activation arena             {:>10}", mib(report.arena_bytes));
    println!("  peak memory at context       {:>10} (weights + KV + arena + logits)", mib(report.peak_memory_bytes()));
    println!("  layers                       {:>8}", report.layers);
    for note in &report.notes {
        println!("  {note}");
    }
    print!("{deployment}");
    Ok(())
}

/// `optimize`.
fn optimize(a: OptimizeArgs) -> Result<()> {
    let OptimizeArgs {
        model,
        out,
        force,
        model_passes: ModelPassArgs { quant, quant_tensor, prune_layers, calib, calib_tokens, lora },
    } = a;
    let quant = quant_options(quant, &quant_tensor)?;
    let model = match model {
        Some(m) => m,
        None => kiln::fetch_default_model(true)?,
    };
    let start = Instant::now();
    // Refuse an output kiln may not write before calibrating.
    compiler::outdir::check_output_file(&out, force)?;
    let calib = workflow::calibrate::CalibOptions { text: calib, tokens: calib_tokens };
    let (prune_layers, prune_notes) = workflow::calibrate::resolve_prune(&model, prune_layers, &calib, &lora)?;
    print_lines(&prune_notes);
    let opts = compiler::optimize::OptimizeOptions { model, out, force, prune: prune_layers, quant, lora };
    let spinner = runtime::cli::spinner("optimize");
    let report = compiler::optimize::optimize(&opts);
    spinner.finish_and_clear();
    let report = report?;
    println!("wrote {} in {:.2} s", opts.out.display(), start.elapsed().as_secs_f64());
    for note in &report.notes {
        println!("  {note}");
    }
    println!("  before: {}", report.before);
    println!("  after:  {}", report.after);
    println!(
        "  file: {} -> {} ({:.1}%)",
        mib(report.source_file_bytes),
        mib(report.out_file_bytes),
        100.0 * report.out_file_bytes as f64 / report.source_file_bytes.max(1) as f64
    );
    Ok(())
}

/// `bench`.
fn bench(a: BenchArgs) -> Result<()> {
    let BenchArgs { bundle, threads, runs, prefill, decode, vs, gguf, json, force } = a;
    let peer_gguf = match (vs, gguf) {
        (None, _) => None,
        (Some(_), Some(g)) => Some(g),
        (Some(_), None) => {
            let manifest: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(bundle.join("manifest.json"))
                    .with_context(|| format!("{} is not a kiln bundle", bundle.display()))?,
            )?;
            if manifest["source"]["sha256"] != kiln::DEFAULT_MODEL_SHA256 {
                bail!("--vs llama.cpp needs --gguf FILE: the GGUF the bundle was built from");
            }
            Some(kiln::fetch_default_model(false)?)
        }
    };
    workflow::bench::bench(&workflow::bench::BenchOptions {
        bundle,
        threads,
        runs,
        prefill,
        decode,
        peer_gguf,
        json,
        force,
    })
}

/// `bench-large`.
fn bench_large(a: BenchLargeArgs) -> Result<()> {
    let BenchLargeArgs { layers, width, ffn, heads, kv_heads, seed, threads, runs, kv_cache, json, force } = a;
    let options = workflow::bench_large::BenchLargeOptions {
        shape: workflow::bench_large::Shape { layers, width, ffn, heads, kv_heads },
        seed,
        threads,
        runs,
        kv_cache: match kv_cache {
            KvCacheArg::F32 => "f32",
            KvCacheArg::F16 => "f16",
        }
        .to_string(),
        kiln: std::env::current_exe().context("cannot find the kiln binary")?,
        tokenizer_from: kiln::fetch_default_model(true)?,
        json,
        force,
    };
    workflow::bench_large::bench_large(&options).map(drop)
}

/// `test`: the machine made ready, formatting checked, the workspace's tests with the default
/// model, the fuzz smoke run, and a summary naming every test that could not run.
fn test(a: TestArgs) -> Result<()> {
    let TestArgs { hf_reference, rest } = a;
    // `cargo xtask test` checked the machine before this binary was built (xtask::setup).
    let python = peers::python_for_tests()?;
    let formatted = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(workflow::root())
        .status()
        .context("cannot run cargo fmt")?;
    if !formatted.success() {
        bail!("the code is not formatted as rustfmt.toml says (the differences are above): run `cargo fmt --all`");
    }
    let model = kiln::fetch_default_model(true)?;
    let not_run = workflow::root().join("target/kiln-tests/not-run.tsv");
    std::fs::create_dir_all(not_run.parent().unwrap())?;
    std::fs::write(&not_run, "")?;
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["test", "--release", "--workspace"])
        .args(rest)
        .env("KILN_MODEL", &model)
        .env("KILN_NOT_RUN", &not_run)
        .env("KILN_PYTHON", &python)
        // Every model the tests compile goes through Cranelift's IR verifier.
        .env("KILN_VERIFY_IR", "1")
        .current_dir(workflow::root());
    if let Some(dir) = hf_reference.or_else(|| std::env::var_os("KILN_HF_REFERENCE").map(PathBuf::from)) {
        cmd.env("KILN_HF_REFERENCE", dir.canonicalize().with_context(|| format!("no directory {}", dir.display()))?);
    }
    let status = cmd.status()?;
    // The fuzz smoke run: each target for 20 s; a crash or a missing cargo-fuzz fails the test.
    let fuzz = if status.success() { Some(kiln::fuzz(&kiln::FUZZ_TARGETS, 20, Some(&model), &[])) } else { None };
    let records = std::fs::read_to_string(&not_run).unwrap_or_default();
    let lines: Vec<&str> = records.lines().filter(|l| !l.is_empty()).collect();
    eprintln!();
    if lines.is_empty() {
        eprintln!("kiln test summary: every test ran ({})", if status.success() { "passed" } else { "FAILED" });
    } else {
        eprintln!(
            "kiln test summary: {} test(s) NOT RUN (they neither passed nor failed); {}:",
            lines.len(),
            if status.success() { "all others passed" } else { "others FAILED" }
        );
        for l in lines {
            let (test, reason) = l.split_once('\t').unwrap_or((l, ""));
            eprintln!("  not run: {test}: {reason}");
        }
    }
    match &fuzz {
        None => eprintln!("fuzz smoke run: not started (the tests failed)"),
        Some(Ok(())) => eprintln!("fuzz smoke run: {} targets, no crash", kiln::FUZZ_TARGETS.len()),
        Some(Err(e)) => eprintln!("fuzz smoke run: FAILED: {e:#}"),
    }
    if !status.success() {
        exit_with(status.code());
    }
    fuzz.expect("ran")?;
    Ok(())
}

/// `heal` and `finetune` from the binary built without the training stack: cargo builds
/// (once) and runs this command with `--features train`, with the same arguments.
#[cfg(not(feature = "train"))]
fn with_training_stack(command: &str, args: &[std::ffi::OsString]) -> Result<()> {
    eprintln!("{command}: building the training stack (burn's autodiff) on first use");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--release", "--quiet", "--package", "kiln", "--features", "train", "--", command])
        .args(args)
        .current_dir(workflow::root())
        .status()
        .context("cannot run cargo")?;
    exit_with(status.code())
}

/// The requantization options of `--quant` and `--quant-tensor` (each a comma-separated list).
/// `heal` and `finetune`: the model passes' options resolved as build-model resolves them.
#[cfg(feature = "train")]
fn train_adapter(
    model: Option<PathBuf>,
    passes: ModelPassArgs,
    task: heal::Task,
    train: heal::TrainArgs,
) -> Result<()> {
    let ModelPassArgs { quant, quant_tensor, prune_layers, calib, calib_tokens, lora } = passes;
    let quant = quant_options(quant, &quant_tensor)?;
    // Refuse an output kiln may not write, and bad options, before calibrating.
    if train.resume && train.force {
        bail!("--resume and --force exclude each other");
    }
    if matches!(task, heal::Task::Heal { .. }) && prune_layers.is_none() && quant.is_empty() && lora.is_empty() {
        bail!("heal needs something to heal: give --quant, --quant-tensor or --prune-layers (the compression a build will apply)");
    }
    let model = match model {
        Some(m) => m,
        None => kiln::fetch_default_model(true)?,
    };
    let calib = workflow::calibrate::CalibOptions { text: calib, tokens: calib_tokens };
    let (prune, prune_notes) = workflow::calibrate::resolve_prune(&model, prune_layers, &calib, &lora)?;
    print_lines(&prune_notes);
    let summary = heal::run(heal::RunOptions { model, prune, quant, base_lora: lora, task, train })?;
    heal::print_summary(&summary);
    Ok(())
}

fn quant_options(quant: Option<String>, tensors: &[String]) -> Result<compiler::passes::requantize::QuantOptions> {
    let mut rules = vec![];
    for t in tensors {
        rules.extend(compiler::passes::requantize::TensorRule::parse_list(t).map_err(anyhow::Error::msg)?);
    }
    Ok(compiler::passes::requantize::QuantOptions { default: quant, tensors: rules })
}

/// Runs a runner command on `bundle`: in this process for bundles of the host, else with the
/// runner built for the bundle's target under emulation, given this command's own arguments.
fn run_bundle(bundle: &std::path::Path, command: chat::Command) -> Result<()> {
    match workflow::runner::runner_for(bundle)? {
        None => chat::run(&command),
        Some(app) => {
            if let Some((qemu, _)) = &app.emulator {
                eprintln!("(running the aarch64 build under {qemu}: emulated, not representative of speed)");
            }
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            exit_with(app.command().args(args).status()?.code())
        }
    }
}

fn exit_with(code: Option<i32>) -> ! {
    std::process::exit(code.unwrap_or(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
