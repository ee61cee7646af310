//! The pass pipeline: every pass is registered once in [`PASSES`] so that it is timed and can
//! be dumped (`--dump-after=<pass>`), and [`run_pipeline`] is the one place that orders them.
//!
//! A pass transforms a [`Model`] (the graph and its weights together) and reads its options
//! from the [`PassContext`]; a pass whose options do not fit the model (a layer that does not
//! exist, an adapter of another shape) returns a [`PassError`]. A panic or a verifier failure
//! after a pass is a bug in that pass.

pub mod attach_lora;
pub mod drop_unused_weights;
pub mod fuse_elementwise;
pub mod merge_lora;
pub mod plan_memory;
pub mod prune_layers;
pub mod quantize_activations;
pub mod requantize;

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, Instant};

use ir::verify::{verify, verify_unlowered, GraphInfo, VerifierErrors};

use crate::model::Model;

/// A rewrite of a model (graph and weights).
pub struct Pass {
    pub name: &'static str,
    pub run: fn(&mut Model<'_>, &PassContext) -> Result<(), PassError>,
    /// This pass lowers the graph (gives quantized matmuls q16 activations): the passes before
    /// it see, and leave, graphs that only `verify_unlowered` accepts.
    pub lowers: bool,
}

/// What every pass may read (the pipeline's options) and where it tells the build report
/// what it changed ([`PassContext::note`]). The passes are target-independent: the target
/// enters at code generation.
pub struct PassContext<'a> {
    pub options: &'a PipelineOptions,
    notes: RefCell<Vec<String>>,
}

impl<'a> PassContext<'a> {
    pub fn new(options: &'a PipelineOptions) -> Self {
        PassContext { options, notes: RefCell::new(vec![]) }
    }

    /// Adds a line to the build report (`pass: text`).
    pub fn note(&self, pass: &str, text: impl fmt::Display) {
        self.notes.borrow_mut().push(format!("{pass}: {text}"));
    }

    /// The report lines so far.
    pub fn notes(&self) -> Vec<String> {
        self.notes.borrow().clone()
    }
}

/// Every rewrite pass, in pipeline order. The model passes (pruning, requantization, dropping
/// unused weights) come before the lowering pass: `cargo xtask optimize` runs only those and
/// writes the model as a GGUF.
pub const PASSES: &[Pass] = &[
    Pass { name: "merge_lora", run: merge_lora::run, lowers: false },
    Pass { name: "prune_layers", run: prune_layers::run, lowers: false },
    Pass { name: "drop_unused_weights", run: drop_unused_weights::run, lowers: false },
    Pass { name: "requantize", run: requantize::run, lowers: false },
    Pass { name: "attach_lora", run: attach_lora::run, lowers: false },
    Pass { name: "quantize_activations", run: quantize_activations::run, lowers: true },
    Pass { name: "fuse_elementwise", run: fuse_elementwise::run, lowers: false },
];

/// Options of the pipeline, read by the passes they concern.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    /// Print the graph after each named pass (or `all`) to stderr.
    pub dump_after: Vec<String>,
    /// LoRA adapters to merge into the weights (`merge_lora`), in order.
    pub lora: Vec<std::sync::Arc<crate::lora::Adapter>>,
    /// Keep the adapters as low-rank matmuls (`attach_lora`) instead of merging them.
    pub lora_low_rank: bool,
    /// `--prune-layers`: the transformer blocks `prune_layers` removes.
    pub prune: Option<prune_layers::PruneSpec>,
    /// `--quant`, `--quant-tensor`: the formats `requantize` gives the weights.
    pub quant: requantize::QuantOptions,
}

