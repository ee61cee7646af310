//! [`Model`]: a graph together with the bytes of its weights, the unit the pass pipeline
//! transforms. Passes that rewrite weights (pruning, requantization, adapter merges) change
//! the graph and the weight table together, so they travel as one value; weights stay borrowed
//! slices of the model file until a pass replaces them.

use std::borrow::Cow;
use std::fmt;

use ir::{Graph, Op, QuantFormat, WeightId};

/// The size of a model, for the build report: what pruning and requantization change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelStats {
    /// Transformer layers (attention nodes, one KV cache layer each).
    pub layers: u32,
    /// Values in the weights the graph reads (a tied embedding counts once).
    pub parameters: u64,
    /// Stored bytes of those weights, in their formats (before packing).
    pub weight_bytes: u64,
}

impl ModelStats {
    pub fn bits_per_weight(&self) -> f64 {
        if self.parameters == 0 {
            return 0.0;
        }
        self.weight_bytes as f64 * 8.0 / self.parameters as f64
    }
}

impl fmt::Display for ModelStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} layers, {:.2}M parameters, {:.2} MiB of weights, {:.3} bits/weight",
            self.layers,
            self.parameters as f64 / 1e6,
            self.weight_bytes as f64 / (1 << 20) as f64,
            self.bits_per_weight()
        )
    }
}

/// A graph and its weights (indexed by [`WeightId`], stored in each weight's format).
#[derive(Clone)]
pub struct Model<'a> {
    pub graph: Graph,
    weights: Vec<Cow<'a, [u8]>>,
    /// Told about a borrowed weight that will not be read again soon ([`Model::release_weight`]).
    release: Option<&'a (dyn Fn(&[u8]) + Sync)>,
}

impl fmt::Debug for Model<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("graph", &self.graph.name)
            .field("weights", &self.weights.len())
            .field("releases", &self.release.is_some())
            .finish()
    }
}

impl<'a> Model<'a> {
    /// Pairs `graph` with `weights`; [`Model::check_weights`] says whether they fit.
    pub fn new(graph: Graph, weights: Vec<Cow<'a, [u8]>>) -> Self {
        Model { graph, weights, release: None }
    }

    /// The model with `release` told of each borrowed weight the build is done with (the
    /// source's [`crate::source::ModelSource::release`], which gives a mapped file's pages back).
    pub fn with_release(mut self, release: &'a (dyn Fn(&[u8]) + Sync)) -> Self {
        self.release = Some(release);
        self
    }

    /// Says that weight `w` will not be read again soon: a weight borrowed from the source
    /// is released to it (its pages may be dropped and read back if it is read after all).
    pub fn release_weight(&self, w: WeightId) {
        if let (Some(release), Cow::Borrowed(bytes)) = (self.release, &self.weights[w.index()]) {
            release(bytes);
        }
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

    /// Adds a weight stored in `format` as `bytes` and returns its id.
    pub fn add_weight(&mut self, name: String, format: QuantFormat, shape: Vec<u32>, bytes: Vec<u8>) -> WeightId {
        self.weights.push(Cow::Owned(bytes));
        self.graph.add_weight(name, format, shape)
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

    /// Layers, parameters and weight bytes of the weights some node reads.
    pub fn stats(&self) -> ModelStats {
        let mut used = vec![false; self.graph.weights.len()];
        for node in &self.graph.nodes {
            if let Some(w) = node.op.weight() {
                used[w.index()] = true;
            }
        }
        let (mut parameters, mut weight_bytes) = (0, 0);
        for (i, w) in self.graph.weights.iter().enumerate().filter(|(i, _)| used[*i]) {
            parameters += w.n_values();
            weight_bytes += self.weights[i].len() as u64;
        }
        let layers = self.graph.nodes.iter().filter(|n| matches!(n.op, Op::Attention { .. })).count() as u32;
        ModelStats { layers, parameters, weight_bytes }
    }

    /// Renames weight `w`.
    pub fn rename_weight(&mut self, w: WeightId, name: String) {
        self.graph.weights[w.index()].name = name;
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
