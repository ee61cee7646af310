//! Probe graphs for `--prune-layers auto:N`: the residual stream at every block boundary as
//! graph outputs, so that a caller that can run code (`xtask`) measures how much each run of
//! blocks changes it, as Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper
//! Layers") do, and resolves `auto:N` to the blocks to drop. The compiler only builds graphs
//! and does the arithmetic; it never runs them.
//!
//! `x_l` is the residual stream entering block `l`: `x_0` is the token embedding and `x_L`
//! (for `L` blocks) the stream after the last block, before the final norm. A library has at
//! most `MAX_IO` inputs and outputs, so the probe is split into segments that chain: the first
//! takes token ids and outputs `x_0 ..= x_6`, each later one takes the previous segment's last
//! state as f32 rows and outputs the next seven. Together they hold each block once, so running
//! all segments costs one forward pass. Each segment numbers its attention layers from 0 and
//! holds only its blocks' weights.

use ir::{Graph, Op, ValueId, WeightId};

use crate::codegen::abi::MAX_IO;
use crate::model::Model;
use crate::passes::prune_layers::find_blocks;
use crate::passes::PassError;

/// One segment of the probe.
pub struct ProbeSegment {
    /// Input 0: token ids when `input_state` is `None`, else the rows of `x_{input_state}`;
    /// the outputs are `x_{first_state} ..`, one per output.
    pub graph: Graph,
    /// The segment's weights (raw bytes, indexed by the segment's weight ids).
    pub weights: Vec<Vec<u8>>,
    pub input_state: Option<u32>,
    pub first_state: u32,
}

/// The probe segments of `model` (see the module doc), or why its blocks cannot be found.
pub fn probe_segments(model: &Model<'_>) -> Result<Vec<ProbeSegment>, PassError> {
    let blocks = find_blocks(model)?;
    let graph = &model.graph;
    let n_layers = blocks.len();
    let per_segment = MAX_IO - 1;
    let mut segments = vec![];
    let mut start = 0;
    while start < n_layers {
        let first = start == 0;
        // Outputs: x_0 plus six blocks in the first segment, seven blocks in later ones.
        let end = (start + if first { per_segment - 1 } else { per_segment }).min(n_layers);
        let mut out = Graph::new(format!("{}-probe-{start}", graph.name), graph.context);
        let mut weights = vec![];
        let mut new_weight: Vec<Option<WeightId>> = vec![None; graph.weights.len()];
        let mut new_value: Vec<Option<ValueId>> = vec![None; graph.nodes.len()];
        let copy_from = if first {
            0
        } else {
            let input = blocks[start].input;
            new_value[input.index()] = Some(out.push(Op::Input { index: 0 }, graph.ty(input).clone()));
            blocks[start].start
        };
        for i in copy_from..=blocks[end - 1].output.index() {
            let node = &graph.nodes[i];
            let mut op = node.op.clone();
            let mut missing = None;
            op.map_operands(|v| {
                new_value[v.index()].unwrap_or_else(|| {
                    missing = Some(v);
                    v
                })
            });
            if let Some(v) = missing {
                return Err(PassError::BadOption {
                    pass: "probe",
                    message: format!("value {v} reaches block {start} from outside the residual stream"),
                });
            }
            op.for_each_weight_mut(|w| {
                *w = *new_weight[w.index()].get_or_insert_with(|| {
                    let source = graph.weight(*w);
                    weights.push(model.weight_bytes(*w).to_vec());
                    out.add_weight(source.name.clone(), source.format, source.shape.clone())
                })
            });
            if let Op::Attention { layer, .. } = &mut op {
                *layer -= start as u32;
            }
            new_value[i] = Some(out.push(op, node.ty.clone()));
        }
        if first {
            out.outputs.push(new_value[blocks[0].input.index()].expect("copied"));
        }
        for block in &blocks[start..end] {
            out.outputs.push(new_value[block.output.index()].expect("copied"));
        }
        segments.push(ProbeSegment {
            graph: out,
            weights,
            input_state: (!first).then_some(start as u32),
            first_state: if first { 0 } else { start as u32 + 1 },
        });
        start = end;
    }
    Ok(segments)
}

/// The angular distance `arccos(cos(a, b)) / pi` of two rows, in `[0, 1]`, computed in f64.
/// Two zero rows are at distance 0; a zero row and another at 1/2.
pub fn angular_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    let cos = match (aa > 0.0, bb > 0.0) {
        (true, true) => (dot / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0),
        (false, false) => 1.0,
        _ => 0.0,
    };
    cos.acos() / std::f64::consts::PI
}

/// The run of `n` blocks `auto:n` drops, given `distances[l]` = the mean angular distance
/// between `x_l` and `x_{l+n}` for each start `l` in `0..=n_layers - n`: the smallest among
/// the runs that keep the final block (`l + n <= n_layers - 1`), the smallest `l` on ties.
/// Returns the start `l`, or an error when no run fits or the distances do not match.
pub fn choose_run(distances: &[f64], n: u32, n_layers: u32) -> Result<u32, String> {
    crate::passes::prune_layers::PruneSpec::check_auto(n, n_layers)?;
    if distances.len() != (n_layers - n + 1) as usize {
        return Err(format!("{} distances for auto:{n} of {n_layers} blocks", distances.len()));
    }
    let eligible = &distances[..(n_layers - n) as usize];
    let mut best = 0;
    for (l, &d) in eligible.iter().enumerate() {
        if d.is_nan() {
            return Err(format!("the distance at block {l} is not a number"));
        }
        if d < eligible[best] {
            best = l;
        }
    }
    Ok(best as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn angular_distances() {
        assert_eq!(angular_distance(&[1.0, 0.0], &[2.0, 0.0]), 0.0);
        assert!((angular_distance(&[1.0, 0.0], &[0.0, 3.0]) - 0.5).abs() < 1e-15);
        assert!((angular_distance(&[1.0, 0.0], &[-1.0, 0.0]) - 1.0).abs() < 1e-15);
        assert!((angular_distance(&[1.0, 1.0], &[1.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(angular_distance(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
        assert_eq!(angular_distance(&[0.0, 0.0], &[1.0, 0.0]), 0.5);
    }

    #[test]
    fn the_run_keeps_the_final_block_and_ties_take_the_first() {
        // Five blocks, auto:2: starts 0..=3, of which 3 would drop the final block.
        assert_eq!(choose_run(&[0.3, 0.2, 0.25, 0.01], 2, 5), Ok(1));
        assert_eq!(choose_run(&[0.3, 0.2, 0.2, 0.01], 2, 5), Ok(1));
        assert_eq!(choose_run(&[0.1, 0.2, 0.3, 0.4], 2, 5), Ok(0));
        assert_eq!(choose_run(&[0.4, 0.3], 4, 5), Ok(0));
        assert!(choose_run(&[0.1], 5, 5).unwrap_err().contains("auto:5 needs at least 6 blocks"));
        assert!(choose_run(&[0.1], 0, 5).unwrap_err().contains("auto:0 prunes nothing"));
        assert!(choose_run(&[0.1, f64::NAN, 0.0, 0.0], 2, 5).unwrap_err().contains("not a number"));
    }
}
