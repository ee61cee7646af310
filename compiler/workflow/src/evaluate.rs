//! `cargo xtask eval`: the evaluation step of the workflow, on one or several bundles in one
//! run, a row each: perplexity and agreement with a reference, question-answering accuracy per
//! hop class, hallucination rate, footprint (weights, KV cache, arena, measured peak resident
//! memory) and energy per query (measured by RAPL where the machine exposes it, else modeled
//! from the device profile), printed as a table, written as JSON and as an HTML report.
//!
//! Each bundle's suites run in the runner (`runtime/chat`), one process per bundle and suite
//! group (not per question): perplexity and agreement together (the reference is opened beside
//! the bundle), question answering (its peak resident memory is the bundle's footprint, and the
//! energy RAPL measures around it the measured energy), then hallucination.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use compiler::deploy::{self, Device, Footprint, Query};
use eval::Suite;
use serde_json::{json, Value};

/// `cargo xtask eval`.
#[derive(clap::Args, Clone, Debug)]
pub struct EvalCmd {
    /// A bundle to evaluate; repeat the flag for several (a row each).
    #[arg(long = "bundle", required = true)]
    pub bundles: Vec<PathBuf>,
    /// Worker threads (the calling thread included; default: the machine's physical cores).
    #[arg(short = 't', long, default_value_t = runtime::pool::physical_cores())]
    pub threads: usize,
    #[command(flatten)]
    pub spec: eval::EvalSpec,
    /// Device profile of the energy model (default: each bundle's own device, or its CPU
    /// class on x86-64; `host`: this machine, its bandwidth measured).
    #[arg(long)]
    pub device: Option<String>,
    /// Write every figure as JSON to this file (refused if it exists, unless --force).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the report as one self-contained HTML page with charts (refused if it exists, unless --force).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Replace existing --json and --report files.
    #[arg(long)]
    pub force: bool,
}

/// One evaluated bundle.
#[derive(Clone, Debug)]
pub struct Row {
    /// The bundle's directory name, as rows are labelled.
    pub label: String,
    pub bundle: PathBuf,
    pub manifest: Value,
    pub footprint: Footprint,
    /// The runner's figures, merged (perplexity fields, `qa`, `hallucination`).
    pub figures: Value,
    pub peak_rss_bytes: Option<u64>,
    pub energy: Option<Energy>,
    /// The bundle the agreement suite compared with: the `--reference` bundle, or the temporary
    /// bundle compiled from a `--reference` GGUF (removed when the command ends).
    pub reference: Option<PathBuf>,
}

/// Energy per query.
#[derive(Clone, Debug)]
pub struct Energy {
    pub joules: f64,
    /// "measured" or "modeled".
    pub how: &'static str,
    pub detail: String,
    pub query: Query,
}

/// The device a bundle is described by: `name` (or the bundle's own device, or its CPU class).
pub fn resolve_device(triple: &str, manifest: &Value, name: Option<&str>, threads: usize) -> Result<Device> {
    // The device an AArch64 bundle was built for heads its `target.cpu` ("name (description)");
    // an x86-64 bundle's is its CPU level, also a profile.
    let built_for = manifest["target"]["cpu"]
        .as_str()
        .and_then(|c| c.split(" (").next())
        .filter(|c| targets::devices::costs(c, triple).is_ok());
    let wanted = name.or(built_for);
    let costs = targets::devices::default_costs(triple, wanted).map_err(anyhow::Error::msg)?;
    if wanted == Some(targets::devices::HOST) {
        if Some(triple) != targets::host_triple() {
            bail!("--device host describes this machine, which cannot run {triple} code natively");
        }
        let threads = threads.max(1);
        return Ok(Device {
            costs,
            measured_gbps: Some(crate::bench::read_bandwidth(threads) / 1e9),
            threads: threads as u32,
        });
    }
    Ok(Device::profile(costs))
}

