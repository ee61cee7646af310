//! `cargo xtask bench`: kiln's `chat bench` and, with `--vs llama.cpp`, llama.cpp's own
//! `llama-bench` on the same GGUF and thread counts, in interleaved rounds (each round runs
//! every engine once per thread count, each in a fresh process), reported as medians with
//! their spread, each engine's peak resident memory, and kiln's decode rate as a fraction of
//! the read-bandwidth roofline measured in the same run.
//!
//! llama.cpp's tools are built once from the sdist of the llama-cpp-python version the tests
//! pin ([`peers::LLAMA_CPP_PYTHON`], so the same llama.cpp commit) into the cache directory,
//! for the host CPU (`GGML_NATIVE`), as llama.cpp's users build it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// What `cargo xtask bench` measures.
pub struct BenchOptions {
    pub bundle: PathBuf,
    pub threads: Vec<usize>,
    pub runs: usize,
    pub prefill: Vec<usize>,
    pub decode: usize,
    /// The GGUF llama.cpp runs, when comparing.
    pub peer_gguf: Option<PathBuf>,
    pub json: Option<PathBuf>,
    /// Replace an existing `json` file.
    pub force: bool,
}

/// One measurement of one engine in one round.
pub(crate) struct Sample {
    pub engine: &'static str,
    pub test: String,
    pub threads: usize,
    pub tok_s: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// The samples of one engine, test and thread count: the median rate, its spread, and the
/// largest peak resident memory of the processes that measured it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl Stats {
    pub fn of(samples: &[&Sample]) -> Stats {
        let mut rates: Vec<f64> = samples.iter().map(|s| s.tok_s).collect();
        let (min, max) = rates.iter().fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
        let peak_rss_bytes = samples.iter().filter_map(|s| s.peak_rss_bytes).max();
        Stats { median: median(&mut rates), min, max, peak_rss_bytes }
    }

    /// The stats of `engine`'s `test` at `threads` among `samples`, when it was measured.
    pub fn find(samples: &[Sample], engine: &str, test: &str, threads: usize) -> Option<Stats> {
        let matching: Vec<&Sample> =
            samples.iter().filter(|s| s.engine == engine && s.test == test && s.threads == threads).collect();
        (!matching.is_empty()).then(|| Stats::of(&matching))
    }
}

/// What the interleaved rounds run: kiln's runner on a bundle and, when given, llama.cpp's
/// `llama-bench` (the directory of llama.cpp's tools, the GGUF) on the same work.
pub(crate) struct Rounds<'a> {
    pub runner: &'a crate::runner::App,
    pub bundle: &'a Path,
    pub llama: Option<(&'a Path, &'a Path)>,
    pub threads: &'a [usize],
    pub runs: usize,
    pub prefill: &'a [usize],
    pub decode: usize,
}

impl Rounds<'_> {
    /// Runs the rounds: in each, every engine once per thread count, each in a fresh process,
    /// then the machine's read bandwidth at the most threads ([`read_bandwidth`], a sample of
    /// engine [`BANDWIDTH`] whose rate is bytes/s): on a shared machine it moves between
    /// rounds, and the roofline takes the median of the figures measured beside the engines.
    pub fn run(&self) -> Result<Vec<Sample>> {
        let prefill = self.prefill.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
        let mut samples: Vec<Sample> = vec![];
        let bar = runtime::cli::progress(self.runs as u64, "rounds");
        for round in 0..self.runs {
            bar.set_position(round as u64);
            for &t in self.threads {
                let mut cmd = self.runner.command();
                cmd.args(["bench", "--jsonl", "--runs", "1", "--bundle"]).arg(self.bundle);
                cmd.args(["--threads", &t.to_string(), "--prefill", &prefill, "--decode", &self.decode.to_string()]);
                let (out, rss) = run_measured(cmd, "kiln's chat bench")?;
                for line in out.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
                    samples.push(Sample {
                        engine: "kiln",
                        test: line["test"].as_str().unwrap_or("?").to_string(),
                        threads: t,
                        tok_s: line["median_tok_s"].as_f64().unwrap_or(0.0),
                        peak_rss_bytes: rss,
                    });
                }
                if let Some((bin, gguf)) = self.llama {
                    let mut cmd = Command::new(bin.join("llama-bench"));
                    cmd.env("LD_LIBRARY_PATH", bin).arg("-m").arg(gguf);
                    cmd.args([
                        "-t",
                        &t.to_string(),
                        "-p",
                        &prefill,
                        "-n",
                        &self.decode.to_string(),
                        "-r",
                        "1",
                        "-o",
                        "jsonl",
                    ]);
                    let (out, rss) = run_measured(cmd, "llama-bench")?;
                    for line in out.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
                        let (p, n) = (line["n_prompt"].as_u64().unwrap_or(0), line["n_gen"].as_u64().unwrap_or(0));
                        let test = if n == 0 { format!("pp{p}") } else { format!("tg{n}") };
                        samples.push(Sample {
                            engine: "llama.cpp",
                            test,
                            threads: t,
                            tok_s: line["avg_ts"].as_f64().unwrap_or(0.0),
                            peak_rss_bytes: rss,
                        });
                    }
                }
            }
            let t = self.threads.iter().copied().max().unwrap_or(1);
            samples.push(Sample {
                engine: BANDWIDTH,
                test: BANDWIDTH.into(),
                threads: t,
                tok_s: read_bandwidth(t),
                peak_rss_bytes: None,
            });
        }
        bar.finish_and_clear();
        Ok(samples)
    }
}

