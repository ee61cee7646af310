//! Merges LoRA adapters into the weights they update: `W' = W + scale * B A`, computed on the
//! dequantized weight, stored back in the weight's own format (a lossy requantization for
//! block formats; a later requantization pass may choose another format). Runs first, while
//! tensor names and layer numbers are the model file's.

use ir::quant::{dequantize, quantize_row};

use super::{PassContext, PassError};
use crate::lora::LoraUpdate;
use crate::model::Model;

const NAME: &str = "merge_lora";

pub fn run(model: &mut Model<'_>, cx: &PassContext) -> Result<(), PassError> {
    if cx.options.lora_low_rank {
        return Ok(()); // attach_lora applies them after requantization
    }
    for adapter in &cx.options.lora {
        let bad = |message: String| PassError::BadOption {
            pass: NAME,
            message: format!("adapter {}: {message}", adapter.path.display()),
        };
        for (name, update) in &adapter.updates {
            let Some(index) = model.graph.weights.iter().position(|w| &w.name == name) else {
                let hint = if name == "output.weight" { " (the model ties its output to the embedding)" } else { "" };
                return Err(bad(format!("it updates {name:?}, which the model does not have{hint}")));
            };
            let w = model.graph.weights[index].clone();
            let &[rows, cols] = w.shape.as_slice() else {
                return Err(bad(format!("{name:?} is not a matrix")));
            };
            if (rows as usize, cols as usize) != (update.rows, update.cols) {
                return Err(bad(format!(
                    "{name:?} is {rows}x{cols} but the adapter's update is {}x{} (rank {})",
                    update.rows, update.cols, update.rank
                )));
            }
            let id = ir::WeightId(index as u32);
            let mut values = dequantize(w.format, &model.weight_bytes(id), rows as usize, cols as usize);
            add_update(&mut values, update);
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("merging into {name:?} gives {} at value {i}", values[i])));
            }
            let bytes: Vec<u8> =
                values.chunks_exact(cols as usize).flat_map(|row| quantize_row(w.format, row)).collect();
            model.set_weight(id, w.format, bytes);
        }
        let lossy =
            if adapter.updates.keys().any(|n| {
                model.graph.weights.iter().find(|w| &w.name == n).is_some_and(|w| w.format.is_block_quantized())
            }) {
                "; block-quantized weights were requantized to their format after the merge (lossy)"
            } else {
                ""
            };
        cx.note(NAME, format!("{}: {} tensors updated{lossy}", adapter.path.display(), adapter.updates.len()));
    }
    Ok(())
}

