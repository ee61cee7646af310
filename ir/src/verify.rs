//! The graph verifier. It checks these invariants:
//!
//! - The graph has a nonzero context and at least one output.
//! - Every operand names an earlier node (SSA order), every weight id exists.
//! - Every node satisfies its op's typing rules (documented on [`crate::Op`]).
//! - Weight shapes are 1-D or 2-D, nonzero, and rows of block-quantized weights are whole blocks.
//! - Input indices are `0..n` without gaps or repeats.
//! - Attention layer indices are `0..n` without gaps or repeats, with one KV geometry.
//! - Graph outputs are `f32` values.
//! - A matmul with a block-quantized weight (Q4_0, Q4_1, Q8_0) takes q16 activations: its
//!   kernel reads the activations as int16 blocks, so an f32 operand would be misread.
//!
//! A successful run returns a [`GraphInfo`]: analyses the compiler relies on, which only a
//! verified graph can have. Codegen takes `&GraphInfo` as proof that the graph was verified.
//!
//! A frontend's graph is not lowered yet: its matmuls take f32 activations whatever the
//! weight's format, and the `quantize_activations` pass inserts the `quantize` ops.
//! [`verify_unlowered`] checks such a graph (every invariant but the last); it returns no
//! [`GraphInfo`], so nothing it accepted can reach codegen.

use std::fmt;

use crate::write::write_node;
use crate::{DType, Dim, Epilogue, Graph, Op, TensorType, ValueId};

/// One broken invariant, located at a node when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifierError {
    pub location: Option<ValueId>,
    /// The node in textual form, for the message.
    pub context: String,
    pub message: String,
}

/// All the broken invariants found in one run. Always a bug in whoever built or rewrote the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifierErrors(pub Vec<VerifierError>);

impl fmt::Display for VerifierErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match e.location {
                Some(_) => write!(f, "{}: {}", e.context, e.message)?,
                None => write!(f, "{}", e.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for VerifierErrors {}

/// Facts about a verified graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphInfo {
    /// Uses of each value (operands, epilogue operands and graph outputs).
    pub use_counts: Vec<u32>,
    /// Index of the last node that reads each value; `nodes.len()` for graph outputs.
    pub last_use: Vec<usize>,
    pub n_inputs: u32,
    pub kv_layers: u32,
    /// Floats per position of one KV cache layer's keys (values take as many).
    pub kv_width: u32,
}

struct Checker<'a> {
    graph: &'a Graph,
    errors: Vec<VerifierError>,
}

impl Checker<'_> {
    fn report(&mut self, at: Option<ValueId>, message: String) {
        let context = at.map(|v| write_node(v, self.graph.node(v))).unwrap_or_default();
        self.errors.push(VerifierError { location: at, context, message });
    }
}

fn rows(dtype: DType, n: u32) -> TensorType {
    TensorType::rows(dtype, n)
}

/// Checks every invariant listed in the module docs: the graph is ready for codegen.
pub fn verify(graph: &Graph) -> Result<GraphInfo, VerifierErrors> {
    check(graph, Stage::Lowered)
}

/// Checks a graph before the `quantize_activations` pass: every invariant of [`verify`]
/// except that a matmul may take f32 activations with a block-quantized weight.
pub fn verify_unlowered(graph: &Graph) -> Result<(), VerifierErrors> {
    check(graph, Stage::Unlowered).map(|_| ())
}

/// Whether matmuls with block-quantized weights must already take q16 activations.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Unlowered,
    Lowered,
}

