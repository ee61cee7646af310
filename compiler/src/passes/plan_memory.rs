//! Plans all intermediate values into one activation arena.
//!
//! Every `[seq, n]` value is given room for the compiled batch size (`batch` rows) at a fixed
//! offset. Values whose lifetimes do not overlap share memory: the planner walks the nodes in
//! order, frees a value after its last use, and places each new value first-fit (64-byte
//! aligned). A value is never placed over an operand of the node that defines it, so kernels
//! need not be in-place safe. Graph inputs and outputs live in caller memory (`io` slots).

use ir::verify::GraphInfo;
use ir::{ActDType, DType, Graph, Op, TensorType, ValueId};

/// Bytes of one q16 block on the q16 grid: f32 scale, f32 sum of the quantized values times
/// the scale, 32 x i16.
pub const Q16_BLOCK_BYTES: u64 = 72;

/// Byte offset of the int8 copy of a block's values on the q8 grid (`act=q8`), after the
/// q16 block's fields: the same integers, for kernels that multiply 8-bit activations.
pub const Q8_VALUES_AT: u64 = Q16_BLOCK_BYTES;

/// Bytes of one quantized-activation block on the grid `act`.
pub fn q16_block_bytes(act: ActDType) -> u64 {
    match act {
        ActDType::Q16 => Q16_BLOCK_BYTES,
        ActDType::Q8 => Q8_VALUES_AT + 32,
    }
}

/// Where a value lives while the graph runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// At this byte offset of the activation arena.
    Arena { offset: u64 },
    /// An input, in caller memory: `io[slot]`, holding all `n_tokens` rows.
    Io { slot: u32 },
    /// An output, in caller memory: `io[slot]` (after the inputs), holding only the rows the
    /// caller asks for, `out_start..n_tokens`, of `row_bytes` each; row `t` is at
    /// `io[slot] + (t - out_start) * row_bytes`. Every kernel that writes it starts at
    /// `out_start` (codegen checks that outputs are skippable).
    Output { slot: u32, row_bytes: u64 },
}

/// An output that later kernels need in every row: it lives in the arena, and a last kernel
/// copies its rows `out_start..n_tokens` to the caller's buffer `to` (a `Location::Output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputCopy {
    pub value: usize,
    pub to: Location,
}

/// The result of planning: a location per value and the arena size.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub locations: Vec<Location>,
    /// Outputs computed in the arena and copied out at the end, in output order.
    pub output_copies: Vec<OutputCopy>,
    pub arena_bytes: u64,
    /// Rows every arena value has room for: the most tokens one call may evaluate.
    pub batch: u32,
}

/// Bytes of one row of a value of type `ty` in a graph whose activation grid is `act`.
pub fn row_bytes(ty: &TensorType, act: ActDType) -> u64 {
    let n = ty.row_len().unwrap_or(1) as u64;
    match ty.dtype {
        DType::F32 | DType::I32 => 4 * n,
        DType::Q16 => n / 32 * q16_block_bytes(act),
    }
}

const ALIGN: u64 = 64;

/// Rows of each value that may be skipped: values whose every use only needs the rows the
/// caller asks outputs for (`out_start..n_tokens`). Keys and values entering attention are
/// always computed in full, because the cache keeps them.
pub fn skippable_rows(graph: &Graph) -> Vec<bool> {
    let n = graph.nodes.len();
    let mut users: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, node) in graph.nodes.iter().enumerate() {
        for v in node.op.operands() {
            users[v.index()].push(i);
        }
    }
    let mut skip = vec![false; n];
    for i in (0..n).rev() {
        if matches!(graph.nodes[i].op, Op::Input { .. }) {
            continue;
        }
        let is_output = graph.outputs.contains(&ValueId(i as u32));
        let has_uses = is_output || !users[i].is_empty();
        skip[i] = has_uses && users[i].iter().all(|&u| skip[u] && !matches!(graph.nodes[u].op, Op::Attention { .. }));
    }
    skip
}