/// Why the pipeline stopped.
#[derive(Debug)]
pub enum PassError {
    /// The options do not fit the model: a user's mistake, told in `message`.
    BadOption { pass: &'static str, message: String },
    /// The model broke an IR invariant (before the first pass: the frontend's bug).
    Verifier(VerifierErrors),
}

impl fmt::Display for PassError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PassError::BadOption { pass, message } => write!(f, "{pass}: {message}"),
            PassError::Verifier(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PassError {}

/// What the pipeline did, for the build report: per-pass wall time and what the passes said
/// they changed.
#[derive(Clone, Debug, Default)]
pub struct PipelineReport {
    pub pass_times: Vec<(&'static str, Duration)>,
    pub notes: Vec<String>,
}

/// Runs every pass in order, verifying the graph before the first pass (as an unlowered graph:
/// f32 activations may meet quantized weights, `quantize_activations` lowers them) and fully
/// after each one, and checking after each that every weight's bytes fit its format and shape.
pub fn run_pipeline(model: &mut Model<'_>, opts: &PipelineOptions) -> Result<(GraphInfo, PipelineReport), PassError> {
    let report = run_passes(model, opts, PASSES)?;
    let info = verify(&model.graph).map_err(PassError::Verifier)?;
    Ok((info, report))
}

/// Runs the passes before the lowering pass (pruning, dropping unused weights,
/// requantization): the model stays one a GGUF can hold (`cargo xtask optimize`).
pub fn run_model_passes(model: &mut Model<'_>, opts: &PipelineOptions) -> Result<PipelineReport, PassError> {
    let lowering = PASSES.iter().position(|p| p.lowers).unwrap_or(PASSES.len());
    run_passes(model, opts, &PASSES[..lowering])
}

fn run_passes(model: &mut Model<'_>, opts: &PipelineOptions, passes: &[Pass]) -> Result<PipelineReport, PassError> {
    let mut report = PipelineReport::default();
    verify_unlowered(&model.graph).map_err(PassError::Verifier)?;
    if let Err(e) = model.check_weights() {
        panic!("the model's weights do not fit its graph: {e}");
    }
    let cx = PassContext::new(opts);
    let mut lowered = false;
    for pass in passes {
        let start = Instant::now();
        (pass.run)(model, &cx)?;
        report.pass_times.push((pass.name, start.elapsed()));
        if opts.dump_after.iter().any(|p| p == pass.name || p == "all") {
            eprintln!("; after {}\n{}", pass.name, model.graph);
        }
        let after = |mut e: VerifierErrors| {
            e.0.iter_mut().for_each(|err| err.message = format!("after pass {}: {}", pass.name, err.message));
            PassError::Verifier(e)
        };
        lowered |= pass.lowers;
        if lowered {
            verify(&model.graph).map_err(after)?;
        } else {
            verify_unlowered(&model.graph).map_err(after)?;
        }
        if let Err(e) = model.check_weights() {
            panic!("bug in pass {}: {e}", pass.name);
        }
    }
    report.notes = cx.notes();
    Ok(report)
}

#[cfg(test)]
pub(crate) mod tests {
    use ir::interp::{self, KvCache, Tensor};
    use ir::parse::parse_graph;
    use ir::quant::quantize_row;
    use ir::verify::{assert_valid, verify_unlowered};
    use ir::{DType, Graph, Op};

    use super::{PassContext, PASSES};
    use crate::model::Model;

    /// Pseudo-random values in [-1, 1) from a fixed seed.
    fn values(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn evaluate(graph: &Graph, weights: &[Vec<u8>], inputs: &[Tensor], seq: usize) -> Vec<Vec<f32>> {
        let w: Vec<&[u8]> = weights.iter().map(|w| w.as_slice()).collect();
        interp::run(graph, &w, inputs, &mut KvCache::new(graph), seq, 0)
    }

    /// Runs pass `name` on `input` and checks the printed result against `expected`, then
    /// checks that the graphs before and after evaluate to the same outputs (up to the
    /// rounding of q16 activations, 2e-4 of the output scale) on random weights and inputs.
    pub(crate) fn check_pass(name: &str, input: &str, expected: &str) {
        let before = parse_graph(input).unwrap();
        verify_unlowered(&before).unwrap_or_else(|e| panic!("invalid input graph:\n{e}"));
        let pass = PASSES.iter().find(|p| p.name == name).expect("a registered pass");
        let mut seed = 42;
        let weights: Vec<Vec<u8>> = before
            .weights
            .iter()
            .map(|w| {
                let cols = *w.shape.last().unwrap() as usize;
                let rows = w.n_values() as usize / cols;
                (0..rows).flat_map(|_| quantize_row(w.format, &values(&mut seed, cols))).collect()
            })
            .collect();
        let mut model = Model::borrowed(before.clone(), &weights);
        let options = Default::default();
        let cx = PassContext::new(&options);
        (pass.run)(&mut model, &cx).unwrap_or_else(|e| panic!("{name} failed: {e}"));
        model.check_weights().unwrap();
        let after = model.graph.clone();
        let after_weights: Vec<Vec<u8>> = model.weights().map(|w| w.to_vec()).collect();
        // Passes before the lowering pass see unlowered graphs.
        let lowered_at = PASSES.iter().position(|p| p.lowers).unwrap();
        if PASSES.iter().position(|p| p.name == name).unwrap() < lowered_at {
            verify_unlowered(&after).unwrap_or_else(|e| panic!("{name} left an invalid graph:\n{e}"));
        } else {
            assert_valid(&after);
        }
        assert_eq!(after.to_string(), expected, "{name} produced a different graph");
        let seq = 3;
        let mut inputs: Vec<(u32, Tensor)> = before
            .nodes
            .iter()
            .filter_map(|n| match n.op {
                Op::Input { index } => Some((
                    index,
                    match n.ty.dtype {
                        DType::I32 => Tensor::I32((0..seq as i32).collect()),
                        _ => Tensor::F32(values(&mut seed, seq * n.ty.row_len().unwrap() as usize)),
                    },
                )),
                _ => None,
            })
            .collect();
        inputs.sort_by_key(|(i, _)| *i);
        let inputs: Vec<Tensor> = inputs.into_iter().map(|(_, t)| t).collect();
        let (want, got) = (evaluate(&before, &weights, &inputs, seq), evaluate(&after, &after_weights, &inputs, seq));
        for (w, g) in want.iter().zip(&got) {
            let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = w.iter().zip(g).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 2e-4 * scale, "{name} changed the result by {diff} (scale {scale})");
        }
    }
}
