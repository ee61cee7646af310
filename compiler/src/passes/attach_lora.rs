//! `--lora-mode low-rank` (the default for adapters `heal` and `finetune` write): keeps each
//! LoRA update as two small matmuls beside the layer it adapts, `y = W x + (scale B) (A x)`,
//! instead of merging it into `W` (`merge_lora`). Runs after `requantize`, so `W` is exactly
//! the compressed weight the adapter was trained against (`cargo xtask heal`), with nothing of
//! the update lost to requantization; the price is two matmuls of `rank` rows per adapted
//! layer, `(in + out) * rank` values each, stored f16 (half an ulp of f16, 2^-11 relative, is
//! far below what training resolves), or f32 for a factor with values beyond f16's range.
//!
//! Adapters name layers as the source model numbers them (they are trained before pruning
//! renumbers blocks); updates of pruned blocks are left out, as merging them into weights that
//! pruning then drops would. The scale is folded into `B`.

use ir::{DType, Epilogue, Node, Op, QuantFormat, TensorType, ValueId};

use super::prune_layers::{renamed, PruneSpec};
use super::{PassContext, PassError};
use crate::model::Model;

const NAME: &str = "attach_lora";

/// A factor's values as f16 when every one is within f16's range, else as f32.
fn factor_bytes(values: &[f32]) -> (QuantFormat, Vec<u8>) {
    if values.iter().all(|x| x.abs() <= half::f16::MAX.to_f32()) {
        (QuantFormat::F16, values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect())
    } else {
        (QuantFormat::F32, values.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

pub fn run(model: &mut Model<'_>, cx: &PassContext) -> Result<(), PassError> {
    if !cx.options.lora_low_rank || cx.options.lora.is_empty() {
        return Ok(());
    }
    let bad = |message: String| PassError::BadOption { pass: NAME, message };
    // The source model's block numbering.
    let layers = model.graph.kv_layers();
    let removed = match &cx.options.prune {
        None => vec![],
        Some(PruneSpec::Blocks(b)) => {
            let mut b = b.clone();
            b.sort();
            b.dedup();
            b
        }
        Some(PruneSpec::Last(n)) => PruneSpec::Last(*n).resolve(layers + n).map_err(bad)?,
        Some(PruneSpec::Auto(_)) => return Err(bad("auto:N reaches the passes resolved to blocks".into())),
    };
    let map = PruneSpec::layer_map(&removed, layers + removed.len() as u32);

    // Weight id of each adapted weight -> (A, B) weight ids.
    let mut attach: Vec<Option<(ir::WeightId, ir::WeightId, u32)>> = vec![None; model.graph.weights.len()];
    let (mut attached, mut skipped) = (0usize, 0usize);
    for adapter in &cx.options.lora {
        for (name, u) in &adapter.updates {
            let Some(current) = renamed(name, &map) else {
                skipped += 1;
                continue;
            };
            let Some(index) = model.graph.weights.iter().position(|w| w.name == current) else {
                return Err(bad(format!(
                    "adapter {}: it updates {name:?}, which the model does not have",
                    adapter.path.display()
                )));
            };
            let w = &model.graph.weights[index];
            if w.shape != [u.rows as u32, u.cols as u32] {
                return Err(bad(format!(
                    "adapter {}: {name:?} is {:?} but the update is {}x{}",
                    adapter.path.display(),
                    w.shape,
                    u.rows,
                    u.cols
                )));
            }
            if attach[index].is_some() {
                return Err(bad(format!("{name:?} is updated by two adapters; low-rank mode keeps one per layer")));
            }
            if u.a.iter().chain(&u.b).any(|x| !(x * u.scale).is_finite()) {
                return Err(bad(format!("adapter {}: the update of {name:?} is not finite", adapter.path.display())));
            }
            let b_scaled: Vec<f32> = u.b.iter().map(|x| x * u.scale).collect();
            let (a_format, a_bytes) = factor_bytes(&u.a);
            let (b_format, b_bytes) = factor_bytes(&b_scaled);
            let a =
                model.add_weight(format!("{current}.lora_a"), a_format, vec![u.rank as u32, u.cols as u32], a_bytes);
            let b =
                model.add_weight(format!("{current}.lora_b"), b_format, vec![u.rows as u32, u.rank as u32], b_bytes);
            attach[index] = Some((a, b, u.rank as u32));
            attached += 1;
        }
    }

    let old_nodes = std::mem::take(&mut model.graph.nodes);
    let mut nodes: Vec<Node> = Vec::with_capacity(old_nodes.len() + 2 * attached);
    let mut renumber: Vec<ValueId> = Vec::with_capacity(old_nodes.len());
    for mut node in old_nodes {
        node.op.map_operands(|v| renumber[v.index()]);
        let lora = match node.op {
            Op::MatMul { x, weight, epilogue } => attach[weight.index()].map(|ab| (x, epilogue, ab)),
            _ => None,
        };
        let ty = node.ty.clone();
        let y = ValueId(nodes.len() as u32);
        nodes.push(node);
        if let Some((x, epilogue, (a, b, rank))) = lora {
            if matches!(epilogue, Epilogue::Silu | Epilogue::Mul(_)) {
                return Err(bad("a LoRA update cannot follow a matmul with a silu or mul epilogue".into()));
            }
            if nodes[x.index()].ty.dtype != DType::F32 {
                return Err(bad(
                    "LoRA's low-rank matmuls need f32 activations (the pass runs before quantize_activations)".into(),
                ));
            }
            let t = ValueId(nodes.len() as u32);
            nodes.push(Node {
                op: Op::MatMul { x, weight: a, epilogue: Epilogue::None },
                ty: TensorType::rows(DType::F32, rank),
            });
            let out = ValueId(nodes.len() as u32);
            nodes.push(Node { op: Op::MatMul { x: t, weight: b, epilogue: Epilogue::Add(y) }, ty });
            renumber.push(out);
        } else {
            renumber.push(y);
        }
    }
    model.graph.nodes = nodes;
    for v in &mut model.graph.outputs {
        *v = renumber[v.index()];
    }
    let extra: usize = attach.iter().flatten().map(|&(a, b, _)| model.weight_len(a) + model.weight_len(b)).sum();
    cx.note(
        NAME,
        format!(
            "{attached} updates kept as low-rank matmuls ({:.2} MiB of factors, f16 where in range){}",
            extra as f64 / (1 << 20) as f64,
            if skipped > 0 { format!("; {skipped} updates of pruned blocks left out") } else { String::new() }
        ),
    );
    Ok(())
}