/// The deployment report of a build (from its manifest, before anything is written) for the
/// device `name` (or the bundle's own), and the limits of `budget` it misses.
pub fn deployment(
    triple: &str,
    manifest: &Value,
    name: Option<&str>,
    budget: Option<&deploy::Budget>,
) -> Result<(String, Vec<deploy::Miss>)> {
    let footprint = Footprint::from_manifest(manifest).map_err(anyhow::Error::msg)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let device = resolve_device(triple, manifest, name, threads)?;
    let p = deploy::predict(&footprint, &device, Query::NOMINAL);
    let mut text = deploy::report(&footprint, &device, &p);
    let misses = budget.map_or(vec![], |b| deploy::check(b, &footprint, &p));
    if let Some(b) = budget {
        text += &format!(
            "  budget {}: {}\n",
            budget_text(b),
            if misses.is_empty() { "met".to_string() } else { format!("{} limit(s) missed", misses.len()) }
        );
    }
    Ok((text, misses))
}

/// `build-model`: builds `opts`, checking the deployment report for `device` against `budget`
/// before anything is written. Returns the build's result and the report's text (empty when
/// the build failed before the report).
pub fn build_with_budget(
    opts: &compiler::bundle::BuildOptions,
    device: Option<&str>,
    budget: Option<&deploy::Budget>,
    progress: &mut dyn FnMut(compiler::bundle::Stage),
    packed: &(dyn Fn(u64, u64) + Sync),
) -> (Result<compiler::bundle::BuildReport>, String) {
    let mut text = String::new();
    let result = compiler::bundle::build_model_checked(opts, progress, packed, &mut |manifest| {
        let (report, misses) = deployment(&opts.target, manifest, device, budget).map_err(|e| format!("{e:#}"))?;
        text = report;
        if misses.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = misses.iter().map(|m| m.to_string()).collect();
        Err(format!("the model does not fit the budget on this device: {}", list.join("; ")))
    });
    (result.map_err(anyhow::Error::from), text)
}

fn budget_text(b: &deploy::Budget) -> String {
    let mut parts = vec![];
    if let Some(m) = b.memory_bytes {
        parts.push(format!("memory {:.1} MiB", m as f64 / 1048576.0));
    }
    if let Some(d) = b.decode_tok_s {
        parts.push(format!("decode {d} tok/s"));
    }
    if let Some(p) = b.prefill_tok_s {
        parts.push(format!("prefill {p} tok/s"));
    }
    if let Some(e) = b.energy_joules {
        parts.push(format!("energy {e} J per query"));
    }
    parts.join(", ")
}

/// Package energy counters of RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`), microjoules,
/// with each counter's wrap range; `None` when the machine exposes none.
fn rapl_counters() -> Option<Vec<(u64, u64)>> {
    let dir = std::fs::read_dir("/sys/class/powercap").ok()?;
    let mut out = vec![];
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Package domains only (intel-rapl:0, not the sub-domains intel-rapl:0:0).
        if name.starts_with("intel-rapl:") && name.matches(':').count() == 1 {
            let read = |f: &str| std::fs::read_to_string(entry.path().join(f)).ok()?.trim().parse::<u64>().ok();
            out.push((read("energy_uj")?, read("max_energy_range_uj").unwrap_or(u64::MAX)));
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Joules between two readings of [`rapl_counters`], each counter unwrapped once.
fn rapl_joules(before: &[(u64, u64)], after: &[(u64, u64)]) -> f64 {
    before
        .iter()
        .zip(after)
        .map(|(&(b, range), &(a, _))| if a >= b { a - b } else { range - b + a } as f64 * 1e-6)
        .sum()
}

/// Runs the runner with `args` on `bundle`, returning its JSON figures and peak resident memory.
fn run_runner(
    runner: &crate::App,
    bundle: &Path,
    threads: usize,
    args: &[OsString],
    tmp: &Path,
) -> Result<(Value, Option<u64>)> {
    let _ = std::fs::remove_file(tmp);
    let mut cmd = runner.command();
    cmd.arg("eval").arg("--bundle").arg(bundle).args(["--threads", &threads.to_string()]).args(args);
    cmd.arg("--json").arg(tmp);
    cmd.stderr(std::process::Stdio::inherit());
    let (_, rss) = crate::bench::run_measured(cmd, "the runner's eval")?;
    let text = std::fs::read_to_string(tmp).with_context(|| format!("the runner wrote no {}", tmp.display()))?;
    let _ = std::fs::remove_file(tmp);
    Ok((serde_json::from_str(&text).context("the runner's JSON")?, rss))
}

/// A fresh path under `target/kiln-eval`, unique to this process and call: evaluations may run
/// concurrently in one process (the tests do), so the process id alone does not separate them.
fn scratch(stem: &str, extension: &str) -> Result<PathBuf> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = crate::root().join("target/kiln-eval");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.join(format!("{stem}-{}-{n}{extension}", std::process::id())))
}

