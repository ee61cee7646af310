//! A Hugging Face checkpoint directory as a model source: `config.json`, the weights in one
//! `model.safetensors` or in shards listed by `model.safetensors.index.json` (F32, F16 or
//! BF16), and `tokenizer.json` with `tokenizer_config.json` (special tokens, chat template;
//! or `chat_template.jinja`) and `generation_config.json` (end-of-turn ids) when present.
//!
//! Every file is untrusted. Files are opened through [`ModelDir`]: resolved (links followed)
//! and required to lie in the directory, or in the Hugging Face cache repository it is a
//! snapshot of; regular files, their sizes bounded before anything is allocated. Shard names
//! in the index must be plain `.safetensors` file names. Shards are mapped, not read: each
//! shard's header is validated against the file's length by the `safetensors` crate before any
//! tensor is looked at (nothing else of the file is touched), the shards together may hold no
//! more than a model of the config's size can need ([`max_weight_bytes`]), and every tensor's
//! dtype and shape is checked against the config. Hugging Face stores `q_proj`/`k_proj` rows per head as two
//! halves (rotate-half); kiln's kernels, like GGUF, want the pairs interleaved, so those two
//! are reordered here (the inverse of llama.cpp's `convert_hf_to_gguf.py` permutation).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ir::{QuantFormat, RopeScaling};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::frontend::{bad, FrontendError, Hyperparameters};
use crate::source::files::{max_weight_bytes, Mapped, ModelDir, MAX_TEXT_BYTES};
use crate::source::{stop_ids, ModelSource, SourceTensor, TokenizerSpec};

/// The architectures (`config.json` `architectures`) kiln lowers.
const ARCHITECTURES: &[&str] = &["LlamaForCausalLM"];

/// Where one tensor lives.
struct Entry {
    shard: usize,
    dtype: ::safetensors::Dtype,
    /// As stored, outermost first.
    shape: Vec<u64>,
    /// Byte range in the shard's file.
    range: std::ops::Range<usize>,
}

/// An opened checkpoint: its files read (shards mapped) and validated, tensors indexed by name.
pub struct HfCheckpoint {
    dir: PathBuf,
    config: Value,
    /// Shard file names and their mapped bytes.
    shards: Vec<(String, Mapped)>,
    tensors: BTreeMap<String, Entry>,
    /// Every file read, by name, for the digest.
    files: BTreeMap<String, Vec<u8>>,
}

fn err(file: impl AsRef<Path>, reason: impl Into<String>) -> FrontendError {
    FrontendError::Checkpoint { file: file.as_ref().display().to_string(), reason: reason.into() }
}

/// The JSON object in the file `name` of `dir`, if it exists.
pub(crate) fn read_json_file(dir: &ModelDir, name: &str) -> Result<Option<Value>, FrontendError> {
    dir.read(name, MAX_TEXT_BYTES)?.map(|b| read_json(&dir.path(name), &b)).transpose()
}

fn read_json(path: &Path, bytes: &[u8]) -> Result<Value, FrontendError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| err(path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(err(path, "not a JSON object"));
    }
    Ok(v)
}

/// The Hugging Face name and rotary head count (for `q_proj`/`k_proj`) of kiln's tensor `name`.
fn hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let module = match rest {
        "attn_norm.weight" => "input_layernorm",
        "attn_q.weight" => "self_attn.q_proj",
        "attn_k.weight" => "self_attn.k_proj",
        "attn_v.weight" => "self_attn.v_proj",
        "attn_output.weight" => "self_attn.o_proj",
        "ffn_norm.weight" => "post_attention_layernorm",
        "ffn_gate.weight" => "mlp.gate_proj",
        "ffn_up.weight" => "mlp.up_proj",
        "ffn_down.weight" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.weight"))
}

