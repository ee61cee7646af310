//! [`Model`]: a graph together with the bytes of its weights, the unit the pass pipeline
//! transforms. Passes that rewrite weights (pruning, requantization, adapter merges) change
//! the graph and the weight table together, so they travel as one value; weights stay borrowed
//! slices of the model file until a pass replaces them, and a requantized weight is converted
//! only when it is read ([`Model::convert_weight`]).

use std::borrow::Cow;
use std::fmt;

use ir::quant::{dequantize_row, quantize_row};
use ir::{Graph, Op, QuantFormat, WeightId};
use rayon::prelude::*;

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
    /// The format a weight's bytes are stored in when it is not the graph's (set by
    /// [`Model::convert_weight`]): they are converted when read.
    stored_as: Vec<Option<QuantFormat>>,
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
        let stored_as = vec![None; weights.len()];
        Model { graph, weights, stored_as, release: None }
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

    /// The bytes of weight `w` in its format (the graph's): the stored bytes, or, for a weight
    /// given a new format by [`Model::convert_weight`], those bytes converted now.
    pub fn weight_bytes(&self, w: WeightId) -> Cow<'_, [u8]> {
        let stored = &self.weights[w.index()];
        let Some(from) = self.stored_as[w.index()] else { return Cow::Borrowed(stored) };
        let weight = &self.graph.weights[w.index()];
        let cols = *weight.shape.last().unwrap_or(&1) as usize;
        let row_bytes = from.row_bytes(cols).expect("checked by check_weights");
        // Rows convert independently: on rayon's pool, joined in order.
        let rows: Vec<Vec<u8>> = stored
            .par_chunks(row_bytes.max(1))
            .map(|r| {
                let mut values = vec![0.0f32; cols];
                dequantize_row(from, r, &mut values);
                quantize_row(weight.format, &values)
            })
            .collect();
        Cow::Owned(rows.concat())
    }

    /// Bytes of weight `w` in its format (the length of [`Model::weight_bytes`]).
    pub fn weight_len(&self, w: WeightId) -> usize {
        let w = &self.graph.weights[w.index()];
        let cols = *w.shape.last().unwrap_or(&1) as usize;
        let rows = w.n_values() as usize / cols.max(1);
        w.format.row_bytes(cols).map_or(0, |r| r * rows)
    }

    /// Every weight's bytes in its format, in weight-id order ([`Model::weight_bytes`]).
    pub fn weights(&self) -> impl ExactSizeIterator<Item = Cow<'_, [u8]>> {
        (0..self.weights.len()).map(|i| self.weight_bytes(WeightId(i as u32)))
    }

    /// Replaces weight `w` by `bytes` stored in `format` (same shape).
    pub fn set_weight(&mut self, w: WeightId, format: QuantFormat, bytes: Vec<u8>) {
        self.graph.weights[w.index()].format = format;
        self.weights[w.index()] = Cow::Owned(bytes);
        self.stored_as[w.index()] = None;
    }

    /// Gives weight `w` the format `format` (its rows dequantized and quantized again, as
    /// `dequantize_row` then `quantize_row`), converting only when the weight is read
    /// ([`Model::weight_bytes`]: a build converts each weight as it packs it, so a
    /// requantized model is never held whole). The stored bytes stay as they are; converting
    /// again converts from them.
    pub fn convert_weight(&mut self, w: WeightId, format: QuantFormat) {
        let current = self.graph.weights[w.index()].format;
        let stored = self.stored_as[w.index()].unwrap_or(current);
        self.stored_as[w.index()] = (stored != format).then_some(stored);
        self.graph.weights[w.index()].format = format;
    }

    /// Adds a weight stored in `format` as `bytes` and returns its id.
    pub fn add_weight(&mut self, name: String, format: QuantFormat, shape: Vec<u32>, bytes: Vec<u8>) -> WeightId {
        self.weights.push(Cow::Owned(bytes));
        self.stored_as.push(None);
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
        let mut i = 0;
        self.stored_as.retain(|_| (keep[i], i += 1).0);
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
        for w in self.graph.weights.iter().enumerate().filter(|(i, _)| used[*i]).map(|(_, w)| w) {
            parameters += w.n_values();
            let cols = *w.shape.last().unwrap_or(&1) as usize;
            let rows = w.n_values() as usize / cols.max(1);
            weight_bytes += w.format.row_bytes(cols).map_or(0, |r| (r * rows) as u64);
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
        for ((w, bytes), stored_as) in self.graph.weights.iter().zip(&self.weights).zip(&self.stored_as) {
            let cols = *w.shape.last().unwrap_or(&1) as usize;
            let rows = w.n_values() as usize / cols.max(1);
            let need = stored_as.unwrap_or(w.format).row_bytes(cols).map(|r| r * rows);
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
