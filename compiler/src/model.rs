//! [`Model`]: a graph together with the bytes of its weights, the unit the pass pipeline
//! transforms. Passes that rewrite weights (pruning, requantization, adapter merges) change
//! the graph and the weight table together, so they travel as one value; weights stay borrowed
//! slices of the model file until a pass replaces them.

use std::borrow::Cow;

use ir::{Graph, QuantFormat, WeightId};

/// A graph and its weights (indexed by [`WeightId`], stored in each weight's format).
#[derive(Clone, Debug)]
pub struct Model<'a> {
    pub graph: Graph,
    weights: Vec<Cow<'a, [u8]>>,
}

impl<'a> Model<'a> {
    /// Pairs `graph` with `weights`; [`Model::check_weights`] says whether they fit.
    pub fn new(graph: Graph, weights: Vec<Cow<'a, [u8]>>) -> Self {
        Model { graph, weights }
    }

    /// A model borrowing `weights`.
    pub fn borrowed<W: AsRef<[u8]>>(graph: Graph, weights: &'a [W]) -> Self {
        Model::new(graph, weights.iter().map(|w| Cow::Borrowed(w.as_ref())).collect())
    }

    /// The stored bytes of weight `w`.
    pub fn weight_bytes(&self, w: WeightId) -> &[u8] {
        &self.weights[w.index()]
    }

    /// Every weight's bytes, in weight-id order.
    pub fn weights(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        self.weights.iter().map(|w| w.as_ref())
    }

    /// Replaces weight `w` by `bytes` stored in `format` (same shape).
    pub fn set_weight(&mut self, w: WeightId, format: QuantFormat, bytes: Vec<u8>) {
        self.graph.weights[w.index()].format = format;
        self.weights[w.index()] = Cow::Owned(bytes);
    }

    /// Keeps the weights for which `keep` is true, renumbering them densely in their order and
    /// rewriting every node's weight references. `keep` must hold for every referenced weight.
    pub fn retain_weights(&mut self, keep: &[bool]) {
        assert_eq!(keep.len(), self.graph.weights.len());
        let mut new_id = vec![None; keep.len()];
        let mut next = 0u32;
        for (i, &k) in keep.iter().enumerate() {
            if k {
                new_id[i] = Some(WeightId(next));
                next += 1;
            }
        }
        for node in &mut self.graph.nodes {
            node.op.for_each_weight_mut(|w| *w = new_id[w.index()].expect("a referenced weight is kept"));
        }
        let mut i = 0;
        self.graph.weights.retain(|_| (keep[i], i += 1).0);
        let mut i = 0;
        self.weights.retain(|_| (keep[i], i += 1).0);
    }

    /// Checks that there is one byte string per weight, of the size its format and shape need.
    pub fn check_weights(&self) -> Result<(), String> {
        if self.weights.len() != self.graph.weights.len() {
            return Err(format!(
                "{} weights in the graph, {} in the table",
                self.graph.weights.len(),
                self.weights.len()
            ));
        }
        for (w, bytes) in self.graph.weights.iter().zip(&self.weights) {
            let cols = *w.shape.last().unwrap_or(&1) as usize;
            let rows = w.n_values() as usize / cols.max(1);
            let need = w.format.row_bytes(cols).map(|r| r * rows);
            if need != Some(bytes.len()) {
                return Err(format!(
                    "weight {:?} ({} {:?}): {} bytes, expected {need:?}",
                    w.name,
                    w.format.name(),
                    w.shape,
                    bytes.len()
                ));
            }
        }
        Ok(())
    }
}
