//! `eval`: the perplexity of a bundle on a text, and its KL divergence from a reference bundle,
//! as llama.cpp's `llama-perplexity` (and its `--kl-divergence`) report them, in one process.
//!
//! The text is tokenized whole with the bundle's tokenizer (no chat template, special tokens
//! read as text) and split into non-overlapping chunks of `--ctx` tokens; what is left after
//! the last whole chunk is not evaluated. When the manifest's `add_bos` is set, the stream
//! starts with BOS and the first token of every chunk is replaced by BOS, as llama.cpp does;
//! otherwise (SmolLM2) the chunks are the text's tokens unchanged. Every chunk is evaluated
//! from an empty KV cache, fed in prefill batches of the library's batch size, and the logits
//! of every position are scored as they come (one batch of logits is held at a time).
//!
//! Two scoring rules are reported, both as `exp(mean negative log-likelihood)` with the
//! log-softmax in f64:
//! - `llama.cpp`: llama-perplexity's rule. With `first = ctx / 2`, the logits of positions
//!   `first..ctx-1` predict tokens `first+1..=ctx-1` of the chunk (`ctx - 1 - first` tokens a
//!   chunk, 255 at ctx 512), so every scored token has at least half a chunk of context.
//! - `all-but-first`: every token of the chunk except the first (`ctx - 1` tokens a chunk).
//!
//! The ± figure is llama-perplexity's: the standard error of the mean NLL,
//! `sqrt((mean(nll²) - mean(nll)²) / (n - 1))`, times the perplexity.
//! With a reference, KL(reference || bundle) and top-1 agreement are taken over the positions
//! of the llama.cpp rule (as `--kl-divergence` does), with the same chunks fed to both.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use runtime::session::Session;

use runtime::cli::{check_output_file, open_session, BundleArgs};

pub mod data;
pub mod qa;
pub mod selfcheck;

/// The evaluation text shipped with kiln (embedded: [`crate::data`]).
pub fn default_text() -> PathBuf {
    crate::data::shipped("eval.txt")
}

/// The evaluation suites (`--suite`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Perplexity on a text (llama.cpp's rule and all-but-first).
    Perplexity,
    /// KL divergence from a reference and top-1 agreement (needs --reference).
    Agreement,
    /// Accuracy on a question set, per hop class.
    Qa,
    /// Hallucination rate by self-consistency (SelfCheckGPT, unigram).
    Hallucination,
    /// Weights, KV cache, arena and measured peak resident memory (`cargo xtask eval`).
    Footprint,
    /// Energy per query, measured or modeled (`cargo xtask eval`).
    Energy,
}

/// What to evaluate and on what: shared by the runner's `eval` and `cargo xtask eval`.
#[derive(Args, Clone, Debug)]
pub struct EvalSpec {
    /// The suites to run, comma-separated (default: all; agreement only with --reference).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub suite: Vec<Suite>,
    /// The text to evaluate perplexity on (UTF-8); default: the shipped eval.txt (embedded; kiln:eval.txt).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per perplexity chunk; at most the bundle's compiled context.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most this many chunks (default: every whole chunk of the text).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// A reference to compare with: KL(reference || bundle) and top-1 agreement over the
    /// scored positions. The runner takes a bundle directory; `cargo xtask eval` also takes a
    /// GGUF file, compiled for the occasion into a temporary bundle.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// The question set (JSONL: question, answers, hops); default: the shipped qa.jsonl (kiln:qa.jsonl).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// The biography-style prompts of the hallucination suite (JSONL: prompt); default: the shipped bio.jsonl (kiln:bio.jsonl).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Use only the first N questions and the first N prompts (quick runs).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Most tokens generated per question (a query of the study: up to 256).
    #[arg(long, default_value_t = 256)]
    pub qa_tokens: usize,
    /// Sampled answers per prompt for the hallucination suite.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// Temperature of the sampled answers (top-k and top-p off).
    #[arg(long, default_value_t = 1.0)]
    pub sample_temperature: f32,
    /// Top-k of the sampled answers (0: off).
    #[arg(long, default_value_t = 0)]
    pub sample_top_k: usize,
    /// Top-p of the sampled answers (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub sample_top_p: f32,
    /// Most tokens per answer of the hallucination suite (greedy and sampled).
    #[arg(long, default_value_t = 128)]
    pub bio_tokens: usize,
    /// Seed of the sampled answers.
    #[arg(long, default_value_t = 0x5E1F)]
    pub seed: u64,
}

