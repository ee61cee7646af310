//! Drops the weights no node reads (left by the frontend for tensors the graph does not use,
//! or by pruning), so that nothing unused is packed into the library.

use super::{PassContext, PassError};
use crate::model::Model;

pub fn run(model: &mut Model<'_>, _cx: &PassContext) -> Result<(), PassError> {
    let mut used = vec![false; model.graph.weights.len()];
    for node in &model.graph.nodes {
        if let Some(w) = node.op.weight() {
            used[w.index()] = true;
        }
    }
    if used.iter().any(|u| !u) {
        model.retain_weights(&used);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::passes::tests::check_pass;

    #[test]
    fn unused_weights_are_dropped_and_the_rest_renumbered() {
        check_pass(
            "drop_unused_weights",
            "graph \"t\" context=8\nw0 = weight q8_0[32, 32] \"unused\"\nw1 = weight f32[32] \"norm\"\nw2 = weight q4_0[64, 32] \"unused too\"\nw3 = weight q4_1[32, 32] \"up\"\nv0 = input 0 : f32[seq, 32]\nv1 = rms_norm v0, w1 eps=0.00001 : f32[seq, 32]\nv2 = matmul v1, w3 : f32[seq, 32]\noutput v2\n",
            "graph \"t\" context=8\nw0 = weight f32[32] \"norm\"\nw1 = weight q4_1[32, 32] \"up\"\nv0 = input 0 : f32[seq, 32]\nv1 = rms_norm v0, w0 eps=0.00001 : f32[seq, 32]\nv2 = matmul v1, w1 : f32[seq, 32]\noutput v2\n",
        );
    }
}
