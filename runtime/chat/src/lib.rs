//! The kiln runner: chat with, run, tokenize with, benchmark, evaluate and serve any kiln
//! bundle. A thin layer of argument parsing over the libraries: `runtime` (sessions, the
//! offload client), `eval` (the evaluation suites) and `serve` (the OpenAI server).
//!
//! The runner links no model: it opens the shared library `lib/libkiln_model.so` that
//! `build-model` writes into bundles for targets that can run here, so one binary serves every
//! bundle at once and nothing is relinked per bundle (an app that links a bundle's static
//! library into itself is `examples/rust-chat`). `cargo xtask chat|run|tokenize|bench|eval`
//! run this code in-process for host bundles and as an aarch64 binary under qemu-user for
//! aarch64 Linux bundles. `cargo install --path runtime/chat` gives a `chat` that works from
//! any directory: the data its commands default to is embedded (`eval::data`).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use runtime::sampling::SamplerConfig;
use runtime::session::Session;

use runtime::cli::{check_output_file, open_session, BundleArgs};

/// Sampling and generation options.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Most tokens to generate per answer (llama.cpp's -n).
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 decodes greedily.
    #[arg(long, visible_alias = "temp", default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty (1: off, llama.cpp's default).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Seed of the sampler's random generator.
    #[arg(short = 's', long, default_value_t = 0xC0FFEE)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

/// The system turn.
#[derive(Args, Clone, Debug)]
pub struct SystemArgs {
    /// System prompt that opens the conversation.
    #[arg(long, conflicts_with = "no_system")]
    pub system: Option<String>,
    /// No system prompt: an empty system turn, so that templates which add a default one when
    /// there is none (SmolLM2's does) do not.
    #[arg(long)]
    pub no_system: bool,
}

impl SystemArgs {
    fn apply(&self, session: &mut Session) {
        if self.no_system {
            session.set_system(Some(String::new()));
        } else if let Some(s) = &self.system {
            session.set_system(Some(s.clone()));
        }
    }
}

/// `chat`: answers PROMPT, or starts an interactive chat when there is none.
#[derive(Args, Clone, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// One message to answer; without it, an interactive chat (empty line or Ctrl-D quits,
    /// /reset forgets the conversation).
    pub prompt: Option<String>,
    #[command(flatten)]
    pub system: SystemArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print prefill and decode speed after each answer.
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

/// Offloading to an edge server that speaks the OpenAI protocol.
#[derive(Args, Clone, Debug)]
pub struct OffloadArgs {
    /// The server's base URL (http://host:port); answers may come from it by --offload-policy.
    #[arg(long)]
    pub offload: Option<String>,
    /// never, always, complexity[:T], confidence[:K[:LOGP]], or several joined by +.
    #[arg(long, default_value = "complexity", requires = "offload")]
    pub offload_policy: String,
    /// Seconds one server request may take before it counts as failed.
    #[arg(long, default_value_t = 30.0, requires = "offload")]
    pub offload_timeout: f64,
    /// Seconds the server may take for a whole answer, retries and their waits included,
    /// before the device answers instead (default: 60, or --offload-timeout if longer).
    #[arg(long, requires = "offload")]
    pub offload_deadline: Option<f64>,
    /// Further attempts after a server failure (exponential backoff, at most 10 s a wait).
    #[arg(long, default_value_t = 2, requires = "offload")]
    pub offload_retries: u32,
    /// The model to ask the server for (default: its own).
    #[arg(long, requires = "offload")]
    pub offload_model: Option<String>,
    /// The environment variable holding the server's API key.
    #[arg(long, default_value = "KILN_OFFLOAD_API_KEY", requires = "offload")]
    pub offload_key_env: String,
    /// Send the API key even to a server that is not on this machine (loopback), in clear
    /// text: the runtime speaks plain http:// only, so anyone on the way can read it.
    #[arg(long, requires = "offload")]
    pub offload_insecure: bool,
}