impl HfCheckpoint {
    /// Reads the checkpoint in `dir` (see the module doc); nothing is written.
    pub fn open(dir: &Path) -> Result<Self, FrontendError> {
        let root = ModelDir::new(dir)?;
        let mut files = BTreeMap::new();
        let config_path = dir.join("config.json");
        let config_bytes = root.read("config.json", MAX_TEXT_BYTES)?.ok_or_else(|| {
            err(
                &config_path,
                "missing: a Hugging Face checkpoint directory holds config.json (and kiln reads GGUF files)",
            )
        })?;
        let config = read_json(&config_path, &config_bytes)?;
        files.insert("config.json".to_string(), config_bytes);
        let archs: Vec<&str> = config
            .get("architectures")
            .and_then(Value::as_array)
            .map_or(vec![], |a| a.iter().filter_map(Value::as_str).collect());
        if !archs.iter().any(|a| ARCHITECTURES.contains(a)) {
            let found = match (archs.first(), config.get("model_type").and_then(Value::as_str)) {
                (Some(a), _) => crate::gguf::clip(a),
                (None, Some(t)) => format!("model_type {}", crate::gguf::clip(t)),
                (None, None) => "none".to_string(),
            };
            return Err(err(
                &config_path,
                format!("architecture {found:?} is not supported (kiln reads {})", ARCHITECTURES.join(", ")),
            ));
        }

        // The shards: from the index, or the one file.
        let index_path = dir.join("model.safetensors.index.json");
        let mut weight_map: Option<BTreeMap<String, String>> = None;
        let shard_names: Vec<String> = match root.read("model.safetensors.index.json", MAX_TEXT_BYTES)? {
            Some(bytes) => {
                let index = read_json(&index_path, &bytes)?;
                files.insert("model.safetensors.index.json".to_string(), bytes);
                let map = index
                    .get("weight_map")
                    .and_then(Value::as_object)
                    .ok_or_else(|| err(&index_path, "has no weight_map object"))?;
                let mut names = BTreeMap::new();
                for (tensor, file) in map {
                    let file = file
                        .as_str()
                        .ok_or_else(|| err(&index_path, format!("weight_map[{tensor:?}] is not a file name")))?;
                    let plain = !file.is_empty()
                        && Path::new(file).file_name().is_some_and(|f| f == file)
                        && file.ends_with(".safetensors");
                    if !plain {
                        return Err(err(
                            &index_path,
                            format!(
                                "weight_map[{tensor:?}] = {:?} is not a .safetensors file name in the checkpoint directory",
                                crate::gguf::clip(file)
                            ),
                        ));
                    }
                    names.insert(tensor.clone(), file.to_string());
                }
                let mut shards: Vec<String> = names.values().cloned().collect();
                shards.sort();
                shards.dedup();
                weight_map = Some(names);
                shards
            }
            None => vec!["model.safetensors".to_string()],
        };
        let mut shards = vec![];
        let mut tensors = BTreeMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let bytes = root.map(name)?.ok_or_else(|| match &weight_map {
                Some(_) => err(&path, "missing: model.safetensors.index.json names this shard"),
                None => {
                    err(&path, "missing: the checkpoint has neither model.safetensors nor model.safetensors.index.json")
                }
            })?;
            // Validates the header: offsets in order, inside the file, matching dtype and shape,
            // the data ending where the file does. Reads the header only.
            let st = ::safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| err(&path, format!("not a valid safetensors file ({} bytes): {e}", bytes.len())))?;
            let base = bytes.as_ptr() as usize;
            for (tensor, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    shard: i,
                    dtype: view.dtype(),
                    shape: view.shape().iter().map(|&d| d as u64).collect(),
                    range: start..start + view.data().len(),
                };
                if let Some(map) = &weight_map {
                    if map.get(&tensor) != Some(name) {
                        return Err(err(
                            &path,
                            format!("holds tensor {tensor:?}, which model.safetensors.index.json does not place here"),
                        ));
                    }
                }
                if tensors.insert(tensor.clone(), entry).is_some() {
                    return Err(err(&path, format!("tensor {tensor:?} is stored twice")));
                }
            }
            shards.push((name.clone(), bytes));
        }
        if let Some(map) = &weight_map {
            if let Some((tensor, file)) = map.iter().find(|(t, _)| !tensors.contains_key(*t)) {
                return Err(err(
                    dir.join(file),
                    format!("does not hold tensor {tensor:?}, which the index places there"),
                ));
            }
        }
        read_tokenizer_files(&root, &mut files)?;
        let checkpoint = HfCheckpoint { dir: dir.to_path_buf(), config, shards, tensors, files };
        checkpoint.check_weight_bytes()?;
        Ok(checkpoint)
    }

    /// The shards hold no more than the config's model can need ([`max_weight_bytes`]): every
    /// byte of them is hashed.
    fn check_weight_bytes(&self) -> Result<(), FrontendError> {
        let limit = max_weight_bytes(&self.hyperparameters()?);
        let total = self.shards.iter().fold(0u64, |n, (_, b)| n.saturating_add(b.len() as u64));
        if total <= limit {
            return Ok(());
        }
        let largest = self.tensors.iter().max_by_key(|(_, e)| e.range.len());
        let (file, what) = match largest {
            Some((name, e)) => (
                self.shards[e.shard].0.as_str(),
                format!("; the largest tensor is {:?} ({} bytes)", crate::gguf::clip(name), e.range.len()),
            ),
            None => (self.shards[0].0.as_str(), String::new()),
        };
        Err(err(
            self.path(file),
            format!(
                "the shards hold {total} bytes, more than a model of config.json's size can need \
                 ({limit}: its weights in F32, an eighth more and 64 MiB){what}"
            ),
        ))
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A `config.json` integer that fits in u32, or `default` when absent or null.
    fn config_u32(&self, key: &str, default: Option<u32>) -> Result<u32, FrontendError> {
        let key_name = format!("config.json {key}");
        match self.config.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| err(self.path("config.json"), format!("has no {key}"))),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(&key_name, v, "must be a non-negative integer below 2^32")),
        }
    }

    fn config_f32(&self, key: &str, default: f32) -> Result<f32, FrontendError> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => {
                v.as_f64().map(|x| x as f32).ok_or_else(|| bad(&format!("config.json {key}"), v, "must be a number"))
            }
        }
    }

    /// `rope_scaling`: absent or null, or `rope_type` (or the older `type`) `llama3` (with
    /// `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`) or
    /// `linear` (with `factor`), as transformers reads them; anything else is refused naming
    /// the key.
    fn rope_scaling(&self) -> Result<RopeScaling, FrontendError> {
        let Some(scaling) = self.config.get("rope_scaling").filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let Some(map) = scaling.as_object() else {
            return Err(bad("config.json rope_scaling", scaling, "must be an object"));
        };
        let (type_key, kind) = match (map.get("rope_type"), map.get("type")) {
            (Some(t), _) => ("rope_type", t),
            (None, Some(t)) => ("type", t),
            (None, None) => {
                return Err(bad("config.json rope_scaling", scaling, "has no rope_type"));
            }
        };
        let number = |field: &str| -> Result<f64, FrontendError> {
            let key = format!("config.json rope_scaling.{field}");
            let v = map.get(field).ok_or_else(|| bad(&key, "(missing)", "is required"))?;
            v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| bad(&key, v, "must be a positive number"))
        };
        match kind.as_str() {
            Some("default") => Ok(RopeScaling::None),
            Some("linear") => Ok(RopeScaling::Linear { factor: number("factor")? as f32 }),
            Some("llama3") => {
                let original = number("original_max_position_embeddings")?;
                if original.fract() != 0.0 || original > u32::MAX as f64 {
                    return Err(bad(
                        "config.json rope_scaling.original_max_position_embeddings",
                        original,
                        "must be a whole number of positions",
                    ));
                }
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                if low >= high {
                    return Err(bad(
                        "config.json rope_scaling.low_freq_factor",
                        low,
                        &format!("must be below high_freq_factor ({high})"),
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: number("factor")? as f32,
                    low_freq_factor: low as f32,
                    high_freq_factor: high as f32,
                    original_context: original as u32,
                })
            }
            _ => Err(bad(
                &format!("config.json rope_scaling.{type_key}"),
                kind,
                "kiln supports rope scaling llama3 and linear",
            )),
        }
    }

    fn config_bool(&self, key: &str, default: bool) -> Result<bool, FrontendError> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| bad(&format!("config.json {key}"), v, "must be true or false")),
        }
    }
}

