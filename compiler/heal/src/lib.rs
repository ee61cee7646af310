//! `cargo xtask heal` and `cargo xtask finetune`: LoRA adapters trained on the CPU with burn's
//! autodiff, written as PEFT adapters that `build-model --lora` compiles in.
//!
//! - `heal` distills: the student is the model as a build with the same compression options
//!   would compile it (pruned, requantized: every weight dequantized from its compressed form),
//!   the teacher the model as given, and the loss the KL divergence between their next-token
//!   distributions on windows of a calibration text (plus, optionally, the mean squared
//!   difference of the final hidden states). What the adapter learns corrects the compression.
//! - `finetune` trains the same adapters with the cross-entropy of the answer tokens of a
//!   user's chat examples (JSON Lines), rendered with the model's chat template.
//!
//! A run writes into its `--out` directory only: the adapter (`adapter_config.json`,
//! `adapter_model.safetensors`, rewritten at every checkpoint so a stopped run leaves a usable
//! one), `training_log.jsonl` (a line per step, and the held-out evaluations before and after),
//! `summary.json`, and `checkpoint/` (factors, Adam's moments, the step), from which `--resume`
//! continues, bit for bit as if never stopped. A directory holding anything else is refused.

pub mod data;
pub mod llama;
pub mod lora;
pub mod train;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use compiler::model::Model;
use compiler::passes::prune_layers::PruneSpec;
use compiler::passes::requantize::QuantOptions;
use indicatif::{ProgressBar, ProgressStyle};

use llama::{Llama, Shape, Target};
use train::{EvalStats, Example, Hyper, Objective, Trainer};

/// The one random source of a run, seeded by `--seed`.
pub use ir::rng::SplitMix64 as Rng;

/// The options of the adapter and the training run, shared by `heal` and `finetune`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Directory of the adapter and the run's log and checkpoint (new or empty, or an earlier
    /// run's with --resume or --force).
    #[arg(long)]
    pub out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank); default: twice the rank.
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Layers to adapt: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (GGUF's
    /// attn_q ... ffn_down too), or all-linear.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Peak learning rate of Adam (warmup over the first tenth of the steps, cosine decay to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps between checkpoints (a stopped run loses at most this many).
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: usize,
    /// Continue the run whose checkpoint is in --out.
    #[arg(long)]
    pub resume: bool,
    /// Start over, replacing the files of an earlier run in --out.
    #[arg(long)]
    pub force: bool,
    /// Worker threads of the matrix products (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Stops after this many steps of this run, writing nothing more, as a killed run would
    /// (for the tests of --resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// What a run needs beyond [`TrainArgs`].
pub struct RunOptions {
    pub model: PathBuf,
    /// Model passes applied to the student (a build with the same options compiles it).
    pub prune: Option<PruneSpec>,
    pub quant: QuantOptions,
    /// Adapters merged into both teacher and student first.
    pub base_lora: Vec<PathBuf>,
    pub task: Task,
    pub train: TrainArgs,
}

pub enum Task {
    /// `heal`: distill from the model as given, on windows of `calib`; evaluate on the first
    /// `eval_tokens` of `eval_text`.
    Heal { calib: PathBuf, eval_text: PathBuf, eval_tokens: usize, hidden_weight: f32 },
    /// `finetune`: cross-entropy on the chat examples of `data`.
    Finetune { data: PathBuf },
}

/// What a finished run reports (also `summary.json`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub command: &'static str,
    pub steps: usize,
    pub tokens_seen: usize,
    pub seconds: f64,
    pub trainable_parameters: usize,
    pub before: EvalStats,
    pub after: EvalStats,
    pub eval_set: String,
    pub final_loss: f32,
}

/// The names a run writes into `--out`.
const OUR_FILES: [&str; 6] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "training_log.jsonl",
    "summary.json",
    "checkpoint",
    "checkpoint.tmp",
];