impl OffloadArgs {
    /// The offload client, when --offload was given.
    pub fn offloader(&self) -> Result<Option<runtime::offload::Offloader>> {
        let Some(url) = &self.offload else { return Ok(None) };
        let policy = self.offload_policy.parse().map_err(anyhow::Error::msg)?;
        if !(self.offload_timeout.is_finite() && self.offload_timeout > 0.0) {
            bail!("--offload-timeout must be a positive number of seconds");
        }
        if self.offload_deadline.is_some_and(|d| !(d.is_finite() && d > 0.0)) {
            bail!("--offload-deadline must be a positive number of seconds");
        }
        let config = runtime::offload::OffloadConfig {
            model: self.offload_model.clone(),
            api_key_env: Some(self.offload_key_env.clone()),
            timeout: std::time::Duration::from_secs_f64(self.offload_timeout.min(86400.0)),
            deadline: self.offload_deadline.map(|d| std::time::Duration::from_secs_f64(d.min(86400.0))),
            insecure: self.offload_insecure,
            retries: self.offload_retries,
            ..runtime::offload::OffloadConfig::new(url.clone(), policy)
        };
        Ok(Some(runtime::offload::Offloader::new(config).map_err(anyhow::Error::msg)?))
    }
}

/// `run`: evaluates token ids, or answers one chat message.
#[derive(Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["tokens", "tokens_file", "prompt"])))]
pub struct RunArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// Comma-separated token ids, evaluated as one sequence from an empty cache; prints the
    /// top-1 token of every position.
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
    /// A file of token ids (separated by commas or whitespace), like --tokens.
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// Write the logits of every position of --tokens/--tokens-file as float32 .npy
    /// [n_tokens, vocab]. The file must not exist yet (or pass --force).
    #[arg(long, conflicts_with = "prompt")]
    pub dump_logits: Option<PathBuf>,
    /// Replace an existing --dump-logits file.
    #[arg(long, requires = "dump_logits")]
    pub force: bool,
    /// A chat message, answered with the model's chat template.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub system: SystemArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `tokenize`: text to token ids, or token ids back to text.
#[derive(Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["text", "ids"])))]
pub struct TokenizeArgs {
    /// The bundle directory (only its tokenizer.json and manifest.json are read).
    #[arg(long, default_value = "bundles/x86_64-unknown-linux-gnu")]
    pub bundle: PathBuf,
    /// Text to tokenize (special tokens such as <|im_start|> are parsed).
    pub text: Option<String>,
    /// Comma-separated ids to turn back into text.
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<u32>>,
    /// Also print each token's text.
    #[arg(long)]
    pub show_tokens: bool,
}

/// `bench`: prefill and decode throughput.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// Prompt lengths to measure prefill on.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub prefill: Vec<usize>,
    /// Tokens to decode one at a time (0: skip).
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Measured runs per test (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print one JSON object per line (a measurement each) instead of a table.
    #[arg(long)]
    pub jsonl: bool,
}

/// The runner's commands.
#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Answers PROMPT, or starts an interactive chat when there is none.
    Chat(ChatArgs),
    /// Evaluates token ids (--tokens, --tokens-file) or answers one chat message (--prompt).
    Run(RunArgs),
    /// Text to token ids, or ids back to text (--ids), with the bundle's tokenizer.
    Tokenize(TokenizeArgs),
    /// Prefill and decode tokens/s, medians over runs.
    Bench(BenchArgs),
    /// Perplexity on a text (llama.cpp's rule and all-but-first), and KL divergence from a
    /// reference bundle (--reference).
    Eval(eval::EvalArgs),
    /// Serves the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), /health and a
    /// chat page at / over HTTP.
    Serve(serve::ServeArgs),
}