/// A JSON file of `files` (read from `dir`), parsed, if present.
fn json_file(dir: &Path, files: &BTreeMap<String, Vec<u8>>, name: &str) -> Result<Option<Value>, FrontendError> {
    files.get(name).map(|b| read_json(&dir.join(name), b)).transpose()
}

/// The config key that holds the field GGUF calls `suffix` (for messages).
fn config_key(suffix: &str) -> String {
    let key = match suffix {
        "block_count" => "num_hidden_layers",
        "embedding_length" => "hidden_size",
        "feed_forward_length" => "intermediate_size",
        "attention.head_count" => "num_attention_heads",
        "attention.head_count_kv" => "num_key_value_heads",
        "rope.freq_base" => "rope_theta",
        "rope.scaling.factor" => "rope_scaling",
        "attention.layer_norm_rms_epsilon" => "rms_norm_eps",
        other => other,
    };
    format!("config.json {key}")
}

/// The text of a special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("content").and_then(Value::as_str))
}

/// Token ids in a config: one integer or a list of them.
fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).filter_map(|x| u32::try_from(x).ok()).collect(),
        Some(x) => x.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        None => vec![],
    }
}

impl ModelSource for HfCheckpoint {
    fn kind(&self) -> &'static str {
        "safetensors"
    }

    fn hyperparameters(&self) -> Result<Hyperparameters, FrontendError> {
        let n_heads = self.config_u32("num_attention_heads", None)?;
        let d_model = self.config_u32("hidden_size", None)?;
        let hp = Hyperparameters {
            architecture: "llama".into(),
            n_layers: self.config_u32("num_hidden_layers", None)?,
            d_model,
            d_ff: self.config_u32("intermediate_size", None)?,
            n_heads,
            n_kv_heads: self.config_u32("num_key_value_heads", Some(n_heads))?,
            head_dim: d_model.checked_div(n_heads).unwrap_or(0),
            vocab: self.config_u32("vocab_size", None)?,
            rope_theta: self.config_f32("rope_theta", 10000.0)?,
            rope_scaling: self.rope_scaling()?,
            // LlamaConfig's defaults.
            rms_eps: self.config_f32("rms_norm_eps", 1e-6)?,
            train_context: self.config_u32("max_position_embeddings", Some(2048))?,
            tied_embedding: self.config_bool("tie_word_embeddings", false)?,
        };
        hp.check(config_key)?;
        if hp.vocab == 0 {
            return Err(bad("config.json vocab_size", 0, "must be at least 1"));
        }
        if let Some(v) = self.config.get("head_dim").filter(|v| !v.is_null()) {
            if v.as_u64() != Some(hp.head_dim as u64) {
                return Err(bad("config.json head_dim", v, "kiln needs hidden_size / num_attention_heads"));
            }
        }
        if let Some(v) = self.config.get("hidden_act").filter(|v| v.as_str() != Some("silu")) {
            return Err(bad("config.json hidden_act", v, "kiln's Llama MLP is SwiGLU (silu)"));
        }
        for key in ["attention_bias", "mlp_bias"] {
            if self.config_bool(key, false)? {
                return Err(bad(&format!("config.json {key}"), true, "biases are not supported"));
            }
        }
        Ok(hp)
    }

    fn declared_name(&self) -> Result<Option<String>, FrontendError> {
        // `_name_or_path` is often a path on the machine that saved it: the directory's name is used.
        Ok(None)
    }

    fn tensor(&self, name: &str, dims: &[u64]) -> Result<SourceTensor<'_>, FrontendError> {
        let hf = hf_name(name)
            .ok_or_else(|| err(&self.dir, format!("kiln has no Hugging Face name for tensor {name:?}")))?;
        let entry = self.tensors.get(&hf).ok_or_else(|| {
            let file = if self.files.contains_key("model.safetensors.index.json") {
                "model.safetensors.index.json"
            } else {
                "model.safetensors"
            };
            err(self.path(file), format!("has no tensor {hf:?}"))
        })?;
        let (shard, bytes) = &self.shards[entry.shard];
        let path = self.path(shard);
        let expected: Vec<u64> = dims.iter().rev().copied().collect();
        if entry.shape != expected {
            return Err(err(
                &path,
                format!("tensor {hf:?} has shape {:?}, but config.json requires {expected:?}", entry.shape),
            ));
        }
        use ::safetensors::Dtype;
        let (format, width) = match entry.dtype {
            Dtype::F32 => (QuantFormat::F32, 4),
            Dtype::F16 => (QuantFormat::F16, 2),
            Dtype::BF16 => (QuantFormat::BF16, 2),
            other => {
                return Err(err(&path, format!("tensor {hf:?} has dtype {other:?}; kiln reads F32, F16 and BF16")))
            }
        };
        let data = &bytes[entry.range.clone()];
        let heads = match name.rsplit_once('.').map(|(n, _)| n.rsplit('.').next()) {
            Some(Some("attn_q")) => Some(self.hyperparameters()?.n_heads),
            Some(Some("attn_k")) => Some(self.hyperparameters()?.n_kv_heads),
            _ => None,
        };
        let bytes = match heads {
            None => data.into(),
            Some(heads) => {
                let (rows, row_bytes) = (expected[0] as usize, expected[1] as usize * width);
                crate::lora::permute_rotary_rows(data, rows, row_bytes, heads as usize)
                    .map_err(|m| err(&path, format!("tensor {hf:?}: {m}")))?
                    .into()
            }
        };
        Ok(SourceTensor { format, bytes })
    }

    fn tokenizer(&self) -> Result<TokenizerSpec, FrontendError> {
        tokenizer_spec(&self.dir, &self.files, &self.config)
    }

    fn context_key(&self) -> String {
        "config.json max_position_embeddings".into()
    }

    fn sha256(&self) -> String {
        let mut h = Sha256::new();
        let files = self.files.iter().map(|(n, b)| (n.as_str(), b.as_slice()));
        for (name, bytes) in files.chain(self.shards.iter().map(|(n, b)| (n.as_str(), &b[..]))) {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            for chunk in bytes.chunks(crate::source::HASH_CHUNK) {
                h.update(chunk);
                self.release(chunk);
            }
        }
        format!("{:x}", h.finalize())
    }

    fn release(&self, bytes: &[u8]) {
        self.shards.iter().for_each(|(_, m)| m.release(bytes));
    }
}

