//! Fuses elementwise ops into the epilogue of the op that produces their input, so that the
//! intermediate never goes through memory:
//!
//! - `silu(matmul(x, w))` becomes `matmul x, w +silu`;
//! - `mul(a, matmul(x, w))` (either order) becomes `matmul x, w +mul a`;
//! - `add(a, matmul(x, w))` (either order) becomes `matmul x, w +add a`, the residual add;
//! - `quantize(rms_norm(x))` becomes `rms_norm x quantize`.
//!
//! A producer is fused only when the elementwise op is its single use, and an epilogue operand
//! only when it is defined before the producer (so the graph stays in SSA order).

use super::{PassContext, PassError};
use crate::model::Model;
use ir::{DType, Epilogue, Graph, Op, TensorType, ValueId};

fn single_use_plain_matmul(graph: &Graph, counts: &[u32], v: ValueId) -> bool {
    counts[v.index()] == 1 && matches!(graph.node(v).op, Op::MatMul { epilogue: Epilogue::None, .. })
}

/// One sweep in node order. Use counts are computed once and kept up to date as ops fuse;
/// a fused value's later uses are redirected through a substitution map as each node is
/// reached (a value is only ever replaced by an earlier one, so one level suffices), and the
/// dead nodes go in one final sweep: the pass is linear in the graph size.
pub fn run(model: &mut Model<'_>, _cx: &PassContext) -> Result<(), PassError> {
    rewrite(&mut model.graph);
    Ok(())
}

fn rewrite(graph: &mut Graph) {
    let mut counts = graph.use_counts();
    let mut subst: Vec<ValueId> = (0..graph.nodes.len() as u32).map(ValueId).collect();
    for i in 0..graph.nodes.len() {
        graph.nodes[i].op.map_operands(|v| subst[v.index()]);
        let this = ValueId(i as u32);
        let fused: Option<(ValueId, Epilogue)> = match graph.nodes[i].op {
            Op::Silu { x } if single_use_plain_matmul(graph, &counts, x) => Some((x, Epilogue::Silu)),
            Op::Mul { a, b } | Op::Add { a, b } => {
                let make = |other| match graph.nodes[i].op {
                    Op::Mul { .. } => Epilogue::Mul(other),
                    _ => Epilogue::Add(other),
                };
                if single_use_plain_matmul(graph, &counts, b) && a < b {
                    Some((b, make(a)))
                } else if single_use_plain_matmul(graph, &counts, a) && b < a {
                    Some((a, make(b)))
                } else {
                    None
                }
            }
            Op::Quantize { x } if counts[x.index()] == 1 => {
                if let Op::RmsNorm { quantize: quantize @ false, .. } = &mut graph.nodes[x.index()].op {
                    *quantize = true;
                    graph.nodes[x.index()].ty.dtype = DType::Q16;
                    // The quantize node stays (dead) until the end and keeps its use of x.
                    counts[x.index()] += counts[i];
                    counts[i] = 0;
                    subst[i] = x;
                }
                None
            }
            _ => None,
        };
        if let Some((producer, epilogue)) = fused {
            if let Epilogue::Add(other) | Epilogue::Mul(other) = epilogue {
                counts[other.index()] += 1;
            }
            if let Op::MatMul { epilogue: e, .. } = &mut graph.nodes[producer.index()].op {
                *e = epilogue;
            }
            debug_assert_eq!(graph.ty(producer), &TensorType::rows(DType::F32, graph.ty(this).row_len().unwrap()));
            counts[producer.index()] += counts[i];
            counts[i] = 0;
            subst[i] = producer;
        }
    }
    for v in &mut graph.outputs {
        *v = subst[v.index()];
    }
    graph.remove_dead_nodes();
}

#[cfg(test)]
mod tests {
    use crate::passes::tests::check_pass;

    #[test]
    fn fuses_a_llama_block() {
        check_pass(
            "fuse_elementwise",
            r#"graph "t" context=8
w0 = weight f32[32] "ffn_norm"
w1 = weight q4_1[64, 32] "gate"
w2 = weight q4_1[64, 32] "up"
w3 = weight q4_0[32, 64] "down"
v0 = input 0 : f32[seq, 32]
v1 = rms_norm v0, w0 eps=0.00001 : f32[seq, 32]
v2 = quantize v1 : q16[seq, 32]
v3 = matmul v2, w1 : f32[seq, 64]
v4 = silu v3 : f32[seq, 64]
v5 = matmul v2, w2 : f32[seq, 64]
v6 = mul v4, v5 : f32[seq, 64]
v7 = quantize v6 : q16[seq, 64]
v8 = matmul v7, w3 : f32[seq, 32]
v9 = add v0, v8 : f32[seq, 32]
output v9
"#,
            r#"graph "t" context=8
w0 = weight f32[32] "ffn_norm"
w1 = weight q4_1[64, 32] "gate"
w2 = weight q4_1[64, 32] "up"
w3 = weight q4_0[32, 64] "down"
v0 = input 0 : f32[seq, 32]
v1 = rms_norm v0, w0 eps=0.00001 quantize : q16[seq, 32]
v2 = matmul v1, w1 +silu : f32[seq, 64]
v3 = matmul v1, w2 +mul v2 : f32[seq, 64]
v4 = quantize v3 : q16[seq, 64]
v5 = matmul v4, w3 +add v0 : f32[seq, 32]
output v5
"#,
        );
    }

    #[test]
    fn leaves_shared_producers_alone() {
        let text = r#"graph "t" context=8
w0 = weight f32[32, 32] "a"
v0 = input 0 : f32[seq, 32]
v1 = matmul v0, w0 : f32[seq, 32]
v2 = silu v1 : f32[seq, 32]
v3 = add v1, v2 : f32[seq, 32]
output v3
"#;
        check_pass("fuse_elementwise", text, text);
    }
}