#[derive(Parser, Debug)]
#[command(name = "chat", version, about = "kiln runner: chat with, run, benchmark, evaluate and serve a kiln bundle")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Runs one command.
pub fn run(command: &Command) -> Result<()> {
    match command {
        Command::Chat(a) => chat(a),
        Command::Run(a) => run_tokens_or_prompt(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Eval(a) => eval::run_eval(a).map(drop),
        Command::Serve(a) => serve::serve(a),
        Command::Bench(a) => {
            for row in bench(a)? {
                if a.jsonl {
                    println!("{}", row.json());
                } else {
                    println!(
                        "kiln  {:<12} threads={} {:>9.1} tok/s (median of {} runs)",
                        row.test, row.threads, row.median_tok_s, row.runs
                    );
                }
            }
            Ok(())
        }
    }
}

fn stream_to_stdout(out: &mut std::io::StdoutLock<'_>, piece: &str) {
    let _ = out.write_all(piece.as_bytes());
    let _ = out.flush();
}

fn chat(a: &ChatArgs) -> Result<()> {
    let cfg = a.sampling.config();
    cfg.validate()?;
    let mut session = open_session(&a.bundle.bundle, a.bundle.threads)?;
    a.system.apply(&mut session);
    let offloader = a.offload.offloader()?;
    let turn = |session: &mut Session, text: &str| -> Result<()> {
        let mut out = std::io::stdout().lock();
        if let Some(o) = &offloader {
            let r = o.chat(session, text, a.sampling.max_tokens, &cfg, |piece| stream_to_stdout(&mut out, piece))?;
            writeln!(out)?;
            eprintln!("[{}: {} | {:.2} s]", r.origin, r.reason, r.elapsed.as_secs_f64());
            return Ok(());
        }
        let (_, st) = session.chat(text, a.sampling.max_tokens, &cfg, |piece| stream_to_stdout(&mut out, piece))?;
        writeln!(out)?;
        if a.stats {
            eprintln!(
                "[prefill {} tokens: {:.1} tok/s | decode {} tokens: {:.1} tok/s]",
                st.evaluated_prompt_tokens,
                st.evaluated_prompt_tokens as f64 / st.prefill_time.as_secs_f64().max(1e-9),
                st.generated_tokens,
                st.generated_tokens as f64 / st.decode_time.as_secs_f64().max(1e-9)
            );
        }
        Ok(())
    };
    match &a.prompt {
        Some(p) => turn(&mut session, p),
        None => {
            eprintln!(
                "kiln chat: {} ({} threads). Empty line or Ctrl-D quits; /reset forgets.",
                session.manifest().model.name,
                a.bundle.threads
            );
            let stdin = std::io::stdin();
            loop {
                eprint!("> ");
                let mut line = String::new();
                if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(());
                }
                if line.trim() == "/reset" {
                    session.reset();
                    continue;
                }
                if let Err(e) = turn(&mut session, line.trim_end()) {
                    eprintln!("error: {e:#}");
                }
            }
        }
    }
}

/// Parses token ids separated by commas and/or whitespace.
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().with_context(|| format!("{s:?} is not a token id")))
        .collect()
}

fn run_tokens_or_prompt(a: &RunArgs) -> Result<()> {
    let cfg = a.sampling.config();
    cfg.validate()?;
    let ids = match (&a.tokens, &a.tokens_file) {
        (Some(_), Some(_)) => bail!("give --tokens or --tokens-file, not both"),
        (Some(ids), None) => Some(ids.clone()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let ids = parse_ids(&text).with_context(|| format!("in {}", path.display()))?;
            if ids.is_empty() {
                bail!("{} holds no token ids", path.display());
            }
            Some(ids)
        }
        (None, None) => None,
    };
    if let Some(path) = &a.dump_logits {
        check_output_file(path, a.force)?;
    }
    let mut session = open_session(&a.bundle.bundle, a.bundle.threads)?;
    a.system.apply(&mut session);
    match (ids, &a.prompt) {
        (Some(ids), None) => {
            let logits = session.eval(&ids, true)?;
            let vocab = session.vocab();
            if let Some(path) = &a.dump_logits {
                write_npy(path, &logits, ids.len(), vocab)?;
            }
            let top: Vec<String> = logits.chunks(vocab).map(|row| argmax(row).to_string()).collect();
            println!("top-1 per position: {}", top.join(","));
        }
        (None, Some(text)) => {
            let mut out = std::io::stdout().lock();
            session.chat(text, a.sampling.max_tokens, &cfg, |piece| stream_to_stdout(&mut out, piece))?;
            writeln!(out)?;
        }
        _ => bail!("give exactly one of --tokens, --tokens-file and --prompt"),
    }
    Ok(())
}

fn tokenize(a: &TokenizeArgs) -> Result<()> {
    let path = a.bundle.join("tokenizer.json");
    let tok = runtime::tokenizer::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot read the tokenizer of {}", a.bundle.display()))?;
    match (&a.text, &a.ids) {
        (Some(text), None) => {
            let ids = tok.encode(text, true).map_err(|e| anyhow::anyhow!("{e}"))?;
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            println!("{}", list.join(","));
            if a.show_tokens {
                for id in ids {
                    println!("{id}\t{:?}", tok.id_to_token(id).unwrap_or_default());
                }
            }
        }
        (None, Some(ids)) => {
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
                bail!("token id {bad} is out of range (vocabulary of {})", tok.vocab_size());
            }
            println!("{}", tok.decode_with(ids, false).map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        _ => bail!("give TEXT or --ids, not both"),
    }
    Ok(())
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best })
}