/// Compiles a GGUF reference for `triple` into a temporary bundle under `target/kiln-eval`.
pub fn compile_reference(reference: &Path, triple: &str, ctx: usize, batch: u32) -> Result<PathBuf> {
    let dir = scratch("reference", "")?;
    eprintln!("compiling the reference {} for {triple} into {}", reference.display(), dir.display());
    let opts = compiler::bundle::BuildOptions {
        context: Some(u32::try_from(ctx).context("--ctx is too large")?),
        batch,
        shared_linker: crate::default_shared_linker(triple),
        ..compiler::bundle::BuildOptions::new(reference, triple, dir.clone())
    };
    if let Err(e) = compiler::bundle::build_model(&opts, &mut |_| {}) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot compile the reference {}", reference.display()));
    }
    Ok(dir)
}

fn read_manifest(bundle: &Path) -> Result<Value> {
    let path = bundle.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a kiln bundle (no manifest.json)", bundle.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
}

/// Merges the object `from` into `into` (top-level keys; `from`'s non-null values win).
fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        for (k, v) in b {
            if !v.is_null() || !a.contains_key(&k) {
                a.insert(k, v);
            }
        }
    }
}

/// Evaluates one bundle: every suite group in its own runner process.
fn evaluate_bundle(c: &EvalCmd, bundle: &Path, references: &mut Vec<(String, PathBuf)>) -> Result<Row> {
    let manifest = read_manifest(bundle)?;
    let triple = crate::bundle_triple(bundle)?;
    let footprint = Footprint::from_manifest(&manifest).map_err(anyhow::Error::msg)?;
    let (runnable, emulator) = crate::runner::runnable(&triple)?;
    let runner = crate::build_runner(runnable, &crate::root().join("target"))?;
    if emulator.is_some() {
        eprintln!("(running the aarch64 build under qemu-user: emulated; speed and energy are not measured)");
    }
    let spec = &c.spec;
    let reference = match &spec.reference {
        Some(r) if r.is_file() => Some(match references.iter().find(|(t, _)| *t == triple) {
            Some((_, dir)) => dir.clone(),
            None => {
                let batch = manifest["compile_options"]["batch"].as_u64().unwrap_or(512) as u32;
                let dir = compile_reference(r, &triple, spec.ctx, batch)?;
                references.push((triple.clone(), dir.clone()));
                dir
            }
        }),
        other => other.clone(),
    };
    let tmp = scratch("figures", ".json")?;
    let mut figures = json!({});
    let mut rss = None;
    let group: Vec<Suite> = [Suite::Perplexity, Suite::Agreement].into_iter().filter(|s| spec.runs(*s)).collect();
    // Each step's runner process draws its own progress bar below this line.
    let started = std::time::Instant::now();
    let step = |what: &str| eprintln!("  {what} ({:.0} s in)", started.elapsed().as_secs_f64());
    if !group.is_empty() {
        step("perplexity and agreement");
        let (v, _) = run_runner(&runner, bundle, c.threads, &spec.args(&group, reference.as_deref()), &tmp)?;
        merge(&mut figures, v);
    }
    let mut measured_joules = None;
    if spec.runs(Suite::Qa) {
        step("question answering");
        let before = rapl_counters();
        let (v, r) = run_runner(&runner, bundle, c.threads, &spec.args(&[Suite::Qa], None), &tmp)?;
        if let (Some(b), Some(a)) = (before, rapl_counters()) {
            let queries = v["qa"]["work"]["queries"].as_u64().unwrap_or(0);
            if queries > 0 && emulator.is_none() {
                measured_joules = Some(rapl_joules(&b, &a) / queries as f64);
            }
        }
        rss = r;
        merge(&mut figures, v);
    }
    if spec.runs(Suite::Hallucination) {
        step("hallucination");
        let (v, r) = run_runner(&runner, bundle, c.threads, &spec.args(&[Suite::Hallucination], None), &tmp)?;
        rss = rss.or(r);
        merge(&mut figures, v);
    }
    if spec.runs(Suite::Footprint) && rss.is_none() {
        // No generation ran: the footprint of a 512-token prompt and 128 generated tokens, as `bench` measures it.
        let mut cmd = runner.command();
        cmd.args(["bench", "--jsonl", "--runs", "1", "--prefill", "640", "--decode", "0", "--bundle"]);
        cmd.arg(bundle).args(["--threads", &c.threads.to_string()]);
        rss = crate::bench::run_measured(cmd, "the runner's bench")?.1;
    }
    let energy = if spec.runs(Suite::Energy) {
        let work = &figures["qa"]["work"];
        let query = match (work["queries"].as_f64(), work["prompt_tokens"].as_f64(), work["generated_tokens"].as_f64())
        {
            (Some(q), Some(p), Some(g)) if q > 0.0 => Query { prompt_tokens: p / q, generated_tokens: g / q },
            _ => Query::NOMINAL,
        };
        Some(match measured_joules {
            Some(j) => Energy {
                joules: j,
                how: "measured",
                detail: "RAPL package counters over the question set, whole machine".into(),
                query,
            },
            None => {
                let device = resolve_device(&triple, &manifest, c.device.as_deref(), c.threads)?;
                let p = deploy::predict(&footprint, &device, query);
                Energy {
                    joules: p.query_joules(),
                    how: "modeled",
                    detail: format!(
                        "{}: {} pJ/byte read, {} pJ/op",
                        device.name(),
                        device.costs.dram_pj_per_byte,
                        device.costs.pj_per_op
                    ),
                    query,
                }
            }
        })
    } else {
        None
    };
    let label = bundle.file_name().map_or_else(|| bundle.display().to_string(), |f| f.to_string_lossy().into_owned());
    let bundle = bundle.to_path_buf();
    Ok(Row { label, bundle, manifest, footprint, figures, peak_rss_bytes: rss, energy, reference })
}

