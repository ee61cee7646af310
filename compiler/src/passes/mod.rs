//! The pass pipeline: every pass is registered once in [`PASSES`] so that it is timed and can
//! be dumped (`--dump-after=<pass>`), and [`run_pipeline`] is the one place that orders them.

pub mod fuse_elementwise;
pub mod plan_memory;
pub mod quantize_activations;

use std::time::{Duration, Instant};

use ir::verify::{verify, GraphInfo, VerifierErrors};
use ir::Graph;
use targets::Target;

/// A graph-to-graph rewrite.
pub struct Pass {
    pub name: &'static str,
    pub run: fn(&mut Graph, &dyn Target),
}

/// Every rewrite pass, in pipeline order.
pub const PASSES: &[Pass] = &[
    Pass {
        name: "quantize_activations",
        run: quantize_activations::run,
    },
    Pass {
        name: "fuse_elementwise",
        run: fuse_elementwise::run,
    },
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

/// Runs every pass in order, verifying the graph before the first pass and after each one.
/// A verifier failure after a pass is a bug in that pass.
pub fn run_pipeline(
    graph: &mut Graph,
    target: &dyn Target,
    opts: &PipelineOptions,
) -> Result<(GraphInfo, PipelineReport), VerifierErrors> {
    let mut report = PipelineReport::default();
    verify(graph)?;
    for pass in PASSES {
        let start = Instant::now();
        (pass.run)(graph, target);
        report.pass_times.push((pass.name, start.elapsed()));
        if opts.dump_after.iter().any(|p| p == pass.name || p == "all") {
            eprintln!("; after {}\n{graph}", pass.name);
        }
        verify(graph).map_err(|mut e| {
            e.0.iter_mut()
                .for_each(|err| err.message = format!("after pass {}: {}", pass.name, err.message));
            e
        })?;
    }
    let info = verify(graph)?;
    Ok((info, report))
}
