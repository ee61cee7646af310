//! LoRA adapters, read as untrusted input: a PEFT directory (`adapter_config.json` +
//! `adapter_model.safetensors`) or a llama.cpp GGUF LoRA adapter, into low-rank updates named
//! by the GGUF tensor they apply to. The `merge_lora` pass adds them: `W' = W + scale * B A`.
//!
//! PEFT adapters are trained on Hugging Face checkpoints, whose query and key projections keep
//! the two halves of each rotary pair in separate halves of the head, where GGUF interleaves
//! them (llama.cpp's converter permutes those rows); the rows of `B` of `q_proj` and `k_proj`
//! are permuted the same way here. GGUF adapters are already in GGUF order.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use sha2::{Digest, Sha256};

use crate::gguf::{GgmlType, GgufFile};

/// One low-rank update of a `[rows, cols]` weight: `delta = scale * B A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraUpdate {
    /// `A`: `[rank, cols]`, row-major.
    pub a: Vec<f32>,
    /// `B`: `[rows, rank]`, row-major, rows in GGUF order.
    pub b: Vec<f32>,
    pub rank: usize,
    pub rows: usize,
    pub cols: usize,
    pub scale: f32,
}

/// An adapter: updates by GGUF tensor name (`blk.3.attn_q.weight`).
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub path: PathBuf,
    /// SHA-256 of the adapter's files (config then tensors), for the build fingerprint.
    pub sha256: String,
    pub updates: BTreeMap<String, LoraUpdate>,
    /// Whether the adapter's own metadata (`adapter_config.json`'s `kiln.command`, written by
    /// `heal` and `finetune`) says kiln trained it against the compressed student, so that
    /// merging it before requantization would lose most of what it learned.
    pub trained_on_student: bool,
}

/// How `--lora` adapters are applied (`--lora-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraMode {
    /// Low-rank when every adapter was trained by kiln against the compressed student
    /// ([`Adapter::trained_on_student`]), else merged.
    #[default]
    Auto,
    /// Merged into the weights before pruning and requantization (`merge_lora`).
    Merge,
    /// Kept as low-rank matmuls beside the compressed weights (`attach_lora`).
    LowRank,
}

impl LoraMode {
    /// Whether `adapters` are kept low-rank.
    pub fn low_rank(self, adapters: &[std::sync::Arc<Adapter>]) -> bool {
        match self {
            LoraMode::Merge => false,
            LoraMode::LowRank => true,
            LoraMode::Auto => !adapters.is_empty() && adapters.iter().all(|a| a.trained_on_student),
        }
    }
}

/// What the reader needs to know of the base model: head counts, for the rotary row order.
#[derive(Clone, Copy, Debug)]
pub struct BaseShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
}