impl Row {
    /// Everything about the row as JSON.
    pub fn json(&self) -> Value {
        let mut v = self.figures.clone();
        merge(
            &mut v,
            json!({
                "label": self.label,
                "bundle": self.bundle.display().to_string(),
                "reference_bundle": self.reference.as_ref().map(|r| r.display().to_string()),
                "quant": self.manifest["compile_options"]["quant"],
                "footprint": {
                    "parameters": self.footprint.parameters,
                    "bits_per_weight": self.footprint.bits_per_weight(),
                    "weights_bytes": self.footprint.weights_bytes,
                    "kv_bytes": self.footprint.kv_bytes,
                    "context": self.footprint.context,
                    "arena_bytes": self.footprint.arena_bytes,
                    "peak_rss_bytes": self.peak_rss_bytes,
                },
                "energy": self.energy.as_ref().map(|e| json!({
                    "joules_per_query": e.joules,
                    "how": e.how,
                    "detail": e.detail,
                    "query": {"prompt_tokens": e.query.prompt_tokens, "generated_tokens": e.query.generated_tokens},
                })),
            }),
        );
        v
    }

    /// Perplexity (llama.cpp's rule), when run.
    pub fn perplexity(&self) -> Option<f64> {
        self.figures["perplexity"][0]["perplexity"].as_f64()
    }

    pub fn kl_mean(&self) -> Option<f64> {
        self.figures["kl_divergence"]["mean"].as_f64()
    }

    /// Accuracy and its 95 % interval for `class` (`single_hop`, `multi_hop`, `all`).
    pub fn accuracy(&self, class: &str) -> Option<(f64, f64, f64)> {
        let a = &self.figures["qa"][class];
        Some((a["accuracy"].as_f64()?, a["ci95"][0].as_f64()?, a["ci95"][1].as_f64()?))
    }

    pub fn hallucination_rate(&self) -> Option<f64> {
        self.figures["hallucination"]["rate"].as_f64()
    }
}

