//! `--prune-layers auto:N`: resolves to the N contiguous blocks whose removal changes the
//! residual stream least on calibration text (Gromov et al. 2024).
//!
//! The model's probe segments (`compiler::probe`: every block boundary state as an output) are
//! compiled for the host, linked into shared objects under `target/kiln-calib/` and run with
//! the runtime on the calibration tokens, in chunks of at most `PROBE_CONTEXT` tokens from an
//! empty KV cache (BOS first in each chunk when the model adds one, as `eval` does). For each
//! start `l` the angular distance between `x_l` and `x_{l+N}` is averaged over every token in
//! f64, and the run with the smallest mean that keeps the final block is chosen.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use compiler::model::Model;
use compiler::passes::prune_layers::PruneSpec;
use compiler::probe::{angular_distance, choose_run, probe_segments};
use runtime::program::{Input, Program};

/// Positions of one chunk (and the compiled batch): the model's training context if smaller.
pub const PROBE_CONTEXT: u32 = 256;
/// The fewest calibration tokens accepted: one chunk of 32.
pub const MIN_CALIB_TOKENS: usize = 32;
/// Calibration tokens used when `--calib-tokens` is not given.
pub const DEFAULT_CALIB_TOKENS: usize = 1024;

/// The default calibration text (`runtime/eval/data/calib.txt`, CC0, embedded).
pub fn default_calib_text() -> PathBuf {
    eval::data::shipped("calib.txt")
}

/// What calibration measured and chose.
#[derive(Clone, Debug)]
pub struct AutoChoice {
    pub n: u32,
    pub n_layers: u32,
    /// Mean angular distance between `x_l` and `x_{l+n}` for each start `l` in `0..=L-n`.
    pub distances: Vec<f64>,
    /// The first dropped block.
    pub start: u32,
    pub tokens: usize,
    pub seconds: f64,
}

impl AutoChoice {
    /// The resolved spec: blocks `start..start+n`.
    pub fn spec(&self) -> PruneSpec {
        PruneSpec::Blocks((self.start..self.start + self.n).collect())
    }

    /// The report lines: every start's distance, then the choice and the runner-up.
    pub fn report(&self) -> Vec<String> {
        let last_start = self.n_layers - self.n; // would drop the final block
        let mut lines = vec![format!(
            "auto:{}: mean angular distance d(x_l, x_l+{}) over {} calibration tokens ({:.1} s):",
            self.n, self.n, self.tokens, self.seconds
        )];
        for (l, d) in self.distances.iter().enumerate() {
            let mark = if l as u32 == self.start {
                "  <- chosen"
            } else if l as u32 == last_start {
                "  (not eligible: drops the final block)"
            } else {
                ""
            };
            lines.push(format!("  l={l:<3} blocks {l}..={:<3} {d:.4}{mark}", l as u32 + self.n - 1));
        }
        let runner_up = self.distances[..last_start as usize]
            .iter()
            .enumerate()
            .filter(|&(l, _)| l as u32 != self.start)
            .min_by(|a, b| a.1.total_cmp(b.1));
        let next = match runner_up {
            Some((l, d)) => format!("; next best {d:.4} at {l}"),
            None => String::new(),
        };
        lines.push(format!(
            "auto:{} drops blocks {}..={} (angular distance {:.4}{next})",
            self.n,
            self.start,
            self.start + self.n - 1,
            self.distances[self.start as usize]
        ));
        lines
    }
}

/// The calibration token ids of `text` under the model's tokenizer (as its bundle would
/// tokenize), at most `cap`, or an error when fewer than [`MIN_CALIB_TOKENS`].
pub fn calibration_tokens(tokenizer_json: &str, text: &str, cap: usize) -> Result<Vec<u32>> {
    let tokenizer = runtime::tokenizer::Tokenizer::from_json_str(tokenizer_json).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ids = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    ids.truncate(cap);
    if ids.len() < MIN_CALIB_TOKENS {
        bail!("the calibration text has {} tokens; auto:N needs at least {MIN_CALIB_TOKENS} (one chunk)", ids.len());
    }
    Ok(ids)
}

/// The probe of a model compiled for the host and loaded: one program per segment.
pub struct Probe {
    segments: Vec<(Program, Option<u32>, u32, usize)>,
    n_layers: u32,
    d_model: usize,
    context: usize,
    bos: Option<u32>,
}

