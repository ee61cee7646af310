//! `optimize`: from a GGUF file to a smaller GGUF file (`cargo xtask optimize`), with the same
//! model passes a build runs (`prune_layers`, `drop_unused_weights`, `requantize`).
//!
//! The output keeps all of the source's metadata (tokenizer and chat template included) in
//! its order, with `{arch}.block_count` set to the layers left and `general.file_type` to the
//! `--quant` format's llama.cpp file type; its tensors are the source's in their order, the
//! ones the passes changed replaced, the pruned blocks' left out and the later blocks renamed
//! so that `blk.N` stays contiguous. Tensors the frontend does not read are copied unchanged
//! (renamed with their block). The file is written by [`GgufWriter`] (aligned as the GGUF spec
//! asks: `general.alignment` or 32) to a temporary file that is renamed into place; an
//! existing output is replaced only with `force`.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::bundle::BuildError;
use crate::frontend;
use crate::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};
use crate::model::{Model, ModelStats};
use crate::outdir;
use crate::passes::prune_layers::{renamed, PruneSpec};
use crate::passes::requantize::{file_type_of, QuantOptions};
use crate::passes::{run_model_passes, PipelineOptions};
use crate::CompileError;

/// What to optimize and where to write it.
#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    pub model: PathBuf,
    pub out: PathBuf,
    /// Replace an existing `out` file.
    pub force: bool,
    pub prune: Option<PruneSpec>,
    pub quant: QuantOptions,
    /// LoRA adapters merged into the weights (as llama.cpp's `export-lora` does).
    pub lora: Vec<PathBuf>,
}

/// What `optimize` did.
#[derive(Clone, Debug)]
pub struct OptimizeReport {
    pub before: ModelStats,
    pub after: ModelStats,
    /// What each pass changed.
    pub notes: Vec<String>,
    pub source_file_bytes: u64,
    pub out_file_bytes: u64,
}

fn bad_option(message: String) -> BuildError {
    BuildError::Compile(CompileError::BadOption(message))
}

/// Optimizes `opts.model` into `opts.out`; nothing is written when anything fails.
pub fn optimize(opts: &OptimizeOptions) -> Result<OptimizeReport, BuildError> {
    if opts.prune.is_none() && opts.quant.is_empty() && opts.lora.is_empty() {
        return Err(bad_option("nothing to do: give --quant, --quant-tensor, --prune-layers or --lora".into()));
    }
    // Refuse an output kiln may not write before any work.
    outdir::check_output_file(&opts.out, opts.force)?;
    if opts.model.is_dir() {
        return Err(bad_option(format!(
            "{} is a directory: optimize rewrites GGUF files; compile a Hugging Face checkpoint directly \
             (build-model --model DIR --quant FORMAT)",
            opts.model.display()
        )));
    }
    let gguf = GgufFile::open(&opts.model).map_err(BuildError::Gguf)?;
    let stem = opts.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = frontend::model_name(&gguf, &stem).map_err(BuildError::Frontend)?;
    // The context only sizes a KV cache, which a GGUF does not hold: any valid one will do.
    let lowered = frontend::lower(&gguf, &name, 1).map_err(BuildError::Frontend)?;
    let hp = lowered.hyper.clone();
    let adapters = crate::bundle::read_adapters(&opts.lora, &hp)?;
    let release = |bytes: &[u8]| gguf.release(bytes);
    let mut model = Model::borrowed(lowered.graph, &lowered.weights).with_release(&release);
    let before = model.stats();
    let pipeline =
        PipelineOptions { prune: opts.prune.clone(), quant: opts.quant.clone(), lora: adapters, ..Default::default() };
    // The model passes read nothing of the target; any will do.
    let report = run_model_passes(&mut model, &pipeline).map_err(|e| match e {
        crate::passes::PassError::Verifier(e) => BuildError::Compile(CompileError::Verifier(e)),
        e => bad_option(e.to_string()),
    })?;
    let after = model.stats();
    let removed = match &opts.prune {
        Some(spec) => spec.resolve(hp.n_layers).map_err(bad_option)?,
        None => vec![],
    };
    let map = PruneSpec::layer_map(&removed, hp.n_layers);
    let file_type = opts.quant.default.as_deref().and_then(|q| file_type_of(&q.to_ascii_lowercase()));
    let (writer, data) = optimized_gguf(&gguf, &model, &hp.architecture, after.layers, &map, file_type)?;
    // Each tensor is written from where it is (the mapped source, or the passes' output) and
    // the source's pages released after it: no copy of the model is made.
    outdir::write_file_atomically(&opts.out, opts.force, |f| {
        writer.write_streaming(f, &mut |i, out| match data[i] {
            TensorData::Weight(w) => {
                out.write_all(&model.weight_bytes(w))?;
                model.release_weight(w);
                Ok(())
            }
            TensorData::Source(bytes) => {
                out.write_all(bytes)?;
                gguf.release(bytes);
                Ok(())
            }
        })
    })?;
    let out_file_bytes = std::fs::metadata(&opts.out).map(|m| m.len()).unwrap_or(0);
    Ok(OptimizeReport { before, after, notes: report.notes, source_file_bytes: gguf.file_len(), out_file_bytes })
}