/// Joules with three significant digits.
pub fn joules(j: f64) -> String {
    if j >= 0.01 {
        format!("{j:.3}")
    } else {
        format!("{j:.2e}")
    }
}

/// The table `eval` prints, a row per bundle.
pub fn table(rows: &[Row]) -> String {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    let pct = |v: Option<(f64, f64, f64)>| {
        v.map_or("-".to_string(), |(a, lo, hi)| format!("{:.1} ({:.0}-{:.0})", 100.0 * a, 100.0 * lo, 100.0 * hi))
    };
    let mib = |b: u64| format!("{:.1}", b as f64 / 1048576.0);
    let mut s = format!(
        "{:<24} {:>5} {:>9} {:>9} {:>16} {:>16} {:>16} {:>7} {:>8} {:>8} {:>9} {:>12}\n",
        "bundle",
        "bpw",
        "ppl",
        "KL",
        "QA 1-hop %",
        "QA multi-hop %",
        "QA all %",
        "halluc",
        "weights",
        "KV",
        "peak RSS",
        "J/query"
    );
    for r in rows {
        let f = &r.footprint;
        s += &format!(
            "{:<24} {:>5.2} {:>9} {:>9} {:>16} {:>16} {:>16} {:>7} {:>8} {:>8} {:>9} {:>12}\n",
            r.label.chars().take(24).collect::<String>(),
            f.bits_per_weight(),
            opt(r.perplexity(), &|x| format!("{x:.3}")),
            opt(r.kl_mean(), &|x| format!("{x:.5}")),
            pct(r.accuracy("single_hop")),
            pct(r.accuracy("multi_hop")),
            pct(r.accuracy("all")),
            opt(r.hallucination_rate(), &|x| format!("{:.1}%", 100.0 * x)),
            mib(f.weights_bytes),
            mib(f.kv_bytes),
            r.peak_rss_bytes.map_or("-".into(), mib),
            r.energy.as_ref().map_or("-".into(), |e| format!("{} {}", joules(e.joules), e.how)),
        );
    }
    s += "ppl: llama.cpp's rule; KL: mean KL(reference || bundle); QA: accuracy with 95 % Wilson interval; \
          halluc: share of sentences SelfCheckGPT-unigram flags; weights, KV (at the compiled context), peak RSS \
          (of the process answering the questions): MiB\n";
    s
}

/// Runs `cargo xtask eval`.
pub fn eval(c: &EvalCmd) -> Result<Vec<Row>> {
    c.spec.check()?;
    if c.force && c.json.is_none() && c.report.is_none() {
        bail!("--force replaces the --json or --report file; give one");
    }
    for out in c.json.iter().chain(&c.report) {
        runtime::cli::check_output_file(out, c.force)?;
    }
    if c.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let mut references = vec![];
    let mut rows = vec![];
    let mut result = Ok(());
    for bundle in &c.bundles {
        eprintln!("evaluating {}", bundle.display());
        match evaluate_bundle(c, bundle, &mut references) {
            Ok(r) => rows.push(r),
            Err(e) => {
                result = Err(e.context(format!("evaluating {}", bundle.display())));
                break;
            }
        }
    }
    for (_, dir) in &references {
        let _ = std::fs::remove_dir_all(dir); // the temporary bundles this command built
    }
    result?;
    print!("{}", table(&rows));
    if let Some(path) = &c.json {
        let v = json!({"bundles": rows.iter().map(Row::json).collect::<Vec<_>>()});
        write_new(path, &(serde_json::to_string_pretty(&v)? + "\n"), c.force)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &c.report {
        write_new(path, &crate::report::html(&rows), c.force)?;
        println!("wrote {}", path.display());
    }
    Ok(rows)
}

/// Writes `text` to a new file (or replaces it with `force`).
pub(crate) fn write_new(path: &Path, text: &str, force: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rapl_counters_unwrap() {
        assert_eq!(rapl_joules(&[(100, 1000)], &[(2_000_100, 1000)]), 2.0);
        assert!((rapl_joules(&[(900, 1000)], &[(100, 1000)]) - 200e-6).abs() < 1e-15);
    }
}