impl EvalSpec {
    /// Whether `suite` runs: listed, or the list is empty (all; agreement only with a reference).
    pub fn runs(&self, suite: Suite) -> bool {
        if self.suite.is_empty() {
            suite != Suite::Agreement || self.reference.is_some()
        } else {
            self.suite.contains(&suite)
        }
    }

    /// The text file to read: `--text`, or the shipped one.
    pub fn text_path(&self) -> PathBuf {
        self.text.clone().unwrap_or_else(default_text)
    }

    /// The question set: `--questions`, or the shipped one.
    pub fn questions_path(&self) -> PathBuf {
        self.questions.clone().unwrap_or_else(|| crate::data::shipped("qa.jsonl"))
    }

    /// The prompt set: `--prompts`, or the shipped one.
    pub fn prompts_path(&self) -> PathBuf {
        self.prompts.clone().unwrap_or_else(|| crate::data::shipped("bio.jsonl"))
    }

    /// The command-line arguments that give `suites` with these inputs and settings (for a
    /// runner in another process); `reference` replaces `--reference`.
    pub fn args(&self, suites: &[Suite], reference: Option<&Path>) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![];
        let mut push = |k: &str, v: std::ffi::OsString| {
            a.push(k.into());
            a.push(v);
        };
        let names: Vec<String> = suites.iter().map(|s| format!("{s:?}").to_lowercase()).collect();
        push("--suite", names.join(",").into());
        push("--text", self.text_path().into());
        push("--ctx", self.ctx.to_string().into());
        if let Some(n) = self.chunks {
            push("--chunks", n.to_string().into());
        }
        if let Some(r) = reference {
            push("--reference", r.into());
        }
        push("--questions", self.questions_path().into());
        push("--prompts", self.prompts_path().into());
        if let Some(n) = self.limit {
            push("--limit", n.to_string().into());
        }
        push("--qa-tokens", self.qa_tokens.to_string().into());
        push("--samples", self.samples.to_string().into());
        push("--sample-temperature", self.sample_temperature.to_string().into());
        push("--sample-top-k", self.sample_top_k.to_string().into());
        push("--sample-top-p", self.sample_top_p.to_string().into());
        push("--bio-tokens", self.bio_tokens.to_string().into());
        push("--seed", self.seed.to_string().into());
        a
    }

    /// Checks the flags and input files, before any work.
    pub fn check(&self) -> Result<()> {
        if self.runs(Suite::Agreement) && self.reference.is_none() {
            bail!("--suite agreement needs --reference (a bundle, or a GGUF for `cargo xtask eval`)");
        }
        if self.runs(Suite::Perplexity) || self.runs(Suite::Agreement) {
            if self.ctx < 4 {
                bail!("--ctx must be at least 4 tokens (got {})", self.ctx);
            }
            if self.chunks == Some(0) {
                bail!("--chunks must be at least 1");
            }
            let text = self.text_path();
            if !crate::data::exists(&text) {
                bail!("no text file {}", text.display());
            }
        }
        if self.limit == Some(0) {
            bail!("--limit must be at least 1");
        }
        if self.runs(Suite::Qa) {
            if self.qa_tokens == 0 {
                bail!("--qa-tokens must be at least 1");
            }
            crate::qa::read_questions(&self.questions_path())?;
        }
        if self.runs(Suite::Hallucination) {
            if self.samples == 0 || self.bio_tokens == 0 {
                bail!("--samples and --bio-tokens must be at least 1");
            }
            if !(self.sample_temperature.is_finite() && self.sample_temperature > 0.0) {
                bail!("--sample-temperature must be a finite value > 0 (got {})", self.sample_temperature);
            }
            if !(self.sample_top_p > 0.0 && self.sample_top_p <= 1.0) {
                bail!("--sample-top-p must be in (0, 1] (got {})", self.sample_top_p);
            }
            crate::selfcheck::read_prompts(&self.prompts_path())?;
        }
        Ok(())
    }
}

/// `eval`: perplexity, agreement with a reference, question answering and hallucination of one bundle.
#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    #[command(flatten)]
    pub spec: EvalSpec,
    /// Write the figures as JSON to this file. It must not exist yet (or pass --force).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long, requires = "json")]
    pub force: bool,
}