/// `w += scale * B A` for a `[rows, cols]` row-major `w`, each element accumulated in f64
/// over the rank and rounded once.
pub fn add_update(w: &mut [f32], u: &LoraUpdate) {
    let mut acc = vec![0f64; u.cols];
    for r in 0..u.rows {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for k in 0..u.rank {
            let coef = u.b[r * u.rank + k] as f64;
            let a_row = &u.a[k * u.cols..(k + 1) * u.cols];
            for (acc, &a) in acc.iter_mut().zip(a_row) {
                *acc += coef * a as f64;
            }
        }
        let row = &mut w[r * u.cols..(r + 1) * u.cols];
        for (x, &d) in row.iter_mut().zip(&acc) {
            *x = (*x as f64 + u.scale as f64 * d) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use ir::parse::parse_graph;
    use ir::quant::{dequantize, quantize_row};
    use ir::QuantFormat;

    use super::*;
    use crate::lora::Adapter;
    use crate::passes::PipelineOptions;

    fn update(rows: usize, cols: usize, rank: usize, scale: f32) -> LoraUpdate {
        let v = |n: usize, k: f32| (0..n).map(|i| ((i as f32 + k) * 0.71).sin() * 0.1).collect::<Vec<f32>>();
        LoraUpdate { a: v(rank * cols, 1.0), b: v(rows * rank, 2.0), rank, rows, cols, scale }
    }

    fn run_with(graph: &str, weights: &[Vec<u8>], updates: Vec<(&str, LoraUpdate)>) -> Result<Vec<Vec<u8>>, PassError> {
        let graph = parse_graph(graph).unwrap();
        let mut model = Model::borrowed(graph, weights);
        let adapter = Adapter {
            path: "adapter".into(),
            sha256: String::new(),
            updates: updates.into_iter().map(|(n, u)| (n.to_owned(), u)).collect::<BTreeMap<_, _>>(),
            trained_on_student: false,
        };
        let options = PipelineOptions { lora: vec![Arc::new(adapter)], ..Default::default() };
        run(&mut model, &PassContext::new(&options))?;
        model.check_weights().unwrap();
        Ok(model.weights().map(|w| w.to_vec()).collect())
    }

    const GRAPH: &str = "graph \"t\" context=8\nw0 = weight f32[6, 32] \"blk.0.ffn_up.weight\"\nw1 = weight q8_0[4, 64] \"blk.0.attn_q.weight\"\nv0 = input 0 : f32[seq, 32]\nv1 = matmul v0, w0 : f32[seq, 6]\noutput v1\n";

    #[test]
    fn merged_weights_equal_the_explicit_sum() {
        let v = |n: usize| (0..n).map(|i| (i as f32 * 0.3).cos()).collect::<Vec<f32>>();
        let w0: Vec<u8> = v(6 * 32).iter().flat_map(|x| x.to_le_bytes()).collect();
        let w1: Vec<u8> = v(4 * 64).chunks(64).flat_map(|r| quantize_row(QuantFormat::Q8_0, r)).collect();
        let (u0, u1) = (update(6, 32, 3, 2.0), update(4, 64, 2, 0.5));
        let out = run_with(
            GRAPH,
            &[w0.clone(), w1.clone()],
            vec![("blk.0.ffn_up.weight", u0.clone()), ("blk.0.attn_q.weight", u1.clone())],
        )
        .unwrap();
        for (bytes, before, u, format) in
            [(&out[0], &w0, &u0, QuantFormat::F32), (&out[1], &w1, &u1, QuantFormat::Q8_0)]
        {
            let base = dequantize(format, before, u.rows, u.cols);
            let mut want = vec![0f32; u.rows * u.cols];
            for r in 0..u.rows {
                for c in 0..u.cols {
                    let delta: f64 = (0..u.rank).map(|k| u.b[r * u.rank + k] as f64 * u.a[k * u.cols + c] as f64).sum();
                    want[r * u.cols + c] = (base[r * u.cols + c] as f64 + u.scale as f64 * delta) as f32;
                }
            }
            // Stored back in the weight's format: exact for f32, the format's rounding for q8_0.
            let want: Vec<u8> = want.chunks(u.cols).flat_map(|row| quantize_row(format, row)).collect();
            assert_eq!(bytes, &want, "{format:?}");
            assert_ne!(bytes, before);
        }
    }

    #[test]
    fn adapters_that_do_not_fit_are_refused() {
        let w0 = vec![0u8; 6 * 32 * 4];
        let w1: Vec<u8> = (0..4).flat_map(|_| quantize_row(QuantFormat::Q8_0, &[0.0; 64])).collect();
        let weights = [w0, w1];
        for (name, u, want) in [
            ("blk.7.ffn_up.weight", update(6, 32, 2, 1.0), "does not have"),
            ("output.weight", update(6, 32, 2, 1.0), "ties its output"),
            ("blk.0.ffn_up.weight", update(6, 64, 2, 1.0), "is 6x32 but the adapter's update is 6x64"),
            ("blk.0.ffn_up.weight", update(6, 32, 2, f32::INFINITY), "gives"),
        ] {
            let e = run_with(GRAPH, &weights, vec![(name, u)]).expect_err(want).to_string();
            assert!(e.contains(want) && e.contains("merge_lora"), "{want}: {e}");
        }
    }
}
