//! Cranelift code generation: turns a verified, planned graph into one ELF object holding a
//! kernel function per scheduled step, the `run` entry point that calls them in order through
//! the runtime's `parallel_for`, the optional embedded weights, and the exported descriptor.
//!
//! Every kernel is `fn(ctx, ith, nth)` specialized on its shapes, buffer offsets and weight
//! offsets; only the token count, the position and the output start are read at run time.

pub mod abi;
mod attention;
pub mod builder;
mod matmul;
mod ops;

use std::collections::BTreeMap;
use std::fmt;

use crate::passes::plan_memory::{skippable_rows, Location};
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{AbiParam, FuncRef, Function, InstBuilder, MemFlagsData, Signature, UserFuncName};
use cranelift_codegen::isa::CallConv;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataDescription, FuncId, Linkage, Module, ModuleError, ModuleReloc};
use cranelift_object::{ObjectBuilder, ObjectModule};
use ir::verify::GraphInfo;
use ir::{DType, Epilogue, Graph, Op, ValueId};
use rayon::prelude::*;
use targets::Target;

use self::builder::Kb;
use crate::pack::{Layout, Packed};
use crate::passes::plan_memory::MemoryPlan;

/// Code generation failures.
#[derive(Debug)]
pub enum CodegenError {
    /// The target cannot be configured (a user error: bad triple or features).
    Target(targets::TargetError),
    /// Cranelift rejected generated code: always a bug in kiln's kernel generators.
    Module(Box<ModuleError>),
    /// The graph uses something the kernels do not implement, named in the message.
    Unsupported(String),
}

impl fmt::Display for CodegenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodegenError::Target(e) => write!(f, "{e}"),
            CodegenError::Module(e) => {
                write!(f, "cranelift rejected generated code (a kiln bug): {e:?}")
            }
            CodegenError::Unsupported(m) => write!(f, "unsupported: {m}"),
        }
    }
}

impl std::error::Error for CodegenError {}

impl From<ModuleError> for CodegenError {
    fn from(e: ModuleError) -> Self {
        CodegenError::Module(Box::new(e))
    }
}

/// Options of code generation.
#[derive(Clone, Debug)]
pub struct CodegenOptions {
    /// Put the packed weights in the object (`.rodata`) instead of a separate file.
    pub embed_weights: bool,
    /// The build fingerprint written into the descriptor.
    pub fingerprint: [u8; abi::FINGERPRINT_BYTES],
}

/// The emitted object and facts about it.
pub struct Emitted {
    pub object: Vec<u8>,
    pub n_kernels: usize,
}

/// One generated kernel: a step of a node, or the copy of output copy `k`.
enum Kernel {
    Step { node: usize, step: usize },
    CopyOut(usize),
}