/// Checks `out` before any work: it may be missing or empty; holding an earlier run's files
/// (and nothing else) it needs `resume` (then a checkpoint) or `force` (then they go). Returns
/// whether a checkpoint is to be resumed.
pub fn prepare_out(out: &Path, resume: bool, force: bool) -> Result<bool> {
    if resume && force {
        bail!("--resume and --force exclude each other");
    }
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if resume {
                bail!("--resume: {} does not exist, so there is no checkpoint to continue", out.display());
            }
            std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
            return Ok(false);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", out.display())),
    };
    if !meta.is_dir() {
        bail!("--out {} exists and is not a directory; nothing was changed", out.display());
    }
    let mut ours = vec![];
    for entry in std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type()?;
        if !OUR_FILES.contains(&name.as_str()) || kind.is_symlink() {
            bail!(
                "--out {} holds {name:?}, which no training run wrote; choose a new or empty directory (nothing was changed)",
                out.display()
            );
        }
        ours.push(entry.path());
    }
    let checkpoint = out.join("checkpoint/state.json");
    if resume {
        if !checkpoint.is_file() {
            bail!("--resume: {} holds no checkpoint (checkpoint/state.json)", out.display());
        }
        return Ok(true);
    }
    if ours.is_empty() {
        return Ok(false);
    }
    if !force {
        bail!(
            "--out {} holds an earlier run; pass --resume to continue it from its checkpoint, or --force to start over (nothing was changed)",
            out.display()
        );
    }
    for p in ours {
        if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) }
            .with_context(|| format!("cannot remove {}", p.display()))?;
    }
    Ok(false)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// Runs `heal` or `finetune` (see the module doc).
