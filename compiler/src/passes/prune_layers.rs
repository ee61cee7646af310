//! Removes whole transformer blocks (`--prune-layers 20,21,22` or `--prune-layers last:N`,
//! the last N blocks before the final one, which Gromov et al. keep; `auto:N` is chosen by
//! calibration in xtask, see `compiler::probe`, and reaches this pass as a block list): the
//! residual stream
//! passes through a removed block unchanged, its nodes and weights go, and the remaining
//! blocks are renumbered densely (attention `layer=` indices, so the KV cache shrinks, and
//! weight names, so `blk.N.` stays contiguous in a GGUF written from the model).
//!
//! The blocks are found from the graph, not assumed: block N is the node range from the first
//! node reading a `blk.N.` weight to the value the next block (or the output norm) reads as its
//! residual input. The pass checks that each range holds one attention node, reads only its
//! own block's weights, and lets no value but its residual output escape; otherwise it refuses
//! to prune (a graph of another shape than the frontend's Llama blocks).

use std::fmt;
use std::str::FromStr;

use ir::{Op, ValueId};

use super::{PassContext, PassError};
use crate::model::Model;

const PASS: &str = "prune_layers";

/// Which transformer blocks to remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PruneSpec {
    /// These block indices (of the source model's numbering).
    Blocks(Vec<u32>),
    /// The last N blocks before the final block.
    Last(u32),
    /// The N contiguous blocks (never the final one) whose removal changes the residual stream
    /// least on calibration text (Gromov et al. 2024). It needs running the model, so the
    /// caller (`cargo xtask build-model|optimize`) resolves it to [`PruneSpec::Blocks`] first;
    /// the pass refuses it.
    Auto(u32),
}

impl FromStr for PruneSpec {
    type Err = String;

    /// `20,21,22`, `last:N` or `auto:N`.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(n) = text.strip_prefix("auto:") {
            return match n.trim().parse::<u32>() {
                Ok(0) => Err("auto:0 prunes nothing; give N >= 1".into()),
                Ok(n) => Ok(PruneSpec::Auto(n)),
                Err(_) => Err(format!("bad block count {n:?} in {text:?}: expected auto:N with N a whole number")),
            };
        }
        if let Some(n) = text.strip_prefix("last:") {
            return match n.trim().parse::<u32>() {
                Ok(0) => Err("last:0 prunes nothing; give N >= 1".into()),
                Ok(n) => Ok(PruneSpec::Last(n)),
                Err(_) => Err(format!("bad block count {n:?} in {text:?}: expected last:N with N a whole number")),
            };
        }
        let mut blocks = vec![];
        for part in text.split(',') {
            let part = part.trim();
            let b: u32 = part.parse().map_err(|_| {
                format!("bad block index {part:?} in {text:?}: expected block indices like 20,21,22 or last:N")
            })?;
            if blocks.contains(&b) {
                return Err(format!("block {b} is listed twice in {text:?}"));
            }
            blocks.push(b);
        }
        Ok(PruneSpec::Blocks(blocks))
    }
}

impl fmt::Display for PruneSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PruneSpec::Last(n) => write!(f, "last:{n}"),
            PruneSpec::Auto(n) => write!(f, "auto:{n}"),
            PruneSpec::Blocks(b) => {
                write!(f, "{}", b.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            }
        }
    }
}

impl PruneSpec {
    /// The blocks to remove from a model of `n_layers` blocks, sorted; an error names what does
    /// not fit (an index out of range, nothing left).
    pub fn resolve(&self, n_layers: u32) -> Result<Vec<u32>, String> {
        let mut blocks = match self {
            PruneSpec::Last(n) => {
                if *n >= n_layers {
                    return Err(format!(
                        "last:{n} needs at least {} blocks (the final block is kept), and the model has {n_layers}",
                        n.saturating_add(1)
                    ));
                }
                (n_layers - 1 - n..n_layers - 1).collect()
            }
            PruneSpec::Auto(n) => {
                return Err(format!(
                    "auto:{n} is chosen by running the model on calibration text, which the compiler does not do: \
                     use `cargo xtask build-model` or `cargo xtask optimize`, which resolve it to a block list"
                ))
            }
            PruneSpec::Blocks(b) => b.clone(),
        };
        blocks.sort_unstable();
        if let Some(&b) = blocks.iter().find(|&&b| b >= n_layers) {
            return Err(format!("block {b} does not exist: the model has {n_layers} blocks (0..={})", n_layers - 1));
        }
        if blocks.windows(2).any(|w| w[0] == w[1]) {
            return Err("a block is listed twice".into());
        }
        if blocks.len() as u32 >= n_layers {
            return Err(format!("pruning {} of {n_layers} blocks leaves no model", blocks.len()));
        }
        Ok(blocks)
    }