/// Why an adapter could not be read.
#[derive(Debug)]
pub struct LoraError {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for LoraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LoRA adapter {}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for LoraError {}

/// Largest adapter file read (adapters are small next to their models).
const MAX_FILE: u64 = 4 << 30;

fn err(path: &Path, message: impl Into<String>) -> LoraError {
    LoraError { path: path.to_owned(), message: message.into() }
}

/// Reads the adapter at `path`: a directory holding a PEFT adapter, or a GGUF LoRA file.
pub fn read_adapter(path: &Path, base: BaseShape) -> Result<Adapter, LoraError> {
    let meta = std::fs::metadata(path).map_err(|e| err(path, e.to_string()))?;
    if meta.is_dir() {
        read_peft(path, base)
    } else if meta.is_file() {
        read_gguf(path)
    } else {
        Err(err(path, "neither a PEFT adapter directory nor a GGUF file"))
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, LoraError> {
    let meta = std::fs::metadata(path).map_err(|e| err(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(err(path, "not a regular file"));
    }
    if meta.len() > MAX_FILE {
        return Err(err(path, format!("{} bytes: larger than any adapter kiln reads ({MAX_FILE})", meta.len())));
    }
    std::fs::read(path).map_err(|e| err(path, e.to_string()))
}

/// The GGUF name of a Hugging Face Llama module path (`model.layers.3.self_attn.q_proj`).
fn gguf_name(module: &str) -> Option<String> {
    if module == "lm_head" {
        return Some("output.weight".into());
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let part = match rest {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

fn read_peft(dir: &Path, base: BaseShape) -> Result<Adapter, LoraError> {
    let config_path = dir.join("adapter_config.json");
    let config_text = read_file(&config_path)?;
    let config: serde_json::Value =
        serde_json::from_slice(&config_text).map_err(|e| err(&config_path, format!("not valid JSON: {e}")))?;
    let cfg_err = |m: String| err(&config_path, m);
    let peft_type = config.get("peft_type").and_then(|v| v.as_str()).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(cfg_err(format!("peft_type {peft_type:?}: only LORA adapters can be merged")));
    }
    let rank = config.get("r").and_then(|v| v.as_u64()).ok_or_else(|| cfg_err("no integer \"r\" (the rank)".into()))?;
    let alpha =
        config.get("lora_alpha").and_then(|v| v.as_f64()).ok_or_else(|| cfg_err("no number \"lora_alpha\"".into()))?;
    if rank == 0 || rank > 65536 {
        return Err(cfg_err(format!("rank r = {rank} must be in 1..=65536")));
    }
    if !alpha.is_finite() {
        return Err(cfg_err(format!("lora_alpha {alpha} is not finite")));
    }
    for (key, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (transposed) weights")] {
        if config.get(key).and_then(|v| v.as_bool()) == Some(true) {
            return Err(cfg_err(format!("{what} adapters are not supported")));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if config.get(key).and_then(|v| v.as_object()).is_some_and(|o| !o.is_empty()) {
            return Err(cfg_err(format!("per-module \"{key}\" is not supported")));
        }
    }
    if let Some(bias) = config.get("bias").and_then(|v| v.as_str()) {
        if bias != "none" {
            return Err(cfg_err(format!(
                "bias {bias:?}: adapters that train biases are not supported (Llama has none)"
            )));
        }
    }
    let rslora = config.get("use_rslora").and_then(|v| v.as_bool()) == Some(true);
    let scale = if rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 } as f32;

    let st_path = dir.join("adapter_model.safetensors");
    let bytes = read_file(&st_path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err(&st_path, format!("not a valid safetensors file: {e}")))?;
    // Pairs of A and B by module path.
    let mut halves: BTreeMap<String, [Option<(Vec<f32>, usize, usize)>; 2]> = BTreeMap::new();
    for (name, view) in st.iter() {
        let clipped: String = name.chars().take(120).collect();
        let (module, which) = [(".lora_A.weight", 0), (".lora_B.weight", 1)]
            .iter()
            .find_map(|(suffix, i)| name.strip_suffix(suffix).map(|m| (m, *i)))
            .ok_or_else(|| err(&st_path, format!("tensor {clipped:?} is not a lora_A/lora_B weight")))?;
        let module = module.strip_prefix("base_model.model.").unwrap_or(module);
        let shape = view.shape();
        let [r, c] = shape[..] else {
            return Err(err(&st_path, format!("tensor {clipped:?} has shape {shape:?}, expected 2 dimensions")));
        };
        let values =
            to_f32(view.dtype(), view.data(), r * c).map_err(|m| err(&st_path, format!("tensor {clipped:?}: {m}")))?;
        halves.entry(module.to_owned()).or_default()[which] = Some((values, r, c));
    }
    if halves.is_empty() {
        return Err(err(&st_path, "holds no LoRA tensors"));
    }
    let mut updates = BTreeMap::new();
    for (module, [a, b]) in halves {
        let (Some((a, ar, ac)), Some((b, br, bc))) = (a, b) else {
            return Err(err(&st_path, format!("module {module:?} lacks its lora_A or lora_B")));
        };
        if ar != rank as usize || bc != rank as usize {
            return Err(err(
                &st_path,
                format!("module {module:?}: A is {ar}x{ac} and B {br}x{bc}, expected rank {rank}"),
            ));
        }
        let name = gguf_name(&module)
            .ok_or_else(|| err(&st_path, format!("module {module:?} is not a Llama projection kiln can merge")))?;
        let heads = if name.ends_with("attn_q.weight") {
            Some(base.n_heads)
        } else if name.ends_with("attn_k.weight") {
            Some(base.n_kv_heads)
        } else {
            None
        };
        let b = match heads {
            Some(h) => {
                permute_rotary_rows(&b, br, bc, h).map_err(|m| err(&st_path, format!("module {module:?}: {m}")))?
            }
            None => b,
        };
        updates.insert(name, LoraUpdate { a, b, rank: rank as usize, rows: br, cols: ac, scale });
    }
    let mut digest = Sha256::new();
    digest.update(&config_text);
    digest.update(&bytes);
    let trained_on_student = config
        .get("kiln")
        .and_then(|k| k.get("command"))
        .and_then(|c| c.as_str())
        .is_some_and(|c| c == "heal" || c == "finetune");
    Ok(Adapter { path: dir.to_owned(), sha256: format!("{:x}", digest.finalize()), updates, trained_on_student })
}

/// Rows of a `[rows, cols]` matrix from Hugging Face's rotary order (per head: the first
/// halves of all pairs, then the second halves) to GGUF's (pairs interleaved).
pub fn permute_rotary_rows<T: Copy + Default>(
    m: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Result<Vec<T>, String> {
    move_rotary_rows(m, rows, cols, heads, false)
}

/// The inverse of [`permute_rotary_rows`]: rows from GGUF's order back to Hugging Face's (what
/// a PEFT adapter written from a model in GGUF order holds).
pub fn unpermute_rotary_rows<T: Copy + Default>(
    m: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Result<Vec<T>, String> {
    move_rotary_rows(m, rows, cols, heads, true)
}

fn move_rotary_rows<T: Copy + Default>(
    m: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
    back: bool,
) -> Result<Vec<T>, String> {
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(format!("{rows} rows do not split into {heads} heads of rotary pairs"));
    }
    if m.len() != rows * cols {
        return Err(format!("{} values are not {rows} rows of {cols}", m.len()));
    }
    let half = rows / heads / 2;
    let mut out = vec![T::default(); m.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let (mut from, mut to) = (h * 2 * half + i * half + j, h * 2 * half + j * 2 + i);
                if back {
                    std::mem::swap(&mut from, &mut to);
                }
                out[to * cols..(to + 1) * cols].copy_from_slice(&m[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(out)
}

fn to_f32(dtype: safetensors::Dtype, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    use safetensors::Dtype;
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => return Err(format!("dtype {other:?}: expected F32, F16 or BF16")),
    };
    if data.len() != n * width {
        return Err(format!("{} bytes for {n} values of {dtype:?}", data.len()));
    }
    let values: Vec<f32> = match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is {}", values[i]));
    }
    Ok(values)
}

fn read_gguf(path: &Path) -> Result<Adapter, LoraError> {
    let gguf = GgufFile::open(path).map_err(|e| err(path, e.to_string()))?;
    match gguf.get_str("general.type") {
        Ok("adapter") => {}
        Ok(other) => return Err(err(path, format!("general.type is {other:?}, not \"adapter\""))),
        Err(_) => return Err(err(path, "not an adapter (no general.type = \"adapter\")")),
    }
    let kind = gguf.get_str("adapter.type").map_err(|e| err(path, e.to_string()))?;
    if kind != "lora" {
        return Err(err(path, format!("adapter.type {kind:?}: only \"lora\" adapters can be merged")));
    }
    let alpha = gguf.get_f32("adapter.lora.alpha").map_err(|e| err(path, e.to_string()))?;
    if !alpha.is_finite() {
        return Err(err(path, format!("adapter.lora.alpha {alpha} is not finite")));
    }
    let mut halves: BTreeMap<String, [Option<(Vec<f32>, usize, usize)>; 2]> = BTreeMap::new();
    for info in &gguf.tensors {
        let clipped: String = info.name.chars().take(120).collect();
        let (base, which) = [(".lora_a", 0), (".lora_b", 1)]
            .iter()
            .find_map(|(suffix, i)| info.name.strip_suffix(suffix).map(|m| (m, *i)))
            .ok_or_else(|| err(path, format!("tensor {clipped:?} is not a lora_a/lora_b tensor")))?;
        let [c, r] = info.dims[..] else {
            return Err(err(path, format!("tensor {clipped:?} has {} dimensions, expected 2", info.dims.len())));
        };
        let (r, c) = (r as usize, c as usize);
        let data = gguf.tensor_data(info);
        let values = match info.ggml_type {
            GgmlType::F32 => to_f32(safetensors::Dtype::F32, data, r * c),
            GgmlType::F16 => to_f32(safetensors::Dtype::F16, data, r * c),
            GgmlType::BF16 => to_f32(safetensors::Dtype::BF16, data, r * c),
            t => Err(format!("type {}: expected f32, f16 or bf16", t.name())),
        }
        .map_err(|m| err(path, format!("tensor {clipped:?}: {m}")))?;
        halves.entry(base.to_owned()).or_default()[which] = Some((values, r, c));
    }
    let mut updates = BTreeMap::new();
    for (name, [a, b]) in halves {
        let (Some((a, ar, ac)), Some((b, br, bc))) = (a, b) else {
            return Err(err(path, format!("tensor {name:?} lacks its lora_a or lora_b")));
        };
        if ar != bc || ar == 0 {
            return Err(err(path, format!("tensor {name:?}: lora_a is {ar}x{ac} and lora_b {br}x{bc}: ranks differ")));
        }
        // llama.cpp's rule: alpha 0 means no alpha scaling.
        let scale = if alpha == 0.0 { 1.0 } else { alpha / ar as f32 };
        updates.insert(name, LoraUpdate { a, b, rank: ar, rows: br, cols: ac, scale });
    }
    if updates.is_empty() {
        return Err(err(path, "holds no LoRA tensors"));
    }
    Ok(Adapter {
        path: path.to_owned(),
        sha256: format!("{:x}", Sha256::digest(gguf.bytes())),
        updates,
        trained_on_student: false,
    })
}

/// Writers of adapter files, for tests (kiln's own and the integration tests).
pub mod testing {
    use std::path::Path;

    use crate::gguf::{GgmlType, GgufWriter, MetaValue};

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Writes a PEFT adapter into `dir`: `modules` are Hugging Face module paths
    /// (`model.layers.0.self_attn.q_proj`) with `A` (`[r, cols]`) and `B` (`[rows, r]`) as
    /// `(a, b, rows, cols)`, stored as F32; `config` is the whole `adapter_config.json`.
    pub fn write_peft(
        dir: &Path,
        config: &serde_json::Value,
        r: usize,
        modules: &[(&str, &[f32], &[f32], usize, usize)],
    ) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let mut bufs = vec![];
        for (m, a, b, rows, cols) in modules {
            bufs.push((format!("base_model.model.{m}.lora_A.weight"), f32_bytes(a), vec![r, *cols]));
            bufs.push((format!("base_model.model.{m}.lora_B.weight"), f32_bytes(b), vec![*rows, r]));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
            .iter()
            .map(|(n, d, s)| {
                (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
            })
            .collect();
        std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    }

    /// A llama.cpp GGUF LoRA adapter: tensors `(gguf name, a, b, rows, cols, r)`, F32.
    pub fn gguf_adapter(alpha: f32, tensors: &[(&str, &[f32], &[f32], usize, usize, usize)]) -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.add_meta("general.architecture", MetaValue::String("llama".into()));
        w.add_meta("general.type", MetaValue::String("adapter".into()));
        w.add_meta("adapter.type", MetaValue::String("lora".into()));
        w.add_meta("adapter.lora.alpha", MetaValue::F32(alpha));
        for (name, a, b, rows, cols, r) in tensors {
            w.add_tensor(&format!("{name}.lora_a"), &[*cols as u64, *r as u64], GgmlType::F32, &f32_bytes(a));
            w.add_tensor(&format!("{name}.lora_b"), &[*r as u64, *rows as u64], GgmlType::F32, &f32_bytes(b));
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::testing::{gguf_adapter, write_peft};
    use super::*;

    const BASE: BaseShape = BaseShape { n_heads: 2, n_kv_heads: 1 };

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-lora-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + k).sin()).collect()
    }

    #[test]
    fn rotary_rows_go_from_split_halves_to_interleaved_pairs() {
        // Two heads of head_dim 4, one column: HF rows per head [x0, x1, y0, y1] -> [x0, y0, x1, y1].
        let m: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let p = permute_rotary_rows(&m, 8, 1, 2).unwrap();
        assert_eq!(p, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert!(permute_rotary_rows(&m, 8, 1, 3).is_err());
        // The way back, on a matrix of several columns and heads of head_dim 8.
        let m = seq(32 * 3, 0.5);
        let there = permute_rotary_rows(&m, 32, 3, 4).unwrap();
        assert_ne!(there, m);
        assert_eq!(unpermute_rotary_rows(&there, 32, 3, 4).unwrap(), m);
        assert!(unpermute_rotary_rows(&m, 32, 3, 5).is_err());
    }

    #[test]
    fn peft_adapters_read_with_their_scale_and_rotary_order() {
        let dir = scratch("peft");
        let (r, d, kv) = (2, 8, 4);
        let (qa, qb, ka, kb, ua, ub) =
            (seq(r * d, 0.1), seq(d * r, 0.2), seq(r * d, 0.3), seq(kv * r, 0.4), seq(r * d, 0.5), seq(16 * r, 0.6));
        let config = json!({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "up_proj"], "bias": "none"});
        write_peft(
            &dir,
            &config,
            r,
            &[
                ("model.layers.0.self_attn.q_proj", &qa, &qb, d, d),
                ("model.layers.1.self_attn.k_proj", &ka, &kb, kv, d),
                ("model.layers.1.mlp.up_proj", &ua, &ub, 16, d),
            ],
        );
        let a = read_adapter(&dir, BASE).unwrap();
        assert_eq!(
            a.updates.keys().collect::<Vec<_>>(),
            ["blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_up.weight"]
        );
        let q = &a.updates["blk.0.attn_q.weight"];
        assert_eq!((q.rows, q.cols, q.rank, q.scale), (d, d, r, 8.0));
        assert_eq!(q.a, qa);
        assert_eq!(q.b, permute_rotary_rows(&qb, d, r, 2).unwrap());
        assert_ne!(q.b, qb, "the permutation moved rows");
        assert_eq!(a.updates["blk.1.attn_k.weight"].b, permute_rotary_rows(&kb, kv, r, 1).unwrap());
        assert_eq!(a.updates["blk.1.ffn_up.weight"].b, ub, "non-rotary rows stay in order");
        // rsLoRA scales by alpha / sqrt(r).
        write_peft(
            &dir,
            &json!({"r": r, "lora_alpha": 16, "use_rslora": true}),
            r,
            &[("model.layers.1.mlp.up_proj", &ua, &ub, 16, d)],
        );
        assert_eq!(read_adapter(&dir, BASE).unwrap().updates["blk.1.ffn_up.weight"].scale, 16.0 / 2f32.sqrt());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Adapters `heal` and `finetune` wrote (their config's `kiln.command`) are kept low-rank
    /// by default; any other adapter, or a mix, is merged; an explicit mode wins.
    #[test]
    fn the_default_mode_follows_what_trained_the_adapter() {
        let dir = scratch("mode");
        let (r, d) = (2, 8);
        let (a, b) = (seq(r * d, 0.1), seq(d * r, 0.2));
        let module = [("model.layers.0.mlp.up_proj", &a[..], &b[..], d, d)];
        let read = |name: &str, config: serde_json::Value| {
            let at = dir.join(name);
            write_peft(&at, &config, r, &module);
            std::sync::Arc::new(read_adapter(&at, BASE).unwrap())
        };
        let healed = read("healed", json!({"r": r, "lora_alpha": 4, "kiln": {"command": "heal", "quant": "q3_g64"}}));
        let tuned = read("tuned", json!({"r": r, "lora_alpha": 4, "kiln": {"command": "finetune"}}));
        let plain = read("plain", json!({"r": r, "lora_alpha": 4}));
        let other = read("other", json!({"r": r, "lora_alpha": 4, "kiln": {"command": "export"}}));
        assert!(healed.trained_on_student && tuned.trained_on_student);
        assert!(!plain.trained_on_student && !other.trained_on_student);
        assert!(LoraMode::Auto.low_rank(&[healed.clone(), tuned.clone()]));
        assert!(!LoraMode::Auto.low_rank(&[healed.clone(), plain.clone()]));
        assert!(!LoraMode::Auto.low_rank(&[other]) && !LoraMode::Auto.low_rank(&[]));
        assert!(!LoraMode::Merge.low_rank(&[healed]) && LoraMode::LowRank.low_rank(&[plain]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_peft_adapters_are_refused_with_a_reason() {
        let dir = scratch("bad-peft");
        let (r, d) = (2, 8);
        let (a, b) = (seq(r * d, 0.1), seq(d * r, 0.2));
        let good = json!({"r": r, "lora_alpha": 16});
        let cases: Vec<(serde_json::Value, &str, &str)> = vec![
            (json!({"lora_alpha": 16}), "model.layers.0.self_attn.q_proj", "\"r\""),
            (json!({"r": 0, "lora_alpha": 16}), "model.layers.0.self_attn.q_proj", "rank"),
            (json!({"r": r, "lora_alpha": 16, "use_dora": true}), "model.layers.0.self_attn.q_proj", "DoRA"),
            (
                json!({"r": r, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}}),
                "model.layers.0.self_attn.q_proj",
                "rank_pattern",
            ),
            (json!({"r": r, "lora_alpha": 16, "bias": "all"}), "model.layers.0.self_attn.q_proj", "bias"),
            (json!({"r": 3, "lora_alpha": 16}), "model.layers.0.self_attn.q_proj", "expected rank 3"),
            (good.clone(), "model.layers.0.self_attn.rotary_emb", "not a Llama projection"),
            (json!({"r": r, "lora_alpha": 16, "peft_type": "IA3"}), "model.layers.0.self_attn.q_proj", "IA3"),
        ];
        for (config, module, want) in cases {
            write_peft(&dir, &config, r, &[(module, &a, &b, d, d)]);
            let e = read_adapter(&dir, BASE).expect_err(want).to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        // Malformed files.
        write_peft(&dir, &good, r, &[("model.layers.0.self_attn.q_proj", &a, &b, d, d)]);
        std::fs::write(dir.join("adapter_model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let e = read_adapter(&dir, BASE).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
        std::fs::write(dir.join("adapter_config.json"), b"{ not json").unwrap();
        assert!(read_adapter(&dir, BASE).unwrap_err().to_string().contains("not valid JSON"));
        std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
        assert!(read_adapter(&dir, BASE).unwrap_err().to_string().contains("adapter_config.json"));
        // A non-finite value.
        let mut nan = a.clone();
        nan[3] = f32::NAN;
        write_peft(&dir, &good, r, &[("model.layers.0.self_attn.q_proj", &nan, &b, d, d)]);
        assert!(read_adapter(&dir, BASE).unwrap_err().to_string().contains("NaN"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gguf_adapters_read_as_llama_cpp_scales_them() {
        let dir = scratch("gguf");
        std::fs::create_dir_all(&dir).unwrap();
        let (r, d) = (4, 8);
        let (a, b) = (seq(r * d, 0.1), seq(16 * r, 0.2));
        let path = dir.join("adapter.gguf");
        std::fs::write(&path, gguf_adapter(8.0, &[("blk.0.ffn_up.weight", &a, &b, 16, d, r)])).unwrap();
        let ad = read_adapter(&path, BASE).unwrap();
        let u = &ad.updates["blk.0.ffn_up.weight"];
        assert_eq!((u.rows, u.cols, u.rank, u.scale), (16, d, r, 2.0));
        assert_eq!((&u.a, &u.b), (&a, &b), "GGUF adapters are already in GGUF order");
        // alpha 0 means scale 1 in llama.cpp.
        std::fs::write(&path, gguf_adapter(0.0, &[("blk.0.ffn_up.weight", &a, &b, 16, d, r)])).unwrap();
        assert_eq!(read_adapter(&path, BASE).unwrap().updates["blk.0.ffn_up.weight"].scale, 1.0);
        // A model file is not an adapter; a missing half is named.
        let mut w = crate::gguf::GgufWriter::new();
        w.add_meta("general.type", crate::gguf::MetaValue::String("model".into()));
        std::fs::write(&path, w.finish()).unwrap();
        assert!(read_adapter(&path, BASE).unwrap_err().to_string().contains("not \"adapter\""));
        let mut bytes = gguf_adapter(8.0, &[("blk.0.ffn_up.weight", &a, &b, 16, d, r)]);
        bytes.truncate(bytes.len() - 8);
        std::fs::write(&path, bytes).unwrap();
        assert!(read_adapter(&path, BASE).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