impl EvalArgs {
    /// Checks what can be checked before any work: the flags, the input files and the output file.
    pub fn check(&self) -> Result<()> {
        self.spec.check()?;
        if let Some(path) = &self.json {
            check_output_file(path, self.force)?;
        }
        Ok(())
    }
}

/// Sums of negative log-likelihoods, for a perplexity and its standard error.
#[derive(Clone, Copy, Debug, Default)]
struct NllSums {
    sum: f64,
    sum_sq: f64,
    count: usize,
}

impl NllSums {
    fn add(&mut self, nll: f64) {
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }

    fn score(&self, rule: &'static str) -> Score {
        let n = self.count as f64;
        let mean = self.sum / n;
        let ppl = mean.exp();
        let var = self.sum_sq / n - mean * mean;
        let ppl_err = if self.count > 1 && var > 0.0 { (var / (n - 1.0)).sqrt() * ppl } else { 0.0 };
        Score { rule, scored: self.count, mean_nll: mean, perplexity: ppl, perplexity_err: ppl_err }
    }
}

/// A perplexity under one scoring rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    /// `llama.cpp` or `all-but-first` (see the module documentation).
    pub rule: &'static str,
    /// Tokens scored.
    pub scored: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
    /// Standard error of the perplexity (llama-perplexity's ±).
    pub perplexity_err: f64,
}

/// KL(reference || bundle) over the positions of the llama.cpp rule.
#[derive(Clone, Debug, PartialEq)]
pub struct KlStats {
    pub positions: usize,
    pub mean: f64,
    /// Standard error of the mean.
    pub mean_err: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    /// Fraction of positions where both put the largest logit on the same token.
    pub top1_agreement: f64,
    /// The reference's own perplexity under the llama.cpp rule.
    pub reference: Score,
}

/// The figures of one evaluation.
#[derive(Clone, Debug)]
pub struct EvalReport {
    pub bundle: PathBuf,
    pub model: String,
    pub text: PathBuf,
    /// Tokens of the whole text (BOS included when the model adds one).
    pub text_tokens: usize,
    pub add_bos: bool,
    pub ctx: usize,
    pub chunks: usize,
    pub llama_cpp: Score,
    pub all_but_first: Score,
    pub kl: Option<KlStats>,
    pub threads: usize,
    /// Wall time of the evaluation (model runs and scoring, not opening the bundles).
    pub seconds: f64,
    /// The part of `seconds` spent in the model libraries (prefill), bundle and reference.
    pub model_seconds: f64,
}

/// `ln(sum(exp(row)))` in f64, shifted by the maximum.
fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best })
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    max + sum.ln()
}

/// KL(p || q) of the softmaxes of two logit rows, in f64.
fn kl_divergence(reference: &[f32], bundle: &[f32]) -> f64 {
    let (lse_r, lse_b) = (log_sum_exp(reference), log_sum_exp(bundle));
    reference
        .iter()
        .zip(bundle)
        .map(|(&r, &b)| {
            let log_p = f64::from(r) - lse_r;
            let log_q = f64::from(b) - lse_b;
            log_p.exp() * (log_p - log_q)
        })
        .sum()
}

/// llama.cpp's percentile: linear interpolation between the sorted values.
fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    let p = fraction * (sorted.len() - 1) as f64;
    let below = p.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let t = p - below as f64;
    (1.0 - t) * sorted[below] + t * sorted[above]
}

fn all_finite(row: &[f32]) -> bool {
    row.iter().all(|x| x.is_finite())
}