/// Resets this process's peak resident set to its current one (`/proc/self/clear_refs`, 5).
/// A child started later inherits the peak in its own: Rust spawns children with `vfork`
/// semantics, and at `exec` Linux folds the parent's memory map's peak into the child's
/// `ru_maxrss`. Without the reset, an engine measured after a bandwidth sample (a 512 MiB
/// buffer) or after this process compiled a bundle would show that peak as its own.
fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("cannot reset this process's peak RSS (/proc/self/clear_refs) before measuring a child's")
}

/// The engine (and test) name of the read-bandwidth samples [`Rounds::run`] takes.
pub(crate) const BANDWIDTH: &str = "read bandwidth";

/// `llama-bench` (and `llama-completion`) from the pinned llama.cpp, built on first use.
pub fn ensure_llama_tools() -> Result<PathBuf> {
    let version = peers::LLAMA_CPP_PYTHON.rsplit("==").next().unwrap_or("unknown");
    let dir = peers::cache_dir().join(format!("llama.cpp-{version}"));
    let bin = dir.join("build/bin");
    if bin.join("llama-bench").exists() && bin.join("llama-completion").exists() {
        return Ok(bin);
    }
    eprintln!(
        "building llama.cpp's llama-bench and llama-completion ({}) into {} (5-10 minutes, once)",
        peers::LLAMA_CPP_PYTHON,
        dir.display()
    );
    std::fs::create_dir_all(&dir)?;
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
        if !out.status.success() {
            bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
        }
        Ok(())
    };
    // cmake from the system, else from PyPI into kiln's Python environment (never the system's).
    let have_cmake = Command::new("cmake").arg("--version").output().is_ok_and(|o| o.status.success());
    let python = peers::ensure_venv()?;
    let cmake = if have_cmake {
        std::path::PathBuf::from("cmake")
    } else {
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "cmake"]), "pip install cmake")?;
        python.with_file_name("cmake")
    };
    let archive = peers::download_llama_cpp_sdist(&python, &dir.join("sdist"))?;
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    run(Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(&src).arg("--strip-components=1"), "tar")?;
    let build = dir.join("build");
    run(
        Command::new(&cmake)
            .arg("-S")
            .arg(src.join("vendor/llama.cpp"))
            .arg("-B")
            .arg(&build)
            .args(["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF"])
            .args(["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]),
        "cmake configure of llama.cpp",
    )?;
    run(
        Command::new(&cmake).arg("--build").arg(&build).args([
            "-j",
            "2",
            "--target",
            "llama-bench",
            "llama-completion",
        ]),
        "cmake build of llama.cpp",
    )?;
    Ok(bin)
}

/// Runs `cmd` to its end, returning its stdout and the peak resident memory of the process
/// (the kernel's count, from `wait4`'s `ru_maxrss`: no GNU time needed). This process's own
/// peak is reset first ([`reset_peak_rss`]), or the child's count would start from it.
pub(crate) fn run_measured(mut cmd: Command, what: &str) -> Result<(String, Option<u64>)> {
    use std::io::Read;
    reset_peak_rss()?;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("{what}: no pipes");
    };
    let errors = std::thread::spawn(move || {
        let mut e = vec![];
        let _ = err.read_to_end(&mut e);
        e
    });
    let mut stdout = vec![];
    let read = out.read_to_end(&mut stdout);
    let stderr = errors.join().unwrap_or_default();
    let (exit, max_rss_kib) = wait_with_rusage(child.id()).with_context(|| format!("cannot wait for {what}"))?;
    read.with_context(|| format!("cannot read the output of {what}"))?;
    if exit != Some(0) {
        bail!(
            "{what} failed ({}): {}",
            exit.map_or("killed by a signal".into(), |c| format!("exit {c}")),
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok((String::from_utf8_lossy(&stdout).into_owned(), Some(max_rss_kib * 1024)))
}

/// Waits for the child `pid` (not yet reaped: std never waited for it) and returns its exit
/// code (None: killed by a signal) and its peak resident memory in KiB.
#[allow(unsafe_code)]
fn wait_with_rusage(pid: u32) -> std::io::Result<(Option<i32>, u64)> {
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is plain data, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes only into `status` and `usage`, which outlive the call; `pid`
        // is this process's own child, so no other process can be reaped by mistake.
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
        if r == pid as libc::pid_t {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let exit = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Ok((exit, usage.ru_maxrss.max(0) as u64))
}

/// Streaming read bandwidth of this machine with `threads` threads (bytes/s): the best of three
/// passes summing a 512 MiB buffer (well past every cache), with the widest loads the CPU has
/// ([`sum_words`]: a loop of baseline SSE2 loads reads about 45 GB/s on two Zen 5 cores that
/// stream 78 GB/s with AVX2, and a roofline that low is one the engines exceed).
pub fn read_bandwidth(threads: usize) -> f64 {
    let words = 64usize << 20;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || sum_words(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / secs);
    }
    best
}

/// The wrapping sum of `words`, compiled for AVX2 when the CPU has it.
fn sum_words(words: &[u64]) -> u64 {
    #[inline(always)]
    fn sum(words: &[u64]) -> u64 {
        words.iter().fold(0u64, |a, &x| a.wrapping_add(x))
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn sum_avx2(words: &[u64]) -> u64 {
        sum(words)
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU running this has AVX2 (just detected), the one requirement of
        // calling a function compiled for it.
        return unsafe { sum_avx2(words) };
    }
    sum(words)
}

/// Bytes a decoded token reads, for the roofline of decode: every weight byte once, plus the
/// KV cache (of the manifest's element type) up to the average position of a `decode`-token
/// test from an empty cache.
pub(crate) fn decode_bytes_per_token(manifest: &Value, decode: usize) -> f64 {
    let memory = &manifest["memory"];
    let weights = memory["weights_bytes"].as_f64().unwrap_or(0.0);
    let context = manifest["model"]["context"].as_f64().unwrap_or(0.0).max(1.0);
    let kv_per_position = memory["kv_bytes"].as_f64().unwrap_or(0.0) / context;
    weights + kv_per_position * (1.0 + decode as f64) / 2.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the benchmark and prints the table (and writes `--json`).
pub fn bench(o: &BenchOptions) -> Result<()> {
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if let Some(j) = &o.json {
        compiler::outdir::check_output_file(j, o.force)?;
    }
    let triple = crate::bundle_triple(&o.bundle)?;
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(o.bundle.join("manifest.json"))?)?;
    if o.peer_gguf.is_some() && Some(triple.as_str()) != targets::host_triple() {
        bail!("--vs llama.cpp compares on this machine: the bundle is for {triple}, build one for the host");
    }
    if let Some(g) = &o.peer_gguf {
        if !g.is_file() {
            bail!("no GGUF for llama.cpp at {}", g.display());
        }
    }
    if o.threads.is_empty() || o.threads.contains(&0) {
        bail!("--threads must list thread counts of at least 1");
    }
    let runner = crate::build_runner(&triple, &crate::root().join("target"))?;
    let llama = match &o.peer_gguf {
        Some(g) => Some((ensure_llama_tools()?, g.clone())),
        None => None,
    };
    let samples = Rounds {
        runner: &runner,
        bundle: &o.bundle,
        llama: llama.as_ref().map(|(bin, gguf)| (bin.as_path(), gguf.as_path())),
        threads: &o.threads,
        runs: o.runs,
        prefill: &o.prefill,
        decode: o.decode,
    }
    .run()?;

    // Peak memory at the bundle's context, the same work for both: a 512-token prompt and
    // `decode` generated tokens (kiln's bench; llama-completion with -c at the context).
    let context = manifest["model"]["context"].as_u64().unwrap_or(0);
    let max_threads = o.threads.iter().copied().max().unwrap_or(1);
    let memory = match &llama {
        Some((bin, gguf)) => Some(same_context_memory(&runner, bin, gguf, &o.bundle, context, max_threads, o.decode)?),
        None => None,
    };

    let bytes_per_token = decode_bytes_per_token(&manifest, o.decode);
    let bandwidth = Stats::find(&samples, BANDWIDTH, BANDWIDTH, max_threads).expect("a bandwidth sample per round");

    // The (test, threads) pairs kiln measured, in first-seen order.
    let mut order: Vec<(String, usize)> = vec![];
    for s in samples.iter().filter(|s| s.engine == "kiln") {
        if !order.contains(&(s.test.clone(), s.threads)) {
            order.push((s.test.clone(), s.threads));
        }
    }
    let mib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.0}", b as f64 / (1 << 20) as f64));
    // A markdown table in llama-bench's shape (model, size, threads, test, t/s), kiln and
    // llama.cpp side by side.
    let model = manifest["model"]["name"].as_str().unwrap_or("?").to_string();
    let size = manifest["memory"]["weights_bytes"]
        .as_u64()
        .map_or("-".to_string(), |b| format!("{:.2} MiB", b as f64 / (1 << 20) as f64));
    println!("| model | size | threads | test | kiln t/s (min-max) | llama.cpp t/s (min-max) | kiln ÷ llama.cpp | kiln MiB | llama.cpp MiB |");
    println!("| ----- | ---: | ------: | ---: | -----------------: | ----------------------: | ---------------: | -------: | ------------: |");
    let mut results = vec![];
    for (test, t) in &order {
        let k = Stats::find(&samples, "kiln", test, *t).expect("kiln measured every test in `order`");
        let p = Stats::find(&samples, "llama.cpp", test, *t);
        let span = |s: Stats| format!("{:.1} ({:.0}-{:.0})", s.median, s.min, s.max);
        println!(
            "| {model} | {size} | {t} | {test} | {} | {} | {} | {} | {} |",
            span(k),
            p.map_or("-".into(), span),
            p.map_or("-".into(), |p| format!("{:.2}x", k.median / p.median)),
            mib(k.peak_rss_bytes),
            mib(p.and_then(|p| p.peak_rss_bytes)),
        );
        for (engine, s) in [("kiln", Some(k)), ("llama.cpp", p)] {
            if let Some(s) = s {
                results.push(json!({
                    "engine": engine, "test": test, "threads": t,
                    "tokens_per_s": {"median": s.median, "min": s.min, "max": s.max},
                    "runs": o.runs, "peak_rss_bytes": s.peak_rss_bytes,
                }));
            }
        }
    }
    let decode_test = format!("tg{}", o.decode);
    let kiln_decode = Stats::find(&samples, "kiln", &decode_test, max_threads).map(|s| s.median);
    let roof = bandwidth.median / bytes_per_token;
    println!(
        "medians of {} interleaved rounds (each engine a fresh process per round); peak RSS of each engine's benchmark \
         process (kiln at the bundle's context {}, llama-bench at prompt + generated tokens)",
        o.runs, manifest["model"]["context"]
    );
    println!(
        "roofline: read bandwidth {:.1} GB/s ({max_threads} threads; median of one per round, {:.1}-{:.1}), {:.1} MB \
         read per decoded token: {:.0} tok/s{}",
        bandwidth.median / 1e9,
        bandwidth.min / 1e9,
        bandwidth.max / 1e9,
        bytes_per_token / 1e6,
        roof,
        kiln_decode.map_or(String::new(), |k| format!("; kiln {decode_test} at {:.0}% of it", 100.0 * k / roof))
    );
    // The deployment report's prediction for this machine (`--device host`), beside the
    // measurement: how far `build-model --budget` can be trusted here.
    let predicted = (Some(triple.as_str()) == targets::host_triple())
        .then(|| {
            let device = crate::evaluate::resolve_device(&triple, &manifest, Some("host"), max_threads).ok()?;
            let footprint = compiler::deploy::Footprint::from_manifest(&manifest).ok()?;
            let query = compiler::deploy::Query { prompt_tokens: 1.0, generated_tokens: o.decode as f64 };
            Some(compiler::deploy::predict(&footprint, &device, query).decode_tok_s)
        })
        .flatten();
    if let (Some(p), Some(k)) = (predicted, kiln_decode) {
        println!(
            "the deployment report (--device host) predicts {p:.0} tok/s for {decode_test} at {max_threads} threads: \
             {:.2}x the measured {k:.0}",
            p / k
        );
    }
    if let Some((k, l)) = memory {
        println!(
            "peak RSS at context {context}, 512-token prompt + {} generated, {max_threads} threads: kiln {} MiB, \
             llama-completion {} MiB{}",
            o.decode,
            mib(k),
            mib(l),
            match (k, l) {
                (Some(k), Some(l)) => format!(" ({:.2}x)", k as f64 / l as f64),
                _ => String::new(),
            }
        );
    }
    if let Some(j) = &o.json {
        let doc = json!({
            "memory_at_context": memory.map(|(k, l)| json!({
                "context": context, "prompt_tokens": 512, "generated_tokens": o.decode, "threads": max_threads,
                "kiln_peak_rss_bytes": k, "llama_completion_peak_rss_bytes": l,
            })),
            "results": results,
            "roofline": {
                "read_bandwidth_bytes_per_s": bandwidth.median,
                "read_bandwidth_range": [bandwidth.min, bandwidth.max],
                "bytes_per_token": bytes_per_token,
                "decode_fraction": kiln_decode.map(|k| k / roof),
            },
            "predicted_decode_tokens_per_s": predicted,
            "bundle": o.bundle, "llama_cpp_gguf": o.peer_gguf, "llama_cpp": peers::LLAMA_CPP_PYTHON,
        });
        let text = serde_json::to_string_pretty(&doc)? + "\n";
        compiler::outdir::write_file_atomically(j, o.force, |w| std::io::Write::write_all(w, text.as_bytes()))?;
        println!("wrote {}", j.display());
    }
    Ok(())
}

/// Peak resident memory of kiln and of llama-completion doing the same work at the bundle's
/// context: a 512-token prompt, then `decode` generated tokens.
pub(crate) fn same_context_memory(
    runner: &crate::runner::App,
    bin: &Path,
    gguf: &Path,
    bundle: &Path,
    context: u64,
    threads: usize,
    decode: usize,
) -> Result<(Option<u64>, Option<u64>)> {
    // The same positions as llama-completion's prompt and generated tokens: a prefill of
    // 512 + decode tokens (in batches of at most 512, as the prompt is) fills the KV cache
    // as far, where `--decode` alone would start again from position 0.
    let mut cmd = runner.command();
    let positions = (512 + decode).to_string();
    cmd.args(["bench", "--jsonl", "--runs", "1", "--prefill", &positions, "--decode", "0", "--bundle"]);
    cmd.arg(bundle).args(["--threads", &threads.to_string()]);
    let (_, kiln) = run_measured(cmd, "kiln's chat bench")?;
    // About 512 tokens of the shipped evaluation text (English prose: about 1.3 tokens a word).
    let text = eval::data::read(&eval::data::shipped("eval.txt"))?;
    let prompt: Vec<&str> = text.split_whitespace().take(390).collect();
    let prompt_file = tempfile::Builder::new().prefix("kiln-prompt-").suffix(".txt").tempfile()?;
    std::fs::write(prompt_file.path(), prompt.join(" "))?;
    let mut cmd = Command::new(bin.join("llama-completion"));
    cmd.env("LD_LIBRARY_PATH", bin).arg("-m").arg(gguf).arg("-f").arg(prompt_file.path());
    cmd.args(["-c", &context.to_string(), "-t", &threads.to_string(), "-n", &decode.to_string()]);
    cmd.args(["--ignore-eos", "-no-cnv", "--no-display-prompt", "--temp", "0", "--no-perf"]);
    cmd.stdin(std::process::Stdio::null());
    let result = run_measured(cmd, "llama-completion");
    drop(prompt_file);
    Ok((kiln, result?.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child's peak RSS is its own even when this process was much larger before it
    /// started (a bandwidth buffer, a compiled reference): `true` needs a few MiB.
    #[test]
    fn a_childs_peak_rss_is_its_own() {
        let big = vec![1u8; 400 << 20];
        std::hint::black_box(&big);
        drop(big);
        let (_, rss) = run_measured(Command::new("true"), "true").unwrap();
        let rss = rss.expect("a peak RSS");
        assert!(rss < 100 << 20, "`true` measured at {} MiB", rss >> 20);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.0]), 7.0);
    }
}
