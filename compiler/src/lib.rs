//! kiln's compiler: reads a model file, lowers it to the tensor IR, runs the pass pipeline,
//! packs the weights for the target and generates a static model library with Cranelift.
//!
//! The entry point is [`bundle::build_model`], which writes a bundle directory; the pieces
//! ([`compile`] for a graph, [`gguf`], [`frontend`], [`passes`], [`pack`], [`codegen`]) are
//! public for tests and tools.

// The compiler emits bytes, it never runs them. Two `unsafe` blocks, allowed where they are
// (`source::files`): mapping a model file read-only, and giving a packed tensor's pages back.
#![deny(unsafe_code)]

pub mod bundle;
pub mod codegen;
pub mod deploy;
pub mod frontend;
pub mod gguf;
pub mod lora;
pub mod model;
pub mod optimize;
pub mod outdir;
pub mod pack;
pub mod passes;
pub mod probe;
pub mod source;
pub mod tokenizer_json;

use std::fmt;
use std::time::{Duration, Instant};

use ir::Graph;
use targets::Target;

/// Options of [`compile`].
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Most tokens one call of the compiled `run` may evaluate.
    pub batch: u32,
    pub embed_weights: bool,
    pub pipeline: passes::PipelineOptions,
    /// Build fingerprint stored in the library's descriptor (`bundle::fingerprint`); all
    /// zeros for graphs compiled outside `build_model`.
    pub fingerprint: [u8; codegen::abi::FINGERPRINT_BYTES],
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            batch: 512,
            embed_weights: true,
            pipeline: Default::default(),
            fingerprint: [0; codegen::abi::FINGERPRINT_BYTES],
        }
    }
}

/// A compiled graph: the object file, the packed weights and what the build measured.
pub struct Compiled {
    pub object: Vec<u8>,
    /// The packed weights for a `weights.bin`; empty when they are embedded in `object`.
    pub weights: Vec<u8>,
    /// Size of the packed weights, embedded or not.
    pub weights_bytes: u64,
    pub arena_bytes: u64,
    pub kv_bytes: u64,
    pub n_kernels: usize,
    /// The graph after the pipeline, in textual form.
    pub final_ir: String,
    pub timings: Vec<(String, Duration)>,
    /// Layers (KV cache layers) of the compiled model, after pruning.
    pub kv_layers: u32,
    /// What the passes changed (pruning, requantization), for the build report.
    pub notes: Vec<String>,
}

/// Why compiling a graph failed.
#[derive(Debug)]
pub enum CompileError {
    /// The graph broke an IR invariant: a bug in the frontend or in a pass.
    Verifier(ir::verify::VerifierErrors),
    Codegen(codegen::CodegenError),
    BadOption(String),
    /// The packed weights could not be written (`weights.bin` in the making).
    Write(std::io::Error),
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompileError::Verifier(e) => write!(f, "invalid IR (a kiln bug):\n{e}"),
            CompileError::Codegen(e) => write!(f, "{e}"),
            CompileError::BadOption(m) => write!(f, "{m}"),
            CompileError::Write(e) => write!(f, "writing the packed weights: {e}"),
        }
    }
}

impl std::error::Error for CompileError {}

/// Compiles `graph` (with raw weights `weights`, indexed by weight id: owned buffers or slices
/// of a model file) for `target`: [`prepare`] then [`finish`].
pub fn compile<W: AsRef<[u8]>>(
    graph: Graph,
    weights: &[W],
    target: &dyn Target,
    opts: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let prepared = prepare(model::Model::borrowed(graph, weights), target, opts)?;
    finish(prepared, target, opts)
}

/// A graph after the pass pipeline, with its memory planned: its weights, still in their
/// formats (slices of the model file where the source lends them), are packed next.
pub struct Planned<'a> {
    model: model::Model<'a>,
    info: ir::verify::GraphInfo,
    plan: passes::plan_memory::MemoryPlan,
    micro_rows: Option<u32>,
    timings: Vec<(String, Duration)>,
    notes: Vec<String>,
}

impl<'a> Planned<'a> {
    /// The least bytes the packed weights can take ([`pack::packed_bytes_at_least`]).
    pub fn packed_bytes_at_least(&self) -> u64 {
        pack::packed_bytes_at_least(&self.model.graph, self.micro_rows)
    }

    /// Bytes of the activation arena and of the KV cache, and the layers (after pruning).
    pub fn memory(&self) -> (u64, u64, u32) {
        (self.plan.arena_bytes, codegen::kv_bytes(&self.model.graph, &self.info), self.info.kv_layers)
    }

    /// Packs the weights into `sink` ([`pack::pack`]), tensor by tensor.
    pub fn pack(self, sink: pack::WeightsSink<'_>) -> Result<Prepared, CompileError> {
        let Planned { model, info, plan, micro_rows, mut timings, notes } = self;
        let start = Instant::now();
        let packed = pack::pack(&model, micro_rows, sink).map_err(CompileError::Write)?;
        timings.push(("pack weights".into(), start.elapsed()));
        Ok(Prepared { graph: model.graph, info, plan, packed, timings, notes })
    }
}