    /// Checks `auto:n` against a model of `n_layers` blocks: a run of `n` blocks that leaves
    /// the final block must fit.
    pub fn check_auto(n: u32, n_layers: u32) -> Result<(), String> {
        if n == 0 {
            return Err("auto:0 prunes nothing; give N >= 1".into());
        }
        if n >= n_layers {
            return Err(format!(
                "auto:{n} needs at least {} blocks (the final block is kept), and the model has {n_layers}",
                n.saturating_add(1)
            ));
        }
        Ok(())
    }

    /// For each of `n_layers` source blocks, its index after removing `removed` (`None` for a
    /// removed block).
    pub fn layer_map(removed: &[u32], n_layers: u32) -> Vec<Option<u32>> {
        let mut next = 0;
        (0..n_layers)
            .map(|b| {
                (!removed.contains(&b)).then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect()
    }
}

/// The block of a tensor named `blk.N.rest`: `(N, rest)`.
pub fn block_of(name: &str) -> Option<(u32, &str)> {
    let (n, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    Some((n.parse().ok()?, rest))
}

/// `name` with its block renumbered by `map` (see [`PruneSpec::layer_map`]): `None` when its
/// block is removed; names outside blocks (and blocks beyond the map) stay.
pub fn renamed(name: &str, map: &[Option<u32>]) -> Option<String> {
    match block_of(name) {
        Some((b, rest)) if (b as usize) < map.len() => map[b as usize].map(|n| format!("blk.{n}.{rest}")),
        _ => Some(name.to_owned()),
    }
}

/// One transformer block as found in the graph.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    /// First node of the block.
    pub(crate) start: usize,
    /// The residual stream entering the block.
    pub(crate) input: ValueId,
    /// The residual stream leaving it: the block's last node.
    pub(crate) output: ValueId,
}

fn structure_error(message: String) -> PassError {
    PassError::BadOption {
        pass: PASS,
        message: format!("cannot find the model's transformer blocks ({message}), so blocks cannot be pruned"),
    }
}

/// Finds the blocks `blk.0` ... `blk.{n-1}` and checks that each is a self-contained residual
/// block (see the module doc).
pub(crate) fn find_blocks(model: &Model<'_>) -> Result<Vec<Block>, PassError> {
    let graph = &model.graph;
    let block_of_node = |i: usize| graph.nodes[i].op.weight().and_then(|w| block_of(&graph.weight(w).name));
    // The first and last node reading each block's weights.
    let mut first: Vec<Option<usize>> = vec![];
    for i in 0..graph.nodes.len() {
        if let Some((b, _)) = block_of_node(i) {
            let b = b as usize;
            if b >= graph.nodes.len() {
                return Err(structure_error(format!("block index {b} is larger than the graph")));
            }
            if first.len() <= b {
                first.resize(b + 1, None);
            }
            first[b].get_or_insert(i);
        }
    }
    if first.is_empty() {
        return Err(structure_error("no weight is named blk.N.*".into()));
    }
    if let Some(b) = first.iter().position(Option::is_none) {
        return Err(structure_error(format!("no node reads a weight of block {b}")));
    }
    let starts: Vec<usize> = first.into_iter().map(|s| s.expect("checked")).collect();
    if starts.windows(2).any(|w| w[0] >= w[1]) {
        return Err(structure_error("the blocks are not in order".into()));
    }
    let n = starts.len();
    // The residual input of each block: the first operand of its first node.
    let residual_in = |i: usize| graph.nodes[i].op.operands().first().copied();
    // After the last block: the first node reading a weight outside the blocks (the output norm).
    let tail = (starts[n - 1]..graph.nodes.len())
        .find(|&i| graph.nodes[i].op.weight().is_some() && block_of_node(i).is_none())
        .ok_or_else(|| structure_error("no node after the last block reads a weight (the output norm)".into()))?;
    let mut blocks = Vec::with_capacity(n);
    for b in 0..n {
        let next = if b + 1 < n { starts[b + 1] } else { tail };
        let (Some(input), Some(output)) = (residual_in(starts[b]), residual_in(next)) else {
            return Err(structure_error(format!("block {b} has no residual input")));
        };
        if input.index() >= starts[b] || output.index() < starts[b] || output.index() >= next {
            return Err(structure_error(format!("block {b}'s residual stream does not pass through it")));
        }
        if graph.ty(input) != graph.ty(output) {
            return Err(structure_error(format!("block {b} changes the residual stream's type")));
        }
        blocks.push(Block { start: starts[b], input, output });
    }
    // Each block reads only its own weights, holds one attention node, and only its output
    // is used after it.
    let mut owner: Vec<Option<usize>> = vec![None; graph.nodes.len()];
    for (b, block) in blocks.iter().enumerate() {
        let range = block.start..=block.output.index();
        let mut attention = 0;
        for i in range.clone() {
            owner[i] = Some(b);
            if let Some((wb, _)) = block_of_node(i) {
                if wb as usize != b {
                    return Err(structure_error(format!("a node of block {b} reads a weight of block {wb}")));
                }
            }
            attention += matches!(graph.nodes[i].op, Op::Attention { .. }) as usize;
        }
        if attention != 1 {
            return Err(structure_error(format!("block {b} holds {attention} attention nodes, not 1")));
        }
    }
    for (i, node) in graph.nodes.iter().enumerate() {
        for v in node.op.operands() {
            if let Some(b) = owner[v.index()] {
                if owner[i] != Some(b) && v != blocks[b].output {
                    return Err(structure_error(format!("value {v} of block {b} is used outside it")));
                }
            }
        }
    }
    for v in &graph.outputs {
        if let Some(b) = owner[v.index()] {
            if *v != blocks[b].output {
                return Err(structure_error(format!("value {v} of block {b} is a graph output")));
            }
        }
    }
    Ok(blocks)
}

pub fn run(model: &mut Model<'_>, cx: &PassContext) -> Result<(), PassError> {
    let Some(spec) = &cx.options.prune else { return Ok(()) };
    let before = model.stats();
    let blocks = find_blocks(model)?;
    let n_layers = blocks.len() as u32;
    let removed = spec.resolve(n_layers).map_err(|message| PassError::BadOption { pass: PASS, message })?;
    let map = PruneSpec::layer_map(&removed, n_layers);
    // The residual stream skips each removed block: uses of its output become uses of its
    // input (of the input of a run of removed blocks, as the substitution is followed).
    let graph = &mut model.graph;
    let mut subst: Vec<ValueId> = (0..graph.nodes.len() as u32).map(ValueId).collect();
    for &b in &removed {
        let block = &blocks[b as usize];
        subst[block.output.index()] = subst[block.input.index()];
    }
    graph.substitute(&subst);
    for (b, block) in blocks.iter().enumerate() {
        if let Some(new) = map[b] {
            for node in &mut graph.nodes[block.start..=block.output.index()] {
                if let Op::Attention { layer, .. } = &mut node.op {
                    *layer = new;
                }
            }
        }
    }
    graph.remove_dead_nodes();
    // Drop the removed blocks' weights now, so that no two weights share a name once the kept
    // blocks are renamed.
    let mut used = vec![false; graph.weights.len()];
    for node in &graph.nodes {
        if let Some(w) = node.op.weight() {
            used[w.index()] = true;
        }
    }
    model.retain_weights(&used);
    for w in &mut model.graph.weights {
        if let Some(name) = renamed(&w.name, &map) {
            w.name = name;
        }
    }
    let after = model.stats();
    let list: Vec<String> = removed.iter().map(u32::to_string).collect();
    cx.note(PASS, format_args!("--prune-layers {spec}: removed blocks {} of {n_layers}", list.join(", ")));
    cx.note(PASS, format_args!("  before: {before}"));
    cx.note(PASS, format_args!("  after:  {after}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::{PassContext, PipelineOptions};
    use ir::interp::{self, KvCache, Tensor};
    use ir::parse::parse_graph;
    use ir::quant::quantize_row;
    use ir::verify::verify_unlowered;
    use ir::{DType, Epilogue, Graph, QuantFormat, TensorType};

    /// A three-block model in the frontend's shape, with 32-wide vectors.
    fn three_blocks() -> Graph {
        let mut g = Graph::new("t", 16);
        let d = 32;
        let emb = g.add_weight("token_embd.weight", QuantFormat::Q8_0, vec![8, d]);
        let ids = g.push(Op::Input { index: 0 }, TensorType::seq(DType::I32));
        let mut x = g.push(Op::Embed { ids, table: emb }, TensorType::rows(DType::F32, d));
        for l in 0..3 {
            let w = |g: &mut Graph, s: &str, shape: Vec<u32>| {
                let f = if shape.len() == 1 { QuantFormat::F32 } else { QuantFormat::Q8_0 };
                g.add_weight(format!("blk.{l}.{s}.weight"), f, shape)
            };
            let norm = w(&mut g, "attn_norm", vec![d]);
            let (wq, wk, wv, wo) = (
                w(&mut g, "attn_q", vec![d, d]),
                w(&mut g, "attn_k", vec![d, d]),
                w(&mut g, "attn_v", vec![d, d]),
                w(&mut g, "attn_output", vec![d, d]),
            );
            let ty = TensorType::rows(DType::F32, d);
            let h = g.push(Op::RmsNorm { x, weight: norm, eps: 1e-5, quantize: false }, ty.clone());
            let mm = |g: &mut Graph, x, weight| g.push(Op::MatMul { x, weight, epilogue: Epilogue::None }, ty.clone());
            let (q, k, v) = (mm(&mut g, h, wq), mm(&mut g, h, wk), mm(&mut g, h, wv));
            let a = g.push(Op::Attention { q, k, v, layer: l, n_heads: 1, n_kv_heads: 1, head_dim: d }, ty.clone());
            let o = mm(&mut g, a, wo);
            x = g.push(Op::Add { a: x, b: o }, ty.clone());
        }
        let norm = g.add_weight("output_norm.weight", QuantFormat::F32, vec![d]);
        let h = g.push(Op::RmsNorm { x, weight: norm, eps: 1e-5, quantize: false }, TensorType::rows(DType::F32, d));
        let logits =
            g.push(Op::MatMul { x: h, weight: emb, epilogue: Epilogue::None }, TensorType::rows(DType::F32, 8));
        g.outputs.push(logits);
        verify_unlowered(&g).unwrap();
        g
    }

    fn weights(g: &Graph) -> Vec<Vec<u8>> {
        let mut seed = 7u64;
        g.weights
            .iter()
            .map(|w| {
                let cols = *w.shape.last().unwrap() as usize;
                let rows = w.n_values() as usize / cols;
                (0..rows)
                    .flat_map(|_| {
                        let v: Vec<f32> = (0..cols)
                            .map(|_| {
                                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                                (seed >> 40) as f32 / (1u64 << 23) as f32 - 0.5
                            })
                            .collect();
                        quantize_row(w.format, &v)
                    })
                    .collect()
            })
            .collect()
    }

    /// The graph, weights and report lines after the pass.
    type Pruned = (Graph, Vec<Vec<u8>>, Vec<String>);

    fn prune(g: &Graph, w: &[Vec<u8>], spec: &str) -> Result<Pruned, PassError> {
        let mut model = Model::borrowed(g.clone(), w);
        let options = PipelineOptions { prune: Some(spec.parse().unwrap()), ..Default::default() };
        let cx = PassContext::new(&options);
        run(&mut model, &cx)?;
        model.check_weights().unwrap();
        verify_unlowered(&model.graph).unwrap_or_else(|e| panic!("invalid graph after pruning:\n{e}"));
        let w = model.weights().map(|w| w.to_vec()).collect();
        Ok((model.graph, w, cx.notes()))
    }

    fn eval(g: &Graph, w: &[Vec<u8>]) -> Vec<f32> {
        let w: Vec<&[u8]> = w.iter().map(|w| w.as_slice()).collect();
        interp::run(g, &w, &[Tensor::I32(vec![1, 5, 2])], &mut KvCache::new(g), 3, 0).swap_remove(0)
    }

    #[test]
    fn pruning_a_middle_block_equals_the_graph_written_without_it() {
        let g = three_blocks();
        let w = weights(&g);
        let (pruned, pw, notes) = prune(&g, &w, "1").unwrap();
        assert_eq!(pruned.kv_layers(), 2);
        let names: Vec<&str> = pruned.weights.iter().map(|w| w.name.as_str()).collect();
        assert!(names.contains(&"blk.1.attn_q.weight") && !names.iter().any(|n| n.starts_with("blk.2.")), "{names:?}");
        // The same model built by hand from blocks 0 and 2: drop block 1's nodes from the text.
        let text = g.to_string();
        let expected_weights: Vec<Vec<u8>> =
            g.weights.iter().zip(&w).filter(|(x, _)| !x.name.starts_with("blk.1.")).map(|(_, b)| b.clone()).collect();
        assert_eq!(pw, expected_weights, "the kept weights keep their bytes");
        let want = eval(&reference_without_block_1(&text), &expected_weights);
        let got = eval(&pruned, &pw);
        assert_eq!(got, want);
        assert!(notes.iter().any(|n| n.contains("removed blocks 1 of 3")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("after:  2 layers")), "{notes:?}");
    }

    /// `text` (the three-block graph) rewritten by hand without block 1.
    fn reference_without_block_1(text: &str) -> Graph {
        // Block 1 is nodes v9..=v15 (7 per block after the input and the embedding), reading
        // weights w6..=w10; rebuild without them, block 0's output v8 feeding block 2.
        let g = parse_graph(text).unwrap();
        let mut out = Graph::new(g.name.clone(), g.context);
        let keep_w: Vec<bool> = g.weights.iter().map(|w| !w.name.starts_with("blk.1.")).collect();
        let mut new_w = vec![None; g.weights.len()];
        for (i, w) in g.weights.iter().enumerate().filter(|(i, _)| keep_w[*i]) {
            new_w[i] = Some(out.add_weight(w.name.replace("blk.2.", "blk.1."), w.format, w.shape.clone()));
        }
        let mut new_v: Vec<Option<ValueId>> = vec![None; g.nodes.len()];
        let block1 = 9..=15;
        for (i, n) in g.nodes.iter().enumerate() {
            if block1.contains(&i) {
                continue;
            }
            let mut op = n.op.clone();
            op.map_operands(|v| {
                let v = if v.index() == 15 { ValueId(8) } else { v };
                new_v[v.index()].unwrap()
            });
            op.for_each_weight_mut(|w| *w = new_w[w.index()].unwrap());
            if let Op::Attention { layer, .. } = &mut op {
                *layer = (*layer).min(1);
            }
            new_v[i] = Some(out.push(op, n.ty.clone()));
        }
        out.outputs = g.outputs.iter().map(|v| new_v[v.index()].unwrap()).collect();
        verify_unlowered(&out).unwrap();
        out
    }

    #[test]
    fn last_n_keeps_the_final_block() {
        let g = three_blocks();
        let w = weights(&g);
        let (pruned, _, notes) = prune(&g, &w, "last:2").unwrap();
        assert_eq!(pruned.kv_layers(), 1);
        assert!(notes.iter().any(|n| n.contains("removed blocks 0, 1 of 3")), "{notes:?}");
        let (two, _, _) = prune(&g, &w, "0,2").unwrap();
        assert_eq!(two.kv_layers(), 1);
        assert!(two.weights.iter().any(|w| w.name == "blk.0.attn_v.weight"));
    }

    #[test]
    fn bad_specs_are_clear_errors() {
        let g = three_blocks();
        let w = weights(&g);
        for (spec, needle) in [
            ("3", "block 3 does not exist: the model has 3 blocks (0..=2)"),
            ("0,1,2", "pruning 3 of 3 blocks leaves no model"),
            ("last:3", "last:3 needs at least 4 blocks"),
            ("auto:1", "auto:1 is chosen by running the model on calibration text"),
        ] {
            let e = prune(&g, &w, spec).err().unwrap_or_else(|| panic!("{spec} was accepted")).to_string();
            assert!(e.starts_with("prune_layers: ") && e.contains(needle), "{spec}: {e}");
        }
        for (text, needle) in [
            ("1,1", "listed twice"),
            ("last:0", "prunes nothing"),
            ("auto:0", "auto:0 prunes nothing"),
            ("auto:x", "bad block count"),
            ("last:x", "bad block count"),
            ("1,,2", "bad block index"),
            ("-1", "bad block index"),
            ("", "bad block index"),
        ] {
            let e = text.parse::<PruneSpec>().unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_graph_without_blocks_is_refused() {
        let g = parse_graph(
            "graph \"t\" context=8\nw0 = weight f32[32] \"norm\"\nv0 = input 0 : f32[seq, 32]\nv1 = rms_norm v0, w0 eps=0.00001 : f32[seq, 32]\noutput v1\n",
        )
        .unwrap();
        let w = weights(&g);
        let e = prune(&g, &w, "0").err().unwrap().to_string();
        assert!(e.contains("cannot find the model's transformer blocks (no weight is named blk.N.*)"), "{e}");
    }

    #[test]
    fn block_names() {
        assert_eq!(block_of("blk.12.attn_q.weight"), Some((12, "attn_q.weight")));
        assert_eq!(block_of("blk.x.attn_q.weight"), None);
        assert_eq!(block_of("blk.01.a"), None);
        assert_eq!(block_of("token_embd.weight"), None);
        let map = PruneSpec::layer_map(&[1], 3);
        assert_eq!(map, vec![Some(0), None, Some(1)]);
        assert_eq!(renamed("blk.2.ffn_up.weight", &map).as_deref(), Some("blk.1.ffn_up.weight"));
        assert_eq!(renamed("blk.1.ffn_up.weight", &map), None);
        assert_eq!(renamed("output.weight", &map).as_deref(), Some("output.weight"));
    }
}