/// Runs the evaluation described by `a` and returns its figures (printing nothing).
pub fn evaluate(a: &EvalArgs) -> Result<EvalReport> {
    a.check()?;
    let text_path = a.spec.text_path();
    let text = crate::data::read(&text_path)?;
    let mut session = open_session(&a.bundle.bundle, a.bundle.threads)?;
    if a.spec.ctx > session.context() {
        bail!(
            "--ctx {} is larger than the context {} that {} was compiled for (build it with --context {} or more)",
            a.spec.ctx,
            session.context(),
            a.bundle.bundle.display(),
            a.spec.ctx
        );
    }
    let tokens = eval_tokens(&session, &text)?;
    let mut reference = match &a.spec.reference {
        None => None,
        Some(dir) => {
            if dir.is_file() {
                bail!(
                    "--reference {} is a file: the runner takes a bundle directory (`cargo xtask eval` compiles a GGUF \
                     reference itself)",
                    dir.display()
                );
            }
            let r = open_session(dir, a.bundle.threads).context("cannot open the reference")?;
            if r.vocab() != session.vocab() {
                bail!("the reference has a vocabulary of {}, the bundle {}", r.vocab(), session.vocab());
            }
            if a.spec.ctx > r.context() {
                bail!("--ctx {} is larger than the reference's context {}", a.spec.ctx, r.context());
            }
            if eval_tokens(&r, &text)? != tokens {
                bail!(
                    "the reference tokenizes the text differently from the bundle, so their logits cannot be compared"
                );
            }
            Some(r)
        }
    };
    if tokens.len() < a.spec.ctx {
        bail!(
            "{} has {} tokens, fewer than one chunk of --ctx {}; give a longer text or a smaller --ctx",
            text_path.display(),
            tokens.len(),
            a.spec.ctx
        );
    }
    let whole_chunks = tokens.len() / a.spec.ctx;
    let n_chunks = a.spec.chunks.map_or(whole_chunks, |c| c.min(whole_chunks));
    let add_bos = session.manifest().tokenizer.add_bos;
    let bos = session.manifest().tokenizer.bos_id;
    let batch = session.program().desc().batch().max(1);
    let vocab = session.vocab();
    let first = a.spec.ctx / 2;

    let start = Instant::now();
    let (mut llama_cpp, mut all_but_first, mut ref_nll) = (NllSums::default(), NllSums::default(), NllSums::default());
    let mut kls: Vec<f64> = vec![];
    let mut top1_same = 0usize;
    let mut model_seconds = 0.0;
    let bar = runtime::cli::progress(n_chunks as u64, "chunks");
    for chunk_idx in 0..n_chunks {
        bar.set_position(chunk_idx as u64);
        let mut chunk = tokens[chunk_idx * a.spec.ctx..(chunk_idx + 1) * a.spec.ctx].to_vec();
        if add_bos {
            chunk[0] = bos;
        }
        session.reset();
        if let Some(r) = reference.as_mut() {
            r.reset();
        }
        for batch_start in (0..a.spec.ctx).step_by(batch) {
            let batch_end = (batch_start + batch).min(a.spec.ctx);
            let model_start = Instant::now();
            let logits = session.eval(&chunk[batch_start..batch_end], true)?;
            let ref_logits = match reference.as_mut() {
                Some(r) => Some(r.eval(&chunk[batch_start..batch_end], true)?),
                None => None,
            };
            model_seconds += model_start.elapsed().as_secs_f64();
            // (batch_end - batch_start, vocab): row i holds the logits of position batch_start + i,
            // which predict token batch_start + i + 1.
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let pos = batch_start + i;
                if pos + 1 >= a.spec.ctx {
                    break;
                }
                if !all_finite(row) {
                    bail!("the bundle's logits at position {pos} of chunk {chunk_idx} are not finite");
                }
                let target = chunk[pos + 1] as usize;
                let nll = log_sum_exp(row) - f64::from(row[target]);
                all_but_first.add(nll);
                if pos < first {
                    continue;
                }
                llama_cpp.add(nll);
                if let Some(ref_logits) = &ref_logits {
                    let ref_row = &ref_logits[i * vocab..(i + 1) * vocab];
                    if !all_finite(ref_row) {
                        bail!("the reference's logits at position {pos} of chunk {chunk_idx} are not finite");
                    }
                    ref_nll.add(log_sum_exp(ref_row) - f64::from(ref_row[target]));
                    kls.push(kl_divergence(ref_row, row));
                    top1_same += usize::from(argmax(ref_row) == argmax(row));
                }
            }
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let kl = reference.as_ref().map(|_| {
        let n = kls.len() as f64;
        let mean = kls.iter().sum::<f64>() / n;
        let var = kls.iter().map(|k| k * k).sum::<f64>() / n - mean * mean;
        let mean_err = if kls.len() > 1 && var > 0.0 { (var / (n - 1.0)).sqrt() } else { 0.0 };
        let mut sorted = kls.clone();
        sorted.sort_by(f64::total_cmp);
        KlStats {
            positions: kls.len(),
            mean,
            mean_err,
            median: percentile(&sorted, 0.5),
            p99: percentile(&sorted, 0.99),
            max: sorted[sorted.len() - 1],
            top1_agreement: top1_same as f64 / n,
            reference: ref_nll.score("llama.cpp"),
        }
    });
    Ok(EvalReport {
        bundle: a.bundle.bundle.clone(),
        model: session.manifest().model.name.clone(),
        text: text_path,
        text_tokens: tokens.len(),
        add_bos,
        ctx: a.spec.ctx,
        chunks: n_chunks,
        llama_cpp: llama_cpp.score("llama.cpp"),
        all_but_first: all_but_first.score("all-but-first"),
        kl,
        threads: a.bundle.threads,
        seconds,
        model_seconds,
    })
}

/// The text's tokens as `eval` feeds them: special tokens read as plain text, BOS first when
/// the bundle's manifest says the model adds one.
pub fn eval_tokens(session: &Session, text: &str) -> Result<Vec<u32>> {
    let mut ids = session.tokenizer().encode(text, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = &session.manifest().tokenizer;
    if t.add_bos {
        ids.insert(0, t.bos_id);
    }
    Ok(ids)
}

impl EvalReport {
    /// The readable table `eval` prints.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let bos = if self.add_bos { "BOS first in every chunk" } else { "no BOS (the model adds none)" };
        s += &format!("model {:?}, bundle {}\n", self.model, self.bundle.display());
        s += &format!(
            "text {}: {} tokens, {}; {} chunks of {} tokens ({} tokens not evaluated), each from an empty cache\n\n",
            self.text.display(),
            self.text_tokens,
            bos,
            self.chunks,
            self.ctx,
            self.text_tokens - self.chunks * self.ctx,
        );
        s += &format!("{:<15} {:>8} {:>12} {:>10} {:>10}\n", "rule", "scored", "perplexity", "±", "mean NLL");
        for sc in [&self.llama_cpp, &self.all_but_first] {
            s += &format!(
                "{:<15} {:>8} {:>12.4} {:>10.5} {:>10.5}\n",
                sc.rule, sc.scored, sc.perplexity, sc.perplexity_err, sc.mean_nll
            );
        }
        if let Some(kl) = &self.kl {
            s += &format!("\nagainst the reference, over the {} positions of the llama.cpp rule:\n", kl.positions);
            s += &format!(
                "  reference perplexity {:.4} ± {:.5}\n",
                kl.reference.perplexity, kl.reference.perplexity_err
            );
            s += &format!("  KL(reference || bundle) mean {:.6} ± {:.6}\n", kl.mean, kl.mean_err);
            s += &format!("  KL median {:.6}, 99th percentile {:.6}, max {:.6}\n", kl.median, kl.p99, kl.max);
            s += &format!("  top-1 agreement {:.4} %\n", 100.0 * kl.top1_agreement);
        }
        let evaluated = self.chunks * self.ctx * if self.kl.is_some() { 2 } else { 1 };
        s += &format!(
            "\n{:.2} s with {} threads: {:.2} s in the model ({:.1} tokens/s{}), {:.2} s scoring\n",
            self.seconds,
            self.threads,
            self.model_seconds,
            evaluated as f64 / self.model_seconds.max(1e-9),
            if self.kl.is_some() { ", bundle and reference together" } else { "" },
            self.seconds - self.model_seconds
        );
        s
    }

    /// The figures as a JSON object.
    pub fn json(&self) -> serde_json::Value {
        let score = |s: &Score| {
            serde_json::json!({
                "rule": s.rule,
                "scored": s.scored,
                "mean_nll": s.mean_nll,
                "perplexity": s.perplexity,
                "perplexity_err": s.perplexity_err,
            })
        };
        let kl = self.kl.as_ref().map(|k| {
            serde_json::json!({
                "positions": k.positions,
                "mean": k.mean,
                "mean_err": k.mean_err,
                "median": k.median,
                "p99": k.p99,
                "max": k.max,
                "top1_agreement": k.top1_agreement,
                "reference_perplexity": score(&k.reference),
            })
        });
        serde_json::json!({
            "bundle": self.bundle.display().to_string(),
            "model": self.model,
            "text": self.text.display().to_string(),
            "text_tokens": self.text_tokens,
            "add_bos": self.add_bos,
            "ctx": self.ctx,
            "chunks": self.chunks,
            "perplexity": [score(&self.llama_cpp), score(&self.all_but_first)],
            "kl_divergence": kl,
            "threads": self.threads,
            "seconds": self.seconds,
            "model_seconds": self.model_seconds,
        })
    }
}

/// The figures of every suite `eval` ran on one bundle.
#[derive(Clone, Debug)]
pub struct SuiteReport {
    pub bundle: PathBuf,
    pub model: String,
    pub threads: usize,
    pub suites: Vec<Suite>,
    pub perplexity: Option<EvalReport>,
    pub qa: Option<crate::qa::QaReport>,
    pub hallucination: Option<crate::selfcheck::SelfCheckReport>,
    /// Wall time of all suites.
    pub seconds: f64,
}

impl SuiteReport {
    /// The readable summary `eval` prints.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if let Some(p) = &self.perplexity {
            s += &p.table();
        }
        if let Some(q) = &self.qa {
            let line = |name: &str, p: &crate::qa::Proportion| {
                let (lo, hi) = p.wilson95();
                format!(
                    "  {name:<11} {:>4} / {:<4} {:>6.1} %  (95 % CI {:.1}-{:.1} %)\n",
                    p.successes,
                    p.total,
                    100.0 * p.rate(),
                    100.0 * lo,
                    100.0 * hi
                )
            };
            s += &format!("\nquestion answering on {} (greedy, at most {} tokens):\n", q.set, q.max_tokens);
            s += &line("single-hop", &q.single_hop);
            s += &line("multi-hop", &q.multi_hop);
            s += &line("all", &q.all);
            s += &format!(
                "  {} prompt tokens, {} generated tokens ({:.1} per question)\n",
                q.work.prompt_tokens,
                q.work.generated_tokens,
                q.work.generated_tokens as f64 / q.work.queries.max(1) as f64
            );
        }
        if let Some(h) = &self.hallucination {
            let o = &h.options;
            s += &format!(
                "\nhallucination on {} (SelfCheckGPT unigram, {} samples at temperature {}, at most {} tokens):\n",
                h.set, o.samples, o.temperature, o.max_tokens
            );
            s += &format!(
                "  {} of {} sentences hallucinated ({:.1} %; normalized Avg >= 0.5), mean normalized Avg {:.3}, mean unigram Max {:.2} nats\n",
                h.hallucinated,
                h.sentences,
                100.0 * h.rate(),
                h.mean_normalized,
                h.mean_unigram_max
            );
        }
        s += &format!("\nall suites: {:.1} s with {} threads\n", self.seconds, self.threads);
        s
    }

    /// The figures as one JSON object: the perplexity report's fields at the top level (as
    /// `eval` wrote them before the other suites), plus `qa` and `hallucination`.
    pub fn json(&self) -> serde_json::Value {
        let mut v = match &self.perplexity {
            Some(p) => p.json(),
            None => serde_json::json!({}),
        };
        let o = v.as_object_mut().expect("an object");
        o.insert("bundle".into(), self.bundle.display().to_string().into());
        o.insert("model".into(), self.model.clone().into());
        o.insert("threads".into(), self.threads.into());
        o.insert(
            "suites".into(),
            self.suites.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>().into(),
        );
        o.insert("qa".into(), self.qa.as_ref().map_or(serde_json::Value::Null, |q| q.json()));
        o.insert("hallucination".into(), self.hallucination.as_ref().map_or(serde_json::Value::Null, |h| h.json()));
        o.insert("suite_seconds".into(), self.seconds.into());
        v
    }
}