fn check(graph: &Graph, stage: Stage) -> Result<GraphInfo, VerifierErrors> {
    let mut ck = Checker { graph, errors: vec![] };
    if graph.context == 0 {
        ck.report(None, "context must be nonzero".into());
    }
    if graph.outputs.is_empty() {
        ck.report(None, "the graph has no outputs".into());
    }
    for (i, w) in graph.weights.iter().enumerate() {
        let ok_rank = matches!(w.shape.len(), 1 | 2) && w.shape.iter().all(|&d| d > 0);
        if !ok_rank {
            ck.report(None, format!("w{i} \"{}\": shape {:?} must be 1-D or 2-D and nonzero", w.name, w.shape));
        } else if w.format.row_bytes(*w.shape.last().unwrap() as usize).is_none() {
            ck.report(
                None,
                format!("w{i} \"{}\": row length is not a whole number of {} blocks", w.name, w.format.name()),
            );
        }
    }
    let mut inputs = vec![];
    let mut layers = vec![];
    let mut kv_geometry = None;
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = ValueId(i as u32);
        let mut operands_ok = true;
        for v in node.op.operands() {
            if v.index() >= i {
                ck.report(Some(id), format!("operand {v} is not defined before its use"));
                operands_ok = false;
            }
        }
        if let Some(w) = node.op.weight() {
            if w.index() >= graph.weights.len() {
                ck.report(Some(id), format!("weight {w} does not exist"));
                operands_ok = false;
            }
        }
        if !operands_ok {
            continue;
        }
        if let Err(message) = check_types(graph, &node.op, &node.ty, stage) {
            ck.report(Some(id), message);
        }
        match node.op {
            Op::Input { index } => inputs.push(index),
            Op::Attention { layer, n_kv_heads, head_dim, .. } => {
                layers.push(layer);
                match kv_geometry {
                    None => kv_geometry = Some((n_kv_heads, head_dim)),
                    Some(g) if g != (n_kv_heads, head_dim) => {
                        ck.report(Some(id), format!("KV geometry differs from the first attention's {g:?}"))
                    }
                    Some(_) => {}
                }
            }
            _ => {}
        }
    }
    for (what, mut ids) in [("input indices", inputs.clone()), ("attention layers", layers.clone())] {
        ids.sort_unstable();
        if ids.iter().enumerate().any(|(i, &x)| i as u32 != x) {
            ck.report(None, format!("{what} {ids:?} must be 0..n without gaps or repeats"));
        }
    }
    for &v in &graph.outputs {
        if v.index() >= graph.nodes.len() {
            ck.report(None, format!("output {v} does not exist"));
        } else if graph.ty(v).dtype != DType::F32 {
            ck.report(Some(v), "graph outputs must be f32".into());
        }
    }
    if !ck.errors.is_empty() {
        return Err(VerifierErrors(ck.errors));
    }
    let mut last_use = vec![0usize; graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        for v in node.op.operands() {
            last_use[v.index()] = i;
        }
    }
    for v in &graph.outputs {
        last_use[v.index()] = graph.nodes.len();
    }
    Ok(GraphInfo {
        use_counts: graph.use_counts(),
        last_use,
        n_inputs: inputs.len() as u32,
        kv_layers: layers.len() as u32,
        kv_width: kv_geometry.map(|(h, d)| h * d).unwrap_or(0),
    })
}