/// Parses a `tokenizer.json` with the `tokenizers` crate, first refusing what makes its parser
/// panic rather than fail: malformed JSON (its decoder and normalizer parsers `expect` their
/// part to be well formed) and a `Precompiled` normalizer whose fields do not parse.
fn parse_tokenizer(json: &str) -> Result<tokenizers::Tokenizer, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    fn precompiled_ok(v: &Value) -> Result<(), String> {
        match v {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("Precompiled") => {
                serde_json::from_value::<tokenizers::normalizers::Precompiled>(v.clone())
                    .map(drop)
                    .map_err(|e| format!("bad Precompiled normalizer: {e}"))
            }
            Value::Object(o) => o.values().try_for_each(precompiled_ok),
            Value::Array(a) => a.iter().try_for_each(precompiled_ok),
            _ => Ok(()),
        }
    }
    precompiled_ok(value.get("normalizer").unwrap_or(&Value::Null))?;
    // Two tokens of one id: which one the id decodes to depends on a hash map's order, so
    // two loads of the file (the build's, the runtime's) could disagree.
    if let Some(vocab) = value.pointer("/model/vocab").and_then(Value::as_object) {
        let mut seen = std::collections::HashMap::new();
        for (token, id) in vocab {
            if let Some(other) = id.as_u64().and_then(|id| seen.insert(id, token)) {
                return Err(format!(
                    "the model's vocab gives id {id} to both {:?} and {:?}",
                    crate::gguf::clip(other),
                    crate::gguf::clip(token)
                ));
            }
        }
    }
    json.parse().map_err(|e: tokenizers::Error| e.to_string())
}