/// Prints `done / total` on one line of stderr, when stderr is a terminal.
fn progress_line(what: &'static str) -> impl FnMut(usize, usize) {
    let bar = runtime::cli::progress(0, what);
    move |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if done == total {
            bar.finish_and_clear();
        }
    }
}

/// Runs every suite of `a` on its bundle (one process, one session at a time).
pub fn run_suites(a: &EvalArgs) -> Result<SuiteReport> {
    a.check()?;
    let start = Instant::now();
    let spec = &a.spec;
    let perplexity =
        if spec.runs(Suite::Perplexity) || spec.runs(Suite::Agreement) { Some(evaluate(a)?) } else { None };
    let limit = |n: usize| spec.limit.map_or(n, |l| l.min(n));
    let mut qa = None;
    let mut hallucination = None;
    let mut model = perplexity.as_ref().map(|p| p.model.clone());
    if spec.runs(Suite::Qa) || spec.runs(Suite::Hallucination) {
        let mut session = open_session(&a.bundle.bundle, a.bundle.threads)?;
        model = Some(session.manifest().model.name.clone());
        if spec.runs(Suite::Qa) {
            let path = spec.questions_path();
            let questions = crate::qa::read_questions(&path)?;
            let questions = &questions[..limit(questions.len())];
            qa = Some(crate::qa::run_qa(&mut session, &path, questions, spec.qa_tokens, progress_line("questions"))?);
        }
        if spec.runs(Suite::Hallucination) {
            let path = spec.prompts_path();
            let prompts = crate::selfcheck::read_prompts(&path)?;
            let prompts = &prompts[..limit(prompts.len())];
            let o = crate::selfcheck::SelfCheckOptions {
                samples: spec.samples,
                temperature: spec.sample_temperature,
                top_k: spec.sample_top_k,
                top_p: spec.sample_top_p,
                max_tokens: spec.bio_tokens,
                seed: spec.seed,
            };
            hallucination =
                Some(crate::selfcheck::run_selfcheck(&mut session, &path, prompts, o, progress_line("prompts"))?);
        }
    }
    let all = [Suite::Perplexity, Suite::Agreement, Suite::Qa, Suite::Hallucination, Suite::Footprint, Suite::Energy];
    Ok(SuiteReport {
        bundle: a.bundle.bundle.clone(),
        model: match model {
            Some(m) => m,
            None => open_session(&a.bundle.bundle, 1)?.manifest().model.name.clone(),
        },
        threads: a.bundle.threads,
        suites: all.into_iter().filter(|s| spec.runs(*s)).collect(),
        perplexity,
        qa,
        hallucination,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `eval` as a command: runs the suites, prints the summary, writes `--json`.
pub fn run_eval(a: &EvalArgs) -> Result<SuiteReport> {
    let report = run_suites(a)?;
    print!("{}", report.table());
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report.json())? + "\n";
        let mut options = std::fs::OpenOptions::new();
        options.write(true);
        if a.force {
            options.create(true).truncate(true);
        } else {
            options.create_new(true); // never replace a file that appeared meanwhile
        }
        let mut file = options.open(path).with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_llama_cpp() {
        let v = [0.0, 1.0, 2.0, 3.0, 10.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 1.0), 10.0);
        assert!((percentile(&v, 0.99) - (3.0 + 0.96 * 7.0)).abs() < 1e-12);
        assert_eq!(percentile(&[4.0], 0.99), 4.0);
    }

    #[test]
    fn kl_is_zero_for_equal_rows_and_positive_otherwise() {
        let p = [1.0f32, 2.0, -3.0, 0.5];
        assert_eq!(kl_divergence(&p, &p), 0.0);
        let q = [1.0f32, 2.5, -3.0, 0.5];
        assert!(kl_divergence(&p, &q) > 0.0);
        // Adding a constant to every logit changes no probability.
        let shifted: Vec<f32> = p.iter().map(|x| x + 4.0).collect();
        assert!(kl_divergence(&p, &shifted).abs() < 1e-12);
    }

    #[test]
    fn known_distributions_give_known_perplexity_and_kl() {
        // Equal logits over 50 tokens: every token has probability 1/50, perplexity 50.
        let row = [0.25f32; 50];
        let mut sums = NllSums::default();
        for target in [0usize, 7, 49] {
            sums.add(log_sum_exp(&row) - f64::from(row[target]));
        }
        let s = sums.score("llama.cpp");
        assert!((s.perplexity - 50.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.perplexity_err, 0.0);
        // p = (1/2, 1/2) and q = (1/4, 3/4): KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3).
        let p = [0.0f32, 0.0];
        let q = [0.0f32, 3f32.ln()];
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_divergence(&p, &q) - want).abs() < 1e-7, "{}", kl_divergence(&p, &q));
    }

    #[test]
    fn standard_error_is_llama_perplexity_s() {
        let mut sums = NllSums::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            sums.add(x);
        }
        let s = sums.score("llama.cpp");
        assert_eq!(s.mean_nll, 2.5);
        assert_eq!(s.perplexity, 2.5f64.exp());
        // Population variance 1.25, over n - 1 = 3.
        assert!((s.perplexity_err - (1.25f64 / 3.0).sqrt() * 2.5f64.exp()).abs() < 1e-12);
    }
}