/// Plans `graph` for batches of up to `batch` tokens.
pub fn plan(graph: &Graph, info: &GraphInfo, batch: u32) -> MemoryPlan {
    let n = graph.nodes.len();
    let mut locations = vec![Location::Arena { offset: 0 }; n];
    let mut is_io = vec![false; n];
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Op::Input { index } = node.op {
            locations[i] = Location::Io { slot: index };
            is_io[i] = true;
        }
    }
    let skip = skippable_rows(graph);
    let mut output_copies = vec![];
    for (k, v) in graph.outputs.iter().enumerate() {
        let row_bytes = row_bytes(&graph.nodes[v.index()].ty, graph.act_dtype);
        let to = Location::Output { slot: info.n_inputs + k as u32, row_bytes };
        if !is_io[v.index()] && skip[v.index()] {
            locations[v.index()] = to;
            is_io[v.index()] = true;
        } else {
            // Needed in every row, an input, or an earlier output too: computed where it is
            // and copied out.
            output_copies.push(OutputCopy { value: v.index(), to });
        }
    }
    // Free list of (offset, size), sorted by offset; `end` is the arena high-water mark.
    let mut free: Vec<(u64, u64)> = vec![];
    let mut end = 0u64;
    let mut live: Vec<(usize, u64, u64)> = vec![]; // (value, offset, size)
    for i in 0..n {
        // Release values whose last use is before this node.
        live.retain(|&(v, off, size)| {
            if info.last_use[v] < i {
                free.push((off, size));
                false
            } else {
                true
            }
        });
        free.sort_unstable();
        let mut merged: Vec<(u64, u64)> = vec![];
        for (off, size) in free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += size,
                _ => merged.push((off, size)),
            }
        }
        free = merged;
        if is_io[i] || info.use_counts[i] == 0 {
            continue;
        }
        let size = (row_bytes(&graph.nodes[i].ty, graph.act_dtype) * batch as u64).div_ceil(ALIGN) * ALIGN;
        let offset = match free.iter().position(|&(_, s)| s >= size) {
            Some(j) => {
                let (off, s) = free[j];
                if s == size {
                    free.remove(j);
                } else {
                    free[j] = (off + size, s - size);
                }
                off
            }
            None => {
                // Grow the arena, reusing a free block that ends at the high-water mark.
                match free.last() {
                    Some(&(off, s)) if off + s == end => {
                        free.pop();
                        end = off + size;
                        off
                    }
                    _ => {
                        end += size;
                        end - size
                    }
                }
            }
        };
        locations[i] = Location::Arena { offset };
        live.push((i, offset, size));
    }
    MemoryPlan { locations, output_copies, arena_bytes: end.max(ALIGN), batch }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::parse::parse_graph;
    use ir::verify::assert_valid;

    #[test]
    fn reuses_memory_of_dead_values_but_never_an_operand() {
        let g = parse_graph(
            r#"graph "t" context=8
v0 = input 0 : f32[seq, 16]
v1 = silu v0 : f32[seq, 16]
v2 = silu v1 : f32[seq, 16]
v3 = silu v2 : f32[seq, 16]
v4 = add v3, v0 : f32[seq, 16]
output v4
"#,
        )
        .unwrap();
        let info = assert_valid(&g);
        let plan = plan(&g, &info, 4);
        let off = |i: usize| match plan.locations[i] {
            Location::Arena { offset } => offset,
            Location::Io { .. } | Location::Output { .. } => panic!("v{i} should be in the arena"),
        };
        assert_eq!(plan.locations[0], Location::Io { slot: 0 });
        assert_eq!(plan.locations[4], Location::Output { slot: 1, row_bytes: 64 });
        // v1 and v2 overlap in time, v3 can take v1's place.
        assert_ne!(off(1), off(2));
        assert_eq!(off(3), off(1));
        assert_eq!(plan.arena_bytes, 2 * 256);
    }
}