impl Probe {
    /// Compiles `model`'s probe segments for the host (objects and shared libraries in
    /// `scratch`, which must exist) with chunks of `context` tokens.
    pub fn compile(
        model: &Model<'_>,
        n_layers: u32,
        d_model: usize,
        context: u32,
        bos: Option<u32>,
        scratch: &Path,
    ) -> Result<Self> {
        let triple =
            targets::host_triple().context("auto:N runs the model here, and kiln has no target for this host")?;
        let target = targets::lookup(triple)?;
        let linker = crate::default_shared_linker(triple).unwrap_or_else(|| "cc".into());
        let opts = compiler::CompileOptions { batch: context, embed_weights: true, ..Default::default() };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let mut segments = vec![];
        for (k, mut segment) in probe_segments(model)?.into_iter().enumerate() {
            segment.graph.context = context;
            let compiled = compiler::compile(segment.graph, &segment.weights, target.as_ref(), &opts)
                .with_context(|| format!("cannot compile probe segment {k}"))?;
            let object = scratch.join(format!("probe-{k}.o"));
            let so = scratch.join(format!("probe-{k}.so"));
            std::fs::write(&object, &compiled.object).with_context(|| format!("cannot write {}", object.display()))?;
            let status = std::process::Command::new(&linker)
                .arg("-shared")
                .arg("-o")
                .arg(&so)
                .arg(&object)
                .status()
                .with_context(|| format!("cannot run the linker {linker}"))?;
            if !status.success() {
                bail!("{linker} -shared failed for {}", object.display());
            }
            let program = Program::load_shared(&so, None, threads).map_err(|e| anyhow::anyhow!("{e}"))?;
            let n_outputs = program.desc().n_outputs();
            segments.push((program, segment.input_state, segment.first_state, n_outputs));
        }
        Ok(Probe { segments, n_layers, d_model, context: context as usize, bos })
    }

    /// Positions per chunk.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The states `x_0 ..= x_L` of one chunk of at most `context` tokens from an empty cache,
    /// each `[tokens, d_model]` row-major.
    pub fn states(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let n = tokens.len();
        if n == 0 || n > self.context {
            bail!("a chunk of {n} tokens; the probe takes 1..={}", self.context);
        }
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let mut states: Vec<Vec<f32>> = vec![vec![]; self.n_layers as usize + 1];
        for (program, input_state, first_state, n_outputs) in &mut self.segments {
            program.reset();
            let mut outputs = vec![vec![0.0f32; n * self.d_model]; *n_outputs];
            let mut slices: Vec<&mut [f32]> = outputs.iter_mut().map(|o| o.as_mut_slice()).collect();
            let input = match input_state {
                None => Input::I32(&ids),
                Some(l) => Input::F32(&states[*l as usize]),
            };
            program.run(&[input], &mut slices, n, 0, 0).map_err(|e| anyhow::anyhow!("{e}"))?;
            for (k, output) in outputs.into_iter().enumerate() {
                states[*first_state as usize + k] = output;
            }
        }
        Ok(states)
    }

    /// For runs of `n` blocks, the mean angular distance between `x_l` and `x_{l+n}` over
    /// every token, for each start `l` in `0..=L-n`; `tokens` are cut into chunks of the
    /// probe's context (BOS first in each when the model adds one).
    pub fn distances(&mut self, tokens: &[u32], n: u32) -> Result<Vec<f64>> {
        PruneSpec::check_auto(n, self.n_layers).map_err(anyhow::Error::msg)?;
        let starts = (self.n_layers - n + 1) as usize;
        let mut sums = vec![0.0f64; starts];
        let mut count = 0usize;
        let text_per_chunk = self.context - self.bos.is_some() as usize;
        for chunk in tokens.chunks(text_per_chunk) {
            let chunk: Vec<u32> = self.bos.into_iter().chain(chunk.iter().copied()).collect();
            let states = self.states(&chunk)?;
            let d = self.d_model;
            for (l, sum) in sums.iter_mut().enumerate() {
                let (a, b) = (&states[l], &states[l + n as usize]);
                for t in 0..chunk.len() {
                    *sum += angular_distance(&a[t * d..(t + 1) * d], &b[t * d..(t + 1) * d]);
                }
            }
            count += chunk.len();
        }
        Ok(sums.into_iter().map(|s| s / count as f64).collect())
    }
}