/// A graph after the pass pipeline, planned, with its weights packed: the raw weights are no
/// longer needed (a caller can free the model file before code generation).
pub struct Prepared {
    graph: Graph,
    info: ir::verify::GraphInfo,
    plan: passes::plan_memory::MemoryPlan,
    packed: pack::Packed,
    timings: Vec<(String, Duration)>,
    notes: Vec<String>,
}

impl Prepared {
    /// Bytes of the packed weights blob (what a library embeds or `weights.bin` holds).
    pub fn weights_bytes(&self) -> u64 {
        self.packed.len
    }

    /// Whether the packed weights are in memory (packed into [`pack::WeightsSink::memory`]).
    pub fn weights_in_memory(&self) -> bool {
        self.packed.blob.len() as u64 == self.packed.len
    }

    /// The packed weights, when they are in memory (empty otherwise), leaving none behind:
    /// what a build writes to `weights.bin` when they are not embedded after all.
    pub fn take_weights(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.packed.blob)
    }
}

/// The first half of [`compile`]: [`plan`], then the weights packed into memory.
pub fn prepare(model: model::Model<'_>, target: &dyn Target, opts: &CompileOptions) -> Result<Prepared, CompileError> {
    plan(model, target, opts)?.pack(pack::WeightsSink::memory())
}

/// Checks the options, runs the pass pipeline on `model` and plans memory.
pub fn plan<'a>(
    mut model: model::Model<'a>,
    target: &dyn Target,
    opts: &CompileOptions,
) -> Result<Planned<'a>, CompileError> {
    if opts.batch == 0 || opts.batch > 65536 {
        return Err(CompileError::BadOption(format!("batch {} must be in 1..=65536", opts.batch)));
    }
    // The name becomes the object file's name (an ELF string table entry, NUL-terminated).
    if model.graph.name.contains('\0') {
        return Err(CompileError::BadOption(format!(
            "graph name {:?} holds a NUL byte",
            gguf::clip(&model.graph.name)
        )));
    }
    let mut timings = vec![];
    let (info, report) = passes::run_pipeline(&mut model, &opts.pipeline).map_err(|e| match e {
        passes::PassError::Verifier(e) => CompileError::Verifier(e),
        e => CompileError::BadOption(e.to_string()),
    })?;
    timings.extend(report.pass_times.into_iter().map(|(n, d)| (format!("pass {n}"), d)));
    let notes = report.notes;
    let start = Instant::now();
    let plan = passes::plan_memory::plan(&model.graph, &info, opts.batch);
    timings.push(("plan memory".into(), start.elapsed()));
    Ok(Planned { model, info, plan, micro_rows: target.matmul_schedule().micro_rows, timings, notes })
}

/// The second half of [`compile`]: code generation. `opts` must be the options given to
/// [`prepare`].
pub fn finish(prepared: Prepared, target: &dyn Target, opts: &CompileOptions) -> Result<Compiled, CompileError> {
    let Prepared { graph, info, plan, mut packed, mut timings, notes } = prepared;
    let weights_bytes = packed.len;
    if opts.embed_weights && packed.blob.len() as u64 != weights_bytes {
        return Err(CompileError::BadOption("weights packed into a file cannot be embedded".into()));
    }
    let start = Instant::now();
    let emitted = codegen::emit(
        &graph,
        &info,
        &plan,
        &mut packed,
        target,
        &codegen::CodegenOptions { embed_weights: opts.embed_weights, fingerprint: opts.fingerprint },
    )
    .map_err(CompileError::Codegen)?;
    timings.push(("codegen".into(), start.elapsed()));
    let kv_bytes = codegen::kv_bytes(&graph, &info);
    Ok(Compiled {
        object: emitted.object,
        weights: packed.blob,
        weights_bytes,
        arena_bytes: plan.arena_bytes,
        kv_bytes,
        n_kernels: emitted.n_kernels,
        final_ir: graph.to_string(),
        timings,
        kv_layers: info.kv_layers,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_in_the_graph_name_is_an_error_not_a_panic() {
        let mut graph = ir::parse::parse_graph(
            "graph \"t\" context=8\nv0 = input 0 : f32[seq, 32]\nv1 = silu v0 : f32[seq, 32]\noutput v1\n",
        )
        .unwrap();
        graph.name = "a\0b".into();
        let target = targets::lookup("x86_64-unknown-linux-gnu").unwrap();
        let weights: &[Vec<u8>] = &[];
        let e = compile(graph, weights, target.as_ref(), &CompileOptions::default()).err().expect("an error");
        assert!(matches!(&e, CompileError::BadOption(m) if m.contains("NUL")), "{e}");
    }
}
