//! The pass pipeline: every pass is registered once in [`PASSES`] so that it is timed and can
//! be dumped (`--dump-after=<pass>`), and [`run_pipeline`] is the one place that orders them.

pub mod fuse_elementwise;
pub mod plan_memory;
pub mod quantize_activations;

use std::time::{Duration, Instant};

use ir::verify::{verify, verify_unlowered, GraphInfo, VerifierErrors};
use ir::Graph;
use targets::Target;

/// A graph-to-graph rewrite.
pub struct Pass {
    pub name: &'static str,
    pub run: fn(&mut Graph, &dyn Target),
}

/// Every rewrite pass, in pipeline order.
pub const PASSES: &[Pass] = &[
    Pass { name: "quantize_activations", run: quantize_activations::run },
    Pass { name: "fuse_elementwise", run: fuse_elementwise::run },
];

/// Options of the pipeline.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    /// Print the graph after each named pass (or `all`) to stderr.
    pub dump_after: Vec<String>,
}

/// What the pipeline did: per-pass wall time, for the build report.
#[derive(Clone, Debug, Default)]
pub struct PipelineReport {
    pub pass_times: Vec<(&'static str, Duration)>,
}

/// Runs every pass in order, verifying the graph before the first pass (as an unlowered graph:
/// f32 activations may meet quantized weights, `quantize_activations` lowers them) and fully
/// after each one. A verifier failure after a pass is a bug in that pass.
pub fn run_pipeline(
    graph: &mut Graph,
    target: &dyn Target,
    opts: &PipelineOptions,
) -> Result<(GraphInfo, PipelineReport), VerifierErrors> {
    let mut report = PipelineReport::default();
    verify_unlowered(graph)?;
    for pass in PASSES {
        let start = Instant::now();
        (pass.run)(graph, target);
        report.pass_times.push((pass.name, start.elapsed()));
        if opts.dump_after.iter().any(|p| p == pass.name || p == "all") {
            eprintln!("; after {}\n{graph}", pass.name);
        }
        verify(graph).map_err(|mut e| {
            e.0.iter_mut().for_each(|err| err.message = format!("after pass {}: {}", pass.name, err.message));
            e
        })?;
    }
    let info = verify(graph)?;
    Ok((info, report))
}

#[cfg(test)]
pub(crate) mod tests {
    use ir::interp::{self, KvCache, Tensor};
    use ir::parse::parse_graph;
    use ir::quant::quantize_row;
    use ir::verify::{assert_valid, verify_unlowered};
    use ir::{DType, Graph, Op};

    use super::PASSES;

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
        let target = targets::lookup("x86_64-unknown-linux-gnu").unwrap();
        let mut after = before.clone();
        (pass.run)(&mut after, target.as_ref());
        assert_valid(&after);
        assert_eq!(after.to_string(), expected, "{name} produced a different graph");

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
        let (want, got) = (evaluate(&before, &weights, &inputs, seq), evaluate(&after, &weights, &inputs, seq));
        for (w, g) in want.iter().zip(&got) {
            let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = w.iter().zip(g).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 2e-4 * scale, "{name} changed the result by {diff} (scale {scale})");
        }
    }
}
