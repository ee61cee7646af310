//! A chat app linked against one compiled kiln model library and the kiln runtime.
//!
//! `cargo xtask chat --bundle DIR` builds it with `KILN_BUNDLE=DIR`, which links the bundle's
//! `lib/libkiln_model.a`; the bundle directory supplies the tokenizer, manifest and weights.
//! Subcommands: `chat` (interactive or one prompt), `run` (greedy completion or logits of
//! given token ids), `bench` (prefill and decode throughput).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use runtime::program::ModelDesc;
use runtime::sampling::SamplerConfig;
use runtime::session::Session;

#[cfg(kiln_model)]
extern "C" {
    /// The descriptor exported by the linked model library.
    static kiln_model: ModelDesc;
}

fn linked_model() -> Result<&'static ModelDesc> {
    #[cfg(kiln_model)]
    {
        // SAFETY: `kiln_model` is the immutable descriptor of the statically linked library;
        // the session checks its ABI version before using it.
        Ok(unsafe { &*std::ptr::addr_of!(kiln_model) })
    }
    #[cfg(not(kiln_model))]
    bail!("this chat binary was built without a model; build it with `cargo xtask chat --bundle DIR`")
}

#[derive(Parser)]
#[command(about = "chat with a kiln-compiled model")]
struct Cli {
    /// The bundle directory the linked library came from.
    #[arg(long)]
    bundle: PathBuf,
    /// Worker threads (the caller's thread included).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// 1 disables the repetition penalty (llama.cpp's default).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0xC0FFEE)]
    seed: u64,
}

impl SamplingArgs {
    fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplerConfig::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Answers PROMPT, or starts an interactive chat when there is none.
    Chat {
        prompt: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print prefill and decode speed after each answer.
        #[arg(long)]
        stats: bool,
    },
    /// Evaluates token ids (`--tokens`) or completes a chat-formatted prompt (`--prompt`).
    Run {
        /// Comma-separated token ids, evaluated as one prompt from an empty cache.
        #[arg(long, value_delimiter = ',')]
        tokens: Option<Vec<u32>>,
        /// Write the logits of every position as float32 .npy [n_tokens, vocab].
        #[arg(long)]
        dump_logits: Option<PathBuf>,
        #[arg(long)]
        prompt: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Measures prefill and decode throughput (tokens/s), medians over runs.
    Bench {
        #[arg(long, value_delimiter = ',', default_value = "128,512")]
        prefill: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        decode: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print one JSON object per measurement instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn open(cli: &Cli) -> Result<Session> {
    Session::open(linked_model()?, &cli.bundle, cli.threads)
        .with_context(|| format!("cannot open bundle {}", cli.bundle.display()))
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Chat { prompt, sampling, stats } => {
            let mut session = open(&cli)?;
            let cfg = sampling.config();
            let turn = |session: &mut Session, text: &str| -> Result<()> {
                let mut out = std::io::stdout().lock();
                let (_, st) = session.chat(text, sampling.max_tokens, &cfg, |piece| {
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                })?;
                writeln!(out)?;
                if *stats {
                    eprintln!(
                        "[prefill {} tokens: {:.1} tok/s | decode {} tokens: {:.1} tok/s]",
                        st.evaluated_prompt_tokens,
                        st.evaluated_prompt_tokens as f64 / st.prefill_time.as_secs_f64(),
                        st.generated_tokens,
                        st.generated_tokens as f64 / st.decode_time.as_secs_f64().max(1e-9)
                    );
                }
                Ok(())
            };
            match prompt {
                Some(p) => turn(&mut session, p)?,
                None => {
                    eprintln!(
                        "kiln chat: {} ({} threads). Empty line or Ctrl-D quits; /reset forgets.",
                        session.manifest().model.name,
                        cli.threads
                    );
                    let stdin = std::io::stdin();
                    loop {
                        eprint!("> ");
                        let mut line = String::new();
                        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
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
        Command::Run { tokens, dump_logits, prompt, sampling } => {
            let mut session = open(&cli)?;
            match (tokens, prompt) {
                (Some(ids), None) => {
                    let logits = session.eval(ids, true)?;
                    let vocab = session.vocab();
                    if let Some(path) = dump_logits {
                        write_npy(path, &logits, ids.len(), vocab)?;
                    }
                    let top: Vec<String> = logits.chunks(vocab).map(|row| argmax(row).to_string()).collect();
                    println!("top-1 per position: {}", top.join(","));
                }
                (None, Some(text)) => {
                    let cfg = sampling.config();
                    let mut out = std::io::stdout().lock();
                    session.chat(text, sampling.max_tokens, &cfg, |piece| {
                        let _ = out.write_all(piece.as_bytes());
                        let _ = out.flush();
                    })?;
                    writeln!(out)?;
                }
                _ => bail!("give exactly one of --tokens and --prompt"),
            }
        }
        Command::Bench { prefill, decode, runs, json } => bench(&cli, prefill, *decode, *runs, *json)?,
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

fn bench(cli: &Cli, prefill: &[usize], decode: usize, runs: usize, json: bool) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut session = open(cli)?;
    let vocab = session.vocab();
    let report = |what: String, n: usize, secs: Vec<f64>| {
        let rates: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
        let med = median(rates.clone());
        if json {
            println!(
                "{{\"engine\": \"kiln\", \"test\": \"{what}\", \"threads\": {}, \"tokens\": {n}, \"runs\": {}, \"median_tok_s\": {med:.2}}}",
                cli.threads,
                rates.len()
            );
        } else {
            println!("kiln  {what:<12} threads={} {med:>9.1} tok/s (median of {} runs)", cli.threads, rates.len());
        }
    };
    for &n in prefill {
        let tokens = bench_tokens(n, vocab);
        session.reset();
        session.eval(&tokens, false)?; // warm-up
        let mut secs = vec![];
        for _ in 0..runs {
            session.reset();
            let start = Instant::now();
            session.eval(&tokens, false)?;
            secs.push(start.elapsed().as_secs_f64());
        }
        report(format!("pp{n}"), n, secs);
    }
    if decode > 0 {
        let tokens = bench_tokens(decode + 1, vocab);
        let mut secs = vec![];
        for run in 0..=runs {
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
        report(format!("tg{decode}"), decode, secs);
    }
    Ok(())
}
