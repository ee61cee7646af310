//! Inserts `quantize` before every matmul whose weight is block-quantized, so that its kernel
//! can use integer dot products. One `quantize` serves all matmuls that read the same value
//! (the q, k and v projections share one; so do gate and up).
//!
//! Activations are quantized to int16 blocks (q16), not to int8 as llama.cpp does: the
//! int16 rounding error is 256 times smaller, which keeps logits within float32 noise of the
//! exact result, and the int16 dot product costs one `pmaddwd`/`smull`+`smlal2` per 8 values.

use std::collections::BTreeMap;

use ir::{DType, Graph, Node, Op, QuantFormat, TensorType, ValueId};
use targets::Target;

pub fn run(graph: &mut Graph, _target: &dyn Target) {
    let mut quantized: BTreeMap<ValueId, ValueId> = BTreeMap::new();
    let mut i = 0;
    while i < graph.nodes.len() {
        let Op::MatMul { x, weight, .. } = graph.nodes[i].op else {
            i += 1;
            continue;
        };
        let is_quantized = !matches!(graph.weight(weight).format, QuantFormat::F32 | QuantFormat::F16);
        if !is_quantized || graph.ty(x).dtype != DType::F32 {
            i += 1;
            continue;
        }
        let q = match quantized.get(&x) {
            Some(&q) => q,
            None => {
                let n = graph.ty(x).row_len().expect("verified matmul input");
                // Insert just before this matmul; it and everything after shift by one.
                let at = ValueId(i as u32);
                graph.insert(at, Node { op: Op::Quantize { x }, ty: TensorType::rows(DType::Q16, n) });
                for q in quantized.values_mut() {
                    if *q >= at {
                        q.0 += 1;
                    }
                }
                quantized.insert(x, at);
                i += 1;
                at
            }
        };
        if let Op::MatMul { x, .. } = &mut graph.nodes[i].op {
            *x = q;
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use crate::passes::tests::check_pass;

    #[test]
    fn shares_one_quantize_between_projections() {
        check_pass(
            "quantize_activations",
            r#"graph "t" context=8
w0 = weight q4_1[64, 32] "q"
w1 = weight q8_0[64, 32] "k"
w2 = weight f16[64, 32] "v"
v0 = input 0 : f32[seq, 32]
v1 = matmul v0, w0 : f32[seq, 64]
v2 = matmul v0, w1 : f32[seq, 64]
v3 = matmul v0, w2 : f32[seq, 64]
v4 = add v1, v2 : f32[seq, 64]
v5 = add v4, v3 : f32[seq, 64]
output v5
"#,
            r#"graph "t" context=8
w0 = weight q4_1[64, 32] "q"
w1 = weight q8_0[64, 32] "k"
w2 = weight f16[64, 32] "v"
v0 = input 0 : f32[seq, 32]
v1 = quantize v0 : q16[seq, 32]
v2 = matmul v1, w0 : f32[seq, 64]
v3 = matmul v1, w1 : f32[seq, 64]
v4 = matmul v0, w2 : f32[seq, 64]
v5 = add v2, v3 : f32[seq, 64]
v6 = add v5, v4 : f32[seq, 64]
output v6
"#,
        );
    }
}