/// Checks one node against its op's typing rules.
fn check_types(graph: &Graph, op: &Op, ty: &TensorType, stage: Stage) -> Result<(), String> {
    let expect = |want: TensorType| {
        if *ty == want {
            Ok(())
        } else {
            Err(format!("result type should be {}", crate::write::write_type(&want)))
        }
    };
    let row_f32 = |v: ValueId, what: &str| -> Result<u32, String> {
        match (graph.ty(v).dtype, graph.ty(v).row_len()) {
            (DType::F32, Some(n)) => Ok(n),
            _ => Err(format!("{what} {v} must be f32[seq, n]")),
        }
    };
    match *op {
        Op::Input { .. } => {
            let ok = *ty == TensorType::seq(DType::I32) || (ty.dtype == DType::F32 && ty.row_len().is_some());
            if ok {
                Ok(())
            } else {
                Err("an input is i32[seq] or f32[seq, n]".into())
            }
        }
        Op::Embed { ids, table } => {
            if *graph.ty(ids) != TensorType::seq(DType::I32) {
                return Err(format!("ids {ids} must be i32[seq]"));
            }
            match graph.weight(table).shape[..] {
                [_, n] => expect(rows(DType::F32, n)),
                _ => Err(format!("table {table} must be 2-D")),
            }
        }
        Op::RmsNorm { x, weight, eps, quantize } => {
            let n = row_f32(x, "x")?;
            if graph.weight(weight).shape != [n] {
                return Err(format!("weight {weight} must have shape [{n}]"));
            }
            if !(eps.is_finite() && eps >= 0.0) {
                return Err("eps must be finite and non-negative".into());
            }
            if quantize && n % 32 != 0 {
                return Err("a quantized row must be a whole number of 32-value blocks".into());
            }
            expect(rows(if quantize { DType::Q16 } else { DType::F32 }, n))
        }
        Op::Quantize { x } => {
            let n = row_f32(x, "x")?;
            if n % 32 != 0 {
                return Err("a quantized row must be a whole number of 32-value blocks".into());
            }
            expect(rows(DType::Q16, n))
        }
        Op::MatMul { x, weight, epilogue } => {
            let xt = graph.ty(x);
            let k = match (xt.dtype, xt.row_len()) {
                (DType::F32 | DType::Q16, Some(k)) => k,
                _ => return Err(format!("x {x} must be f32[seq, k] or q16[seq, k]")),
            };
            let w = graph.weight(weight);
            let n = match w.shape[..] {
                [n, wk] if wk == k => n,
                _ => return Err(format!("weight {weight} {:?} must have shape [n, {k}]", w.shape)),
            };
            let block_quantized = w.format.is_block_quantized();
            if xt.dtype == DType::Q16 && !block_quantized {
                return Err("q16 activations need a block-quantized weight".into());
            }
            if xt.dtype == DType::F32 && block_quantized && stage == Stage::Lowered {
                return Err(format!(
                    "x {x} is f32 but weight {weight} is {}: block-quantized weights need q16 activations \
                     (run the quantize_activations pass, or quantize {x} first)",
                    w.format.name()
                ));
            }
            if let Epilogue::Add(o) | Epilogue::Mul(o) = epilogue {
                if *graph.ty(o) != rows(DType::F32, n) {
                    return Err(format!("epilogue operand {o} must be f32[seq, {n}]"));
                }
            }
            expect(rows(DType::F32, n))
        }
        Op::Rope { x, head_dim, theta, ref scaling } => {
            let n = row_f32(x, "x")?;
            if head_dim == 0 || head_dim % 2 != 0 || n % head_dim != 0 {
                return Err(format!("head_dim {head_dim} must be even and divide {n}"));
            }
            if !(theta.is_finite() && theta > 0.0) {
                return Err("theta must be finite and positive".into());
            }
            scaling.check(head_dim)?;
            expect(rows(DType::F32, n))
        }
        Op::Attention { q, k, v, n_heads, n_kv_heads, head_dim, .. } => {
            if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 || n_heads % n_kv_heads != 0 {
                return Err("n_kv_heads must divide n_heads, all nonzero".into());
            }
            if row_f32(q, "q")? != n_heads * head_dim {
                return Err(format!("q must be f32[seq, {}]", n_heads * head_dim));
            }
            for (name, kv) in [("k", k), ("v", v)] {
                if row_f32(kv, name)? != n_kv_heads * head_dim {
                    return Err(format!("{name} must be f32[seq, {}]", n_kv_heads * head_dim));
                }
            }
            expect(rows(DType::F32, n_heads * head_dim))
        }
        Op::Silu { x } => expect(rows(DType::F32, row_f32(x, "x")?)),
        Op::Mul { a, b } | Op::Add { a, b } => {
            let n = row_f32(a, "a")?;
            if row_f32(b, "b")? != n {
                return Err(format!("{a} and {b} must have the same type"));
            }
            expect(rows(DType::F32, n))
        }
    }
    .map(|()| {
        debug_assert!(ty.shape.first() == Some(&Dim::Seq));
    })
}