/// Reads the tokenizer files a Hugging Face directory may hold (`tokenizer.json`,
/// `tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`) into `files`.
pub(crate) fn read_tokenizer_files(dir: &ModelDir, files: &mut BTreeMap<String, Vec<u8>>) -> Result<(), FrontendError> {
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"] {
        if let Some(bytes) = dir.read(name, MAX_TEXT_BYTES)? {
            files.insert(name.to_string(), bytes);
        }
    }
    Ok(())
}

/// The tokenizer of a Hugging Face directory `dir` from its files (read by
/// [`read_tokenizer_files`]) and its `config` (`config.json`; null when there is none).
pub(crate) fn tokenizer_spec(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    config: &Value,
) -> Result<TokenizerSpec, FrontendError> {
    let path = dir.join("tokenizer.json");
    let json = files.get("tokenizer.json").ok_or_else(|| err(&path, "missing"))?;
    let json = String::from_utf8(json.clone()).map_err(|_| err(&path, "not UTF-8"))?;
    let tokenizer =
        parse_tokenizer(&json).map_err(|e| err(&path, format!("not a tokenizer kiln's runtime can load: {e}")))?;
    let tok_config = json_file(dir, files, "tokenizer_config.json")?.unwrap_or(Value::Null);
    let generation = json_file(dir, files, "generation_config.json")?.unwrap_or(Value::Null);
    // A special token: its text in tokenizer_config.json, else its id in config.json.
    // A special token: its text in tokenizer_config.json, else its id in config.json; either
    // way the vocabulary must map the text to the id and back (a tokenizer.json that gives one
    // id two texts would make the chat template's token and the prompt's id differ).
    let special = |which: &str| -> Result<(u32, String), FrontendError> {
        let (id, text) = if let Some(text) = tok_config.get(format!("{which}_token")).and_then(token_text) {
            let id = tokenizer.token_to_id(text).ok_or_else(|| {
                err(dir.join("tokenizer_config.json"), format!("{which}_token {text:?} is not in tokenizer.json"))
            })?;
            (id, text.to_string())
        } else {
            let key = format!("{which}_token_id");
            let id = ids(config.get(&key)).first().copied().ok_or_else(|| {
                err(dir.join("config.json"), format!("names no {key} (and tokenizer_config.json no {which}_token)"))
            })?;
            let text = tokenizer
                .id_to_token(id)
                .ok_or_else(|| err(dir.join("config.json"), format!("{key} {id} is not in tokenizer.json")))?;
            (id, text)
        };
        let (back_text, back_id) = (tokenizer.id_to_token(id), tokenizer.token_to_id(&text));
        if back_text.as_deref() != Some(text.as_str()) || back_id != Some(id) {
            return Err(err(
                &path,
                format!(
                    "inconsistent: {which} token {:?} has id {back_id:?}, and id {id} is {:?}",
                    crate::gguf::clip(&text),
                    back_text.as_deref().map(crate::gguf::clip)
                ),
            ));
        }
        Ok((id, text))
    };
    let bos = special("bos")?;
    let eos = special("eos")?;
    let add_bos = match tok_config.get("add_bos_token") {
        // As transformers' fast tokenizer does then: whatever tokenizer.json's post-processor
        // adds (Llama 3's TemplateProcessing puts <|begin_of_text|> first; ByteLevel nothing).
        None | Some(Value::Null) => tokenizer
            .encode("a", true)
            .map_err(|e| err(&path, format!("cannot encode with the post-processor: {e}")))?
            .get_ids()
            .first()
            .is_some_and(|&id| id == bos.0),
        Some(v) => {
            v.as_bool().ok_or_else(|| err(dir.join("tokenizer_config.json"), "add_bos_token is not a boolean"))?
        }
    };
    let chat_template = match files.get("chat_template.jinja") {
        Some(b) => Some(String::from_utf8(b.clone()).map_err(|_| err(dir.join("chat_template.jinja"), "not UTF-8"))?),
        None => match tok_config.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            // A list of named templates: the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            Some(_) => return Err(err(dir.join("tokenizer_config.json"), "chat_template is neither text nor a list")),
        },
    };
    let mut ends = vec![eos.0];
    ends.extend(ids(generation.get("eos_token_id")));
    ends.extend(ids(config.get("eos_token_id")));
    let stop_ids = stop_ids(ends, |t| tokenizer.token_to_id(t));
    Ok(TokenizerSpec { json, bos, eos, add_bos, chat_template, stop_ids })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str = r#"{"version": "1.0", "added_tokens": [], "normalizer": NORM,
        "pre_tokenizer": null, "post_processor": null, "decoder": DEC,
        "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1}, "unk_token": "<s>"}}"#;

    fn spec(normalizer: &str, decoder: &str) -> Result<TokenizerSpec, FrontendError> {
        let json = TOKENIZER.replace("NORM", normalizer).replace("DEC", decoder);
        let files = BTreeMap::from([("tokenizer.json".to_string(), json.into_bytes())]);
        let config = serde_json::json!({"bos_token_id": 0, "eos_token_id": 1});
        tokenizer_spec(Path::new("dir"), &files, &config)
    }

    /// Tokenizer files the `hf_checkpoint` fuzz target found (the `tokenizers` parser
    /// panicked on them, their special token had two ids, two tokens had one id) are errors.
    #[test]
    fn bad_tokenizer_json_is_an_error() {
        assert_eq!(spec("null", "null").unwrap().eos, (1, "</s>".to_string()));
        let e = spec("null", r#"{"type": "ByteLevel", "x": tru}"#).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("expected"), "{e}");
        // Two ids of one text: the special token's text and id must map to each other.
        // (an added token missing from the model's vocabulary gets the id of the vocabulary's
        // size, here 3, which a token of the vocabulary has)
        let added = r#""added_tokens": [
            {"id": 0, "content": "<e>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 3, "content": "<x>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}]"#;
        let json = TOKENIZER
            .replace("NORM", "null")
            .replace("DEC", "null")
            .replace(r#""added_tokens": []"#, added)
            .replace(r#""<s>": 0, "</s>": 1"#, r#""<s>": 0, "</s>": 1, "<x>": 3"#);
        let files = BTreeMap::from([
            ("tokenizer.json".to_string(), json.into_bytes()),
            ("tokenizer_config.json".to_string(), br#"{"bos_token": "<e>", "eos_token": "<e>"}"#.to_vec()),
        ]);
        let config = Value::Null;
        let e = tokenizer_spec(Path::new("dir"), &files, &config).unwrap_err().to_string();
        assert!(e.contains("inconsistent"), "{e}");
        // Two tokens of one id.
        let json = TOKENIZER.replace("NORM", "null").replace("DEC", "null").replace(r#""</s>": 1"#, r#""</s>": 0"#);
        let files = BTreeMap::from([("tokenizer.json".to_string(), json.into_bytes())]);
        let e = tokenizer_spec(Path::new("dir"), &files, &Value::Null).unwrap_err().to_string();
        assert!(e.contains("gives id 0 to both"), "{e}");
        for bad in [
            r#"{"type": "Precompiled"}"#,
            r#"{"type": "Sequence", "normalizers": [{"type": "Precompiled", "precompiled_charsmap": "!"}]}"#,
        ] {
            let e = spec(bad, "null").unwrap_err().to_string();
            assert!(e.contains("Precompiled"), "{e}");
        }
    }
}
