//! The textual form of a graph, printed one declaration per line.
//!
//! ```text
//! graph "tiny" context=64
//! w0 = weight q4_1[64, 32] "blk.0.attn_q.weight"
//! v0 = input 0 : f32[seq, 32]
//! v1 = matmul v0, w0 +add v2 : f32[seq, 64]
//! output v1
//! ```
//! [`crate::parse`] reads the same text back into an equal graph.

use std::fmt::Write;

use crate::{ActDType, Dim, Epilogue, Graph, KvDType, Node, Op, RopeScaling, TensorType, ValueId};

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn write_type(ty: &TensorType) -> String {
    let dims: Vec<String> = ty
        .shape
        .iter()
        .map(|d| match d {
            Dim::Seq => "seq".to_string(),
            Dim::Fixed(n) => n.to_string(),
        })
        .collect();
    format!("{}[{}]", ty.dtype.name(), dims.join(", "))
}

/// Prints the right-hand side of a node: `matmul v2, w3 +add v1`.
pub fn write_op(op: &Op) -> String {
    let m = op.mnemonic();
    match *op {
        Op::Input { index } => format!("{m} {index}"),
        Op::Embed { ids, table } => format!("{m} {ids}, {table}"),
        Op::RmsNorm { x, weight, eps, quantize } => {
            format!("{m} {x}, {weight} eps={eps}{}", if quantize { " quantize" } else { "" })
        }
        Op::Quantize { x } | Op::Silu { x } => format!("{m} {x}"),
        Op::MatMul { x, weight, epilogue } => {
            let epi = match epilogue {
                Epilogue::None => String::new(),
                Epilogue::Silu => " +silu".to_string(),
                Epilogue::Add(o) => format!(" +add {o}"),
                Epilogue::Mul(o) => format!(" +mul {o}"),
            };
            format!("{m} {x}, {weight}{epi}")
        }
        Op::Rope { x, head_dim, theta, ref scaling } => {
            let scaling = match scaling {
                RopeScaling::None => String::new(),
                RopeScaling::Linear { factor } => format!(" scaling=linear factor={factor}"),
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => format!(
                    " scaling=llama3 factor={factor} low_freq_factor={low_freq_factor} \
                     high_freq_factor={high_freq_factor} original_context={original_context}"
                ),
                RopeScaling::Divisors(d) => {
                    let list: Vec<String> = d.iter().map(f32::to_string).collect();
                    format!(" scaling=divisors [{}]", list.join(", "))
                }
            };
            format!("{m} {x} head_dim={head_dim} theta={theta}{scaling}")
        }
        Op::Attention { q, k, v, layer, n_heads, n_kv_heads, head_dim } => {
            format!("{m} {q}, {k}, {v} layer={layer} heads={n_heads} kv_heads={n_kv_heads} head_dim={head_dim}")
        }
        Op::Mul { a, b } | Op::Add { a, b } => format!("{m} {a}, {b}"),
    }
}

/// Prints one node as a line without the trailing newline: `v3 = matmul v2, w0 : f32[seq, 64]`.
pub fn write_node(id: ValueId, node: &Node) -> String {
    format!("{id} = {} : {}", write_op(&node.op), write_type(&node.ty))
}

pub fn write_graph(graph: &Graph) -> String {
    let mut out = String::new();
    write!(out, "graph {} context={}", quote(&graph.name), graph.context).unwrap();
    if graph.kv_dtype != KvDType::F32 {
        write!(out, " kv={}", graph.kv_dtype.name()).unwrap();
    }
    if graph.act_dtype != ActDType::Q16 {
        write!(out, " act={}", graph.act_dtype.name()).unwrap();
    }
    out.push('\n');
    for (i, w) in graph.weights.iter().enumerate() {
        let shape: Vec<String> = w.shape.iter().map(|d| d.to_string()).collect();
        writeln!(out, "w{i} = weight {}[{}] {}", w.format.name(), shape.join(", "), quote(&w.name)).unwrap();
    }
    for (i, node) in graph.nodes.iter().enumerate() {
        writeln!(out, "{}", write_node(ValueId(i as u32), node)).unwrap();
    }
    for v in &graph.outputs {
        writeln!(out, "output {v}").unwrap();
    }
    out
}