/// Runs [`verify`] and panics with the graph and its errors when it fails: for tests and for
/// checks between passes, where a failure is a bug in the compiler.
pub fn assert_valid(graph: &Graph) -> GraphInfo {
    match verify(graph) {
        Ok(info) => info,
        Err(e) => panic!("invalid graph:\n{e}\n{graph}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_graph;

    fn errors(text: &str) -> String {
        verify(&parse_graph(text).unwrap()).unwrap_err().to_string()
    }

    #[test]
    fn reports_type_errors_with_the_node() {
        let text = "graph \"t\" context=8\nw0 = weight q4_1[8, 64] \"a\"\nv0 = input 0 : f32[seq, 32]\nv1 = matmul v0, w0 : f32[seq, 8]\noutput v1\n";
        let e = errors(text);
        assert!(e.contains("v1 = matmul v0, w0") && e.contains("[n, 32]"), "{e}");
    }

    #[test]
    fn reports_use_before_definition_and_bad_outputs() {
        let text = "graph \"t\" context=8\nv0 = input 0 : f32[seq, 32]\nv1 = add v0, v2 : f32[seq, 32]\nv2 = silu v0 : f32[seq, 32]\noutput v1\n";
        assert!(errors(text).contains("not defined before"));
        let text = "graph \"t\" context=8\nv0 = input 0 : i32[seq]\noutput v0\n";
        assert!(errors(text).contains("must be f32"));
        let text = "graph \"t\" context=8\nv0 = input 1 : f32[seq, 4]\noutput v0\n";
        assert!(errors(text).contains("input indices"));
    }

    #[test]
    fn refuses_f32_activations_with_a_quantized_weight_until_lowered() {
        for format in ["q4_0", "q4_1", "q8_0"] {
            let text = format!(
                "graph \"t\" context=8\nw0 = weight {format}[8, 32] \"a\"\nv0 = input 0 : f32[seq, 32]\nv1 = matmul v0, w0 : f32[seq, 8]\noutput v1\n"
            );
            let graph = parse_graph(&text).unwrap();
            let e = verify(&graph).unwrap_err().to_string();
            assert!(
                e.contains("v1 = matmul v0, w0")
                    && e.contains(&format!("weight w0 is {format}"))
                    && e.contains("need q16 activations")
                    && e.contains("quantize_activations"),
                "{e}"
            );
            // Before the pass this is the frontend's normal form.
            verify_unlowered(&graph).unwrap();
            // Quantized first, the matmul is accepted.
            let lowered = text.replace(
                "v1 = matmul v0, w0 : f32[seq, 8]\noutput v1",
                "v1 = quantize v0 : q16[seq, 32]\nv2 = matmul v1, w0 : f32[seq, 8]\noutput v2",
            );
            verify(&parse_graph(&lowered).unwrap()).unwrap();
        }
        // Float weights take f32 activations at every stage, and refuse q16 ones.
        let text = "graph \"t\" context=8\nw0 = weight f16[8, 32] \"a\"\nv0 = input 0 : f32[seq, 32]\nv1 = matmul v0, w0 : f32[seq, 8]\noutput v1\n";
        verify(&parse_graph(text).unwrap()).unwrap();
        let q16 = text.replace(
            "v1 = matmul v0, w0 : f32[seq, 8]\noutput v1",
            "v1 = quantize v0 : q16[seq, 32]\nv2 = matmul v1, w0 : f32[seq, 8]\noutput v2",
        );
        assert!(errors(&q16).contains("need a block-quantized weight"));
        // The unlowered check still reports every other broken rule.
        let bad = "graph \"t\" context=8\nw0 = weight q4_0[8, 64] \"a\"\nv0 = input 0 : f32[seq, 32]\nv1 = matmul v0, w0 : f32[seq, 8]\noutput v1\n";
        let e = verify_unlowered(&parse_graph(bad).unwrap()).unwrap_err().to_string();
        assert!(e.contains("[n, 32]"), "{e}");
    }

    #[test]
    fn rejects_attention_with_bad_heads() {
        let text = "graph \"t\" context=8\nv0 = input 0 : f32[seq, 64]\nv1 = input 1 : f32[seq, 32]\nv2 = attention v0, v1, v1 layer=0 heads=4 kv_heads=3 head_dim=16 : f32[seq, 64]\noutput v2\n";
        assert!(errors(text).contains("must divide"));
    }
}