/// Options of `--prune-layers auto:N`.
#[derive(Clone, Debug, Default)]
pub struct CalibOptions {
    /// `--calib`: the text; default [`default_calib_text`].
    pub text: Option<PathBuf>,
    /// `--calib-tokens`: at most this many tokens; default [`DEFAULT_CALIB_TOKENS`].
    pub tokens: Option<usize>,
}

/// Resolves `spec` for the model at `path`: `auto:N` by calibration (merging `lora` first, as
/// the build will), anything else unchanged. Returns the spec to build with and the report
/// lines. `--calib` or `--calib-tokens` without `auto:N` is an error.
pub fn resolve_prune(
    path: &Path,
    spec: Option<PruneSpec>,
    calib: &CalibOptions,
    lora: &[PathBuf],
) -> Result<(Option<PruneSpec>, Vec<String>)> {
    let Some(PruneSpec::Auto(n)) = spec else {
        if calib.text.is_some() || calib.tokens.is_some() {
            bail!("--calib and --calib-tokens only apply to --prune-layers auto:N");
        }
        return Ok((spec, vec![]));
    };
    let choice = choose_auto(path, n, calib, lora)?;
    Ok((Some(choice.spec()), choice.report()))
}

/// Runs calibration for `auto:n` on the model at `path` (see the module doc).
pub fn choose_auto(path: &Path, n: u32, calib: &CalibOptions, lora: &[PathBuf]) -> Result<AutoChoice> {
    let start_time = std::time::Instant::now();
    let cap = calib.tokens.unwrap_or(DEFAULT_CALIB_TOKENS);
    if cap < MIN_CALIB_TOKENS {
        bail!("--calib-tokens {cap}: auto:N needs at least {MIN_CALIB_TOKENS}");
    }
    let text_path = calib.text.clone().unwrap_or_else(default_calib_text);
    let text = eval::data::read(&text_path)
        .with_context(|| format!("cannot read the calibration text {}", text_path.display()))?;
    let source = compiler::source::open(path)?;
    let source = source.as_ref();
    let hp = compiler::frontend::hyperparameters(source)?;
    PruneSpec::check_auto(n, hp.n_layers).map_err(|m| anyhow::anyhow!("--prune-layers: {m}"))?;
    let spec = source.tokenizer().context("cannot build the model's tokenizer")?;
    let tokens = calibration_tokens(&spec.json, &text, cap)?;
    let bos = spec.add_bos.then_some(spec.bos.0);
    let context = match hp.train_context {
        0 => PROBE_CONTEXT,
        c => c.min(PROBE_CONTEXT),
    };
    if context as usize <= bos.is_some() as usize {
        bail!("the model's context of {context} is too short to calibrate");
    }
    let lowered = compiler::frontend::lower(source, "probe", context)?;
    let mut model = Model::borrowed(lowered.graph, &lowered.weights);
    if !lora.is_empty() {
        let adapters = compiler::bundle::read_adapters(lora, &hp)?;
        let options = compiler::passes::PipelineOptions { lora: adapters, ..Default::default() };
        compiler::passes::run_model_passes(&mut model, &options)?;
    }
    let scratch = scratch_dir()?;
    let result = (|| {
        let mut probe = Probe::compile(&model, hp.n_layers, hp.d_model as usize, context, bos, &scratch)?;
        probe.distances(&tokens, n)
    })();
    let _ = std::fs::remove_dir_all(&scratch); // the probe libraries this run built
    let distances = result?;
    let start = choose_run(&distances, n, hp.n_layers).map_err(anyhow::Error::msg)?;
    Ok(AutoChoice {
        n,
        n_layers: hp.n_layers,
        distances,
        start,
        tokens: tokens.len(),
        seconds: start_time.elapsed().as_secs_f64(),
    })
}

/// A fresh directory for one run's probe libraries: `target/kiln-calib/<pid>-<n>`.
pub fn scratch_dir() -> Result<PathBuf> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = crate::root().join("target/kiln-calib").join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