/// Splits the kernels, in order, into runs that may share one `parallel_for` (no barrier
/// between them): matmuls and rotary embeddings, none of which reads a value another writes
/// or writes over memory another reads or writes (the memory plan reuses the arena, so this
/// compares byte ranges, not only values). Every other kernel is a run of its own.
fn barrier_free_groups(graph: &Graph, plan: &MemoryPlan, work: &[(String, Kernel)]) -> Vec<std::ops::Range<usize>> {
    // Where a value lives: (space, start, end); inputs and outputs each have a space of their own.
    let region = |v: usize| -> (u64, u64, u64) {
        match plan.locations[v] {
            Location::Arena { offset } => {
                let bytes = crate::passes::plan_memory::row_bytes(&graph.nodes[v].ty, graph.act_dtype);
                (0, offset, offset + bytes * plan.batch as u64)
            }
            Location::Io { slot } | Location::Output { slot, .. } => (1 + slot as u64, 0, u64::MAX),
        }
    };
    let overlap = |a: (u64, u64, u64), b: (u64, u64, u64)| a.0 == b.0 && a.1 < b.2 && b.1 < a.2;
    let groupable = |k: &Kernel| match *k {
        Kernel::Step { node, .. } => matches!(graph.nodes[node].op, Op::MatMul { .. } | Op::Rope { .. }),
        Kernel::CopyOut(_) => false,
    };
    let node_of = |k: &Kernel| match *k {
        Kernel::Step { node, .. } => node,
        Kernel::CopyOut(_) => unreachable!("copies are not grouped"),
    };
    let mut groups: Vec<std::ops::Range<usize>> = vec![];
    for (i, (_, k)) in work.iter().enumerate() {
        let joins = groupable(k)
            && groups.last().is_some_and(|g| {
                let b = node_of(k);
                let b_reads: Vec<_> = graph.nodes[b].op.operands().iter().map(|v| region(v.index())).collect();
                let b_writes = region(b);
                work[g.clone()].iter().all(|(_, other)| {
                    if !groupable(other) {
                        return false;
                    }
                    let a = node_of(other);
                    let a_reads: Vec<_> = graph.nodes[a].op.operands().iter().map(|v| region(v.index())).collect();
                    let a_writes = region(a);
                    !overlap(a_writes, b_writes)
                        && b_reads.iter().all(|&r| !overlap(a_writes, r))
                        && a_reads.iter().all(|&r| !overlap(b_writes, r))
                })
            });
        match groups.last_mut() {
            Some(g) if joins => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    groups
}

/// Keys per tile of the attention kernel (its stack buffer holds one tile of scores).
pub fn attention_key_tile() -> u32 {
    attention::KEY_TILE
}

fn kernel_signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    sig.params.extend([AbiParam::new(I64); 3]);
    sig
}

/// Generates the object for `graph`. With `embed_weights`, the weights blob moves into the
/// object (`packed.blob` is left empty), so the build holds one copy of the weights, not two.
pub fn emit(
    graph: &Graph,
    info: &GraphInfo,
    plan: &MemoryPlan,
    packed: &mut Packed,
    target: &dyn Target,
    opts: &CodegenOptions,
) -> Result<Emitted, CodegenError> {
    let isa = target.isa().map_err(CodegenError::Target)?;
    let call_conv = isa.default_call_conv();
    let frontend_config = isa.frontend_config();
    let builder = ObjectBuilder::new(isa, graph.name.as_bytes().to_vec(), cranelift_module::default_libcall_names())?;
    let mut module = ObjectModule::new(builder);
    let skip = skippable_rows(graph);
    // An output buffer holds only rows out_start..n_tokens (`Location::Output`), so every
    // kernel that writes one must start at out_start; the plan keeps outputs needed in every
    // row in the arena and copies them out (`MemoryPlan::output_copies`).
    for (k, v) in graph.outputs.iter().enumerate() {
        if matches!(plan.locations[v.index()], Location::Output { .. }) && !skip[v.index()] {
            return Err(CodegenError::Unsupported(format!(
                "output {k} (v{}) is needed in every row but planned into the caller's buffer (a planner bug)",
                v.index()
            )));
        }
    }
    let sig = kernel_signature(call_conv);
    let micro = define_micro_kernels(&mut module, graph, packed, target, call_conv)?;
    let attention_kernels = define_attention_kernels(&mut module, graph, target, call_conv)?;
    let mut kernels = vec![];
    let mut ctx = module.make_context();
    let mut fbc = FunctionBuilderContext::new();

    // Every kernel in order: a step per node (two for attention), then the copies of outputs
    // that later kernels needed in every row (their rows out_start..n_tokens, out).
    let mut work: Vec<(String, Kernel)> = vec![];
    for (i, node) in graph.nodes.iter().enumerate() {
        let steps: &[&str] = match node.op {
            Op::Input { .. } => &[],
            Op::Attention { .. } => &["kv_store", "attend"],
            _ => &[node.op.mnemonic()],
        };
        for (step, &kind) in steps.iter().enumerate() {
            let weight = node.op.weight().map(|w| graph.weight(w).name.replace(['.', '-'], "_"));
            let name = match weight {
                Some(w) => format!("kiln_v{i}_{kind}_{w}"),
                None => format!("kiln_v{i}_{kind}"),
            };
            work.push((name, Kernel::Step { node: i, step }));
        }
    }
    let n_inputs = input_values(graph).len();
    for (k, copy) in plan.output_copies.iter().enumerate() {
        let Location::Output { slot, .. } = copy.to else { unreachable!("copies go to outputs") };
        work.push((format!("kiln_v{}_copy_out{}", copy.value, slot as usize - n_inputs), Kernel::CopyOut(k)));
    }
    let groups = barrier_free_groups(graph, plan, &work);
    // The kernels' IR is built here, in order; Cranelift compiles them on rayon's pool
    // (`define_compiled`), and they enter the object in this order, so the output does not
    // depend on the threads.
    let mut pending = Vec::with_capacity(work.len());
    for (name, kernel) in work {
        let id = module.declare_function(&name, Linkage::Local, &sig)?;
        ctx.func.signature = sig.clone();
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        // A matmul on the micro-kernel layout calls the target's micro-kernels.
        let micro_refs = match kernel {
            Kernel::Step { node, .. } => match graph.nodes[node].op {
                Op::MatMul { weight, .. } => micro
                    .get(&micro_key(packed.weight(weight).layout, graph.act_dtype))
                    .map(|ids| ids.map(|id| module.declare_func_in_func(id, &mut ctx.func))),
                _ => None,
            },
            Kernel::CopyOut(_) => None,
        };
        let attention_refs = match (&kernel, attention_kernels) {
            (&Kernel::Step { node, step: 1 }, Some((scores, values)))
                if matches!(graph.nodes[node].op, Op::Attention { .. }) =>
            {
                let mut declare = |ids: [FuncId; 3]| ids.map(|id| module.declare_func_in_func(id, &mut ctx.func));
                Some(attention::AttentionKernels { scores: declare(scores), values: declare(values) })
            }
            _ => None,
        };
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            b.seal_block(entry);
            let p = b.block_params(entry).to_vec();
            let mut kb = Kb { b, ctx: p[0], ith: p[1], nth: p[2], target };
            match kernel {
                Kernel::Step { node, step } => {
                    emit_step(&mut kb, graph, plan, packed, node, step, skip[node], micro_refs, attention_refs)?
                }
                Kernel::CopyOut(k) => {
                    let copy = plan.output_copies[k];
                    let n = graph.nodes[copy.value].ty.row_len().unwrap_or(0);
                    let from = plan.locations[copy.value];
                    ops::emit_elementwise(&mut kb, ops::Elementwise::Copy, from, None, copy.to, n, true);
                }
            }
            kb.b.ins().return_(&[]);
            kb.b.finalize(frontend_config);
        }
        pending.push((id, std::mem::replace(&mut ctx.func, Function::new())));
        module.clear_context(&mut ctx);
        kernels.push(id);
    }
    define_compiled(&mut module, pending)?;

    // A group of kernels that need no barrier between them runs as one function calling
    // them in order: each thread goes on to its share of the next without waiting.
    let mut entries = Vec::with_capacity(groups.len());
    for (g, range) in groups.iter().enumerate() {
        if range.len() == 1 {
            entries.push(kernels[range.start]);
            continue;
        }
        let id = module.declare_function(&format!("kiln_group{g}"), Linkage::Local, &sig)?;
        ctx.func.signature = sig.clone();
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            b.seal_block(entry);
            let args = b.block_params(entry).to_vec();
            for &k in &kernels[range.clone()] {
                let fref = module.declare_func_in_func(k, b.func);
                b.ins().call(fref, &args);
            }
            b.ins().return_(&[]);
            b.finalize(frontend_config);
        }
        module.define_function(id, &mut ctx)?;
        module.clear_context(&mut ctx);
        entries.push(id);
    }

    // run(ctx): parallel_for(pool, kernel, ctx) for every kernel (or group) in order.
    let mut run_sig = Signature::new(call_conv);
    run_sig.params.push(AbiParam::new(I64));
    let run_id = module.declare_function("kiln_run", Linkage::Local, &run_sig)?;
    ctx.func.signature = run_sig;
    ctx.func.name = UserFuncName::user(0, run_id.as_u32());
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let kctx = b.block_params(entry)[0];
        let mut pf_sig = Signature::new(call_conv);
        pf_sig.params.extend([AbiParam::new(I64); 3]);
        let pf_sig = b.import_signature(pf_sig);
        let flags = MemFlagsData::new().with_notrap().with_readonly();
        for &k in &entries {
            let fref = module.declare_func_in_func(k, b.func);
            let addr = b.ins().func_addr(I64, fref);
            let pf = b.ins().load(I64, flags, kctx, abi::ctx::PARALLEL_FOR);
            let pool = b.ins().load(I64, flags, kctx, abi::ctx::POOL);
            b.ins().call_indirect(pf_sig, pf, &[pool, addr, kctx]);
        }
        b.ins().return_(&[]);
        b.finalize(frontend_config);
    }
    module.define_function(run_id, &mut ctx)?;
    module.clear_context(&mut ctx);

    // The weights, then the descriptor pointing at them and at run.
    let (weights_bytes, weights_checksum) = (packed.len, packed.checksum);
    let weights_id = if opts.embed_weights {
        let id = module.declare_data("kiln_weights", Linkage::Local, false, false)?;
        let mut data = DataDescription::new();
        data.set_align(64);
        data.define(std::mem::take(&mut packed.blob).into_boxed_slice());
        module.define_data(id, &data)?;
        drop(data);
        Some(id)
    } else {
        None
    };
    let mut desc = vec![0u8; abi::desc::SIZE];
    let mut put32 = |at: usize, v: u32| desc[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(abi::desc::ABI_VERSION, abi::ABI_VERSION);
    put32(abi::desc::N_INPUTS, info.n_inputs);
    put32(abi::desc::N_OUTPUTS, graph.outputs.len() as u32);
    put32(abi::desc::BATCH, plan.batch);
    put32(abi::desc::CONTEXT, graph.context);
    put32(abi::desc::KV_LAYERS, info.kv_layers);
    put32(abi::desc::KV_WIDTH, info.kv_width);
    put32(abi::desc::KV_ELEMENT_BYTES, graph.kv_dtype.bytes());
    let io_values: Vec<ValueId> = input_values(graph).into_iter().chain(graph.outputs.iter().copied()).collect();
    if io_values.len() > abi::MAX_IO {
        return Err(CodegenError::Unsupported(format!(
            "{} inputs and outputs (at most {})",
            io_values.len(),
            abi::MAX_IO
        )));
    }
    for (slot, v) in io_values.iter().enumerate() {
        let ty = graph.ty(*v);
        put32(abi::desc::IO_DTYPE + 4 * slot, if ty.dtype == DType::I32 { abi::DTYPE_I32 } else { abi::DTYPE_F32 });
        put32(abi::desc::IO_WIDTH + 4 * slot, ty.row_len().unwrap_or(1));
    }
    let kv_bytes = kv_bytes(graph, info);
    let mut put64 = |at: usize, v: u64| desc[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put64(abi::desc::ARENA_BYTES, plan.arena_bytes);
    put64(abi::desc::KV_BYTES, kv_bytes);
    put64(abi::desc::WEIGHTS_BYTES, weights_bytes);
    put64(abi::desc::WEIGHTS_CHECKSUM, weights_checksum);
    desc[abi::desc::FINGERPRINT..abi::desc::FINGERPRINT + abi::FINGERPRINT_BYTES].copy_from_slice(&opts.fingerprint);
    let cpu = abi::cpu_feature_bits(&target.summary().isa_features);
    desc[abi::desc::CPU_FEATURES..abi::desc::CPU_FEATURES + 4].copy_from_slice(&cpu.to_le_bytes());
    let desc_id = module.declare_data(abi::MODEL_SYMBOL, Linkage::Export, false, false)?;
    let mut data = DataDescription::new();
    data.set_align(8);
    data.define(desc.into_boxed_slice());
    if let Some(w) = weights_id {
        let gv = module.declare_data_in_data(w, &mut data);
        data.write_data_addr(abi::desc::WEIGHTS as u32, gv, 0);
    }
    let run_ref = module.declare_func_in_data(run_id, &mut data);
    data.write_function_addr(abi::desc::RUN as u32, run_ref);
    module.define_data(desc_id, &data)?;

    let product = module.finish();
    let object = product.emit().map_err(|e| CodegenError::Unsupported(format!("object emission failed: {e}")))?;
    Ok(Emitted { object, n_kernels: kernels.len() })
}

/// The key of a matmul weight's micro-kernels: the kernel for one token row (the others
/// differ in `tokens` only), for weights in a micro-kernel layout.
fn micro_key(layout: Layout, act: ir::ActDType) -> Option<targets::MicroKernel> {
    matmul::micro_kernel(layout, 1, act)
}

/// Defines the target's micro-kernels that the model's matmuls need: for each kind of weight
/// in a micro-kernel layout, one function per tile height 1..=4 (machine code from the target,
/// placed in the object beside Cranelift's functions).
fn define_micro_kernels(
    module: &mut ObjectModule,
    graph: &Graph,
    packed: &Packed,
    target: &dyn Target,
    call_conv: CallConv,
) -> Result<BTreeMap<Option<targets::MicroKernel>, [FuncId; matmul::MICRO_TOKENS]>, CodegenError> {
    let mut sig = Signature::new(call_conv);
    sig.params.extend([AbiParam::new(I64); 5]);
    let mut defined = BTreeMap::new();
    for node in &graph.nodes {
        let Op::MatMul { weight, .. } = node.op else { continue };
        let layout = packed.weight(weight).layout;
        let key = micro_key(layout, graph.act_dtype);
        if key.is_none() || defined.contains_key(&key) {
            continue;
        }
        let mut ids = Vec::with_capacity(matmul::MICRO_TOKENS);
        for tokens in 1..=matmul::MICRO_TOKENS {
            let spec = matmul::micro_kernel(layout, tokens, graph.act_dtype).expect("a micro-kernel layout");
            let bytes = target
                .micro_kernel(&spec)
                .ok_or_else(|| CodegenError::Unsupported(format!("target {} has no micro-kernels", target.triple())))?;
            let name = format!(
                "kiln_micro_{}{}x8_{}_{}_t{tokens}",
                match (spec.k32, spec.k16) {
                    (_, Some(ir::quant::KKind::Q3)) if spec.low => "g3",
                    _ if spec.low => "g2",
                    (true, _) => "k",
                    (_, Some(ir::quant::KKind::Q2)) => "k2",
                    (_, Some(ir::quant::KKind::Q3)) => "k3",
                    (_, Some(ir::quant::KKind::Q6)) => "k6",
                    _ => "",
                },
                match (spec.values, spec.high_at.is_some()) {
                    (targets::MicroValues::Nibbles, false) => "q4",
                    (targets::MicroValues::NibbleDwords, false) => "q4i8",
                    (targets::MicroValues::NibbleDwords, true) => "q5i8",
                    (targets::MicroValues::Nibbles, true) => "q5",
                    (targets::MicroValues::Bytes, _) => "q8",
                    (targets::MicroValues::F16, _) => ["f16w", "f16w1", "f16w2", "f16w3"][spec.tail as usize],
                    (targets::MicroValues::BF16, _) => ["bf16w", "bf16w1", "bf16w2", "bf16w3"][spec.tail as usize],
                },
                if spec.half { "f16" } else { "f32" },
                if spec.mins_at.is_some() { "min" } else { "nomin" }
            );
            let id = module.declare_function(&name, Linkage::Local, &sig)?;
            module.define_function_bytes(id, 64, &bytes, &[])?;
            ids.push(id);
        }
        defined.insert(key, ids.try_into().expect("one per tile height"));
    }
    Ok(defined)
}

/// Defines the target's attention kernels for the model's attention shape (every attention
/// op of a graph has the same heads and head size), for 1..=3 heads per call, when the target
/// has them for that shape: `(scores, values)`.
fn define_attention_kernels(
    module: &mut ObjectModule,
    graph: &Graph,
    target: &dyn Target,
    call_conv: CallConv,
) -> Result<Option<([FuncId; 3], [FuncId; 3])>, CodegenError> {
    let Some(head_dim) = graph.nodes.iter().find_map(|n| match n.op {
        Op::Attention { head_dim, .. } => Some(head_dim),
        _ => None,
    }) else {
        return Ok(None);
    };
    let mut ids = [vec![], vec![]];
    for (s, step) in [targets::AttentionStep::Scores, targets::AttentionStep::Values].into_iter().enumerate() {
        let mut sig = Signature::new(call_conv);
        sig.params.extend([AbiParam::new(I64); 6][..if s == 0 { 5 } else { 6 }].iter().copied());
        for heads in 1..=attention::HEADS_PER_UNIT {
            let spec = attention::attention_kernel(step, heads, head_dim, graph.context, graph.kv_dtype);
            let Some(bytes) = target.attention_kernel(&spec) else { return Ok(None) };
            let kind = if s == 0 { "scores" } else { "values" };
            let id =
                module.declare_function(&format!("kiln_attn_{kind}_h{heads}_d{head_dim}"), Linkage::Local, &sig)?;
            module.define_function_bytes(id, 64, &bytes, &[])?;
            ids[s].push(id);
        }
    }
    let [scores, values] = ids.map(|v| v.try_into().expect("one per head count"));
    Ok(Some((scores, values)))
}

/// Bytes of the KV cache: per layer, `context` rows of keys then of values.
pub fn kv_bytes(graph: &Graph, info: &GraphInfo) -> u64 {
    info.kv_layers as u64 * 2 * graph.context as u64 * info.kv_width as u64 * graph.kv_dtype.bytes() as u64
}

/// Compiles `funcs` on rayon's pool, one function per unit of work (the kernels are
/// independent), collects the machine code in the given order, then defines it in the object
/// in that order on this thread: the object depends on neither the threads nor the schedule.
fn define_compiled(module: &mut ObjectModule, funcs: Vec<(FuncId, Function)>) -> Result<(), CodegenError> {
    let isa = module.isa();
    let compiled: Vec<_> = funcs
        .into_par_iter()
        .map_init(cranelift_codegen::Context::new, |ctx, (id, func)| {
            ctx.clear();
            ctx.func = func;
            ctx.compile(isa, &mut ControlPlane::default()).map_err(|e| e.inner)?;
            let code = ctx.compiled_code().expect("just compiled");
            let relocs =
                code.buffer.relocs().iter().map(|r| ModuleReloc::from_mach_reloc(r, &ctx.func, id)).collect::<Vec<_>>();
            Ok((id, code.buffer.alignment as u64, code.buffer.data().to_vec(), relocs))
        })
        .collect();
    for result in compiled {
        let (id, alignment, bytes, relocs) = result.map_err(ModuleError::Compilation)?;
        module.define_function_bytes(id, alignment, &bytes, &relocs)?;
    }
    Ok(())
}

/// Input values ordered by input index.
fn input_values(graph: &Graph) -> Vec<ValueId> {
    let mut inputs: Vec<(u32, ValueId)> = graph
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match n.op {
            Op::Input { index } => Some((index, ValueId(i as u32))),
            _ => None,
        })
        .collect();
    inputs.sort_unstable();
    inputs.into_iter().map(|(_, v)| v).collect()
}