/// Writes a float32 C-order .npy file of shape [rows, cols].
fn write_npy(path: &Path, data: &[f32], rows: usize, cols: usize) -> Result<()> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let mut header = dict.into_bytes();
    let total = 10 + header.len() + 1;
    header.resize(header.len() + (64 - total % 64) % 64, b' ');
    header.push(b'\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(&header);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Deterministic pseudo-random token ids (no special tokens).
fn bench_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x: u64 = 0x243f6a8885a308d3;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (100 + x % (vocab as u64 - 100)) as u32
        })
        .collect()
}

/// One throughput measurement.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub test: String,
    pub threads: usize,
    pub tokens: usize,
    pub runs: usize,
    pub median_tok_s: f64,
}

impl BenchRow {
    pub fn json(&self) -> String {
        format!(
            "{{\"engine\": \"kiln\", \"test\": \"{}\", \"threads\": {}, \"tokens\": {}, \"runs\": {}, \"median_tok_s\": {:.2}}}",
            self.test, self.threads, self.tokens, self.runs, self.median_tok_s
        )
    }
}

/// Measures prefill (`pp<n>`) and decode (`tg<n>`) throughput.
pub fn bench(a: &BenchArgs) -> Result<Vec<BenchRow>> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut session = open_session(&a.bundle.bundle, a.bundle.threads)?;
    let vocab = session.vocab();
    if vocab <= 100 {
        bail!("the bench draws tokens from ids 100 and up; this vocabulary has {vocab}");
    }
    let mut rows = vec![];
    let row = |test: String, n: usize, secs: Vec<f64>| {
        let rates: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
        BenchRow { test, threads: a.bundle.threads, tokens: n, runs: rates.len(), median_tok_s: median(rates) }
    };
    for &n in &a.prefill {
        let tokens = bench_tokens(n, vocab);
        session.reset();
        session.eval(&tokens, false)?; // warm-up
        let mut secs = vec![];
        for _ in 0..a.runs {
            session.reset();
            let start = Instant::now();
            session.eval(&tokens, false)?;
            secs.push(start.elapsed().as_secs_f64());
        }
        rows.push(row(format!("pp{n}"), n, secs));
    }
    if a.decode > 0 {
        let tokens = bench_tokens(a.decode + 1, vocab);
        let mut secs = vec![];
        for run in 0..=a.runs {
            session.reset();
            session.eval(&tokens[..1], false)?;
            let start = Instant::now();
            for &t in &tokens[1..] {
                session.eval(&[t], false)?;
            }
            if run > 0 {
                secs.push(start.elapsed().as_secs_f64());
            }
        }
        rows.push(row(format!("tg{}", a.decode), a.decode, secs));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c =
            Cli::try_parse_from(["chat", "run", "-p", "hi", "-n", "8", "--temp", "0", "-s", "3", "-t", "1"]).unwrap();
        let Command::Run(r) = c.command else { panic!("not run") };
        assert_eq!((r.sampling.max_tokens, r.sampling.seed, r.bundle.threads), (8, 3, 1));
        assert_eq!((r.prompt.as_deref(), r.sampling.temperature), (Some("hi"), 0.0));
        assert!(runtime::pool::physical_cores() >= 1);
    }

    #[test]
    fn token_ids_parse_from_commas_and_whitespace() {
        assert_eq!(parse_ids("1,2, 3\n4\t5,\n").unwrap(), [1, 2, 3, 4, 5]);
        assert!(parse_ids("1,x").unwrap_err().to_string().contains("\"x\""));
        assert!(parse_ids("").unwrap().is_empty());
    }

    #[test]
    fn dump_logits_with_a_prompt_is_refused_by_the_parser() {
        let r = Cli::try_parse_from(["chat", "run", "--prompt", "hi", "--dump-logits", "x.npy"]);
        assert!(r.unwrap_err().to_string().contains("cannot be used with"));
        assert!(Cli::try_parse_from(["chat", "run"]).is_err(), "run needs an input");
        assert!(Cli::try_parse_from(["chat", "run", "--tokens", "1,2", "--dump-logits", "x.npy"]).is_ok());
    }
}