pub fn run(opts: RunOptions) -> Result<Summary> {
    let args = &opts.train;
    let targets = Target::parse_list(&args.targets)?;
    if args.rank == 0 {
        bail!("--rank 0: a LoRA rank must be at least 1");
    }
    if args.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1");
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let resuming = prepare_out(&args.out, args.resume, args.force)?;
    // The products' thread count is set by the binary before any thread starts
    // (`MATMUL_NUM_THREADS`, xtask's main): changing the environment here would race with
    // other threads reading it.
    let start = Instant::now();

    let source = compiler::source::open(&opts.model)?;
    let source = source.as_ref();
    let hp = compiler::frontend::hyperparameters(source)?;
    let shape = Shape::from_hyper(&hp);
    lora::check_rank(&shape, &targets, args.rank)?;
    let spec = source.tokenizer().context("cannot build the model's tokenizer")?;
    let tokenizer = runtime::tokenizer::Tokenizer::from_json_str(&spec.json).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bos = spec.add_bos.then_some(spec.bos.0);

    // The data, before the models: bad input fails fast.
    let (examples, eval, eval_set, data_digest) = match &opts.task {
        Task::Heal { calib, eval_text, eval_tokens, .. } => {
            let tokens = data::text_tokens(&tokenizer, calib, bos)?;
            let examples = data::windows(&tokens, args.seq_len, "calibration text")?;
            let eval_ids = data::text_tokens(&tokenizer, eval_text, bos)?;
            let eval = data::chunks(&eval_ids, args.seq_len, *eval_tokens);
            if eval.is_empty() {
                bail!("the evaluation text {} has fewer than 2 tokens", eval_text.display());
            }
            let digest = sha256_hex(data::read_text(calib)?.as_bytes());
            (examples, eval, format!("{} (first {} tokens)", eval_text.display(), eval_tokens), digest)
        }
        Task::Finetune { data } => {
            let source_template =
                spec.chat_template.as_deref().context("the model has no chat template to render the examples with")?;
            let template = runtime::chat_template::ChatTemplate::new(source_template, &spec.bos.1, &spec.eos.1)
                .map_err(|e| anyhow::anyhow!("the model's chat template: {e}"))?;
            let (all, cut) = data::chat_examples(data, &template, &tokenizer, args.seq_len, bos)?;
            if cut > 0 {
                eprintln!("note: {cut} example(s) longer than --seq-len {} were cut", args.seq_len);
            }
            // Every tenth example is held out when there are ten or more.
            let (train, eval): (Vec<(usize, Example)>, Vec<(usize, Example)>) =
                all.into_iter().enumerate().partition(|(i, _)| *i % 10 != 9);
            let train: Vec<Example> = train.into_iter().map(|(_, e)| e).collect();
            let eval: Vec<Example> = eval.into_iter().map(|(_, e)| e).collect();
            let (train, eval, set) = if eval.is_empty() {
                (train.clone(), train, "the training examples (fewer than 10: none held out)".to_string())
            } else {
                let set = format!("{} held-out examples (every tenth)", eval.len());
                (train, eval, set)
            };
            let digest = sha256_hex(&std::fs::read(data)?);
            (train, eval, set, digest)
        }
    };

    // Teacher (distillation only) and student, as a build with these options compiles them.
    let context = (args.seq_len as u32).max(2);
    let lowered = compiler::frontend::lower(source, "heal", context)?;
    let adapters = compiler::bundle::read_adapters(&opts.base_lora, &hp)?;
    let all_layers: Vec<u32> = (0..hp.n_layers).collect();
    let teacher = match &opts.task {
        Task::Heal { .. } => {
            let mut model = Model::borrowed(lowered.graph.clone(), &lowered.weights);
            if !adapters.is_empty() {
                let o = compiler::passes::PipelineOptions { lora: adapters.clone(), ..Default::default() };
                compiler::passes::run_model_passes(&mut model, &o)?;
            }
            Some(Llama::from_model(&model, shape.clone(), all_layers.clone())?)
        }
        Task::Finetune { .. } => None,
    };
    let removed = match &opts.prune {
        Some(p) => p.resolve(hp.n_layers).map_err(anyhow::Error::msg)?,
        None => vec![],
    };
    let kept: Vec<u32> = all_layers.iter().copied().filter(|l| !removed.contains(l)).collect();
    let mut model = Model::borrowed(lowered.graph, &lowered.weights);
    let o = compiler::passes::PipelineOptions {
        prune: opts.prune.clone(),
        quant: opts.quant.clone(),
        lora: adapters,
        ..Default::default()
    };
    let report = compiler::passes::run_model_passes(&mut model, &o)?;
    let student = Llama::from_model(&model, shape.clone(), kept.clone())?;
    drop(model);
    let objective = match (&opts.task, teacher) {
        (Task::Heal { hidden_weight, .. }, Some(t)) => {
            Objective::Distill { teacher: Box::new(t), hidden_weight: *hidden_weight }
        }
        _ => Objective::CrossEntropy,
    };
    let command = if matches!(opts.task, Task::Heal { .. }) { "heal" } else { "finetune" };
    let alpha = args.alpha.unwrap_or(2.0 * args.rank as f32);
    let mut rng = Rng::new(args.seed);
    let lora = lora::Lora::new(&student, &targets, args.rank, alpha, &mut rng)?;
    let n_params = lora.n_params();
    let hyper = Hyper { steps: args.steps, batch: args.batch, lr: args.lr, seed: args.seed };
    let mut trainer = Trainer::new(&student, &objective, lora, hyper, examples)?;

    // What a checkpoint must agree with to be resumed.
    let meta = serde_json::json!({
        "command": command,
        "model": opts.model.display().to_string(),
        "model_bytes": std::fs::metadata(&opts.model).map(|m| m.len()).unwrap_or(0),
        "quant": format!("{:?}", opts.quant),
        "pruned": removed,
        "base_lora": opts.base_lora.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "data_sha256": data_digest,
        "targets": targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "rank": args.rank, "alpha": alpha, "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "hidden_weight": match &opts.task { Task::Heal { hidden_weight, .. } => *hidden_weight, _ => 0.0 },
    });
    let log_path = args.out.join("training_log.jsonl");
    let mut log_lines: Vec<String> = vec![];
    let before: EvalStats;
    if resuming {
        trainer.load(&args.out.join("checkpoint"), &meta)?;
        // The log up to the checkpoint; the evaluation before training is in it.
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let mut found = None;
        for line in text.lines() {
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v.get("eval").and_then(|e| e.as_str()) == Some("before") {
                found = Some(v.clone());
            } else if v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| (s as usize) >= trainer.step) {
                continue;
            } else if v.get("eval").is_some() {
                continue;
            }
            log_lines.push(line.to_string());
        }
        let found = found.context("the run's training_log.jsonl lost its evaluation before training")?;
        before = serde_json::from_value(found["stats"].clone()).context("training_log.jsonl: a bad evaluation line")?;
        println!("resuming {command} at step {} of {}", trainer.step, args.steps);
    } else {
        println!(
            "{command}: {} blocks{}, LoRA rank {} alpha {alpha} on {} ({n_params} parameters), {} training sequences of up to {} tokens",
            kept.len(),
            if removed.is_empty() { String::new() } else { format!(" (pruned {removed:?})") },
            args.rank,
            targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>().join(","),
            trainer.n_examples(),
            args.seq_len
        );
        for note in &report.notes {
            println!("  {note}");
        }
        before = trainer.evaluate(&eval, false)?;
        log_lines.push(serde_json::json!({ "eval": "before", "stats": before }).to_string());
    }
    write_lines(&log_path, &log_lines)?;
    let mut log = std::fs::OpenOptions::new().append(true).open(&log_path)?;

    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} steps | {msg} | {elapsed} elapsed, {eta} left")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_position(trainer.step as u64);
    let train_start = Instant::now();
    let first_step = trainer.step;
    let mut tokens_seen = 0usize;
    let mut last_loss = f32::NAN;
    let extra =
        serde_json::json!({ "base_model_name_or_path": opts.model.display().to_string(), "kiln": meta.clone() });
    while trainer.step < args.steps {
        let s = trainer.step()?;
        tokens_seen += s.tokens;
        last_loss = s.loss;
        let secs = train_start.elapsed().as_secs_f64();
        let rate = tokens_seen as f64 / secs.max(1e-9);
        bar.set_message(format!("loss {:.4} | {:.0} tok/s", s.loss, rate));
        bar.set_position(trainer.step as u64);
        writeln!(
            log,
            "{}",
            serde_json::json!({ "step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "tokens": s.tokens, "seconds": secs })
        )?;
        if args.stop_after == Some(trainer.step - first_step) {
            bar.abandon();
            bail!(
                "stopped after {} steps of this run (--stop-after), at step {}",
                trainer.step - first_step,
                trainer.step
            );
        }
        if trainer.step % args.checkpoint_every == 0 || trainer.step == args.steps {
            checkpoint(&trainer, &args.out, &meta, &shape, &extra)?;
            if !bar.is_hidden() {
                bar.println(format!("checkpoint at step {}", trainer.step));
            } else {
                println!("step {}: loss {:.4}, {:.0} tok/s, checkpoint written", trainer.step, s.loss, rate);
            }
        }
    }
    bar.finish_and_clear();
    let after = trainer.evaluate(&eval, true)?;
    writeln!(log, "{}", serde_json::json!({ "eval": "after", "stats": after }))?;
    let summary = Summary {
        command,
        steps: args.steps,
        tokens_seen: tokens_seen + first_step * args.batch * trainer.mean_example_tokens(),
        seconds: start.elapsed().as_secs_f64(),
        trainable_parameters: n_params,
        before,
        after,
        eval_set,
        final_loss: last_loss,
    };
    let mut text = serde_json::to_vec_pretty(&summary)?;
    text.push(b'\n');
    std::fs::write(args.out.join("summary.json"), text)?;
    Ok(summary)
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes the checkpoint (to `checkpoint.tmp`, then renamed over the last one) and the adapter
/// as it stands.
fn checkpoint(
    trainer: &Trainer<'_>,
    out: &Path,
    meta: &serde_json::Value,
    shape: &Shape,
    extra: &serde_json::Value,
) -> Result<()> {
    let tmp = out.join("checkpoint.tmp");
    let dir = out.join("checkpoint");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    trainer.save(&tmp, meta)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)?;
    trainer.lora.write_peft(out, shape, extra.clone())
}

/// Prints the before/after table of a summary.
pub fn print_summary(s: &Summary) {
    println!("{} done: {} steps, {} tokens seen, {:.1} s", s.command, s.steps, s.tokens_seen, s.seconds);
    println!("held-out: {}", s.eval_set);
    let kl = |e: &EvalStats| e.kl.map_or("-".to_string(), |k| format!("{k:.4}"));
    println!("{:<8} {:>10} {:>12}", "", "perplexity", "KL to teacher");
    println!("{:<8} {:>10.3} {:>12}", "before", s.before.perplexity, kl(&s.before));
    println!("{:<8} {:>10.3} {:>12}", "after", s.after.perplexity, kl(&s.after));
    if let Some(t) = s.before.teacher_perplexity {
        println!("{:<8} {:>10.3}", "teacher", t);
    }
}