/// Emits step `step` of node `i` into `kb`.
fn emit_step(
    kb: &mut Kb,
    graph: &Graph,
    plan: &MemoryPlan,
    packed: &Packed,
    i: usize,
    step: usize,
    skip: bool,
    micro: Option<[FuncRef; matmul::MICRO_TOKENS]>,
    attention_kernels: Option<attention::AttentionKernels>,
) -> Result<(), CodegenError> {
    let node = &graph.nodes[i];
    let loc = |v: ValueId| plan.locations[v.index()];
    let y = plan.locations[i];
    let n = node.ty.row_len().unwrap_or(0);
    match node.op {
        Op::Input { .. } => unreachable!("inputs have no kernel"),
        Op::Embed { ids, table } => ops::emit_embed(kb, loc(ids), packed.weight(table), y, skip),
        Op::RmsNorm { x, weight, eps, quantize } => {
            let quantize = quantize.then_some(graph.act_dtype);
            ops::emit_rms_norm(kb, loc(x), packed.weight(weight), y, n, eps, quantize, skip)
        }
        Op::Quantize { x } => ops::emit_quantize(kb, loc(x), y, n, graph.act_dtype, skip),
        Op::MatMul { x, weight, epilogue } => {
            let epilogue = match epilogue {
                Epilogue::None => matmul::EpilogueAt::None,
                Epilogue::Silu => matmul::EpilogueAt::Silu,
                Epilogue::Add(o) => matmul::EpilogueAt::Add(loc(o)),
                Epilogue::Mul(o) => matmul::EpilogueAt::Mul(loc(o)),
            };
            let x_row_bytes = crate::passes::plan_memory::row_bytes(graph.ty(x), graph.act_dtype) as i64;
            let token_block = matmul::token_block(kb.target.summary().cache.l2, x_row_bytes);
            let spec = matmul::MatmulSpec {
                x: loc(x),
                y,
                weight: packed.weight(weight),
                epilogue,
                skip_rows: skip,
                token_block,
                micro,
                x_block_bytes: crate::passes::plan_memory::q16_block_bytes(graph.act_dtype) as i64,
            };
            matmul::emit(kb, &spec);
        }
        Op::Rope { x, head_dim, theta, ref scaling } => {
            if head_dim % 4 != 0 {
                return Err(CodegenError::Unsupported(format!(
                    "rope with head_dim {head_dim} (must be a multiple of 4)"
                )));
            }
            let table = packed.rope_tables[&crate::pack::RopeKey::new(head_dim, theta, scaling)];
            ops::emit_rope(kb, loc(x), y, n, head_dim, table, skip);
        }
        Op::Attention { q, k, v, layer, n_heads, n_kv_heads, head_dim } => {
            if head_dim % 4 != 0 {
                return Err(CodegenError::Unsupported(format!(
                    "attention with head_dim {head_dim} (must be a multiple of 4)"
                )));
            }
            let spec = attention::AttentionSpec {
                q: loc(q),
                k: loc(k),
                v: loc(v),
                y,
                layer,
                n_heads,
                n_kv_heads,
                head_dim,
                context: graph.context,
                kv_dtype: graph.kv_dtype,
                skip_rows: skip,
                kernels: attention_kernels,
            };
            if step == 0 {
                attention::emit_kv_store(kb, &spec);
            } else {
                attention::emit_attend(kb, &spec);
            }
        }
        Op::Silu { x } => ops::emit_elementwise(kb, ops::Elementwise::Silu, loc(x), None, y, n, skip),
        Op::Mul { a, b } => ops::emit_elementwise(kb, ops::Elementwise::Mul, loc(a), Some(loc(b)), y, n, skip),
        Op::Add { a, b } => ops::emit_elementwise(kb, ops::Elementwise::Add, loc(a), Some(loc(b)), y, n, skip),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups_of(text: &str) -> Vec<Vec<usize>> {
        let graph = ir::parse::parse_graph(text).unwrap();
        let info = ir::verify::verify(&graph).unwrap();
        let plan = crate::passes::plan_memory::plan(&graph, &info, 4);
        let work: Vec<(String, Kernel)> = (0..graph.nodes.len())
            .filter(|&i| !matches!(graph.nodes[i].op, Op::Input { .. }))
            .map(|i| (String::new(), Kernel::Step { node: i, step: 0 }))
            .collect();
        barrier_free_groups(&graph, &plan, &work)
            .into_iter()
            .map(|g| work[g].iter().map(|(_, k)| if let Kernel::Step { node, .. } = k { *node } else { 0 }).collect())
            .collect()
    }

    /// Independent matmuls of one input share a run; a kernel reading another's output, or
    /// writing where another reads (arena reuse), starts a new one.
    #[test]
    fn only_independent_kernels_share_a_barrier() {
        let text = r#"graph "g" context=8
w0 = weight q8_0[64, 64] "q"
w1 = weight q8_0[32, 64] "k"
w2 = weight q8_0[32, 64] "v"
w3 = weight q8_0[32, 64] "u"
v0 = input 0 : f32[seq, 64]
v1 = quantize v0 : q16[seq, 64]
v2 = matmul v1, w0 : f32[seq, 64]
v3 = matmul v1, w1 : f32[seq, 32]
v4 = matmul v1, w2 : f32[seq, 32]
v5 = rope v2 head_dim=16 theta=10000 : f32[seq, 64]
v6 = rope v3 head_dim=16 theta=10000 : f32[seq, 32]
v7 = matmul v1, w3 +mul v4 : f32[seq, 32]
v8 = add v6, v7 : f32[seq, 32]
v9 = add v5, v5 : f32[seq, 64]
output v8
output v9
"#;
        let groups = groups_of(text);
        // v6 is placed where v2 was (v2's last use is v5), so it may not run beside v5, which
        // reads v2; v7 may run beside v6.
        assert_eq!(groups, vec![vec![1], vec![2, 3, 4], vec![5], vec![6, 7], vec![8], vec![9]], "{groups:?}");
    }
}
