//! LoRA factors of a [`Llama`]: for each adapted linear layer `W` (`[out, in]`), `A`
//! (`[rank, in]`) and `B` (`[out, rank]`), the layer becoming `W x + (alpha / rank) B A x`
//! (PEFT's `lora_alpha / r`). Kept transposed (`a: [in, rank]`, `b: [rank, out]`) for
//! `x.matmul(a).matmul(b)`. Initialized as PEFT does: `A` uniform in `±1/sqrt(in)`, `B` zero,
//! so training starts from the base model exactly.
//!
//! Written as a PEFT adapter directory, the format `build-model --lora` reads: tensors
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` in Hugging Face's row
//! order (query and key rows of `B` moved back from GGUF's interleaved rotary order), with
//! `N` the layer's number in the *source* model, since `merge_lora` runs before pruning.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::tensor::Tensor;

use super::llama::{matrix, values, Llama, Shape, Target};
use super::Rng;

/// One adapted layer.
pub struct LoraModule {
    /// The block's index in the model being trained.
    pub block: usize,
    /// The block's number in the source model.
    pub layer: u32,
    pub target: Target,
    /// `A` transposed, `[in, rank]`.
    pub a: Tensor<2>,
    /// `B` transposed, `[rank, out]`.
    pub b: Tensor<2>,
}

pub struct Lora {
    pub rank: usize,
    pub alpha: f32,
    pub scale: f32,
    pub targets: Vec<Target>,
    pub modules: Vec<LoraModule>,
    index: HashMap<(usize, Target), usize>,
}

/// The checks of a LoRA configuration against a model's shape.
pub fn check_rank(shape: &Shape, targets: &[Target], rank: usize) -> Result<()> {
    if rank == 0 {
        bail!("--rank 0: a LoRA rank must be at least 1");
    }
    for &t in targets {
        let (inp, out) = t.dims(shape);
        let width = inp.min(out);
        if rank > width {
            bail!(
                "--rank {rank} is larger than the width of {} ({width}): a LoRA rank must be below the layer's",
                t.peft_name()
            );
        }
    }
    Ok(())
}

impl Lora {
    /// Fresh factors for every block of `model` and each of `targets`.
    pub fn new(model: &Llama, targets: &[Target], rank: usize, alpha: f32, rng: &mut Rng) -> Result<Self> {
        check_rank(&model.shape, targets, rank)?;
        if !(alpha.is_finite() && alpha > 0.0) {
            bail!("--alpha {alpha} must be a positive number");
        }
        let mut modules = vec![];
        for (block, &layer) in model.layers.iter().enumerate() {
            for &target in targets {
                let (inp, out) = target.dims(&model.shape);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..inp * rank).map(|_| (rng.uniform()) * bound).collect();
                modules.push(LoraModule {
                    block,
                    layer,
                    target,
                    a: matrix(a, inp, rank, model.device()),
                    b: matrix(vec![0.0; rank * out], rank, out, model.device()),
                });
            }
        }
        Ok(Self::from_modules(rank, alpha, targets.to_vec(), modules))
    }

    /// Reads a PEFT (or llama.cpp GGUF) adapter into factors for `model`'s blocks, as
    /// `build-model --lora` would merge it: every update must name a block `model` has.
    pub fn from_adapter(model: &Llama, path: &Path) -> Result<Self> {
        let base = compiler::lora::BaseShape { n_heads: model.shape.n_heads, n_kv_heads: model.shape.n_kv_heads };
        let adapter = compiler::lora::read_adapter(path, base)?;
        let mut modules = vec![];
        let (mut rank, mut scale) = (None, None);
        let mut targets = vec![];
        for (name, u) in &adapter.updates {
            let parsed =
                name.strip_prefix("blk.").and_then(|r| r.strip_suffix(".weight")).and_then(|r| r.split_once('.'));
            let Some((layer, part)) = parsed else {
                bail!("{}: update of {name:?}, not a block's linear layer", path.display())
            };
            let layer: u32 = layer.parse().with_context(|| format!("{}: update of {name:?}", path.display()))?;
            let target = Target::ALL
                .into_iter()
                .find(|t| t.gguf_part() == part)
                .with_context(|| format!("{}: update of {name:?}, not a linear layer", path.display()))?;
            let block = model.layers.iter().position(|&l| l == layer).with_context(|| {
                format!("{}: updates block {layer}, which this model does not have", path.display())
            })?;
            let (inp, out) = target.dims(&model.shape);
            if (u.rows, u.cols) != (out, inp) {
                bail!("{}: {name} is {}x{}, the model's layer {out}x{inp}", path.display(), u.rows, u.cols);
            }
            if *rank.get_or_insert(u.rank) != u.rank || *scale.get_or_insert(u.scale) != u.scale {
                bail!("{}: updates of different ranks or scales", path.display());
            }
            targets.push(target);
            modules.push(LoraModule {
                block,
                layer,
                target,
                a: matrix(transpose(&u.a, u.rank, inp), inp, u.rank, model.device()),
                b: matrix(transpose(&u.b, out, u.rank), u.rank, out, model.device()),
            });
        }
        let (Some(rank), Some(scale)) = (rank, scale) else { bail!("{}: no updates", path.display()) };
        targets.sort();
        targets.dedup();
        let mut lora = Self::from_modules(rank, scale * rank as f32, targets, modules);
        lora.scale = scale;
        Ok(lora)
    }

    pub fn from_modules(rank: usize, alpha: f32, targets: Vec<Target>, modules: Vec<LoraModule>) -> Self {
        let index = modules.iter().enumerate().map(|(i, m)| ((m.block, m.target), i)).collect();
        Lora { rank, alpha, scale: alpha / rank as f32, targets, modules, index }
    }

    pub fn module(&self, block: usize, target: Target) -> Option<&LoraModule> {
        self.index.get(&(block, target)).map(|&i| &self.modules[i])
    }

    /// Every factor in order (`a` then `b` of each module).
    pub fn params(&self) -> Vec<Tensor<2>> {
        self.modules.iter().flat_map(|m| [m.a.clone(), m.b.clone()]).collect()
    }

    /// Replaces the factors by `params` (in [`Lora::params`] order).
    pub fn set_params(&mut self, params: Vec<Tensor<2>>) {
        assert_eq!(params.len(), 2 * self.modules.len());
        let mut it = params.into_iter();
        for m in &mut self.modules {
            m.a = it.next().unwrap();
            m.b = it.next().unwrap();
        }
    }

    /// The factors as autodiff leaves (fresh ones: any earlier graph is left behind).
    pub fn tracked(&self) -> Vec<Tensor<2>> {
        self.params().into_iter().map(|p| p.inner().autodiff().require_grad()).collect()
    }

    /// Number of trained values.
    pub fn n_params(&self) -> usize {
        self.modules.iter().map(|m| m.a.dims()[0] * m.a.dims()[1] + m.b.dims()[0] * m.b.dims()[1]).sum()
    }

    /// Writes the PEFT adapter files into `dir` (which exists): `adapter_config.json` with
    /// `extra` merged in, and `adapter_model.safetensors`.
    pub fn write_peft(&self, dir: &Path, shape: &Shape, extra: serde_json::Value) -> Result<()> {
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = vec![];
        for m in &self.modules {
            let (inp, out) = m.target.dims(shape);
            let a_t = values(&m.a)?; // [in, r]
            let b_t = values(&m.b)?; // [r, out]
            let a = transpose(&a_t, inp, self.rank); // [r, in]
            let mut b = transpose(&b_t, self.rank, out); // [out, r]
            let heads = match m.target {
                Target::Q => Some(shape.n_heads),
                Target::K => Some(shape.n_kv_heads),
                _ => None,
            };
            if let Some(h) = heads {
                b = compiler::lora::unpermute_rotary_rows(&b, out, self.rank, h).map_err(anyhow::Error::msg)?;
            }
            let prefix = format!("base_model.model.model.layers.{}.{}", m.layer, m.target.module_path());
            tensors.push((format!("{prefix}.lora_A.weight"), f32_bytes(&a), vec![self.rank, inp]));
            tensors.push((format!("{prefix}.lora_B.weight"), f32_bytes(&b), vec![out, self.rank]));
        }
        let mut layers: Vec<u32> = self.modules.iter().map(|m| m.layer).collect();
        layers.dedup();
        let mut config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "inference_mode": true,
            "target_modules": self.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
            "layers_to_transform": layers,
        });
        if let (Some(c), serde_json::Value::Object(e)) = (config.as_object_mut(), extra) {
            c.extend(e);
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let mut text = serde_json::to_vec_pretty(&config)?;
        text.push(b'\n');
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A row-major `[rows, cols]` matrix transposed.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes F32 tensors `(name, little-endian bytes, shape)` as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<u8>, Vec<usize>)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, d, s)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let bytes = safetensors::serialize(views, None)?;
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