/// Where the data of an optimized GGUF's tensor comes from.
#[derive(Clone, Copy, Debug)]
pub enum TensorData<'a> {
    /// A weight of the model (converted as it is written, when requantized).
    Weight(ir::WeightId),
    /// A tensor the frontend does not read, copied from the source.
    Source(&'a [u8]),
}

/// The GGUF of `model` (after the model passes) with the metadata of `source`, its tensors'
/// data to be written from `TensorData` ([`GgufWriter::write_streaming`]): see the module doc.
/// `map` is the block renumbering ([`PruneSpec::layer_map`]).
pub fn optimized_gguf<'a>(
    source: &'a GgufFile,
    model: &'a Model<'_>,
    architecture: &str,
    layers: u32,
    map: &[Option<u32>],
    file_type: Option<u32>,
) -> Result<(GgufWriter, Vec<TensorData<'a>>), BuildError> {
    let mut w = GgufWriter::new();
    let mut data = vec![];
    let block_count = format!("{architecture}.block_count");
    let mut has_file_type = false;
    for (key, value) in source.metadata() {
        let value = if key == block_count {
            MetaValue::U32(layers)
        } else if key == "general.file_type" {
            has_file_type = true;
            file_type.map_or_else(|| value.clone(), MetaValue::U32)
        } else {
            value.clone()
        };
        w.add_meta(key, value);
    }
    if let (false, Some(ft)) = (has_file_type, file_type) {
        w.add_meta("general.file_type", MetaValue::U32(ft));
    }
    let by_name: HashMap<&str, usize> =
        model.graph.weights.iter().enumerate().map(|(i, w)| (w.name.as_str(), i)).collect();
    let mut written = vec![false; model.graph.weights.len()];
    for info in &source.tensors {
        let Some(name) = renamed(&info.name, map) else { continue };
        match by_name.get(name.as_str()) {
            Some(&i) => {
                let weight = &model.graph.weights[i];
                let ty = GgmlType::from_id(weight.format.ggml_type()).expect("every kiln format is a ggml type");
                let id = ir::WeightId(i as u32);
                w.add_tensor_streamed(&name, &info.dims, ty, model.weight_len(id) as u64);
                data.push(TensorData::Weight(id));
                written[i] = true;
            }
            None => {
                let bytes = source.tensor_data(info);
                w.add_tensor_streamed(&name, &info.dims, info.ggml_type, bytes.len() as u64);
                data.push(TensorData::Source(bytes));
            }
        }
    }
    if let Some(i) = written.iter().position(|w| !w) {
        return Err(bad_option(format!(
            "internal error: weight {:?} has no tensor in the source file",
            model.graph.weights[i].name
        )));
    }
    Ok((w, data))
}
